#include "worker/xen/blkif_request.h"

#include <algorithm>
#include <cstring>
#include <optional>

namespace blockplane::worker::xen {
namespace {

// After copying out of shared memory: forbid the compiler from satisfying later reads of the copy
// by re-reading the source (the guest may have changed it). Same role as barrier() after the
// copy in QEMU's blkif_get_x86_*_req and READ_ONCE in blkback.
inline void CompilerBarrier() { __asm__ __volatile__("" ::: "memory"); }

// The fields of any ABI's request, decoded from the private copy. The segment descriptors and
// indirect grefs are not decoded: they are read straight from the copy (`segments`,
// `indirect_grefs` point into it), only as many as the request uses.
struct Decoded {
  uint8_t operation = 0;
  uint64_t id = 0;
  // READ/WRITE/WRITE_BARRIER/FLUSH_DISKCACHE
  uint8_t nr_segments = 0;
  uint16_t handle = 0;
  uint64_t sector_number = 0;
  const uint8_t* segments = nullptr;  // BLKIF_MAX_SEGMENTS_PER_REQUEST blkif_request_segment
  // DISCARD
  uint8_t discard_flag = 0;
  uint16_t discard_handle = 0;
  uint64_t discard_sector = 0;
  uint64_t discard_nr_sectors = 0;
  // INDIRECT
  uint8_t indirect_op = 0;
  uint16_t indirect_nr_segments = 0;
  uint16_t indirect_handle = 0;
  uint64_t indirect_sector = 0;
  const uint8_t* indirect_grefs = nullptr;  // BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST grant_ref_t
};

// Decodes one ABI family. `bytes` is the private copy, at least sizeof(Rw) long; the discard and
// indirect variants are not larger than the read-write one.
template <typename Rw, typename Discard, typename Indirect>
Decoded DecodeAs(const uint8_t* bytes) {
  static_assert(sizeof(Discard) <= sizeof(Rw) && sizeof(Indirect) <= sizeof(Rw));
  static_assert(offsetof(Rw, id) == offsetof(Discard, id));
  static_assert(offsetof(Rw, id) == offsetof(Indirect, id));
  Decoded d;
  Rw rw;
  std::memcpy(&rw, bytes, sizeof(rw));
  d.operation = rw.operation;
  d.id = rw.id;  // same offset in every variant of one ABI
  switch (rw.operation) {
    case BLKIF_OP_DISCARD: {
      Discard discard;
      std::memcpy(&discard, bytes, sizeof(discard));
      d.discard_flag = discard.flag;
      d.discard_handle = discard.handle;
      d.discard_sector = discard.sector_number;
      d.discard_nr_sectors = discard.nr_sectors;
      break;
    }
    case BLKIF_OP_INDIRECT: {
      Indirect indirect;
      std::memcpy(&indirect, bytes, sizeof(indirect));
      d.indirect_op = indirect.indirect_op;
      d.indirect_nr_segments = indirect.nr_segments;
      d.indirect_handle = indirect.handle;
      d.indirect_sector = indirect.sector_number;
      d.indirect_grefs = bytes + offsetof(Indirect, indirect_grefs);
      break;
    }
    default:
      d.nr_segments = rw.nr_segments;
      d.handle = rw.handle;
      d.sector_number = rw.sector_number;
      d.segments = bytes + offsetof(Rw, seg);
      break;
  }
  return d;
}

Decoded Decode(Protocol protocol, const uint8_t* bytes) {
  switch (protocol) {
    case Protocol::kX86_32:
      return DecodeAs<blkif_x86_32_request, blkif_x86_32_request_discard,
                      blkif_x86_32_request_indirect>(bytes);
    case Protocol::kX86_64:
      return DecodeAs<blkif_x86_64_request, blkif_x86_64_request_discard,
                      blkif_x86_64_request_indirect>(bytes);
    case Protocol::kNative:
    default:
      return DecodeAs<struct blkif_request, struct blkif_request_discard,
                      struct blkif_request_indirect>(bytes);
  }
}

RequestError Refuse(uint64_t id, uint8_t operation, InvalidReason reason) {
  const bool unsupported =
      reason == InvalidReason::kUnknownOperation || reason == InvalidReason::kNotAdvertised;
  return RequestError{
      .id = id,
      .operation = operation,
      .status = static_cast<int16_t>(unsupported ? BLKIF_RSP_EOPNOTSUPP : BLKIF_RSP_ERROR),
      .reason = reason};
}

uint32_t LbsSectors(const DeviceGeometry& geometry) {
  // Anything but 1024/2048/4096 is treated as 512: the geometry is ours, not the guest's.
  switch (geometry.logical_block_size) {
    case 1024:
      return 2;
    case 2048:
      return 4;
    case 4096:
      return 8;
    default:
      return 1;
  }
}

uint32_t MaxIndirectSegments(const DeviceGeometry& geometry) {
  return std::min(geometry.max_indirect_segments, kMaxIndirectSegmentsProtocol);
}

// [sector, sector + count) inside a disk of `disk_sectors`, without overflow (xen_vbd_translate).
bool RangeInsideDisk(uint64_t sector, uint64_t count, uint64_t disk_sectors) {
  return sector <= disk_sectors && count <= disk_sectors - sector;
}

// Segment rule of dispatch_rw_block_io: last_sect within the page and first <= last; plus the
// logical block size alignment of the start and length ("Misaligned I/O request").
// `lbs_mask`: logical block size in sectors minus one (a power of two, see LbsSectors).
std::optional<InvalidReason> CheckSegment(const BlkifSegment& seg, uint32_t lbs_mask) {
  if (seg.last_sect >= kSectorsPerPage || seg.last_sect < seg.first_sect) {
    return InvalidReason::kBadFirstLastSect;
  }
  if ((seg.first_sect & lbs_mask) != 0 || (seg.sectors() & lbs_mask) != 0) {
    return InvalidReason::kMisaligned;
  }
  return std::nullopt;
}

// The Validate* functions fill the caller's `request` (which may hold a previous request: every
// scalar field is written; segments past nr_segments and grefs past indirect.nr_pages are left
// as they were) or return the error to answer with.
std::optional<RequestError> ValidateDirect(const Decoded& d, const DeviceGeometry& geometry,
                                           BlkifRequest& request) {
  const uint32_t lbs_mask = LbsSectors(geometry) - 1;
  if ((d.operation == BLKIF_OP_FLUSH_DISKCACHE && !geometry.flush_enabled) ||
      (d.operation == BLKIF_OP_WRITE_BARRIER && !geometry.barrier_enabled)) {
    return Refuse(d.id, d.operation, InvalidReason::kNotAdvertised);
  }
  // Only FLUSH_DISKCACHE may carry no data (blkback: nseg == 0 only with a pure REQ_PREFLUSH;
  // WRITE_BARRIER is PREFLUSH|FUA of data and needs segments).
  if ((d.nr_segments == 0 && d.operation != BLKIF_OP_FLUSH_DISKCACHE) ||
      d.nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST) {
    return Refuse(d.id, d.operation, InvalidReason::kBadNrSegments);
  }
  // The descriptors in use, from the private copy into the request (same layout), checked there.
  // One fixed-size copy each (a single load and store; a variable-length memcpy of the whole
  // array compiles to a slow-starting rep movs).
  uint64_t total_sectors = 0;
  for (uint32_t i = 0; i < d.nr_segments; ++i) {
    BlkifSegment& seg = request.segments[i];
    std::memcpy(&seg, d.segments + size_t{i} * sizeof(BlkifSegment), sizeof(BlkifSegment));
    if (auto reason = CheckSegment(seg, lbs_mask)) return Refuse(d.id, d.operation, *reason);
    total_sectors += seg.sectors();  // <= 11 * 8: cannot overflow
  }
  if (d.nr_segments > 0 && (d.sector_number & lbs_mask) != 0) {
    return Refuse(d.id, d.operation, InvalidReason::kMisaligned);
  }
  // xen_vbd_translate: anything but a read is a write to the vbd (flush and barrier included).
  if (d.operation != BLKIF_OP_READ && geometry.read_only) {
    return Refuse(d.id, d.operation, InvalidReason::kReadOnlyWrite);
  }
  // A flush without data has no range (blkback checks the range only when nr_sects != 0).
  if (total_sectors > 0 && !RangeInsideDisk(d.sector_number, total_sectors, geometry.sectors)) {
    return Refuse(d.id, d.operation, InvalidReason::kBadSectorRange);
  }
  request.operation = d.operation;
  request.id = d.id;
  request.handle = d.handle;
  request.sector_number = d.sector_number;
  request.nr_segments = d.nr_segments;
  request.indirect.op = 0;
  request.indirect.nr_pages = 0;
  request.discard = {};
  request.transfer_bytes = total_sectors * kSectorSize;
  return std::nullopt;
}

std::optional<RequestError> ValidateIndirect(const Decoded& d, const DeviceGeometry& geometry,
                                             BlkifRequest& request) {
  // Responses to an indirect request echo the data operation, as blkback's fail_response does.
  const uint8_t echo = d.indirect_op;
  if (d.indirect_op != BLKIF_OP_READ && d.indirect_op != BLKIF_OP_WRITE) {
    return Refuse(d.id, echo, InvalidReason::kBadIndirect);
  }
  const uint32_t max_segments = MaxIndirectSegments(geometry);
  if (max_segments == 0) return Refuse(d.id, echo, InvalidReason::kBadIndirect);
  if (d.indirect_nr_segments == 0 || d.indirect_nr_segments > max_segments) {
    return Refuse(d.id, echo, InvalidReason::kBadNrSegments);
  }
  if ((d.indirect_sector & (LbsSectors(geometry) - 1)) != 0) {
    return Refuse(d.id, echo, InvalidReason::kMisaligned);
  }
  if (d.indirect_op == BLKIF_OP_WRITE && geometry.read_only) {
    return Refuse(d.id, echo, InvalidReason::kReadOnlyWrite);
  }
  // The length is known only from the descriptors; here at least one sector must fit.
  // ParseIndirectSegments checks the whole range.
  if (!RangeInsideDisk(d.indirect_sector, 1, geometry.sectors)) {
    return Refuse(d.id, echo, InvalidReason::kBadSectorRange);
  }
  request.operation = BLKIF_OP_INDIRECT;
  request.id = d.id;
  request.handle = d.indirect_handle;
  request.sector_number = d.indirect_sector;
  request.nr_segments = d.indirect_nr_segments;
  request.indirect.op = d.indirect_op;
  request.indirect.nr_pages = static_cast<uint8_t>(
      (d.indirect_nr_segments + kSegmentsPerIndirectPage - 1) / kSegmentsPerIndirectPage);
  std::memcpy(request.indirect.grefs.data(), d.indirect_grefs,
              size_t{request.indirect.nr_pages} * sizeof(grant_ref_t));
  request.discard = {};
  request.transfer_bytes = 0;
  return std::nullopt;
}

std::optional<RequestError> ValidateDiscard(const Decoded& d, const DeviceGeometry& geometry,
                                            BlkifRequest& request) {
  // Not advertised: "not supported" (blkback answers EOPNOTSUPP when the device cannot discard).
  if (!geometry.discard_enabled) {
    return Refuse(d.id, d.operation, InvalidReason::kNotAdvertised);
  }
  if (geometry.read_only) return Refuse(d.id, d.operation, InvalidReason::kReadOnlyWrite);
  if (d.discard_nr_sectors == 0) return Refuse(d.id, d.operation, InvalidReason::kBadDiscard);
  if (!RangeInsideDisk(d.discard_sector, d.discard_nr_sectors, geometry.sectors)) {
    return Refuse(d.id, d.operation, InvalidReason::kBadSectorRange);
  }
  // Alignment is not required: the block layer trims a discard to what the backend can do.
  request.operation = BLKIF_OP_DISCARD;
  request.id = d.id;
  request.handle = d.discard_handle;
  request.sector_number = d.discard_sector;
  request.nr_segments = 0;
  request.indirect.op = 0;
  request.indirect.nr_pages = 0;
  request.discard = {.sector = d.discard_sector,
                     .nr_sectors = d.discard_nr_sectors,
                     .secure = (d.discard_flag & BLKIF_DISCARD_SECURE) != 0};
  request.transfer_bytes = 0;
  return std::nullopt;
}

}  // namespace

std::string_view InvalidReasonName(InvalidReason reason) {
  switch (reason) {
    case InvalidReason::kShortSlot:
      return "short_slot";
    case InvalidReason::kUnknownOperation:
      return "unknown_op";
    case InvalidReason::kBadNrSegments:
      return "bad_nr_segments";
    case InvalidReason::kBadFirstLastSect:
      return "bad_first_last_sect";
    case InvalidReason::kMisaligned:
      return "misaligned";
    case InvalidReason::kBadSectorRange:
      return "bad_sector_range";
    case InvalidReason::kReadOnlyWrite:
      return "readonly_write";
    case InvalidReason::kBadIndirect:
      return "bad_indirect";
    case InvalidReason::kNotAdvertised:
      return "not_advertised";
    case InvalidReason::kBadDiscard:
      return "bad_discard";
  }
  return "unknown";
}

RequestSlotCopy CopyRequestSlot(Protocol protocol, std::span<const uint8_t> slot) {
  RequestSlotCopy copy;
  copy.protocol = protocol;
  copy.size = std::min(slot.size(), LayoutOf(protocol).request_size);
  if (copy.size > 0) std::memcpy(copy.bytes.data(), slot.data(), copy.size);  // data() may be null
  CompilerBarrier();
  return copy;
}

std::optional<RequestError> ValidateRequestInto(Protocol protocol, std::span<const uint8_t> copy,
                                                const DeviceGeometry& geometry, BlkifRequest* out) {
  if (copy.size() < LayoutOf(protocol).request_size) {
    return Refuse(0, 0, InvalidReason::kShortSlot);
  }
  const Decoded d = Decode(protocol, copy.data());
  switch (d.operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
    case BLKIF_OP_WRITE_BARRIER:
    case BLKIF_OP_FLUSH_DISKCACHE:
      return ValidateDirect(d, geometry, *out);
    case BLKIF_OP_INDIRECT:
      return ValidateIndirect(d, geometry, *out);
    case BLKIF_OP_DISCARD:
      return ValidateDiscard(d, geometry, *out);
    default:  // including BLKIF_OP_RESERVED_1
      return Refuse(d.id, d.operation, InvalidReason::kUnknownOperation);
  }
}

Parsed<BlkifRequest> ValidateRequest(const RequestSlotCopy& copy, const DeviceGeometry& geometry) {
  BlkifRequest request;
  if (std::optional<RequestError> error =
          ValidateRequestInto(copy.protocol, std::span<const uint8_t>(copy.bytes.data(), copy.size),
                              geometry, &request)) {
    return *error;
  }
  return request;
}

Parsed<BlkifRequest> ParseRequest(Protocol protocol, std::span<const uint8_t> slot,
                                  const DeviceGeometry& geometry) {
  return ValidateRequest(CopyRequestSlot(protocol, slot), geometry);
}

Parsed<IndirectSegments> ParseIndirectSegments(const BlkifRequest& request,
                                               std::span<const uint8_t> indirect_pages,
                                               const DeviceGeometry& geometry,
                                               std::span<BlkifSegment> segments_out) {
  const uint8_t echo = request.data_operation();
  const uint32_t count = request.nr_segments;
  if (!request.is_indirect() || count == 0 || count > MaxIndirectSegments(geometry) ||
      segments_out.size() < count ||
      indirect_pages.size() < size_t{count} * sizeof(struct blkif_request_segment)) {
    return Refuse(request.id, echo, InvalidReason::kBadIndirect);
  }
  std::memcpy(segments_out.data(), indirect_pages.data(),
              size_t{count} * sizeof(struct blkif_request_segment));
  CompilerBarrier();

  const uint32_t lbs_mask = LbsSectors(geometry) - 1;
  uint64_t total_sectors = 0;
  for (uint32_t i = 0; i < count; ++i) {
    if (auto reason = CheckSegment(segments_out[i], lbs_mask)) {
      return Refuse(request.id, echo, *reason);
    }
    total_sectors += segments_out[i].sectors();  // <= 4096 * 8: cannot overflow
  }
  if (!RangeInsideDisk(request.sector_number, total_sectors, geometry.sectors)) {
    return Refuse(request.id, echo, InvalidReason::kBadSectorRange);
  }
  return IndirectSegments{.nr_segments = count, .transfer_bytes = total_sectors * kSectorSize};
}

}  // namespace blockplane::worker::xen
