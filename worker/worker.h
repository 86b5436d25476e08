#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "blockplane/internal/worker.pb.h"
#include "common/event_loop.h"
#include "common/frame_channel.h"
#include "common/unique_fd.h"
#include "common/xen/xen_platform.h"
#include "worker/block/block_device.h"
#include "worker/diagnostics/self_test_io.h"
#include "worker/metrics/device_collector.h"
#include "worker/metrics/stats_segment.h"
#include "worker/metrics/worker_exporter.h"
#include "worker/xen/blkif_backend.h"

namespace blockplane::worker {

// One device's worker process: serves the controller's control channel and owns the device's
// dataplane (backend, block layer, frontend). Everything runs on one EventLoop thread.
//
// Lifecycle: Init() opens the backing store and the control socket; Run() serves until a
// StopRequest, SIGTERM or SIGINT; the socket file is removed on the way out. If the backing store
// cannot be opened, the worker still answers the controller's Hello with the reason (so the
// attach fails with a message that says what to fix) and then exits with status 1.
class Worker {
 public:
  explicit Worker(internal::WorkerConfig config);
  ~Worker();

  // Opens the control socket (replacing a stale socket file) and the backend. A failure to open
  // the backend is remembered and reported to the controller, not returned.
  absl::Status Init();
  // Serves until stopped. Returns the process exit status.
  int Run();

 private:
  class ControlConnection;

  void OnAccept();
  void OnSignal();
  void HandleRequest(const internal::ControlRequest& request);
  void Reply(uint64_t id, const absl::Status& status,
             const internal::WorkerStatus* status_message = nullptr,
             const blockplane::v1::DeviceStats* stats = nullptr);
  void SendEvent(const std::string& reason);
  void SetState(internal::WorkerState state, const std::string& reason);
  // Serves /metrics on config_.metrics_listen (if set); a failure is logged, not fatal.
  void StartMetrics();
  // Any thread (the exporter's): reads only atomics.
  DeviceMetricsSnapshot MetricsSnapshot() const;
  internal::WorkerStatus Status() const;
  blockplane::v1::DeviceStats Stats() const;
  void BeginStop(uint64_t reply_id, bool force);
  void CloseConnection();
  void OnErrorStop(int error);
  // The serving state once drains and error stops are over.
  internal::WorkerState ServingState() const;
  // The backend of spec.backend: NullBackend for spec.backend.null, else UringBackend on the path.
  absl::StatusOr<std::unique_ptr<Backend>> OpenBackend();
  // With spec.xen and a Xen platform in the config: opens the platform and starts the blkif
  // backend (features, InitWait, frontend watch). FailedPrecondition names what is missing.
  bool ServesXen() const;
  absl::Status StartXen();
  void OnFrontendConnection(bool connected);
  // Detaches the frontend (Closing -> Closed, every grant unmapped) if there is one, then runs
  // `done`. Bounded: gives up waiting for in-flight I/O after kDetachTimeout.
  void DetachFrontend(std::function<void()> done);

  const internal::WorkerConfig config_;
  std::unique_ptr<common::EventLoop> loop_;
  common::UniqueFd listen_fd_;
  common::EventLoop::FdWatch listen_watch_ = common::EventLoop::kInvalidFdWatch;
  common::UniqueFd signal_fd_;
  common::EventLoop::FdWatch signal_watch_ = common::EventLoop::kInvalidFdWatch;

  // The controller's connection; a new connection (controller restarted) replaces the old one.
  common::UniqueFd conn_fd_;
  common::EventLoop::FdWatch conn_watch_ = common::EventLoop::kInvalidFdWatch;
  common::FrameReader reader_;

  // Declared before device_ so that they outlive it: the device's counters live in the stats
  // segment, and requests of a self-test still in flight at exit point into self_test_'s buffers.
  std::unique_ptr<StatsSegment> stats_segment_;
  std::unique_ptr<SelfTestIo> self_test_;
  std::unique_ptr<BlockDevice> device_;
  // Xen blkif frontend (spec.xen with a Xen platform configured); destroyed before the device.
  std::unique_ptr<common::xen::XenPlatform> xen_;
  std::unique_ptr<xen::BlkifBackend> blkif_;
  bool frontend_connected_ = false;
  absl::Status open_error_;  // why the backing store could not be opened
  // Set while the device is paused by error policy `stop`; resume retries the failed requests.
  std::string error_stop_;
  internal::WorkerState state_ = internal::WORKER_STATE_WAITING_FOR_FRONTEND;
  int exit_status_ = 0;
  // Copies of state_ and the device size for the exporter's threads.
  std::atomic<int> metrics_state_{internal::WORKER_STATE_WAITING_FOR_FRONTEND};
  std::atomic<uint64_t> metrics_size_{0};
  // Reads device_ from its own threads: stopped first in ~Worker.
  std::unique_ptr<WorkerExporter> exporter_;
  // Each blkif queue's counters: in the stats segment, or own_xen_counters_ without one. Set
  // before the exporter starts; all null when the worker serves no Xen frontend.
  std::array<xen::BlkifCounters, xen::kBlkifMaxQueues> own_xen_counters_;
  std::array<xen::BlkifCounters*, xen::kBlkifMaxQueues> xen_counters_{};
  std::unique_ptr<xen::BlkifJournal> xen_journal_;
};

}  // namespace blockplane::worker
