#pragma once

// Userspace blkfront, handshake skeleton: a process acting as guest domain N (through an emulated
// XenPlatform for that domain and its GuestDomain memory) that performs the frontend side of the
// XenbusState handshake of xen/io/blkif.h, as Linux's xen-blkfront does in talk_to_blkback():
//
//   wait for the backend's InitWait -> read its features -> allocate and SHARED_RING_INIT the
//   ring page(s) of each queue in guest memory, grant them to the backend, allocate an unbound
//   event channel per queue -> write ring-ref (or ring-page-order + ring-ref<i>), event-channel,
//   protocol, feature-persistent in one transaction (with several queues: multi-queue-num-queues
//   and the per-queue keys under queue-<n>/) -> Initialised -> wait for the backend's Connected
//   -> read sectors/info/sector-size -> Connected.
//
// Request submission and workloads are not here yet (the blkif backend is another engineer's).
// Also here: the toolstack's xenstore entries for a vbd, which a test writes as dom0.
//
// Threading: one owner thread. Every wait is bounded by `timeout_ms` and fails with
// DeadlineExceeded; a backend that goes to Closing/Closed during the handshake fails it with
// FailedPrecondition.

#include <stdint.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/xen/xen_platform.h"
#include "tests/harness/xen/guest_domain.h"

namespace blockplane::harness {

// XenbusState values (xen/io/xenbus.h).
enum class XenbusState : int {
  kUnknown = 0,
  kInitialising = 1,
  kInitWait = 2,
  kInitialised = 3,
  kConnected = 4,
  kClosing = 5,
  kClosed = 6,
};

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
  std::string protocol = "x86_64-abi";
  bool persistent_grants = true;
  // Queue q's ring is in guest frames [first + q * 2^order, first + (q + 1) * 2^order), granted
  // with refs counted the same way from first_ring_ref.
  uint32_t first_ring_frame = 0;
  common::xen::GrantRef first_ring_ref = 0;
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
  bool feature_discard = false;
};

struct BlkfrontQueue {
  std::vector<common::xen::GrantRef> ring_refs;
  std::byte* ring = nullptr;  // ring_refs.size() contiguous pages of guest memory
  std::unique_ptr<common::xen::EventChannel> event_channel;
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

 private:
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
};

}  // namespace blockplane::harness
