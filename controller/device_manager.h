#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "blockplane/v1/device.pb.h"
#include "controller/metrics/controller_metrics.h"
#include "controller/registry.h"
#include "controller/worker_process.h"
#include "controller/xen_toolstack.h"

namespace blockplane::controller {

struct ManagerOptions {
  // Holds worker control sockets (<state_dir>/workers/<id>.sock).
  std::string state_dir;
  std::vector<std::string> backing_roots;
  WorkerProcess::SpawnOptions spawn;
  // A device is FAILED once its worker crashed more than max_restarts times within
  // restart_window; restarts wait initial_backoff, doubling up to max_backoff.
  int max_restarts = 5;
  std::chrono::milliseconds restart_window{60000};
  std::chrono::milliseconds initial_backoff{200};
  std::chrono::milliseconds max_backoff{10000};
  // Host for worker /metrics endpoints ("" disables them); the kernel picks the port.
  std::string metrics_host;
  // Where spawns, restarts, crashes and registry write latency are counted (null: nowhere).
  ControllerMetrics* metrics = nullptr;
  // Xen toolstack role (see ControllerOptions): "none", "host" or "emulated".
  std::string xen_platform = "none";
  std::string xen_run_dir;
  bool xen_grant_copy = false;
  int xen_max_persistent_grants = 0;
  int xen_poll_us = 0;
};

// A live feed of device events for WatchDevices. Bounded: a watcher that falls more than
// kMaxQueued events behind is cut off (Next returns RESOURCE_EXHAUSTED) rather than letting the
// controller's memory grow.
class WatchSubscription {
 public:
  static constexpr size_t kMaxQueued = 10000;
  explicit WatchSubscription(std::string device_id) : device_id_(std::move(device_id)) {}

  // The next event; nullopt if none arrived within `wait` (so callers can check cancellation).
  absl::StatusOr<std::optional<v1::DeviceEvent>> Next(std::chrono::milliseconds wait);

 private:
  friend class DeviceManager;
  void Push(const v1::DeviceEvent& event);
  void Close();

  const std::string device_id_;  // empty: all devices
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<v1::DeviceEvent> queue_;
  bool overflowed_ = false;
  bool closed_ = false;
};

// Owns the desired and observed state of every device. Gives the gRPC layer a plain C++ API (no
// gRPC types); every method validates its input and returns a status whose message names the
// field at fault. Each change is persisted in the Registry before the method returns.
//
// Threads: any thread may call the public methods. Each device has a monitor thread that watches
// its worker process (exit via pidfd, events on the control socket) and restarts it with backoff.
// One mutex guards the device table; no method waits for a worker while holding it.
class DeviceManager {
 public:
  DeviceManager(ManagerOptions options, Registry* registry);
  ~DeviceManager();

  // Loads the registry; re-adopts workers that are still running and respawns the others.
  absl::Status Start();
  // Ends every WatchDevices stream (Next returns UNAVAILABLE), so that the API server can stop
  // without waiting for them.
  void CloseWatches();
  // Stops the monitor threads, leaving workers running; with stop_workers, first asks every worker
  // to drain and exit (waiting up to `timeout` in all).
  void Shutdown(bool stop_workers, std::chrono::milliseconds timeout);

  absl::StatusOr<v1::Device> Attach(const v1::AttachDeviceRequest& request);
  absl::StatusOr<v1::Device> Drain(const std::string& device_id, Clock::time_point deadline);
  absl::StatusOr<v1::Device> Resume(const std::string& device_id);
  absl::Status Detach(const std::string& device_id, bool force, Clock::time_point deadline);
  absl::StatusOr<v1::Device> Resize(const v1::ResizeDeviceRequest& request,
                                    Clock::time_point deadline);
  absl::StatusOr<v1::Device> Get(const std::string& device_id);
  absl::StatusOr<v1::ListDevicesResponse> List(const v1::ListDevicesRequest& request);
  absl::StatusOr<v1::DeviceStats> Stats(const std::string& device_id, Clock::time_point deadline);
  // Test and diagnostic path (blockplane.internal.Diagnostics): runs `io` through the device's
  // worker and returns the stats once it is done.
  absl::StatusOr<v1::DeviceStats> SelfTestIo(const std::string& device_id,
                                             const internal::SelfTestIoRequest& io,
                                             Clock::time_point deadline);

  // Subscribes to events; `snapshot` receives the matching devices as of the subscription, with no
  // event lost or repeated between the two.
  absl::StatusOr<std::shared_ptr<WatchSubscription>> Watch(const std::string& device_id,
                                                           std::vector<v1::Device>* snapshot);

 private:
  struct Entry {
    v1::Device device;
    std::shared_ptr<WorkerProcess> worker;  // null while no worker runs
    internal::WorkerStatus last_worker_status;
    std::thread monitor;
    bool monitor_running = false;
    common::UniqueFd wake;      // eventfd: wakes the monitor (detach, shutdown)
    bool stopping = false;      // detach in progress: the worker's exit is expected
    bool drain_wanted = false;  // re-applied to a restarted worker
    std::deque<Clock::time_point> crashes;
    Clock::time_point restart_at{};
  };

  // --- all *Locked methods need mu_ held.
  Entry* FindLocked(const std::string& device_id);
  absl::StatusOr<Entry*> GetLocked(const std::string& device_id);
  // Applies `mutate` to the device's status; persists and publishes if anything changed.
  absl::Status UpdateLocked(Entry& entry, const std::function<void(v1::DeviceStatus&)>& mutate,
                            const std::string& reason);
  absl::Status ApplyWorkerStatusLocked(Entry& entry, const internal::WorkerStatus& status,
                                       const std::string& reason);
  void PublishLocked(v1::DeviceEvent::Kind kind, const v1::Device& device,
                     v1::DeviceState previous);
  // Deletes the device from the registry and the table; the entry is gone afterwards.
  void RemoveLocked(Entry& entry, const std::string& reason);
  void StartMonitorLocked(Entry& entry);
  absl::Status CheckConflictsLocked(const std::string& device_id, const v1::DeviceSpec& spec,
                                    const std::string& resolved_path);

  // Sends `request` (stats or self-test I/O) to the device's worker and returns its stats.
  absl::StatusOr<v1::DeviceStats> CallForStats(const std::string& device_id,
                                               internal::ControlRequest request,
                                               Clock::time_point deadline);
  internal::WorkerConfig MakeConfig(const v1::Device& device) const;
  absl::Status TimedRegistryWrite(const std::function<absl::Status()>& write);
  std::string ControlSocketPath(const std::string& device_id) const;
  void Wake(Entry& entry);
  void RunMonitor(Entry* entry);
  // A worker died or could not start: schedules a restart with backoff, or marks the device
  // FAILED and returns true when it failed too often.
  bool RecordWorkerLossLocked(Entry& entry, const std::string& why);
  // Monitor thread: waits until `until` or a wake-up; false if the monitor must stop.
  bool SleepUntil(Entry* entry, Clock::time_point until);

  const ManagerOptions options_;
  // The xenstore side of Xen attaches; null with xen_platform "none".
  std::unique_ptr<XenToolstack> xen_toolstack_;
  Registry* const registry_;

  std::mutex mu_;
  std::condition_variable cv_;  // signalled on every device change
  std::map<std::string, std::unique_ptr<Entry>> devices_;
  std::vector<std::thread> finished_monitors_;  // joined at shutdown
  std::list<std::weak_ptr<WatchSubscription>> watchers_;
  uint64_t revision_ = 0;
  bool shutting_down_ = false;
};

}  // namespace blockplane::controller
