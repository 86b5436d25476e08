#include "controller/device_manager.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "controller/device_state.h"
#include "controller/validation.h"
#include "google/protobuf/util/message_differencer.h"
#include "worker/metrics/stats_segment.h"
#include "worker/xen/blkif_journal.h"

namespace blockplane::controller {
namespace {

google::protobuf::Timestamp Now() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  google::protobuf::Timestamp t;
  t.set_seconds(ts.tv_sec);
  t.set_nanos(static_cast<int32_t>(ts.tv_nsec));
  return t;
}

constexpr absl::string_view kPageTokenPrefix = "after:";
constexpr int kDefaultPageSize = 100;
constexpr int kMaxPageSize = 1000;

std::string MakePageToken(const std::string& last_id) {
  return absl::WebSafeBase64Escape(absl::StrCat(kPageTokenPrefix, last_id));
}

absl::StatusOr<std::string> ParsePageToken(const std::string& token) {
  std::string decoded;
  if (!absl::WebSafeBase64Unescape(token, &decoded) ||
      !absl::StartsWith(decoded, kPageTokenPrefix) ||
      !ValidateDeviceId(decoded.substr(kPageTokenPrefix.size())).ok()) {
    return absl::InvalidArgumentError(
        "page_token: not a token returned by ListDevices; omit it to start from the first page");
  }
  return decoded.substr(kPageTokenPrefix.size());
}

// First line of a field-by-field comparison, e.g. "modified: backend.cache: 1 -> 2".
std::string SpecDifference(const v1::DeviceSpec& a, const v1::DeviceSpec& b) {
  std::string report;
  google::protobuf::util::MessageDifferencer differ;
  differ.ReportDifferencesToString(&report);
  differ.Compare(a, b);
  size_t eol = report.find('\n');
  return eol == std::string::npos ? report : report.substr(0, eol);
}

v1::FrontendKind KindOf(const v1::DeviceSpec& spec) {
  if (spec.has_xen()) return v1::FRONTEND_KIND_XEN;
  if (spec.has_vhost_user()) return v1::FRONTEND_KIND_VHOST_USER;
  return v1::FRONTEND_KIND_UNSPECIFIED;
}

}  // namespace

// --- WatchSubscription -------------------------------------------------------------------------

absl::StatusOr<std::optional<v1::DeviceEvent>> WatchSubscription::Next(
    std::chrono::milliseconds wait) {
  std::unique_lock lock(mu_);
  cv_.wait_for(lock, wait, [&] { return !queue_.empty() || overflowed_ || closed_; });
  if (closed_) return absl::UnavailableError("blockplaned is shutting down; watch again later");
  if (overflowed_) {
    return absl::ResourceExhaustedError(absl::StrCat("the watcher fell more than ", kMaxQueued,
                                                     " events behind; watch again to resync"));
  }
  if (queue_.empty()) return std::nullopt;
  v1::DeviceEvent event = std::move(queue_.front());
  queue_.pop_front();
  return event;
}

void WatchSubscription::Push(const v1::DeviceEvent& event) {
  if (!device_id_.empty() && event.device().id() != device_id_) return;
  std::lock_guard lock(mu_);
  if (queue_.size() >= kMaxQueued) {
    overflowed_ = true;
  } else {
    queue_.push_back(event);
  }
  cv_.notify_all();
}

void WatchSubscription::Close() {
  std::lock_guard lock(mu_);
  closed_ = true;
  cv_.notify_all();
}

// --- DeviceManager: bookkeeping ------------------------------------------------------------------

DeviceManager::DeviceManager(ManagerOptions options, Registry* registry)
    : options_(std::move(options)), registry_(registry) {
  if (!options_.xen_platform.empty() && options_.xen_platform != "none") {
    xen_toolstack_ = std::make_unique<XenToolstack>(options_.xen_platform, options_.xen_run_dir);
  }
}

DeviceManager::~DeviceManager() { Shutdown(false, std::chrono::milliseconds(0)); }

std::string DeviceManager::ControlSocketPath(const std::string& device_id) const {
  return absl::StrCat(options_.state_dir, "/workers/", device_id, ".sock");
}

absl::Status DeviceManager::TimedRegistryWrite(const std::function<absl::Status()>& write) {
  auto start = std::chrono::steady_clock::now();
  absl::Status s = write();
  if (options_.metrics) {
    options_.metrics->RegistryWrite(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return s;
}

internal::WorkerConfig DeviceManager::MakeConfig(const v1::Device& device) const {
  internal::WorkerConfig config;
  config.set_device_id(device.id());
  config.set_generation(device.status().worker_generation());
  *config.mutable_spec() = device.spec();
  config.set_control_socket(ControlSocketPath(device.id()));
  config.set_size_bytes(device.status().size_bytes());
  if (device.spec().has_xen() && xen_toolstack_) {
    config.set_xen_platform(options_.xen_platform);
    config.set_xen_run_dir(options_.xen_run_dir);
    config.set_xen_grant_copy(options_.xen_grant_copy);
    config.set_xen_max_persistent_grants(static_cast<uint32_t>(options_.xen_max_persistent_grants));
    // The device's own polling window, else the controller's default.
    config.set_xen_poll_us(device.spec().xen().has_poll_us()
                               ? device.spec().xen().poll_us()
                               : static_cast<uint32_t>(options_.xen_poll_us));
    if (absl::StatusOr<uint32_t> devid =
            ParseXenVirtualDevice(device.spec().xen().virtual_device());
        devid.ok()) {
      config.set_xen_devid(*devid);
    }
  }
  if (!options_.metrics_host.empty()) config.set_metrics_listen(options_.metrics_host + ":0");
  // Before every generation: counters continue across worker crashes (kept if valid).
  std::string stats = worker::StatsSegmentPath(options_.state_dir, device.id());
  if (absl::Status s = worker::PrepareStatsSegment(stats, device.id()); s.ok()) {
    config.set_stats_segment(stats);
  } else {
    BP_LOG(Error) << "device " << device.id() << ": no stats segment, counters will restart with "
                  << "each worker: " << s.message();
  }
  if (device.spec().has_xen() && !config.xen_platform().empty() &&
      config.xen_platform() != "none") {
    // Kept across generations: the next worker answers what a crashed one left unanswered.
    std::string journal = worker::xen::BlkifJournalPath(options_.state_dir, device.id());
    if (absl::Status s = worker::xen::PrepareBlkifJournal(journal); s.ok()) {
      config.set_xen_request_journal(journal);
    } else {
      BP_LOG(Error) << "device " << device.id() << ": no request journal, a worker crash may "
                    << "lose the guest's requests in flight: " << s.message();
    }
  }
  return config;
}

DeviceManager::Entry* DeviceManager::FindLocked(const std::string& device_id) {
  auto it = devices_.find(device_id);
  return it == devices_.end() ? nullptr : it->second.get();
}

absl::StatusOr<DeviceManager::Entry*> DeviceManager::GetLocked(const std::string& device_id) {
  if (absl::Status s = ValidateDeviceId(device_id); !s.ok()) return s;
  Entry* entry = FindLocked(device_id);
  if (entry == nullptr) {
    return absl::NotFoundError(absl::StrCat("device_id: no device \"", device_id, "\""));
  }
  return entry;
}

void DeviceManager::PublishLocked(v1::DeviceEvent::Kind kind, const v1::Device& device,
                                  v1::DeviceState previous) {
  v1::DeviceEvent event;
  event.set_kind(kind);
  *event.mutable_device() = device;
  event.set_previous_state(previous);
  event.set_revision(++revision_);
  *event.mutable_time() = Now();
  for (auto it = watchers_.begin(); it != watchers_.end();) {
    if (std::shared_ptr<WatchSubscription> w = it->lock()) {
      w->Push(event);
      ++it;
    } else {
      it = watchers_.erase(it);
    }
  }
  cv_.notify_all();
}

absl::Status DeviceManager::UpdateLocked(Entry& entry,
                                         const std::function<void(v1::DeviceStatus&)>& mutate,
                                         const std::string& reason) {
  v1::Device updated = entry.device;
  mutate(*updated.mutable_status());
  v1::DeviceState previous = entry.device.status().state();
  v1::DeviceState next = updated.status().state();
  if (google::protobuf::util::MessageDifferencer::Equals(updated, entry.device)) {
    return absl::OkStatus();
  }
  if (next != previous) {
    if (!IsAllowedTransition(previous, next)) {
      BP_LOG(Warning) << "device " << entry.device.id() << ": unexpected transition "
                      << StateName(previous) << " -> " << StateName(next) << " (" << reason << ")";
    }
    *updated.mutable_status()->mutable_state_changed_at() = Now();
  }
  if (absl::Status s =
          TimedRegistryWrite([&] { return registry_->Put(updated, previous, reason); });
      !s.ok()) {
    BP_LOG(Error) << "device " << entry.device.id() << ": " << s;
    return s;
  }
  entry.device = std::move(updated);
  if (next != previous) {
    BP_LOG(Info) << "device " << entry.device.id() << ": " << StateName(previous) << " -> "
                 << StateName(next) << " (" << reason << ")";
  }
  PublishLocked(
      next != previous ? v1::DeviceEvent::KIND_STATE_CHANGED : v1::DeviceEvent::KIND_UPDATED,
      entry.device, previous);
  return absl::OkStatus();
}

absl::Status DeviceManager::ApplyWorkerStatusLocked(Entry& entry,
                                                    const internal::WorkerStatus& status,
                                                    const std::string& reason) {
  entry.last_worker_status = status;
  return UpdateLocked(
      entry,
      [&](v1::DeviceStatus& s) {
        // While detaching, the worker's own state (still serving, draining) does not undo it.
        if (!entry.stopping) s.set_state(FromWorkerState(status.state()));
        if (status.state() == internal::WORKER_STATE_FAILED) s.set_last_error(status.error());
        if (status.size_bytes() != 0) s.set_size_bytes(status.size_bytes());
        s.set_highest_written_offset(
            std::max(s.highest_written_offset(), status.highest_written_offset()));
        s.set_metrics_endpoint(status.metrics_endpoint());
        *s.mutable_frontend() = status.frontend();
        s.set_worker_pid(status.pid());
      },
      reason);
}

void DeviceManager::RemoveLocked(Entry& entry, const std::string& reason) {
  std::string id = entry.device.id();
  v1::DeviceState previous = entry.device.status().state();
  if (absl::Status s = TimedRegistryWrite([&] { return registry_->Delete(id, previous, reason); });
      !s.ok()) {
    BP_LOG(Error) << "device " << id << ": cannot remove from the registry: " << s;
  }
  ::unlink(ControlSocketPath(id).c_str());
  if (entry.device.spec().has_xen() && xen_toolstack_) {
    // After the worker closed the backend (Closing -> Closed): the toolstack's last step.
    if (absl::StatusOr<uint32_t> devid =
            ParseXenVirtualDevice(entry.device.spec().xen().virtual_device());
        devid.ok()) {
      (void)xen_toolstack_->RemoveVbd(entry.device.spec(), *devid);
    }
  }
  worker::RemoveStatsSegment(worker::StatsSegmentPath(options_.state_dir, id));
  worker::xen::RemoveBlkifJournal(worker::xen::BlkifJournalPath(options_.state_dir, id));
  BP_LOG(Info) << "device " << id << ": removed (" << reason << ")";
  v1::Device last = entry.device;
  if (entry.monitor.joinable()) finished_monitors_.push_back(std::move(entry.monitor));
  devices_.erase(id);
  PublishLocked(v1::DeviceEvent::KIND_DETACHED, last, previous);
}

void DeviceManager::Wake(Entry& entry) {
  uint64_t one = 1;
  if (entry.wake.valid()) {
    ssize_t unused = ::write(entry.wake.get(), &one, sizeof(one));
    (void)unused;
  }
}

void DeviceManager::StartMonitorLocked(Entry& entry) {
  if (entry.monitor.joinable()) finished_monitors_.push_back(std::move(entry.monitor));
  if (!entry.wake.valid()) entry.wake.Reset(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  entry.monitor_running = true;
  entry.monitor = std::thread([this, e = &entry] { RunMonitor(e); });
}

absl::Status DeviceManager::CheckConflictsLocked(const std::string& device_id,
                                                 const v1::DeviceSpec& spec,
                                                 const std::string& resolved_path) {
  for (const auto& [id, other] : devices_) {
    if (id == device_id) continue;
    const v1::DeviceSpec& o = other->device.spec();
    char resolved[PATH_MAX];
    std::string other_path =
        realpath(o.backend().path().c_str(), resolved) ? resolved : o.backend().path();
    // Null backends share nothing.
    const bool has_file = !spec.backend().has_null() && !o.backend().has_null();
    if (has_file && other_path == resolved_path &&
        !(spec.backend().read_only() && o.backend().read_only())) {
      return absl::FailedPreconditionError(
          absl::StrCat("spec.backend.path: ", spec.backend().path(), " is already used by device ",
                       id, "; two writers would corrupt it"));
    }
    if (spec.has_xen() && o.has_xen() && spec.xen().domid() == o.xen().domid() &&
        *ParseXenVirtualDevice(spec.xen().virtual_device()) ==
            *ParseXenVirtualDevice(o.xen().virtual_device())) {
      return absl::AlreadyExistsError(
          absl::StrCat("spec.xen.virtual_device: ", spec.xen().virtual_device(), " of domain ",
                       spec.xen().domid(), " is already served by device ", id));
    }
    if (spec.has_vhost_user() && o.has_vhost_user() &&
        spec.vhost_user().socket_path() == o.vhost_user().socket_path()) {
      return absl::AlreadyExistsError(
          absl::StrCat("spec.vhost_user.socket_path: ", spec.vhost_user().socket_path(),
                       " is already used by device ", id));
    }
  }
  return absl::OkStatus();
}

// --- Start / Shutdown -------------------------------------------------------------------------

absl::Status DeviceManager::Start() {
  std::error_code ec;
  std::filesystem::create_directories(options_.state_dir + "/workers", ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create ", options_.state_dir, "/workers: ", ec.message()));
  }
  absl::StatusOr<std::vector<v1::Device>> devices = registry_->LoadAll();
  if (!devices.ok()) return devices.status();

  for (v1::Device& device : *devices) {
    const std::string id = device.id();
    const v1::DeviceState state = device.status().state();
    auto entry = std::make_unique<Entry>();
    entry->device = device;
    entry->drain_wanted = state == v1::DEVICE_STATE_DRAINING || state == v1::DEVICE_STATE_DRAINED;
    entry->stopping = state == v1::DEVICE_STATE_DETACHING;

    absl::StatusOr<std::unique_ptr<WorkerProcess>> adopted = absl::NotFoundError("no worker");
    if (state != v1::DEVICE_STATE_FAILED) {
      adopted = WorkerProcess::Adopt(device.status().worker_pid(), ControlSocketPath(id), id,
                                     device.status().worker_generation());
    }
    std::lock_guard lock(mu_);
    Entry& e = *entry;
    devices_[id] = std::move(entry);
    if (adopted.ok()) {
      e.worker = std::move(*adopted);
      BP_LOG(Info) << "device " << id << ": re-adopted worker pid " << e.worker->pid()
                   << " generation " << device.status().worker_generation();
      ApplyWorkerStatusLocked(e, e.worker->initial_status(), "worker re-adopted").IgnoreError();
      StartMonitorLocked(e);
    } else if (state == v1::DEVICE_STATE_DETACHING) {
      RemoveLocked(e, "detach finished while the controller was down");
    } else if (state == v1::DEVICE_STATE_FAILED) {
      BP_LOG(Info) << "device " << id << ": FAILED (" << device.status().last_error() << ")";
    } else {
      BP_LOG(Warning) << "device " << id << ": worker pid " << device.status().worker_pid()
                      << " not adopted (" << adopted.status().message() << "); respawning";
      UpdateLocked(
          e,
          [&](v1::DeviceStatus& s) {
            s.set_state(v1::DEVICE_STATE_ATTACHING);
            s.set_worker_pid(0);
            s.clear_metrics_endpoint();  // no worker, no target
            s.set_last_error(absl::StrCat("worker was gone after a controller restart: ",
                                          adopted.status().message()));
          },
          "worker gone after controller restart")
          .IgnoreError();
      StartMonitorLocked(e);
    }
  }
  // Detaches that were in progress when the controller stopped: finish them.
  std::vector<std::pair<std::string, std::shared_ptr<WorkerProcess>>> to_stop;
  {
    std::lock_guard lock(mu_);
    for (auto& [id, e] : devices_) {
      if (e->stopping && e->worker) to_stop.emplace_back(id, e->worker);
    }
  }
  for (auto& [id, worker] : to_stop) {
    internal::ControlRequest stop;
    stop.mutable_stop();
    worker->Call(stop, Clock::now() + std::chrono::seconds(5)).IgnoreError();
  }
  return absl::OkStatus();
}

void DeviceManager::CloseWatches() {
  std::lock_guard lock(mu_);
  for (auto& weak : watchers_) {
    if (std::shared_ptr<WatchSubscription> w = weak.lock()) w->Close();
  }
  watchers_.clear();
}

void DeviceManager::Shutdown(bool stop_workers, std::chrono::milliseconds timeout) {
  std::vector<std::thread> threads;
  std::vector<std::shared_ptr<WorkerProcess>> workers;
  {
    std::lock_guard lock(mu_);
    if (shutting_down_ && devices_.empty() && finished_monitors_.empty()) return;
    shutting_down_ = true;
    for (auto& [id, e] : devices_) {
      Wake(*e);
      if (e->monitor.joinable()) threads.push_back(std::move(e->monitor));
      if (e->worker) workers.push_back(e->worker);
    }
    for (std::thread& t : finished_monitors_) threads.push_back(std::move(t));
    finished_monitors_.clear();
    cv_.notify_all();
  }
  for (std::thread& t : threads) t.join();
  if (!stop_workers) return;
  // Monitors are gone, so nobody reads replies: send Stop and watch the pidfds instead.
  for (auto& w : workers) {
    internal::ControlRequest stop;
    stop.mutable_stop();
    w->Send(stop).IgnoreError();
  }
  auto deadline = Clock::now() + timeout;
  for (auto& w : workers) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    pollfd p{w->pidfd(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(std::max<int64_t>(0, left.count()))) <= 0) {
      BP_LOG(Warning) << "worker pid " << w->pid() << " did not stop in time; killing it";
      w->Signal(SIGKILL).IgnoreError();
    }
  }
}

// --- Monitor thread -----------------------------------------------------------------------------

bool DeviceManager::SleepUntil(Entry* entry, Clock::time_point until) {
  for (;;) {
    {
      std::lock_guard lock(mu_);
      if (shutting_down_ || entry->stopping) return false;
    }
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now());
    if (left.count() <= 0) return true;
    pollfd p{entry->wake.get(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) > 0) {
      uint64_t v;
      ssize_t unused = ::read(entry->wake.get(), &v, sizeof(v));
      (void)unused;
    }
  }
}

bool DeviceManager::RecordWorkerLossLocked(Entry& entry, const std::string& why) {
  if (options_.metrics) options_.metrics->WorkerCrashed();
  Clock::time_point now = Clock::now();
  entry.crashes.push_back(now);
  while (!entry.crashes.empty() && entry.crashes.front() < now - options_.restart_window) {
    entry.crashes.pop_front();
  }
  int crashes = static_cast<int>(entry.crashes.size());
  if (crashes > options_.max_restarts) {
    UpdateLocked(
        entry,
        [&](v1::DeviceStatus& st) {
          st.set_state(v1::DEVICE_STATE_FAILED);
          st.set_worker_pid(0);
          st.clear_metrics_endpoint();  // no worker, no target
          st.set_last_error(absl::StrCat(why, "; ", crashes, " failures within ",
                                         options_.restart_window.count() / 1000,
                                         " s, not restarting (ResumeDevice retries)"));
        },
        "worker failed too often")
        .IgnoreError();
    return true;
  }
  auto backoff =
      std::min(options_.initial_backoff * (1 << std::min(crashes - 1, 10)), options_.max_backoff);
  entry.restart_at = now + backoff;
  UpdateLocked(
      entry,
      [&](v1::DeviceStatus& st) {
        st.set_state(v1::DEVICE_STATE_ATTACHING);
        st.set_worker_pid(0);
        st.clear_metrics_endpoint();  // no worker, no target
        st.set_restart_count(st.restart_count() + 1);
        st.set_last_error(absl::StrCat(why, "; restarting in ", backoff.count(), " ms"));
      },
      "worker lost")
      .IgnoreError();
  return false;
}

void DeviceManager::RunMonitor(Entry* entry) {
  const std::string id = entry->device.id();
  for (;;) {
    std::shared_ptr<WorkerProcess> worker;
    {
      std::lock_guard lock(mu_);
      if (shutting_down_) break;
      worker = entry->worker;
      if (!worker && entry->stopping) {
        RemoveLocked(*entry, "detached");
        return;  // `entry` is gone
      }
    }

    if (!worker) {
      // (Re)start the worker once its backoff has passed.
      if (!SleepUntil(entry, entry->restart_at)) continue;
      internal::WorkerConfig config;
      {
        std::lock_guard lock(mu_);
        absl::Status s = UpdateLocked(
            *entry,
            [&](v1::DeviceStatus& st) {
              st.set_state(v1::DEVICE_STATE_ATTACHING);
              st.set_worker_generation(st.worker_generation() + 1);
              st.set_worker_pid(0);
              st.clear_metrics_endpoint();  // no worker, no target
            },
            "starting worker");
        if (!s.ok()) {
          entry->restart_at = Clock::now() + options_.max_backoff;
          continue;
        }
        config = MakeConfig(entry->device);
      }
      absl::StatusOr<std::unique_ptr<WorkerProcess>> spawned =
          WorkerProcess::Spawn(options_.spawn, config);
      std::lock_guard lock(mu_);
      if (spawned.ok()) {
        if (options_.metrics) {
          options_.metrics->WorkerSpawned();
          options_.metrics->WorkerRestarted();
        }
        entry->worker = std::move(*spawned);
        BP_LOG(Info) << "device " << id << ": worker pid " << entry->worker->pid() << " generation "
                     << config.generation() << " started";
        ApplyWorkerStatusLocked(*entry, entry->worker->initial_status(), "worker started")
            .IgnoreError();
        worker = entry->worker;
        if (entry->stopping) {
          worker->Signal(SIGTERM).IgnoreError();  // detached during the restart
        } else if (entry->drain_wanted) {
          // The device was drained before the crash: the new worker starts drained too. Its reply
          // and DRAINED event arrive through the reads below.
          internal::ControlRequest drain;
          drain.mutable_drain();
          worker->Send(drain).IgnoreError();
        }
      } else {
        // A worker that cannot start counts as a crash: same backoff and give-up rule.
        if (RecordWorkerLossLocked(*entry, std::string(spawned.status().message()))) {
          entry->monitor_running = false;
          return;
        }
        continue;
      }
    }
    // Watch the worker until it exits or the monitor is told to stop.
    bool control_open = true;
    std::string exit_reason;
    for (;;) {
      pollfd fds[3] = {{worker->pidfd(), POLLIN, 0},
                       {entry->wake.get(), POLLIN, 0},
                       {control_open ? worker->control_fd() : -1, POLLIN, 0}};
      int n = ::poll(fds, 3, -1);
      if (n < 0 && errno == EINTR) continue;
      if (fds[1].revents & POLLIN) {
        uint64_t v;
        ssize_t unused = ::read(entry->wake.get(), &v, sizeof(v));
        (void)unused;
        std::lock_guard lock(mu_);
        if (shutting_down_) {
          entry->monitor_running = false;
          return;  // leave the worker running
        }
      }
      if (fds[2].revents & (POLLIN | POLLHUP | POLLERR)) {
        absl::Status read = worker->ReadMessages(
            [&](const internal::WorkerStatus& status, const std::string& reason) {
              std::lock_guard lock(mu_);
              ApplyWorkerStatusLocked(*entry, status, reason).IgnoreError();
            });
        if (!read.ok()) control_open = false;
      }
      if (fds[0].revents & POLLIN) {
        // Replies and events the worker sent before dying still count.
        if (control_open) {
          worker
              ->ReadMessages([&](const internal::WorkerStatus& status, const std::string& reason) {
                std::lock_guard lock(mu_);
                ApplyWorkerStatusLocked(*entry, status, reason).IgnoreError();
              })
              .IgnoreError();
        }
        exit_reason = worker->Reap();
        worker->FailPendingCalls(absl::UnavailableError(absl::StrCat(
            "the device's worker ", exit_reason, " before answering; it is being restarted")));
        break;
      }
    }

    std::lock_guard lock(mu_);
    entry->worker.reset();
    if (entry->stopping) {
      RemoveLocked(*entry, absl::StrCat("detached; worker ", exit_reason));
      return;  // `entry` is gone
    }
    BP_LOG(Warning) << "device " << id << ": worker pid " << worker->pid() << " " << exit_reason;
    if (RecordWorkerLossLocked(*entry, absl::StrCat("worker ", exit_reason))) {
      entry->monitor_running = false;
      return;
    }
  }
  std::lock_guard lock(mu_);
  entry->monitor_running = false;
}

// --- API
// ------------------------------------------------------------------------------------------

absl::StatusOr<v1::Device> DeviceManager::Attach(const v1::AttachDeviceRequest& request) {
  if (absl::Status s = ValidateDeviceId(request.device_id()); !s.ok()) return s;
  if (!request.has_spec()) return absl::InvalidArgumentError("spec: must be set");
  if (absl::Status s = ValidateSpec(request.spec()); !s.ok()) return s;
  v1::DeviceSpec spec = NormalizeSpec(request.spec());
  const std::string& id = request.device_id();
  {
    // Idempotency before touching the file system: a retried attach must not fail because the
    // device's own worker now uses the file.
    std::lock_guard lock(mu_);
    if (Entry* existing = FindLocked(id)) {
      // The stored spec is normalised again: it may come from a controller whose normalisation
      // spelled out fewer defaults (for example before spec.backend.null.completion).
      const v1::DeviceSpec stored = NormalizeSpec(existing->device.spec());
      if (google::protobuf::util::MessageDifferencer::Equals(stored, spec)) {
        return existing->device;
      }
      return absl::AlreadyExistsError(absl::StrCat("device_id: device ", id,
                                                   " already exists with a different spec (",
                                                   SpecDifference(stored, spec), ")"));
    }
  }
  absl::StatusOr<BackingInfo> backing = BackingInfo();
  if (spec.backend().has_null()) {
    backing->size_bytes = spec.backend().null().size_bytes();  // no file
  } else {
    backing = InspectBacking(spec.backend(), options_.backing_roots);
  }
  if (!backing.ok()) return backing.status();

  internal::WorkerConfig config;
  {
    std::lock_guard lock(mu_);
    if (shutting_down_) return absl::UnavailableError("blockplaned is shutting down");
    if (Entry* existing = FindLocked(id)) {  // raced with another attach of the same id
      if (google::protobuf::util::MessageDifferencer::Equals(NormalizeSpec(existing->device.spec()),
                                                             spec)) {
        return existing->device;
      }
      return absl::AlreadyExistsError(absl::StrCat("device_id: device ", id, " already exists"));
    }
    if (absl::Status s = CheckConflictsLocked(id, spec, backing->resolved_path); !s.ok()) return s;
    auto entry = std::make_unique<Entry>();
    v1::Device& d = entry->device;
    d.set_id(id);
    *d.mutable_spec() = spec;
    v1::DeviceStatus* st = d.mutable_status();
    st->set_state(v1::DEVICE_STATE_ATTACHING);
    st->set_size_bytes(backing->size_bytes);
    st->set_worker_generation(1);
    *st->mutable_created_at() = Now();
    *st->mutable_state_changed_at() = st->created_at();
    if (absl::Status s = TimedRegistryWrite(
            [&] { return registry_->Put(d, v1::DEVICE_STATE_UNSPECIFIED, "attach"); });
        !s.ok()) {
      return s;
    }
    config = MakeConfig(d);
    PublishLocked(v1::DeviceEvent::KIND_ATTACHED, d, v1::DEVICE_STATE_UNSPECIFIED);
    devices_[id] = std::move(entry);
  }

  // Like a toolstack: the vbd's backend and frontend directories exist before the backend runs.
  if (spec.has_xen() && xen_toolstack_) {
    if (absl::Status written = xen_toolstack_->AddVbd(spec, config.xen_devid()); !written.ok()) {
      std::lock_guard lock(mu_);
      if (Entry* entry = FindLocked(id)) {
        RemoveLocked(*entry, absl::StrCat("attach failed: ", written.message()));
      }
      return written;
    }
  }

  absl::StatusOr<std::unique_ptr<WorkerProcess>> worker =
      WorkerProcess::Spawn(options_.spawn, config);
  std::lock_guard lock(mu_);
  Entry* entry = FindLocked(id);
  if (entry == nullptr) return absl::AbortedError("device_id: detached while attaching");
  if (!worker.ok()) {
    // Attach is all or nothing: a device whose worker cannot start is not kept.
    RemoveLocked(*entry, absl::StrCat("attach failed: ", worker.status().message()));
    return absl::FailedPreconditionError(
        absl::StrCat("spec: the worker could not serve this device: ", worker.status().message()));
  }
  entry->worker = std::move(*worker);
  if (options_.metrics) options_.metrics->WorkerSpawned();
  ApplyWorkerStatusLocked(*entry, entry->worker->initial_status(), "worker started").IgnoreError();
  StartMonitorLocked(*entry);
  return entry->device;
}

absl::StatusOr<v1::Device> DeviceManager::Drain(const std::string& device_id,
                                                Clock::time_point deadline) {
  std::shared_ptr<WorkerProcess> worker;
  {
    std::lock_guard lock(mu_);
    absl::StatusOr<Entry*> entry = GetLocked(device_id);
    if (!entry.ok()) return entry.status();
    v1::DeviceState state = (*entry)->device.status().state();
    if (absl::Status s = CheckOperationAllowed(Operation::kDrain, device_id, state); !s.ok()) {
      return s;
    }
    if (state == v1::DEVICE_STATE_DRAINED) return (*entry)->device;
    worker = (*entry)->worker;
    if (!worker) return absl::UnavailableError("device_id: the device's worker is restarting");
    (*entry)->drain_wanted = true;
  }
  internal::ControlRequest request;
  request.mutable_drain();
  absl::StatusOr<internal::ControlResponse> reply = worker->Call(request, deadline);
  std::unique_lock lock(mu_);
  absl::StatusOr<Entry*> entry = GetLocked(device_id);
  if (!entry.ok()) return absl::AbortedError("device_id: the device was detached while draining");
  if (!reply.ok()) return reply.status();
  // The monitor applied the reply's status (DRAINING or DRAINED) before Call returned.
  bool done = cv_.wait_until(lock, deadline, [&] {
    Entry* e = FindLocked(device_id);
    return e == nullptr || e->device.status().state() != v1::DEVICE_STATE_DRAINING;
  });
  Entry* e = FindLocked(device_id);
  if (e == nullptr) return absl::AbortedError("device_id: the device was detached while draining");
  v1::DeviceState state = e->device.status().state();
  if (state == v1::DEVICE_STATE_DRAINED) return e->device;
  if (!done) {
    return absl::DeadlineExceededError(absl::StrCat(
        "device ", device_id, ": drain did not finish in time: ", e->last_worker_status.in_flight(),
        " requests still in flight; the device stays DRAINING and becomes DRAINED when they "
        "complete (ResumeDevice cancels the drain)"));
  }
  return absl::AbortedError(
      absl::StrCat("device ", device_id, ": drain interrupted, device is now ", StateName(state)));
}

absl::StatusOr<v1::Device> DeviceManager::Resume(const std::string& device_id) {
  std::shared_ptr<WorkerProcess> worker;
  {
    std::lock_guard lock(mu_);
    absl::StatusOr<Entry*> entry = GetLocked(device_id);
    if (!entry.ok()) return entry.status();
    Entry& e = **entry;
    v1::DeviceState state = e.device.status().state();
    if (absl::Status s = CheckOperationAllowed(Operation::kResume, device_id, state); !s.ok()) {
      return s;
    }
    e.drain_wanted = false;
    if (state == v1::DEVICE_STATE_FAILED) {
      // Retry: a fresh worker with a clean crash history.
      e.crashes.clear();
      e.restart_at = Clock::now();
      if (absl::Status s = UpdateLocked(
              e,
              [](v1::DeviceStatus& st) {
                st.set_state(v1::DEVICE_STATE_ATTACHING);
                st.set_restart_count(0);
              },
              "resume of a failed device");
          !s.ok()) {
        return s;
      }
      if (!e.monitor_running) StartMonitorLocked(e);
      return e.device;
    }
    worker = e.worker;
    if (!worker) return absl::UnavailableError("device_id: the device's worker is restarting");
  }
  internal::ControlRequest request;
  request.mutable_resume();
  absl::StatusOr<internal::ControlResponse> reply =
      worker->Call(request, Clock::now() + std::chrono::seconds(10));
  if (!reply.ok()) return reply.status();
  std::lock_guard lock(mu_);
  absl::StatusOr<Entry*> entry = GetLocked(device_id);
  if (!entry.ok()) return entry.status();
  return (*entry)->device;
}

absl::Status DeviceManager::Detach(const std::string& device_id, bool force,
                                   Clock::time_point deadline) {
  std::shared_ptr<WorkerProcess> worker;
  {
    std::lock_guard lock(mu_);
    absl::StatusOr<Entry*> entry = GetLocked(device_id);
    if (!entry.ok()) return entry.status();
    Entry& e = **entry;
    e.stopping = true;
    if (absl::Status s = UpdateLocked(
            e, [](v1::DeviceStatus& st) { st.set_state(v1::DEVICE_STATE_DETACHING); },
            force ? "detach (force)" : "detach");
        !s.ok()) {
      e.stopping = false;
      return s;
    }
    worker = e.worker;
    if (!worker) {
      if (e.monitor_running) {
        Wake(e);  // in restart backoff: the monitor removes the device
      } else {
        RemoveLocked(e, "detached (no worker was running)");
        return absl::OkStatus();
      }
    }
  }
  if (worker) {
    if (force) {
      if (absl::Status s = worker->Signal(SIGKILL); !s.ok()) return s;
    } else {
      internal::ControlRequest request;
      request.mutable_stop()->set_force(false);
      absl::StatusOr<internal::ControlResponse> reply = worker->Call(request, deadline);
      // UNAVAILABLE: the worker exited before its reply was read, which is what we asked for.
      if (!reply.ok() && reply.status().code() != absl::StatusCode::kUnavailable &&
          reply.status().code() != absl::StatusCode::kDeadlineExceeded) {
        return reply.status();
      }
    }
  }
  std::unique_lock lock(mu_);
  bool removed = cv_.wait_until(lock, deadline, [&] { return FindLocked(device_id) == nullptr; });
  if (!removed) {
    Entry* e = FindLocked(device_id);
    return absl::DeadlineExceededError(absl::StrCat(
        "device ", device_id, ": the worker is still draining (",
        e ? e->last_worker_status.in_flight() : 0,
        " requests in flight); it stays DETACHING and is removed when the worker exits; "
        "detach with force to kill it"));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Device> DeviceManager::Resize(const v1::ResizeDeviceRequest& request,
                                                 Clock::time_point deadline) {
  const std::string& id = request.device_id();
  std::shared_ptr<WorkerProcess> worker;
  v1::Device device;
  {
    std::lock_guard lock(mu_);
    absl::StatusOr<Entry*> entry = GetLocked(id);
    if (!entry.ok()) return entry.status();
    if (absl::Status s =
            CheckOperationAllowed(Operation::kResize, id, (*entry)->device.status().state());
        !s.ok()) {
      return s;
    }
    worker = (*entry)->worker;
    device = (*entry)->device;
  }
  if (!worker) return absl::UnavailableError("device_id: the device's worker is restarting");
  if (request.new_size_bytes() < device.status().size_bytes()) {
    // The highest written offset must be current before we decide a shrink is safe.
    internal::ControlRequest hello;
    hello.mutable_hello();
    absl::StatusOr<internal::ControlResponse> fresh = worker->Call(hello, deadline);
    if (!fresh.ok()) return fresh.status();
    device.mutable_status()->set_highest_written_offset(std::max(
        device.status().highest_written_offset(), fresh->status().highest_written_offset()));
  }
  if (absl::Status s = ValidateResize(device, request); !s.ok()) return s;
  if (request.new_size_bytes() == device.status().size_bytes()) return device;
  if (!device.spec().backend().has_null()) {  // a null backend has no file: the worker resizes it
    absl::StatusOr<BackingInfo> backing =
        InspectBacking(device.spec().backend(), options_.backing_roots);
    if (!backing.ok()) return backing.status();
    if (backing->is_block_device) {
      return absl::FailedPreconditionError(
          absl::StrCat("device_id: device ", id, " is backed by the block device ",
                       device.spec().backend().path(), "; resize the block device itself"));
    }
    if (::truncate(backing->resolved_path.c_str(), static_cast<off_t>(request.new_size_bytes())) !=
        0) {
      return absl::FailedPreconditionError(absl::StrCat("spec.backend.path: cannot resize ",
                                                        device.spec().backend().path(), ": ",
                                                        strerror(errno)));
    }
  }
  internal::ControlRequest resize;
  resize.mutable_resize()->set_size_bytes(request.new_size_bytes());
  absl::StatusOr<internal::ControlResponse> reply = worker->Call(resize, deadline);
  std::lock_guard lock(mu_);
  absl::StatusOr<Entry*> entry = GetLocked(id);
  if (!entry.ok()) return entry.status();
  absl::Status persisted = UpdateLocked(
      **entry, [&](v1::DeviceStatus& st) { st.set_size_bytes(request.new_size_bytes()); },
      "resized");
  if (!persisted.ok()) return persisted;
  if (!reply.ok()) {
    // The file has its new size and the registry says so; a restarted worker picks it up.
    return absl::UnavailableError(
        absl::StrCat("the backing file was resized but the worker did "
                     "not confirm the new size: ",
                     reply.status().message()));
  }
  return (*entry)->device;
}

absl::StatusOr<v1::Device> DeviceManager::Get(const std::string& device_id) {
  std::lock_guard lock(mu_);
  absl::StatusOr<Entry*> entry = GetLocked(device_id);
  if (!entry.ok()) return entry.status();
  return (*entry)->device;
}

absl::StatusOr<v1::ListDevicesResponse> DeviceManager::List(const v1::ListDevicesRequest& request) {
  if (request.page_size() < 0 || request.page_size() > kMaxPageSize) {
    return absl::InvalidArgumentError(absl::StrCat("page_size: ", request.page_size(),
                                                   " is out of range; use 0 (default ",
                                                   kDefaultPageSize, ") to ", kMaxPageSize));
  }
  for (int state : request.states()) {
    if (!v1::DeviceState_IsValid(state) || state == v1::DEVICE_STATE_UNSPECIFIED) {
      return absl::InvalidArgumentError(absl::StrCat("states: unknown device state ", state));
    }
  }
  if (!v1::FrontendKind_IsValid(request.frontend_kind())) {
    return absl::InvalidArgumentError(
        absl::StrCat("frontend_kind: unknown value ", request.frontend_kind()));
  }
  std::string after;
  if (!request.page_token().empty()) {
    absl::StatusOr<std::string> parsed = ParsePageToken(request.page_token());
    if (!parsed.ok()) return parsed.status();
    after = *parsed;
  }
  int page_size = request.page_size() == 0 ? kDefaultPageSize : request.page_size();
  v1::ListDevicesResponse response;
  std::lock_guard lock(mu_);
  auto it = after.empty() ? devices_.begin() : devices_.upper_bound(after);
  for (; it != devices_.end(); ++it) {
    const v1::Device& d = it->second->device;
    if (!request.states().empty() && std::find(request.states().begin(), request.states().end(),
                                               d.status().state()) == request.states().end()) {
      continue;
    }
    if (request.frontend_kind() != v1::FRONTEND_KIND_UNSPECIFIED &&
        KindOf(d.spec()) != request.frontend_kind()) {
      continue;
    }
    if (response.devices_size() == page_size) {
      response.set_next_page_token(MakePageToken(response.devices().rbegin()->id()));
      break;
    }
    *response.add_devices() = d;
  }
  return response;
}

absl::StatusOr<v1::DeviceStats> DeviceManager::Stats(const std::string& device_id,
                                                     Clock::time_point deadline) {
  internal::ControlRequest request;
  request.mutable_stats();
  return CallForStats(device_id, std::move(request), deadline);
}

absl::StatusOr<v1::DeviceStats> DeviceManager::SelfTestIo(const std::string& device_id,
                                                          const internal::SelfTestIoRequest& io,
                                                          Clock::time_point deadline) {
  internal::ControlRequest request;
  *request.mutable_self_test_io() = io;
  return CallForStats(device_id, std::move(request), deadline);
}

absl::StatusOr<v1::DeviceStats> DeviceManager::CallForStats(const std::string& device_id,
                                                            internal::ControlRequest request,
                                                            Clock::time_point deadline) {
  std::shared_ptr<WorkerProcess> worker;
  uint64_t generation;
  {
    std::lock_guard lock(mu_);
    absl::StatusOr<Entry*> entry = GetLocked(device_id);
    if (!entry.ok()) return entry.status();
    if (absl::Status s =
            CheckOperationAllowed(Operation::kStats, device_id, (*entry)->device.status().state());
        !s.ok()) {
      return s;
    }
    worker = (*entry)->worker;
    generation = (*entry)->device.status().worker_generation();
  }
  if (!worker) return absl::UnavailableError("device_id: the device's worker is restarting");
  absl::StatusOr<internal::ControlResponse> reply = worker->Call(std::move(request), deadline);
  if (!reply.ok()) return reply.status();
  v1::DeviceStats stats = reply->stats();
  stats.set_device_id(device_id);
  stats.set_worker_generation(generation);
  return stats;
}

absl::StatusOr<std::shared_ptr<WatchSubscription>> DeviceManager::Watch(
    const std::string& device_id, std::vector<v1::Device>* snapshot) {
  std::lock_guard lock(mu_);
  if (!device_id.empty()) {
    absl::StatusOr<Entry*> entry = GetLocked(device_id);
    if (!entry.ok()) return entry.status();
  }
  auto subscription = std::make_shared<WatchSubscription>(device_id);
  for (const auto& [id, e] : devices_) {
    if (device_id.empty() || id == device_id) snapshot->push_back(e->device);
  }
  watchers_.push_back(subscription);
  return subscription;
}

}  // namespace blockplane::controller
