#pragma once

// Guest-side request issuing for the end-to-end blkif tests: what Linux blkfront's
// blkif_queue_request() / blkif_interrupt() do, over one queue that the harness Blkfront has
// connected (its shared ring in guest memory and its event channel). The harness Blkfront does the
// handshake only; this is the minimal data path the tests need, kept with the tests.
//
// Each in-flight slot owns fixed guest frames: `max_pages` data pages and one indirect page, with
// grant refs equal to the frame numbers. With persistent grants the data pages are granted once,
// read-write, and kept (as Linux blkfront does); without, each request grants its pages
// (read-only for writes) and revokes them after the response, which fails if the backend still
// has them mapped, and that is counted (`grants_still_mapped`).
//
// Every wait is bounded (kWaitMs) and ends in DeadlineExceeded, never a hang.

#include <atomic>
#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tests/harness/xen/blkfront.h"
#include "tests/harness/xen/guest_domain.h"
#include "worker/xen/blkif_abi.h"

namespace blockplane::xen_e2e {

struct GuestRequest {
  uint8_t operation = BLKIF_OP_READ;  // READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE, DISCARD
  uint64_t sector = 0;
  uint32_t pages = 1;  // whole data pages (first_sect 0, last_sect 7)
  bool indirect = false;
  bool secure = false;                  // DISCARD
  uint64_t discard_sectors = 0;         // DISCARD
  const uint8_t* write_data = nullptr;  // pages * 4096 bytes (WRITE, WRITE_BARRIER)
  uint8_t* read_data = nullptr;         // pages * 4096 bytes (READ)
};

struct GuestResponse {
  uint64_t id = 0;
  uint8_t operation = 0;
  int16_t status = BLKIF_RSP_ERROR;
};

class GuestQueue {
 public:
  static constexpr int kWaitMs = 20000;

  // `queue` must stay connected while this object is used. Frames [first_frame, first_frame +
  // slots * (max_pages + 1)) of the guest are used for data and must be free.
  GuestQueue(harness::GuestDomain* guest, const harness::BlkfrontQueue* queue,
             worker::xen::Protocol protocol, common::xen::DomainId backend, bool persistent,
             uint32_t first_frame, uint32_t slots, uint32_t max_pages);
  ~GuestQueue();

  uint32_t ring_size() const { return ring_size_; }

  // Runs the requests with up to `depth` in flight; one response per request, in request order.
  absl::StatusOr<std::vector<GuestResponse>> Run(std::span<GuestRequest> requests, uint32_t depth);

  // Hostile: puts `bytes` (at most one ring entry) in the next slot as they are, pushes, kicks
  // and waits for one response.
  absl::StatusOr<GuestResponse> RunRaw(std::span<const uint8_t> bytes);
  // Hostile: publishes req_prod `ahead` entries beyond what was written and kicks.
  void PublishBogusReqProd(uint32_t ahead);

  // Revokes the persistent grants; false if the backend still maps any of them.
  bool RevokePersistentGrants();

  uint64_t grants_still_mapped() const { return grants_still_mapped_; }
  uint64_t completed() const { return completed_.load(); }
  uint64_t pushed() const { return pushed_.load(); }
  // True once the backend has taken every pushed request and asked to be kicked for the next
  // (req_event == req_prod + 1, set by its RING_FINAL_CHECK_FOR_REQUESTS). Any thread.
  bool BackendIdle() const;

 private:
  struct Slot {
    bool busy = false;
    size_t request = 0;
    uint64_t generation = 0;
  };
  uint32_t Frame(uint32_t slot, uint32_t page) const {
    return first_frame_ + slot * (max_pages_ + 1) + page;
  }
  std::byte* Entry(uint32_t index) const;
  absl::Status Prepare(uint32_t slot, const GuestRequest& request, uint64_t id);
  void Finish(uint32_t slot, const GuestRequest& request);
  void Push();
  // Takes the available responses; waits (bounded) if there are none.
  absl::Status Reap(const std::function<void(const GuestResponse&)>& on_response);

  harness::GuestDomain* guest_;
  const harness::BlkfrontQueue* queue_;
  worker::xen::Protocol protocol_;
  worker::xen::ProtocolLayout layout_;
  common::xen::DomainId backend_;
  bool persistent_;
  uint32_t first_frame_;
  uint32_t max_pages_;
  uint32_t ring_size_;
  std::vector<Slot> slots_;
  uint32_t req_prod_pvt_ = 0;
  uint32_t rsp_cons_ = 0;
  uint64_t grants_still_mapped_ = 0;
  std::atomic<uint64_t> completed_{0};
  std::atomic<uint64_t> pushed_{0};
};

}  // namespace blockplane::xen_e2e
