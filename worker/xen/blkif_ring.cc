#include "worker/xen/blkif_ring.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"

namespace blockplane::worker::xen {
namespace {

constexpr size_t kReqProdOffset = offsetof(struct blkif_sring, req_prod);
constexpr size_t kReqEventOffset = offsetof(struct blkif_sring, req_event);
constexpr size_t kRspProdOffset = offsetof(struct blkif_sring, rsp_prod);
constexpr size_t kRspEventOffset = offsetof(struct blkif_sring, rsp_event);

static_assert(std::atomic_ref<uint32_t>::required_alignment <= alignof(uint32_t));
static_assert(std::atomic_ref<uint32_t>::is_always_lock_free);

// Every ABI lays a response out alike: id at 0, operation at 8, one pad byte, status at 10; the
// 64-bit layouts pad to 16 bytes. WriteResponse() writes it with two fixed-size stores built in
// registers: composing it in a stack buffer first and copying a variable length from there made
// the copy's 8-byte loads wait on the buffer's narrower stores (a store-forwarding stall: 4-13%
// of the polled worker's perf samples, depending on the machine's phase). The words are built
// for a little-endian host, as every blkif ABI here is.
static_assert(std::endian::native == std::endian::little);
template <typename Response>
constexpr bool kCommonResponseLayout = offsetof(Response, id) == 0 &&
                                       offsetof(Response, operation) == 8 &&
                                       offsetof(Response, status) == 10 &&
                                       (sizeof(Response) == 12 || sizeof(Response) == 16);
static_assert(kCommonResponseLayout<blkif_x86_32_response>);
static_assert(kCommonResponseLayout<blkif_x86_64_response>);
static_assert(kCommonResponseLayout<struct blkif_response>);

}  // namespace

static_assert(kRingMarkOffset >= offsetof(struct blkif_sring, __pad) &&
              kRingMarkOffset + sizeof(uint64_t) <=
                  offsetof(struct blkif_sring, __pad) + sizeof(blkif_sring::__pad) &&
              kRingMarkOffset % alignof(uint64_t) == 0);

uint64_t ReadRingMark(std::span<const uint8_t> shared) {
  if (shared.size() < kSringHeaderSize) return 0;
  // atomic_ref needs a non-const object; the load does not write.
  return std::atomic_ref<uint64_t>(
             *reinterpret_cast<uint64_t*>(const_cast<uint8_t*>(shared.data()) + kRingMarkOffset))
      .load(std::memory_order_relaxed);
}

void WriteRingMark(std::span<uint8_t> shared, uint64_t mark) {
  if (shared.size() < kSringHeaderSize) return;
  std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(shared.data() + kRingMarkOffset))
      .store(mark, std::memory_order_relaxed);
}

uint32_t RingEntries(Protocol protocol, size_t ring_bytes) {
  if (ring_bytes <= kSringHeaderSize) return 0;
  const size_t entries = (ring_bytes - kSringHeaderSize) / LayoutOf(protocol).entry_size;
  // __RD32 rounds a 32-bit value; a ring of 2^32 entries is far beyond any mapping.
  return std::bit_floor(static_cast<uint32_t>(std::min<size_t>(entries, uint32_t{1} << 31)));
}

absl::StatusOr<BlkifBackRing> BlkifBackRing::Attach(Protocol protocol, std::span<uint8_t> shared,
                                                    RingIdx start, uint32_t taken) {
  if (reinterpret_cast<uintptr_t>(shared.data()) % alignof(uint32_t) != 0) {
    return absl::InvalidArgumentError("blkif ring: shared ring is not 4-byte aligned");
  }
  const uint32_t size = RingEntries(protocol, shared.size());
  if (size == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("blkif ring: ", shared.size(), " bytes hold no ring entry"));
  }
  if (taken > size) {
    return absl::InvalidArgumentError(
        absl::StrCat("blkif ring: ", taken, " requests taken on a ring of ", size));
  }
  return BlkifBackRing(protocol, shared, size, start, taken);
}

BlkifBackRing::BlkifBackRing(Protocol protocol, std::span<uint8_t> shared, uint32_t size,
                             RingIdx start, uint32_t taken)
    : protocol_(protocol),
      layout_(LayoutOf(protocol)),
      shared_(shared),
      size_(size),
      req_cons_(start + taken),
      rsp_prod_pvt_(start),
      req_prod_snapshot_(start + taken),
      rsp_prod_published_(start) {}

namespace {

// PREFETCHW: fetch the line in exclusive state, so that reading the request and then writing the
// response into it costs one transfer from the frontend's CPU, not two. GCC emits only
// PREFETCHT0 for __builtin_prefetch(p, 1) on baseline x86-64; CPUs without PREFETCHW treat the
// opcode as a NOP.
inline void PrefetchForWrite(const void* p) {
#if defined(__x86_64__)
  __asm__ __volatile__("prefetchw %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 1);
#endif
}

}  // namespace

uint32_t* BlkifBackRing::SharedWord(size_t offset) const {
  return reinterpret_cast<uint32_t*>(shared_.data() + offset);
}

uint32_t BlkifBackRing::UnconsumedRequests() const {
  const RingIdx req_prod =
      std::atomic_ref<uint32_t>(*SharedWord(kReqProdOffset)).load(std::memory_order_acquire);
  const uint32_t requests = req_prod - req_cons_;
  const uint32_t free_slots = size_ - outstanding();
  return std::min(requests, free_slots);
}

absl::StatusOr<uint32_t> BlkifBackRing::PollRequests() {
  if (broken_) return broken_status_;
  // One read of the producer index; the slot reads it covers are ordered after it (xen_rmb).
  const RingIdx req_prod =
      std::atomic_ref<uint32_t>(*SharedWord(kReqProdOffset)).load(std::memory_order_acquire);
  const uint32_t available = req_prod - req_cons_;
  // A frontend can have at most size_ requests without a response (RING_FREE_REQUESTS), so
  // req_prod - rsp_prod_pvt <= size_ (RING_REQUEST_PROD_OVERFLOW). Phrased on `available` the
  // same test also catches a req_prod moved behind req_cons (it wraps to a huge count).
  if (available > size_ - outstanding()) {
    broken_ = true;
    broken_status_ = absl::DataLossError(absl::StrCat(
        "blkif ring: frontend published bogus requests: req_prod=", req_prod,
        " req_cons=", req_cons_, " rsp_prod_pvt=", rsp_prod_pvt_, " ring_size=", size_));
    return broken_status_;
  }
  req_prod_snapshot_ = req_prod;
  // The frontend wrote these slots on another CPU: start fetching all their cache lines now, so
  // the misses overlap instead of stalling one by one in ParseRequest's copy. The first line of
  // each slot is also where its response will go, hence the write hint. A prefetch is a hint,
  // not a read the parser relies on: the single copy in ParseRequest stays the only read.
  for (uint32_t i = 0; i < std::min<uint32_t>(available, kPrefetchSlots); ++i) {
    const uint8_t* slot = shared_.data() + kSringHeaderSize +
                          size_t{(req_cons_ + i) & (size_ - 1)} * layout_.entry_size;
    PrefetchForWrite(slot);
    if (layout_.request_size > 64) __builtin_prefetch(slot + 64, 0);
  }
  return available;
}

std::optional<std::span<const uint8_t>> BlkifBackRing::NextRequestSlot() {
  if (broken_ || req_cons_ == req_prod_snapshot_) return std::nullopt;
  const size_t offset = kSringHeaderSize + size_t{req_cons_ & (size_ - 1)} * layout_.entry_size;
  ++req_cons_;
  return std::span<const uint8_t>(shared_.data() + offset, layout_.request_size);
}

absl::Status BlkifBackRing::WriteResponse(uint64_t id, uint8_t operation, int16_t status) {
  if (outstanding() == 0) {
    return absl::FailedPreconditionError("blkif ring: response without an outstanding request");
  }
  uint8_t* slot =
      shared_.data() + kSringHeaderSize + size_t{rsp_prod_pvt_ & (size_ - 1)} * layout_.entry_size;
  // Bytes 8..15: operation, a zero pad byte, status (little-endian), and zero padding.
  const uint64_t tail = uint64_t{operation} | uint64_t{static_cast<uint16_t>(status)} << 16;
  std::memcpy(slot, &id, sizeof(id));
  if (layout_.response_size == 16) {
    std::memcpy(slot + 8, &tail, sizeof(tail));
  } else {
    const uint32_t tail32 = static_cast<uint32_t>(tail);
    std::memcpy(slot + 8, &tail32, sizeof(tail32));
  }
  ++rsp_prod_pvt_;
  return absl::OkStatus();
}

bool BlkifBackRing::PushResponsesAndCheckNotify() {
  const RingIdx old_prod = rsp_prod_published_;
  const RingIdx new_prod = rsp_prod_pvt_;
  // xen_wmb(): the frontend sees the responses before the new producer index.
  std::atomic_ref<uint32_t>(*SharedWord(kRspProdOffset)).store(new_prod, std::memory_order_release);
  rsp_prod_published_ = new_prod;
  // xen_mb(): the frontend sees the new rsp_prod before we read rsp_event.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const RingIdx rsp_event =
      std::atomic_ref<uint32_t>(*SharedWord(kRspEventOffset)).load(std::memory_order_relaxed);
  // Notify iff rsp_event lies in (old_prod, new_prod]: the frontend asked for a kick at a
  // response of this batch.
  return static_cast<RingIdx>(new_prod - rsp_event) < static_cast<RingIdx>(new_prod - old_prod);
}

bool BlkifBackRing::FinalCheckForRequests() {
  if (broken_) return false;
  if (UnconsumedRequests() != 0) return true;
  std::atomic_ref<uint32_t>(*SharedWord(kReqEventOffset))
      .store(req_cons_ + 1, std::memory_order_relaxed);
  // xen_mb(): req_event is visible before we look at req_prod again.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return UnconsumedRequests() != 0;
}

}  // namespace blockplane::worker::xen
