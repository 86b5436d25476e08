#include "controller/worker_process.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/unix_socket.h"

extern char** environ;

namespace blockplane::controller {
namespace {

int PidfdOpen(pid_t pid) { return static_cast<int>(syscall(SYS_pidfd_open, pid, 0)); }

absl::Status Errno(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", strerror(errno)));
}

}  // namespace

absl::StatusOr<common::UniqueFd> ConnectControlSocket(const std::string& path) {
  return common::ConnectUnix(path);
}

WorkerProcess::WorkerProcess(pid_t pid, common::UniqueFd pidfd, common::UniqueFd control,
                             bool child)
    : pid_(pid), pidfd_(std::move(pidfd)), control_(std::move(control)), child_(child) {}

WorkerProcess::~WorkerProcess() {
  if (child_ && Exited()) Reap();
}

absl::StatusOr<std::unique_ptr<WorkerProcess>> WorkerProcess::Spawn(
    const SpawnOptions& options, const internal::WorkerConfig& config) {
  // The config travels on a sealed memfd: no temp file to clean up, nothing on the command line.
  common::UniqueFd config_fd(memfd_create("blockplane-worker-config", MFD_CLOEXEC));
  if (!config_fd) return Errno("memfd_create");
  std::string bytes = config.SerializeAsString();
  if (::write(config_fd.get(), bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size())) {
    return Errno("write worker config");
  }
  ::lseek(config_fd.get(), 0, SEEK_SET);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, config_fd.get(), 3);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, all_default;
  sigemptyset(&none);
  sigemptyset(&all_default);
  sigaddset(&all_default, SIGPIPE);
  sigaddset(&all_default, SIGTERM);
  sigaddset(&all_default, SIGINT);
  sigaddset(&all_default, SIGHUP);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all_default);
  // Own session: a terminal's Ctrl-C or the controller's death does not reach the worker.
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

  std::vector<std::string> args = {options.worker_binary, "--config-fd=3",
                                   "--log-level=" + options.log_level};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  int rc = posix_spawn(&pid, options.worker_binary.c_str(), &actions, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot start worker ", options.worker_binary, ": ", strerror(rc)));
  }
  common::UniqueFd pidfd(PidfdOpen(pid));
  if (!pidfd) {
    int err = errno;
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return absl::InternalError(absl::StrCat("pidfd_open: ", strerror(err)));
  }

  // Wait for the worker's control socket; give up if it dies or takes too long.
  auto deadline = Clock::now() + options.start_timeout;
  common::UniqueFd control;
  auto delay = std::chrono::milliseconds(2);
  for (;;) {
    absl::StatusOr<common::UniqueFd> fd = ConnectControlSocket(config.control_socket());
    if (fd.ok()) {
      control = std::move(*fd);
      break;
    }
    pollfd p{pidfd.get(), POLLIN, 0};
    bool died = ::poll(&p, 1, 0) > 0;
    if (died || Clock::now() > deadline) {
      std::unique_ptr<WorkerProcess> failed(
          new WorkerProcess(pid, std::move(pidfd), common::UniqueFd(), true));
      std::string how = "did not open its control socket in time";
      if (!died) {
        failed->Signal(SIGKILL).IgnoreError();
        pollfd wait{failed->pidfd(), POLLIN, 0};
        ::poll(&wait, 1, 5000);
      } else {
        how = failed->Reap();
      }
      return absl::UnavailableError(absl::StrCat("worker for ", config.device_id(), " ", how));
    }
    std::this_thread::sleep_for(delay);
    delay = std::min(delay * 2, std::chrono::milliseconds(50));
  }
  std::unique_ptr<WorkerProcess> process(
      new WorkerProcess(pid, std::move(pidfd), std::move(control), true));
  // Nobody else reads the socket yet: run the Hello exchange inline.
  absl::StatusOr<internal::ControlResponse> reply = process->ExchangeHello();
  if (!reply.ok() || reply->code() != 0) {
    process->Signal(SIGKILL).IgnoreError();
    pollfd wait{process->pidfd(), POLLIN, 0};
    ::poll(&wait, 1, 5000);
    std::string why = reply.ok() ? reply->message() : reply.status().ToString();
    return absl::UnavailableError(
        absl::StrCat("worker for ", config.device_id(), " failed to start: ", why,
                     process->Exited() ? absl::StrCat(" (", process->Reap(), ")") : ""));
  }
  process->initial_status_ = reply->status();
  return process;
}

absl::StatusOr<internal::ControlResponse> WorkerProcess::ExchangeHello() {
  internal::ControlRequest hello;
  hello.set_id(next_id_++);
  hello.mutable_hello();
  if (absl::Status sent = common::WriteFrame(control_fd(), hello); !sent.ok()) return sent;
  // A worker may send events before it reads the Hello (a restarted worker whose frontend is
  // still connected re-attaches at once and reports it): the Hello reply carries the current
  // status, so those events are superseded. Bounded: a few events at most, each read waits 5 s.
  for (int skipped = 0;; ++skipped) {
    absl::StatusOr<std::string> frame = common::ReadFrameBlocking(control_fd(), reader_, 5000);
    if (!frame.ok()) return frame.status();
    internal::WorkerMessage message;
    if (!message.ParseFromString(*frame)) {
      return absl::DataLossError("worker sent an undecodable message");
    }
    if (message.has_response()) return std::move(*message.mutable_response());
    if (!message.has_event() || skipped >= 16) {
      return absl::DataLossError("worker sent no reply to Hello");
    }
  }
}

absl::StatusOr<std::unique_ptr<WorkerProcess>> WorkerProcess::Adopt(
    pid_t pid, const std::string& control_socket, const std::string& device_id,
    uint64_t generation) {
  if (pid <= 0) return absl::FailedPreconditionError("no worker pid recorded");
  common::UniqueFd pidfd(PidfdOpen(pid));
  if (!pidfd) {
    return absl::FailedPreconditionError(absl::StrCat("worker pid ", pid, " is gone"));
  }
  absl::StatusOr<common::UniqueFd> control = ConnectControlSocket(control_socket);
  if (!control.ok()) return absl::FailedPreconditionError(control.status().message());
  // pid 0 for "not our child": we cannot wait for it, only watch its pidfd.
  std::unique_ptr<WorkerProcess> process(
      new WorkerProcess(pid, std::move(pidfd), std::move(*control), false));
  absl::StatusOr<internal::ControlResponse> reply = process->ExchangeHello();
  if (!reply.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("worker did not answer Hello: ", reply.status().message()));
  }
  const internal::WorkerStatus& status = reply->status();
  // The pidfd was opened before the Hello: if the process answering is `pid` and is still alive,
  // the pidfd refers to it (no pid reuse in between).
  if (status.device_id() != device_id || status.generation() != generation || status.pid() != pid ||
      process->Exited()) {
    return absl::FailedPreconditionError(
        absl::StrCat("process ", pid, " on ", control_socket, " serves ", status.device_id(),
                     " generation ", status.generation(), " pid ", status.pid(), ", not ",
                     device_id, " generation ", generation));
  }
  process->initial_status_ = status;
  return process;
}

absl::StatusOr<internal::ControlResponse> WorkerProcess::Call(internal::ControlRequest request,
                                                              Clock::time_point deadline) {
  uint64_t id;
  {
    std::lock_guard lock(pending_mu_);
    if (closed_) return absl::UnavailableError("worker control connection is closed");
    id = next_id_++;
    pending_[id];
  }
  request.set_id(id);
  absl::Status sent;
  {
    std::lock_guard lock(write_mu_);
    sent = common::WriteFrame(control_fd(), request);
  }
  std::unique_lock lock(pending_mu_);
  if (!sent.ok()) {
    pending_.erase(id);
    return sent;
  }
  bool done = pending_cv_.wait_until(lock, deadline, [&] { return pending_[id].has_value(); });
  if (!done) {
    pending_.erase(id);
    return absl::DeadlineExceededError("the worker did not answer in time");
  }
  absl::StatusOr<internal::ControlResponse> result = std::move(*pending_[id]);
  pending_.erase(id);
  if (result.ok() && result->code() != 0) {
    return absl::Status(static_cast<absl::StatusCode>(result->code()), result->message());
  }
  return result;
}

absl::Status WorkerProcess::Send(internal::ControlRequest request) {
  {
    std::lock_guard lock(pending_mu_);
    request.set_id(next_id_++);
  }
  std::lock_guard lock(write_mu_);
  return common::WriteFrame(control_fd(), request);
}

void WorkerProcess::FailPending(const absl::Status& status) {
  std::lock_guard lock(pending_mu_);
  closed_ = true;
  for (auto& [id, slot] : pending_) {
    if (!slot.has_value()) slot = status;
  }
  pending_cv_.notify_all();
}

absl::Status WorkerProcess::ReadMessages(
    const std::function<void(const internal::WorkerStatus&, const std::string& reason)>&
        on_status) {
  absl::Status read = reader_.ReadAvailable(control_fd());
  for (;;) {
    absl::StatusOr<std::optional<std::string>> frame = reader_.NextFrame();
    if (!frame.ok()) {
      FailPending(frame.status());
      return frame.status();
    }
    if (!frame->has_value()) break;
    internal::WorkerMessage message;
    if (!message.ParseFromString(**frame)) {
      absl::Status bad = absl::DataLossError("worker sent an undecodable message");
      FailPending(bad);
      return bad;
    }
    if (message.has_event()) {
      on_status(message.event().status(), message.event().reason());
    } else if (message.has_response()) {
      if (message.response().has_status()) on_status(message.response().status(), "reply");
      std::lock_guard lock(pending_mu_);
      auto it = pending_.find(message.response().id());
      if (it != pending_.end()) {
        it->second = message.response();
        pending_cv_.notify_all();
      }
    }
  }
  if (!read.ok()) FailPending(read);
  return read;
}

bool WorkerProcess::Exited() const {
  pollfd p{pidfd_.get(), POLLIN, 0};
  return ::poll(&p, 1, 0) > 0;
}

std::string WorkerProcess::Reap() {
  if (!child_) return "exited (not our child: status unknown)";
  siginfo_t info{};
  if (::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd_.get()), &info,
               WEXITED | WNOHANG) != 0 ||
      info.si_pid == 0) {
    return "exited";
  }
  if (info.si_code == CLD_EXITED) return absl::StrCat("exited with status ", info.si_status);
  return absl::StrCat("killed by signal ", info.si_status, " (", strsignal(info.si_status), ")");
}

absl::Status WorkerProcess::Signal(int sig) {
  if (syscall(SYS_pidfd_send_signal, pidfd_.get(), sig, nullptr, 0) != 0 && errno != ESRCH) {
    return Errno("pidfd_send_signal");
  }
  return absl::OkStatus();
}

}  // namespace blockplane::controller
