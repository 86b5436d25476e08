// Fuzz target: random bytes as the contents of a blkif shared ring (and of the indirect pages),
// under a random ABI and device geometry, through BlkifBackRing, ParseRequest and
// ParseIndirectSegments. Beyond "no crash, no sanitizer report", every accepted request is checked
// against the validation rules and every refusal against the status rules, so a validator that
// lets something through fails here.
//
// Input layout (little-endian), shorter inputs are zero-padded:
//   [0]      protocol: % 3 -> native, x86_32-abi, x86_64-abi
//   [1]      flags: bit0 read_only, bit1 discard_enabled, bits2-3 log2(lbs / 512),
//            bits4-5 log2(ring pages) % 3 (1, 2 or 4 pages), bit6 flush off, bit7 barrier off
//   [2..3]   max_indirect_segments
//   [4..11]  disk sectors
//   [12..15] ring start index (req_cons = rsp_prod_pvt at attach)
//   [16..19] req_prod written by the "guest" before the second poll
//   [20..23] rsp_event written by the "guest" before the second poll
//   [24..]   the shared ring bytes (header then entries), then the indirect pages

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <span>
#include <vector>

#include "worker/xen/blkif_abi.h"
#include "worker/xen/blkif_request.h"
#include "worker/xen/blkif_ring.h"

namespace blockplane::worker::xen {
namespace {

#define FUZZ_CHECK(cond)                                                                 \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

constexpr size_t kHeaderSize = 24;

template <typename T>
T Load(const uint8_t* data, size_t size, size_t offset) {
  uint8_t bytes[sizeof(T)] = {};
  for (size_t i = 0; i < sizeof(T); ++i) {
    if (offset + i < size) bytes[i] = data[offset + i];
  }
  T value;
  std::memcpy(&value, bytes, sizeof(T));
  return value;
}

uint32_t LbsSectors(const DeviceGeometry& g) { return g.logical_block_size / kSectorSize; }

bool InsideDisk(uint64_t sector, uint64_t count, uint64_t disk) {
  return sector <= disk && count <= disk - sector;
}

void CheckSegment(const BlkifSegment& s, const DeviceGeometry& g) {
  FUZZ_CHECK(s.first_sect <= s.last_sect);
  FUZZ_CHECK(s.last_sect < kSectorsPerPage);
  FUZZ_CHECK(s.first_sect % LbsSectors(g) == 0);
  FUZZ_CHECK(s.sectors() % LbsSectors(g) == 0);
}

void CheckRefusal(const RequestError& e) {
  FUZZ_CHECK(static_cast<size_t>(e.reason) < kInvalidReasonCount);
  const bool unsupported =
      e.reason == InvalidReason::kUnknownOperation || e.reason == InvalidReason::kNotAdvertised;
  FUZZ_CHECK(e.status == (unsupported ? BLKIF_RSP_EOPNOTSUPP : BLKIF_RSP_ERROR));
}

// Every accepted request obeys every rule; every refusal carries a coherent status.
void CheckParsed(const Parsed<BlkifRequest>& parsed, const DeviceGeometry& g) {
  if (!parsed.ok()) {
    CheckRefusal(parsed.error());
    return;
  }
  const BlkifRequest& r = parsed.value();
  switch (r.operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
    case BLKIF_OP_WRITE_BARRIER:
    case BLKIF_OP_FLUSH_DISKCACHE: {
      FUZZ_CHECK(r.nr_segments <= BLKIF_MAX_SEGMENTS_PER_REQUEST);
      FUZZ_CHECK(r.nr_segments >= 1 || r.operation == BLKIF_OP_FLUSH_DISKCACHE);
      uint64_t sectors = 0;
      for (int i = 0; i < r.nr_segments; ++i) {
        CheckSegment(r.segments[i], g);
        sectors += r.segments[i].sectors();
      }
      FUZZ_CHECK(r.transfer_bytes == sectors * kSectorSize);
      if (sectors > 0) {
        FUZZ_CHECK(InsideDisk(r.sector_number, sectors, g.sectors));
        FUZZ_CHECK(r.sector_number % LbsSectors(g) == 0);
      }
      FUZZ_CHECK(!g.read_only || r.operation == BLKIF_OP_READ);
      FUZZ_CHECK(g.flush_enabled || r.operation != BLKIF_OP_FLUSH_DISKCACHE);
      FUZZ_CHECK(g.barrier_enabled || r.operation != BLKIF_OP_WRITE_BARRIER);
      break;
    }
    case BLKIF_OP_INDIRECT: {
      FUZZ_CHECK(r.indirect.op == BLKIF_OP_READ || r.indirect.op == BLKIF_OP_WRITE);
      FUZZ_CHECK(r.nr_segments >= 1);
      FUZZ_CHECK(r.nr_segments <= g.max_indirect_segments);
      FUZZ_CHECK(r.nr_segments <= kMaxIndirectSegmentsProtocol);
      FUZZ_CHECK(r.indirect.nr_pages ==
                 (r.nr_segments + kSegmentsPerIndirectPage - 1) / kSegmentsPerIndirectPage);
      FUZZ_CHECK(r.indirect.nr_pages <= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
      FUZZ_CHECK(r.sector_number < g.sectors);
      FUZZ_CHECK(!g.read_only || r.indirect.op == BLKIF_OP_READ);
      break;
    }
    case BLKIF_OP_DISCARD:
      FUZZ_CHECK(g.discard_enabled && !g.read_only);
      FUZZ_CHECK(r.discard.nr_sectors > 0);
      FUZZ_CHECK(InsideDisk(r.discard.sector, r.discard.nr_sectors, g.sectors));
      FUZZ_CHECK(r.transfer_bytes == 0);
      break;
    default:
      FUZZ_CHECK(false && "accepted an unknown operation");
  }
}

void CheckIndirect(const BlkifRequest& r, const Parsed<IndirectSegments>& parsed,
                   const std::vector<BlkifSegment>& segments, const DeviceGeometry& g) {
  if (!parsed.ok()) {
    CheckRefusal(parsed.error());
    FUZZ_CHECK(parsed.error().id == r.id);
    return;
  }
  FUZZ_CHECK(parsed.value().nr_segments == r.nr_segments);
  uint64_t sectors = 0;
  for (uint32_t i = 0; i < parsed.value().nr_segments; ++i) {
    CheckSegment(segments[i], g);
    sectors += segments[i].sectors();
  }
  FUZZ_CHECK(parsed.value().transfer_bytes == sectors * kSectorSize);
  FUZZ_CHECK(InsideDisk(r.sector_number, sectors, g.sectors));
}

// The worker parses each request into one BlkifRequest per queue, reused from request to request
// (ValidateRequestInto), which may hold the previous request's fields. Whatever that left behind,
// the result must be the fresh parse's: the same refusal, or the same request in every field the
// backend reads (segments up to nr_segments, grefs up to nr_pages).
void CheckReusedParse(Protocol protocol, std::span<const uint8_t> slot,
                      const DeviceGeometry& geometry, const Parsed<BlkifRequest>& fresh,
                      BlkifRequest& reused) {
  const RequestSlotCopy copy = CopyRequestSlot(protocol, slot);
  const std::optional<RequestError> error = ValidateRequestInto(
      protocol, std::span<const uint8_t>(copy.bytes.data(), copy.size), geometry, &reused);
  FUZZ_CHECK(error.has_value() == !fresh.ok());
  if (error) {
    const RequestError& want = fresh.error();
    FUZZ_CHECK(error->id == want.id && error->operation == want.operation &&
               error->status == want.status && error->reason == want.reason);
    return;
  }
  const BlkifRequest& want = fresh.value();
  FUZZ_CHECK(reused.operation == want.operation && reused.id == want.id &&
             reused.handle == want.handle && reused.sector_number == want.sector_number &&
             reused.nr_segments == want.nr_segments &&
             reused.transfer_bytes == want.transfer_bytes &&
             reused.data_operation() == want.data_operation());
  if (!want.is_indirect() && want.operation != BLKIF_OP_DISCARD) {
    for (int i = 0; i < want.nr_segments; ++i) {
      FUZZ_CHECK(reused.segments[i].gref == want.segments[i].gref &&
                 reused.segments[i].first_sect == want.segments[i].first_sect &&
                 reused.segments[i].last_sect == want.segments[i].last_sect);
    }
  }
  FUZZ_CHECK(reused.indirect.op == want.indirect.op &&
             reused.indirect.nr_pages == want.indirect.nr_pages);
  for (int i = 0; i < want.indirect.nr_pages; ++i) {
    FUZZ_CHECK(reused.indirect.grefs[i] == want.indirect.grefs[i]);
  }
  FUZZ_CHECK(reused.discard.sector == want.discard.sector &&
             reused.discard.nr_sectors == want.discard.nr_sectors &&
             reused.discard.secure == want.discard.secure);
}

void RunOne(const uint8_t* data, size_t size) {
  constexpr Protocol kProtocols[] = {Protocol::kNative, Protocol::kX86_32, Protocol::kX86_64};
  const Protocol protocol = kProtocols[Load<uint8_t>(data, size, 0) % 3];
  const uint8_t flags = Load<uint8_t>(data, size, 1);
  DeviceGeometry geometry;
  geometry.read_only = flags & 1;
  geometry.discard_enabled = flags & 2;
  geometry.flush_enabled = !(flags & 0x40);
  geometry.barrier_enabled = !(flags & 0x80);
  geometry.logical_block_size = kSectorSize << ((flags >> 2) & 3);
  const size_t ring_pages = size_t{1} << (((flags >> 4) & 3) % 3);
  geometry.max_indirect_segments = Load<uint16_t>(data, size, 2);
  geometry.sectors = Load<uint64_t>(data, size, 4);
  const RingIdx start = Load<uint32_t>(data, size, 12);
  const RingIdx req_prod_2 = Load<uint32_t>(data, size, 16);
  const RingIdx rsp_event_2 = Load<uint32_t>(data, size, 20);
  const uint8_t* body = data + std::min(size, kHeaderSize);
  const size_t body_size = size - std::min(size, kHeaderSize);

  // The body as a lone slot, under every ABI (cheap breadth for the parser alone), also parsed
  // into a request that holds the previous ABI's parse.
  BlkifRequest reused;
  for (Protocol p : kProtocols) {
    const std::span<const uint8_t> lone(body, body_size);
    const Parsed<BlkifRequest> parsed = ParseRequest(p, lone, geometry);
    CheckParsed(parsed, geometry);
    CheckReusedParse(p, lone, geometry, parsed, reused);
  }

  // The shared ring, then up to 8 indirect pages, from the body.
  std::vector<uint8_t> ring_bytes(ring_pages * kXenPageSize, 0);
  std::memcpy(ring_bytes.data(), body, std::min(body_size, ring_bytes.size()));
  std::vector<uint8_t> indirect_pages(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * kXenPageSize, 0);
  if (body_size > ring_bytes.size()) {
    std::memcpy(indirect_pages.data(), body + ring_bytes.size(),
                std::min(body_size - ring_bytes.size(), indirect_pages.size()));
  }
  std::vector<BlkifSegment> segments(kMaxIndirectSegmentsProtocol);

  auto ring = BlkifBackRing::Attach(protocol, ring_bytes, start);
  FUZZ_CHECK(ring.ok());
  FUZZ_CHECK(ring->size() == RingEntries(protocol, ring_bytes.size()));
  for (int round = 0; round < 3; ++round) {
    if (round == 1) {
      std::memcpy(ring_bytes.data() + 0, &req_prod_2, sizeof(req_prod_2));
      std::memcpy(ring_bytes.data() + 12, &rsp_event_2, sizeof(rsp_event_2));
    }
    auto available = ring->PollRequests();
    if (!available.ok()) {
      FUZZ_CHECK(ring->broken());
      FUZZ_CHECK(!ring->NextRequestSlot().has_value());
      break;
    }
    FUZZ_CHECK(*available <= ring->size());
    uint32_t taken = 0;
    while (auto slot = ring->NextRequestSlot()) {
      ++taken;
      FUZZ_CHECK(slot->size() == LayoutOf(protocol).request_size);
      FUZZ_CHECK(slot->data() >= ring_bytes.data() + kSringHeaderSize);
      FUZZ_CHECK(slot->data() + slot->size() <= ring_bytes.data() + ring_bytes.size());
      FUZZ_CHECK(ring->outstanding() <= ring->size());
      auto parsed = ParseRequest(protocol, *slot, geometry);
      CheckParsed(parsed, geometry);
      CheckReusedParse(protocol, *slot, geometry, parsed, reused);
      uint64_t id = 0;
      uint8_t op = 0;
      int16_t status = BLKIF_RSP_OKAY;
      if (parsed.ok()) {
        id = parsed.value().id;
        op = parsed.value().data_operation();
        if (parsed.value().is_indirect()) {
          const size_t mapped = size_t{parsed.value().indirect.nr_pages} * kXenPageSize;
          auto indirect = ParseIndirectSegments(
              parsed.value(), std::span<const uint8_t>(indirect_pages).first(mapped), geometry,
              segments);
          CheckIndirect(parsed.value(), indirect, segments, geometry);
          if (!indirect.ok()) status = indirect.error().status;
        }
      } else {
        id = parsed.error().id;
        op = parsed.error().operation;
        status = parsed.error().status;
      }
      // Leave every other request of the first round unanswered, to exercise outstanding().
      if (round > 0 || taken % 2 == 0) FUZZ_CHECK(ring->WriteResponse(id, op, status).ok());
    }
    FUZZ_CHECK(taken == *available);
    ring->PushResponsesAndCheckNotify();
    ring->FinalCheckForRequests();
  }
}

}  // namespace
}  // namespace blockplane::worker::xen

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  blockplane::worker::xen::RunOne(data, size);
  return 0;
}
