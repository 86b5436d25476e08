#pragma once

// BlkifBackend: the Xen PV block backend for one vbd, on the worker's EventLoop. It plays the part
// of Linux xen-blkback (xenbus.c + blkback.c) and QEMU's xen-block dataplane:
//
//  - xenbus: publishes the backend's features and goes InitWait; watches the frontend's state; on
//    Initialised (or Connected) reads ring-ref / ring-ref<i> + ring-page-order, event-channel,
//    protocol, feature-persistent and multi-queue-num-queues with queue-<n>/, maps every queue's
//    ring in one batched map, binds the event channels, writes the disk geometry and goes
//    Connected. Frontend Closing -> the queues stop taking requests, in-flight ones complete,
//    every grant is unmapped, backend Closing; frontend Closed -> backend Closed; frontend
//    Initialising again (reconnect) -> InitWait. Detach(): Closing, wait for in-flight, unmap,
//    Closed.
//  - data path, per queue: a bounded batch of requests per pass, each copied out of the ring once
//    and validated by the pure parser (blkif_request.h); an invalid request is answered (ERROR or
//    EOPNOTSUPP) and counted by reason. Data grants are mapped in one batched map per request, or
//    kept mapped in a per-queue persistent-grant cache (LRU by second chance, capped like blkback's
//    max_persistent_grants), or copied with grant copy (GrantMode::kCopy, like QEMU). Requests go
//    to BlockDevice; completions become responses; responses are pushed with notification
//    suppression, at most one notify per queue per loop pass.
//  - a frontend that moves req_prod more than a ring ahead breaks only its queue (logged); other
//    queues and the worker keep going.
//  - crash recovery: every request taken is recorded in the request journal before it is parsed
//    and stays there until its response is published. A worker that finds the frontend still
//    connected to the rings the journal describes resumes each ring after its last published
//    response (BACK_RING_ATTACH), replays the requests that have no published response, then
//    takes new ones where the crashed worker stopped. See blkif_journal.h for every crash point.
//
// Guest memory is hostile: the ring is read through BlkifBackRing (single fetch of req_prod,
// overflow check) and requests are parsed from private copies; indirect descriptors are copied
// once; every length comes from the validated copy.
//
// Threading: every method runs on the loop thread (Stats() on any thread). The backend must
// outlive every BlockDevice completion it is owed: destroy it only after Detach() has called back
// (or after the loop has stopped for good, when the process is exiting).

#include <sys/uio.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/event_loop.h"
#include "common/xen/xen_platform.h"
#include "common/xen/xenbus.h"
#include "worker/block/block_device.h"
#include "worker/xen/blkif_journal.h"
#include "worker/xen/blkif_request.h"
#include "worker/xen/blkif_ring.h"

namespace blockplane::worker::xen {

using common::xen::XenbusState;
using common::xen::XenbusStateName;

enum class GrantMode {
  kMap,   // map the data grants (persistent grants when the frontend offers them)
  kCopy,  // grant copy into / out of private buffers (no persistent grants are advertised)
};

// The most queues a frontend may negotiate (multi-queue-num-queues; controller: kMaxXenQueues).
inline constexpr uint32_t kBlkifMaxQueues = 16;

// Ring and grant counters. One writer (the loop thread), any reader; lock-free and standard
// layout so that they may live outside the backend: the worker puts them in the device's stats
// segment (worker/metrics/stats_segment.h), where they survive a crash of the worker.
struct BlkifCounter {
  std::atomic<uint64_t> value{0};
  void Add(uint64_t n = 1) {
    value.store(value.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }
  void Sub(uint64_t n = 1) {
    value.store(value.load(std::memory_order_relaxed) - n, std::memory_order_relaxed);
  }
  uint64_t Get() const { return value.load(std::memory_order_relaxed); }
};
// One queue's counters: everything a queue does is counted on its own BlkifCounters (a queue's
// ring pages too; the failure of the one map call for every queue's ring counts on queue 0).
struct BlkifCounters {
  BlkifCounter requests_taken, responses, notifications_sent, notifications_received;
  BlkifCounter ring_full_stalls, broken_queues, io_errors;
  std::array<BlkifCounter, kInvalidReasonCount> invalid;
  BlkifCounter grant_maps, grant_map_failures, grant_unmaps, grant_copies, grant_copy_failures;
  BlkifCounter persistent_hits, persistent_misses, persistent_evictions;
  // Requests a crashed worker had taken and not answered, answered again by the next one from
  // the request journal (blkif_journal.h). Appended: the transport area keeps its size.
  BlkifCounter requests_replayed;
};
static_assert(std::is_standard_layout_v<BlkifCounters>);

struct BlkifBackendOptions {
  common::xen::DomainId frontend_domid = 0;
  uint32_t devid = 0;
  // The backend directory the toolstack created (/local/domain/<be>/backend/vbd/<fe>/<devid>).
  // Its "frontend" key names the frontend directory.
  std::string backend_path;
  uint32_t max_queues = 4;           // multi-queue-max-queues (1..16)
  uint32_t max_ring_page_order = 4;  // max-ring-page-order (0..4)
  bool persistent_grants = true;     // feature-persistent (map mode only)
  // feature-max-indirect-segments; 0 disables indirect requests. Clamped to the protocol limit.
  uint32_t max_indirect_segments = 32;
  // Persistent grants kept mapped per queue (blkback's max_persistent_grants default: 1056).
  uint32_t max_persistent_grants = 1056;
  GrantMode grant_mode = GrantMode::kMap;
  // Requests taken from one queue per loop pass before yielding to the rest of the loop. Half a
  // one-page ring: a full ring is answered in two halves, so the frontend refills the first
  // while the second is in the backend, instead of both sides taking turns on the whole ring
  // (polled null QD32 on two CPUs: 16 beat 64 in 5 of 6 interleaved runs, ~+20%, and 8 in 6 of 6;
  // no difference with notifications).
  uint32_t max_requests_per_pass = 16;
  // Polling: after a queue's last request, look at its ring again on every loop pass for this
  // long before asking the frontend for a kick (req_event). While a queue polls, a frontend that
  // honours notification suppression sends no event, and the loop does not sleep. 0: no polling,
  // every empty ring asks for a kick (blkback's behaviour).
  uint64_t poll_ns = 0;
  bool cdrom = false;  // VDISK_CDROM in "info"
  // Where each queue's counters live, by queue index (each outlives the backend); a null entry:
  // inside the backend, from zero.
  std::array<BlkifCounters*, kBlkifMaxQueues> counters{};
  // The request journal that outlives the worker (blkif_journal.h): with it, a worker that
  // replaces a crashed one answers every request the crashed one had taken. Null: a private
  // journal (same data path, nothing survives the process).
  BlkifJournal* journal = nullptr;
};

// Counters, summed over the queues (single writer: the loop thread; any reader through Stats()).
struct BlkifBackendStats {
  uint64_t requests_taken = 0;
  uint64_t responses = 0;  // published to the frontend (counted at the push)
  uint64_t notifications_sent = 0;
  uint64_t notifications_received = 0;
  uint64_t ring_full_stalls = 0;  // a poll found every request slot of the ring outstanding
  uint64_t broken_queues = 0;     // queues stopped because the frontend broke the ring protocol
  std::array<uint64_t, kInvalidReasonCount> invalid{};  // by InvalidReason
  uint64_t io_errors = 0;                               // requests answered ERROR after I/O
  uint64_t grant_maps = 0;                              // pages mapped
  uint64_t grant_map_failures = 0;                      // map calls that failed
  uint64_t grant_unmaps = 0;                            // pages unmapped
  uint64_t grant_copies = 0;                            // grant copy segments
  uint64_t grant_copy_failures = 0;
  uint64_t persistent_hits = 0;
  uint64_t persistent_misses = 0;
  uint64_t persistent_evictions = 0;
  uint64_t requests_replayed = 0;         // answered again from a crashed worker's journal
  uint64_t persistent_grants_mapped = 0;  // gauge: entries in all queues' caches
  uint64_t in_flight = 0;                 // gauge
};

// What the frontend negotiated; for the controller's FrontendStatus.
struct BlkifFrontendInfo {
  XenbusState backend_state = XenbusState::kUnknown;
  XenbusState frontend_state = XenbusState::kUnknown;
  uint32_t num_queues = 0;
  std::string protocol;
  bool persistent_grants = false;
  uint32_t ring_page_order = 0;
};

class BlkifBackend {
 public:
  struct Callbacks {
    // The backend went Connected (true) or left it (false). Loop thread.
    std::function<void(bool connected)> on_connection_changed;
  };

  // `platform` and `device` must outlive the backend. Nothing is written until Start().
  BlkifBackend(common::EventLoop* loop, common::xen::XenPlatform* platform, BlockDevice* device,
               BlkifBackendOptions options, Callbacks callbacks);
  ~BlkifBackend();
  BlkifBackend(const BlkifBackend&) = delete;
  BlkifBackend& operator=(const BlkifBackend&) = delete;

  // Reads the frontend path from the backend directory, publishes the features, goes InitWait and
  // starts watching the frontend's state. Errors are xenstore errors (the directory is missing:
  // the toolstack did not create it).
  absl::Status Start();

  // After BlockDevice::Resize(): writes "sectors" and rewrites "state" in one xenstore
  // transaction (retried on EAGAIN), as blkback's xen_vbd_resize(), so the frontend re-reads it.
  absl::Status Resize();

  // Closing -> stop taking requests, wait for in-flight ones, unmap every ring and grant, close
  // the event channels -> Closed; then `done` runs (on the loop thread). Further frontend state
  // changes are ignored.
  void Detach(std::function<void()> done);

  BlkifFrontendInfo FrontendInfo() const;
  BlkifBackendStats Stats() const;
  XenbusState backend_state() const { return backend_state_; }
  // Pages currently mapped by this backend (rings, persistent and per-request grants).
  uint64_t mapped_pages() const { return mapped_pages_; }

 private:
  struct Queue;
  struct Pending;
  struct GrantGroup;
  struct PersistentGrant;
  class QueueKick;

  using Counter = BlkifCounter;

  // xenbus
  absl::Status PublishFeatures();
  absl::Status SwitchState(XenbusState state);
  void OnXenstoreWatch();
  void OnFrontendStateChanged();
  absl::Status ConnectRings();
  absl::Status WriteConnectedInfo();
  // Stops the queues; `then` runs once nothing is in flight and every grant is unmapped.
  void Disconnect(std::function<void()> then);
  void MaybeFinishDisconnect();
  void ReleaseQueues();
  DeviceGeometry Geometry() const;

  // data path
  void ProcessQueue(Queue& queue);
  void StopQueue(Queue& queue, const absl::Status& why);
  void TakeRequest(Queue& queue, std::span<const uint8_t> slot);
  // Parses and starts the request recorded in journal `entry` (taken now, or replayed).
  void TakeJournaled(Queue& queue, uint32_t entry);
  // Resumes queue `q` on `bytes` (its ring pages) from the journal, or starts it fresh.
  absl::Status AttachQueue(Queue& queue, std::span<std::byte> bytes, bool resume);
  void Refuse(Queue& queue, const RequestError& error, uint32_t entry);
  void StartRequest(Queue& queue, const BlkifRequest& request, uint32_t entry);
  absl::Status MapData(Pending& pending, bool writable);
  absl::Status MapPersistent(Queue& queue, Pending& pending);
  // Releases unused least-recently-used persistent grants until `pages` more fit under the cap;
  // false if they still do not (every cached page is in use).
  bool MakeRoomForPersistent(Queue& queue, size_t pages);
  // One page through the persistent-grant cache, for an indirect descriptor page that is read
  // at once: a hit maps nothing; a miss maps the page and keeps it if there is room, else it is
  // mapped into `*temporary` (the caller unmaps it). No use count is held.
  absl::StatusOr<const std::byte*> IndirectPagePersistent(
      Queue& queue, common::xen::GrantRef ref,
      std::unique_ptr<common::xen::GrantMapping>* temporary);
  void BuildCopySegments(Pending& pending);
  void SubmitStep(Pending& pending);
  void OnStepDone(Pending& pending, int result);
  void Complete(Pending& pending, int16_t status);
  void ReleaseGrants(Pending& pending);
  void RespondLater(Queue& queue, uint64_t id, uint8_t operation, int16_t status, uint32_t entry);
  void PushResponses(Queue& queue);
  void EvictPersistent(Queue& queue, PersistentGrant* grant);
  void UnmapGroup(GrantGroup* group);

  common::EventLoop* loop_;
  common::xen::XenPlatform* platform_;
  BlockDevice* device_;
  const BlkifBackendOptions options_;
  Callbacks callbacks_;

  std::string frontend_path_;
  std::string watch_token_;
  common::EventLoop::FdWatch xenstore_watch_ = common::EventLoop::kInvalidFdWatch;
  bool watching_ = false;
  XenbusState backend_state_ = XenbusState::kUnknown;
  XenbusState frontend_state_ = XenbusState::kUnknown;
  bool detaching_ = false;
  bool disconnecting_ = false;
  std::function<void()> after_disconnect_;

  // Negotiated.
  Protocol protocol_ = Protocol::kNative;
  uint32_t ring_page_order_ = 0;
  bool use_persistent_ = false;
  uint32_t max_indirect_segments_ = 0;
  std::vector<std::unique_ptr<Queue>> queues_;
  std::shared_ptr<common::xen::GrantMapping> ring_mapping_;  // every queue's ring pages
  uint64_t mapped_pages_ = 0;
  std::unique_ptr<BlkifJournal> own_journal_;
  BlkifJournal* journal_ = nullptr;
  bool journal_recording_ = false;  // journal_ describes the connected rings

  // Stats: each queue's counters in options_.counters[q] (or own_counters_[q]), gauges here.
  std::array<BlkifCounters, kBlkifMaxQueues> own_counters_;
  std::array<BlkifCounters*, kBlkifMaxQueues> counters_;
  Counter persistent_mapped_;
  Counter in_flight_;
};

}  // namespace blockplane::worker::xen
