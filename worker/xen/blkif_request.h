#pragma once

// Parsing and validation of blkif requests taken from a shared ring. Pure code over spans: no Xen
// calls, no I/O, no allocation, no logging; safe to call on any thread (no shared state).
//
// Guest memory is hostile input and may change under us at any time. The contract is therefore:
//   - ParseRequest() copies the slot out of shared memory exactly once (one memcpy of the request
//     size of the ABI, followed by a compiler barrier so that the compiler cannot re-read the
//     shared bytes instead of the copy) and validates only that copy. Every field of the returned
//     BlkifRequest comes from the copy, so what was validated is what gets executed.
//   - ParseIndirectSegments() does the same for the segment descriptors in the indirect pages.
//   - An invalid request is not an error of the backend: the result carries the guest's id, the
//     operation to echo and the BLKIF_RSP_* status to answer with, plus an InvalidReason for the
//     per-reason counters. The backend answers it and carries on.
//
// Validation follows Linux xen-blkback (dispatch_rw_block_io, dispatch_discard_io,
// xen_vbd_translate) and QEMU xen-block; see the comments at each rule in blkif_request.cc.

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <utility>
#include <variant>

#include "worker/xen/blkif_abi.h"

namespace blockplane::worker::xen {

// What the backend advertised and knows about the disk; validation checks requests against it.
struct DeviceGeometry {
  uint64_t sectors = 0;  // disk size in 512-byte units (the xenstore "sectors" key)
  bool read_only = false;
  // feature-max-indirect-segments; 0 means indirect requests were not advertised and are invalid.
  // Values above the protocol limit (8 pages x 512) are clamped to it.
  uint32_t max_indirect_segments = 0;
  bool discard_enabled = false;
  // feature-flush-cache / feature-barrier. A FLUSH_DISKCACHE or WRITE_BARRIER that was not
  // advertised is answered EOPNOTSUPP, as blkback answers when the device cannot flush.
  bool flush_enabled = true;
  bool barrier_enabled = true;
  // sector-size: 512, 1024, 2048 or 4096. Requests must be aligned to it (start sector and every
  // segment), as blkback requires; with 4096 every segment is a whole page (first 0, last 7).
  uint32_t logical_block_size = kSectorSize;
};

// Why a request was refused. Stable names (InvalidReasonName) are metric label values.
enum class InvalidReason : uint8_t {
  kShortSlot,         // slot span smaller than the ABI's request (caller bug, not the guest)
  kUnknownOperation,  // not READ/WRITE/WRITE_BARRIER/FLUSH_DISKCACHE/DISCARD/INDIRECT
  kBadNrSegments,     // 0 (except FLUSH_DISKCACHE), > 11 direct, > max indirect
  kBadFirstLastSect,  // first_sect > last_sect or last_sect > 7
  kMisaligned,        // start sector or a segment not aligned to logical_block_size
  kBadSectorRange,    // [sector, sector + n) not inside the disk, or overflows
  kReadOnlyWrite,     // write, barrier, flush or discard to a read-only device
  kBadIndirect,       // indirect_op not READ/WRITE, indirect not advertised, pages too short
  kNotAdvertised,     // DISCARD, FLUSH_DISKCACHE or WRITE_BARRIER whose feature key is off
  kBadDiscard,        // DISCARD of 0 sectors
};
inline constexpr size_t kInvalidReasonCount = 10;

// "short_slot", "unknown_op", "bad_nr_segments", "bad_first_last_sect", "misaligned",
// "bad_sector_range", "readonly_write", "bad_indirect", "not_advertised", "bad_discard".
std::string_view InvalidReasonName(InvalidReason reason);

// The answer owed to the guest for a request that was refused.
struct RequestError {
  uint64_t id = 0;        // the guest's id, echoed in the response
  uint8_t operation = 0;  // echoed in the response: indirect_op for INDIRECT (as blkback)
  int16_t status = BLKIF_RSP_ERROR;  // BLKIF_RSP_EOPNOTSUPP for unknown / unadvertised ops
  InvalidReason reason = InvalidReason::kUnknownOperation;
};

// One data segment: a granted 4 KiB page and the 512-byte sectors [first_sect, last_sect] in it.
// Same layout as struct blkif_request_segment, so indirect descriptors are copied in one memcpy.
struct BlkifSegment {
  grant_ref_t gref = 0;
  uint8_t first_sect = 0;
  uint8_t last_sect = 0;

  uint32_t sectors() const { return uint32_t{last_sect} - first_sect + 1; }
  uint32_t offset_bytes() const { return uint32_t{first_sect} * kSectorSize; }
  uint32_t length_bytes() const { return sectors() * kSectorSize; }
};
static_assert(sizeof(BlkifSegment) == sizeof(struct blkif_request_segment));
static_assert(offsetof(BlkifSegment, first_sect) == offsetof(blkif_request_segment, first_sect));
static_assert(offsetof(BlkifSegment, last_sect) == offsetof(blkif_request_segment, last_sect));

struct BlkifIndirect {
  uint8_t op = 0;        // BLKIF_OP_READ or BLKIF_OP_WRITE
  uint8_t nr_pages = 0;  // ceil(nr_segments / 512), 1..8
  std::array<grant_ref_t, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST> grefs{};  // first nr_pages valid
};

struct BlkifDiscard {
  uint64_t sector = 0;
  uint64_t nr_sectors = 0;
  bool secure = false;  // BLKIF_DISCARD_SECURE; honour only if discard-secure was advertised
};

// A validated request, independent of the ABI it came in.
struct BlkifRequest {
  uint8_t operation = 0;  // BLKIF_OP_* as on the ring (INDIRECT stays INDIRECT)
  uint64_t id = 0;
  uint16_t handle = 0;
  uint64_t sector_number = 0;  // start, 512-byte units (DISCARD: same as discard.sector)
  // Direct: entries used in `segments` (0..11). INDIRECT: descriptors in the indirect pages.
  uint16_t nr_segments = 0;
  std::array<BlkifSegment, BLKIF_MAX_SEGMENTS_PER_REQUEST> segments{};  // direct requests only
  BlkifIndirect indirect;                                               // INDIRECT only
  BlkifDiscard discard;                                                 // DISCARD only
  // Bytes moved between guest pages and the disk: 0 for FLUSH without segments and for DISCARD;
  // for INDIRECT 0 until ParseIndirectSegments() has read the descriptors.
  uint64_t transfer_bytes = 0;

  bool is_indirect() const { return operation == BLKIF_OP_INDIRECT; }
  // The data operation: indirect.op for INDIRECT, else operation. Also what the response echoes.
  uint8_t data_operation() const { return is_indirect() ? indirect.op : operation; }
};

// Either a value or the RequestError to answer with.
template <typename T>
class Parsed {
 public:
  Parsed(T value) : v_(std::move(value)) {}             // NOLINT: implicit on purpose
  Parsed(RequestError error) : v_(std::move(error)) {}  // NOLINT
  bool ok() const { return v_.index() == 0; }
  const T& value() const { return std::get<0>(v_); }
  const RequestError& error() const { return std::get<1>(v_); }

 private:
  std::variant<T, RequestError> v_;
};

// Largest request of any ABI (the x86_64 / native read-write layout).
inline constexpr size_t kMaxRequestSize = 112;
static_assert(LayoutOf(Protocol::kNative).request_size <= kMaxRequestSize);
static_assert(LayoutOf(Protocol::kX86_32).request_size <= kMaxRequestSize);
static_assert(LayoutOf(Protocol::kX86_64).request_size <= kMaxRequestSize);

// A request slot copied out of shared memory: the only bytes validation ever looks at.
struct RequestSlotCopy {
  Protocol protocol = Protocol::kNative;
  size_t size = 0;  // bytes copied: the ABI's request size, or less if the slot span was short
  std::array<uint8_t, kMaxRequestSize> bytes{};
};

// Step 1: one memcpy out of `slot` (a ring slot in shared memory). Never reads `slot` afterwards.
RequestSlotCopy CopyRequestSlot(Protocol protocol, std::span<const uint8_t> slot);

// Step 2: decode and validate the private copy.
Parsed<BlkifRequest> ValidateRequest(const RequestSlotCopy& copy, const DeviceGeometry& geometry);

// ValidateRequest for the data path, over bytes that are already a private copy of the slot (the
// blkif journal entry the backend copied the slot into: its one fetch from guest memory), so
// nothing is copied again. The caller must make sure that the compiler cannot satisfy reads of
// `copy` from the guest's slot (a compiler barrier after its copy; this function is not inline).
// Writes the request into `*out`, a caller-owned object reused from request to request (no
// per-request construction): every scalar field is written; `segments` past nr_segments and
// `indirect.grefs` past nr_pages keep whatever they held. On error returns the answer owed to
// the guest and leaves `*out` unspecified. Same checks and results as ValidateRequest.
std::optional<RequestError> ValidateRequestInto(Protocol protocol, std::span<const uint8_t> copy,
                                                const DeviceGeometry& geometry, BlkifRequest* out);

// CopyRequestSlot + ValidateRequest: one slot straight from shared memory (tests, fuzzing).
Parsed<BlkifRequest> ParseRequest(Protocol protocol, std::span<const uint8_t> slot,
                                  const DeviceGeometry& geometry);

struct IndirectSegments {
  uint32_t nr_segments = 0;     // entries written to the caller's segment array
  uint64_t transfer_bytes = 0;  // sum of segment lengths
};

// For an INDIRECT request accepted by ParseRequest (same geometry): copies request.nr_segments
// descriptors out of `indirect_pages` (the request's indirect grefs, mapped contiguously in
// order; at least nr_segments * 8 bytes) with one memcpy into `segments_out`, then validates the
// copies (first/last sect, alignment, whole sector range inside the disk).
//
// `segments_out` is caller-owned private memory (the per-request segment array, sized for the
// advertised max_indirect_segments): an out-parameter on purpose, so the data path does not
// allocate. On error its contents are unspecified. The error carries request.id.
Parsed<IndirectSegments> ParseIndirectSegments(const BlkifRequest& request,
                                               std::span<const uint8_t> indirect_pages,
                                               const DeviceGeometry& geometry,
                                               std::span<BlkifSegment> segments_out);

}  // namespace blockplane::worker::xen
