#pragma once

// Userspace blkfront, handshake skeleton: a process acting as guest domain N (through an emulated
// XenPlatform for that domain and its GuestDomain memory) that performs the frontend side of the
// XenbusState handshake of xen/io/blkif.h, as Linux's xen-blkfront does in talk_to_blkback():
//
//   Initialising -> wait for the backend's InitWait -> read its features -> allocate and
//   SHARED_RING_INIT the ring page(s) of each queue in guest memory, grant them to the backend,
//   allocate an unbound event channel per queue -> write ring-ref (or ring-page-order +
//   ring-ref<i>), event-channel, protocol, feature-persistent in one transaction (with several
//   queues: multi-queue-num-queues and the per-queue keys under queue-<n>/) -> Initialised -> wait
//   for the backend's Connected
//   -> read sectors/info/sector-size -> Connected.
//
// Then the data path of blkfront.c, per queue: requests are produced on the shared ring in the
// negotiated ABI layout (native, x86_32-abi, x86_64-abi) with RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
// semantics, responses consumed with RING_FINAL_CHECK_FOR_RESPONSES semantics.
//
// Memory and grants: each queue has `slots` request slots (Linux's shadow entries). A slot owns a
// fixed run of guest frames (its data buffer, then its indirect pages) and the same number of
// grant refs, all set aside at Connect(): nothing is allocated per request. With persistent grants
// every slot page is granted read-write once, at Connect(), and stays granted until Disconnect()
// (blkfront's persistent grant pool). Without, a request grants the pages it uses (read-only for
// data going to the disk, and for indirect pages) and the response ends that access; a page the
// backend still has mapped at that point is counted (grants_still_mapped) and the slot is held
// back (after ReleaseSlot) until a later EndAccess() succeeds, retried when no other slot is free.
//
// Requests with more than 11 segments go out as BLKIF_OP_INDIRECT when the backend advertises
// feature-max-indirect-segments and the options allow it (max_indirect_segments).
//
// Also here: the toolstack's xenstore entries for a vbd, which a test writes as dom0.
//
// Threading: one owner thread. Every wait is bounded by `timeout_ms` and fails with
// DeadlineExceeded; a backend that goes to Closing during the handshake (or Closed after the
// frontend's Initialised) fails it with FailedPrecondition. A backend found Closed at the start
// (an earlier frontend closed) is waited for: Initialising brings it back to InitWait. The backend
// is not trusted: a response with an id that names no request in flight is dropped and counted
// (bogus_responses), never dereferenced.

#include <stdint.h>

#include <array>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/xen/xen_platform.h"
#include "common/xen/xenbus.h"
#include "tests/harness/xen/guest_domain.h"
#include "worker/xen/blkif_abi.h"

namespace blockplane::harness {

using common::xen::XenbusState;

struct VbdPaths {
  std::string frontend;  // /local/domain/<fe>/device/vbd/<devid>
  std::string backend;   // /local/domain/<be>/backend/vbd/<fe>/<devid>
};
VbdPaths VbdPathsFor(common::xen::DomainId frontend_domid, common::xen::DomainId backend_domid,
                     uint32_t devid);

// What a toolstack (xl, the controller later) writes before frontend and backend start: both
// directories with their cross references and state Initialising, the frontend's owned by the
// guest and readable by the backend, the backend's owned by the backend domain and readable by the
// guest. Run as dom0.
absl::Status WriteVbdToolstackEntries(common::xen::XenStore& dom0_store,
                                      common::xen::DomainId frontend_domid,
                                      common::xen::DomainId backend_domid, uint32_t devid);
absl::Status RemoveVbdToolstackEntries(common::xen::XenStore& dom0_store,
                                       common::xen::DomainId frontend_domid,
                                       common::xen::DomainId backend_domid, uint32_t devid);

// Reads `path` as a XenbusState; a missing node reads as kUnknown.
absl::StatusOr<XenbusState> ReadXenbusState(common::xen::XenStore& store, const std::string& path);

// Watches `path` until `accept(state)` holds, or `fail(state)` holds (FailedPrecondition), or the
// deadline passes (DeadlineExceeded). The watch (token `token`) is removed before returning.
absl::StatusOr<XenbusState> WaitForXenbusState(common::xen::XenStore& store,
                                               const std::string& path, const std::string& token,
                                               bool (*accept)(XenbusState),
                                               bool (*fail)(XenbusState), int timeout_ms);

struct BlkfrontOptions {
  uint32_t devid = 51712;        // xvda
  uint32_t ring_page_order = 0;  // wanted; capped by the backend's max-ring-page-order
  uint32_t num_queues = 1;       // wanted; capped by the backend's multi-queue-max-queues
  // "x86_64-abi", "x86_32-abi", or "native" (no protocol key: the backend's own ABI).
  std::string protocol = "x86_64-abi";
  bool persistent_grants = true;
  // Wanted indirect segments per request (0: never send BLKIF_OP_INDIRECT); capped by the
  // backend's feature-max-indirect-segments and the protocol (8 pages x 512).
  uint32_t max_indirect_segments = 0;
  // Request slots per queue, capped by the ring size (request ids carry the slot in 16 bits,
  // and the largest ring has 4096 entries). 0: as many as fit in the guest memory and grant
  // table left after the rings, possibly none (check slots_per_queue() before submitting).
  uint32_t slots_per_queue = 0;
  // Data buffer of each slot: the largest request the caller will make, rounded up to pages.
  // Requests above 11 pages need indirect segments.
  uint32_t max_request_bytes = BLKIF_MAX_SEGMENTS_PER_REQUEST * 4096;
  // Queue q's ring is in guest frames [first + q * 2^order, first + (q + 1) * 2^order), granted
  // with refs counted the same way from first_ring_ref.
  uint32_t first_ring_frame = 0;
  common::xen::GrantRef first_ring_ref = 0;
  // Slot pages and their refs; by default right after the rings' frames and refs.
  std::optional<uint32_t> first_data_frame;
  std::optional<common::xen::GrantRef> first_data_ref;
  int timeout_ms = 10000;
};

struct BlkbackInfo {
  uint64_t sectors = 0;
  uint32_t sector_size = 512;
  uint32_t physical_sector_size = 512;
  uint32_t info = 0;  // VDISK_* flags
  uint32_t max_ring_page_order = 0;
  uint32_t max_queues = 1;
  bool feature_persistent = false;
  bool feature_flush_cache = false;
  bool feature_barrier = false;
  bool feature_discard = false;
  bool discard_secure = false;
  uint32_t discard_granularity = 0;
  uint32_t max_indirect_segments = 0;  // feature-max-indirect-segments
};

enum class BlkfrontOp : uint8_t { kRead, kWrite, kFlush, kBarrier, kDiscard };
const char* BlkfrontOpName(BlkfrontOp op);  // "read", "write", "flush", "barrier", "discard"

// A well-formed request. Data (read, write, barrier) is the slot buffer's bytes
// [buffer_sector_offset * 512, + nr_sectors * 512): the first segment starts at first_sect =
// buffer_sector_offset, every following page at 0, the last ends where the data ends.
struct BlkfrontRequest {
  BlkfrontOp op = BlkfrontOp::kRead;
  uint64_t sector = 0;      // 512-byte units
  uint32_t nr_sectors = 0;  // read/write/barrier: data length; discard: range; flush: ignored
  uint8_t buffer_sector_offset = 0;  // 0..7
  bool secure = false;               // discard: BLKIF_DISCARD_SECURE
};

// Any request, for hostile tests: the fields go to the ring as given, in the queue's ABI. Grant
// refs are the caller's (take them from SlotView to name the slot's own pages).
struct RawBlkifRequest {
  uint8_t operation = BLKIF_OP_READ;
  uint8_t nr_segments = 0;  // direct requests
  uint64_t sector_number = 0;
  std::array<blkif_request_segment, BLKIF_MAX_SEGMENTS_PER_REQUEST> seg{};
  uint8_t discard_flag = 0;  // BLKIF_OP_DISCARD
  uint64_t discard_nr_sectors = 0;
  uint8_t indirect_op = 0;  // BLKIF_OP_INDIRECT
  uint16_t indirect_nr_segments = 0;
  std::array<grant_ref_t, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST> indirect_grefs{};
};

// A slot's pages in guest memory and their grant refs (valid while the Blkfront is connected).
struct SlotView {
  std::span<std::byte> data;  // data_refs.size() pages
  std::span<const common::xen::GrantRef> data_refs;
  std::span<std::byte> indirect;  // indirect_refs.size() pages (none without indirect)
  std::span<const common::xen::GrantRef> indirect_refs;
};

struct BlkfrontCompletion {
  uint32_t queue = 0;
  uint32_t slot = 0;
  uint8_t operation = 0;  // as the backend echoed it
  int16_t status = 0;     // BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP, or other
  uint64_t latency_ns = 0;
};

struct BlkfrontCounters {
  uint64_t requests = 0;
  uint64_t responses = 0;
  uint64_t indirect_requests = 0;
  uint64_t pushes = 0;
  uint64_t notifications_sent = 0;   // pushes where the backend asked to be kicked
  uint64_t events_received = 0;      // event channel notifications acknowledged
  uint64_t bogus_responses = 0;      // id names no request in flight on that queue
  uint64_t grants_still_mapped = 0;  // EndAccess after a response found the page mapped
};

struct BlkfrontQueue {
  std::vector<common::xen::GrantRef> ring_refs;
  std::byte* ring = nullptr;  // ring_refs.size() contiguous pages of guest memory
  std::unique_ptr<common::xen::EventChannel> event_channel;

  // Front ring state (private: the shared words are only written by this side).
  uint32_t req_prod_pvt = 0;
  uint32_t req_prod_pushed = 0;  // last req_prod published (never read back from the ring)
  uint32_t rsp_cons = 0;
  uint32_t serial = 0;  // high bits of request ids
  bool broken = false;  // BreakRing() was used: no more requests on this queue
  struct Slot {
    bool acquired = false;
    bool in_flight = false;
    bool revoke_pending = false;  // grants to end before the slot can be reused
    uint8_t operation = 0;        // echoed operation expected in the response
    uint32_t granted_data = 0;    // non-persistent: data pages granted for this request
    uint32_t granted_indirect = 0;
    uint64_t id = 0;
    uint64_t submit_ns = 0;  // when Push() published it: the backend cannot see it earlier
  };
  std::vector<Slot> slots;
  std::vector<uint32_t> unpushed;    // slots produced since the last Push(), to be stamped there
  std::vector<uint32_t> free_slots;  // stack; reserved to slots.size()
  // Released slots whose grants the backend still maps; AcquireSlot() retries them when
  // free_slots runs out.
  std::vector<uint32_t> revoke_pending_slots;
  uint32_t in_flight = 0;
};

class Blkfront {
 public:
  // `platform` acts as the guest domain that owns `guest`; both must outlive the Blkfront.
  Blkfront(common::xen::XenPlatform* platform, GuestDomain* guest, BlkfrontOptions options);
  ~Blkfront();
  Blkfront(const Blkfront&) = delete;
  Blkfront& operator=(const Blkfront&) = delete;

  // The handshake above, up to Connected.
  absl::Status Connect();
  // Closing -> wait for the backend's Closing or Closed -> Closed; revokes the ring grants.
  absl::Status Disconnect();

  const VbdPaths& paths() const { return paths_; }
  common::xen::DomainId backend_domid() const { return backend_domid_; }
  const BlkbackInfo& backend_info() const { return backend_info_; }
  uint32_t ring_page_order() const { return ring_page_order_; }
  // One per negotiated queue; valid after Connect().
  const std::vector<BlkfrontQueue>& queues() const { return queues_; }
  uint32_t num_queues() const { return static_cast<uint32_t>(queues_.size()); }

  // --- data path (after Connect()) ---
  worker::xen::Protocol protocol() const { return protocol_; }
  bool persistent_grants() const { return persistent_; }
  // Indirect segments per request this frontend uses (0: none).
  uint32_t indirect_segments() const { return indirect_segments_; }
  uint32_t ring_size() const { return ring_size_; }  // entries per queue ring
  uint32_t slots_per_queue() const { return slots_per_queue_; }
  uint32_t data_pages_per_slot() const { return data_pages_per_slot_; }
  uint32_t indirect_pages_per_slot() const { return indirect_pages_per_slot_; }
  // Largest nr_sectors of a read/write (what fits in a slot and in the segments available).
  uint32_t max_request_sectors() const;
  const BlkfrontCounters& counters() const { return counters_; }

  // A free slot of `queue`, or nullopt when all are taken (back-pressure, not an error).
  std::optional<uint32_t> AcquireSlot(uint32_t queue);
  // Gives back a slot that is acquired and not in flight (after its completion was handled).
  void ReleaseSlot(uint32_t queue, uint32_t slot);
  SlotView Slot(uint32_t queue, uint32_t slot) const;

  // Writes `request` into the next ring slot of `queue` (invisible to the backend until Push()),
  // granting what it uses. InvalidArgument if it does not fit the slot or the segments available,
  // FailedPrecondition if the slot is not acquired or already in flight, or the queue is broken.
  absl::Status Enqueue(uint32_t queue, uint32_t slot, const BlkfrontRequest& request);
  // Same for a raw request. Without persistent grants every page of the slot is granted for it
  // (data read-write, indirect read-only) and revoked after the response.
  absl::Status EnqueueRaw(uint32_t queue, uint32_t slot, const RawBlkifRequest& request);
  // RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, then the kick if the backend asked for one. Returns
  // whether it kicked.
  absl::StatusOr<bool> Push(uint32_t queue);

  // Consumes up to out.size() responses of `queue` (RING_FINAL_CHECK_FOR_RESPONSES when it runs
  // out: rsp_event is set so the backend kicks for the next one). Ends the access of
  // non-persistent grants. The slots stay acquired: ReleaseSlot() them after use.
  // `want_event` false (a polling frontend): rsp_event is left alone, so a backend that honours
  // notification suppression does not kick for responses nobody sleeps on.
  size_t Reap(uint32_t queue, std::span<BlkfrontCompletion> out, bool want_event = true);
  // Waits up to timeout_ms for any queue's event channel and acknowledges what fired. Returns
  // false on timeout.
  absl::StatusOr<bool> WaitForEvent(int timeout_ms);
  uint32_t in_flight(uint32_t queue) const { return queues_[queue].in_flight; }

  // A ref of the guest's grant table that this frontend never grants (for hostile probes), if
  // there is one.
  std::optional<common::xen::GrantRef> UnusedGrantRef() const;

  // Hostile: publishes req_prod `ahead` entries past the requests produced and kicks, like a
  // broken frontend. The queue accepts no more requests.
  absl::Status BreakRing(uint32_t queue, uint32_t ahead);

 private:
  absl::Status SetUpSlots();
  uint32_t SlotFirstFrame(uint32_t queue, uint32_t slot) const;
  common::xen::GrantRef SlotFirstRef(uint32_t queue, uint32_t slot) const;
  std::byte* RingEntry(const BlkfrontQueue& queue, uint32_t index) const;
  absl::Status CheckSlotForEnqueue(uint32_t queue, uint32_t slot) const;
  // Stores the request of the ABI at req_prod_pvt and marks the slot in flight.
  void Produce(uint32_t queue, uint32_t slot, const RawBlkifRequest& request, uint8_t echo);
  void EndSlotGrants(uint32_t queue, uint32_t slot);
  absl::Status ReadBackendPath();
  absl::Status ReadBackendFeatures();
  absl::Status SetUpRings();
  absl::Status PublishRing();
  absl::Status ReadConnectedInfo();
  absl::Status SwitchState(XenbusState state);

  common::xen::XenPlatform* platform_;
  GuestDomain* guest_;
  BlkfrontOptions options_;
  VbdPaths paths_;
  common::xen::DomainId backend_domid_ = 0;
  BlkbackInfo backend_info_;
  uint32_t ring_page_order_ = 0;
  std::vector<BlkfrontQueue> queues_;

  worker::xen::Protocol protocol_ = worker::xen::Protocol::kX86_64;
  bool persistent_ = false;
  uint32_t indirect_segments_ = 0;
  uint32_t ring_size_ = 0;
  uint32_t slots_per_queue_ = 0;
  uint32_t data_pages_per_slot_ = 0;
  uint32_t indirect_pages_per_slot_ = 0;
  uint32_t first_data_frame_ = 0;
  common::xen::GrantRef first_data_ref_ = 0;
  std::vector<common::xen::GrantRef> slot_refs_;  // every slot's refs, in slot order
  BlkfrontCounters counters_;
};

}  // namespace blockplane::harness
