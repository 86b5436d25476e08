#pragma once

#include <sys/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "blockplane/internal/worker.pb.h"
#include "common/frame_channel.h"
#include "common/unique_fd.h"

namespace blockplane::controller {

using Clock = std::chrono::steady_clock;

// One running blockplane-worker process and the controller's connection to its control socket.
//
// Threads: exactly one thread (the device's monitor) calls Poll/ReadEvents/Reap; any thread may
// call Call, Kill and the accessors. Call never holds a lock the monitor needs while it waits.
class WorkerProcess {
 public:
  struct SpawnOptions {
    std::string worker_binary;
    std::string log_level = "info";
    std::chrono::milliseconds start_timeout{10000};
  };

  // Starts a worker with `config` (passed on a memfd as --config-fd=3) in its own session, so that
  // it outlives the controller, and returns once it answered Hello on its control socket. The
  // worker is killed again if it does not answer in time.
  static absl::StatusOr<std::unique_ptr<WorkerProcess>> Spawn(const SpawnOptions& options,
                                                              const internal::WorkerConfig& config);

  // Takes over a worker started by an earlier controller: it must be alive as `pid`, listen on
  // `control_socket` and answer Hello for `device_id` at `generation` with that pid. Anything else
  // (gone, pid reused, another generation) is FAILED_PRECONDITION and the process is left alone.
  static absl::StatusOr<std::unique_ptr<WorkerProcess>> Adopt(pid_t pid,
                                                              const std::string& control_socket,
                                                              const std::string& device_id,
                                                              uint64_t generation);

  ~WorkerProcess();

  pid_t pid() const { return pid_; }
  int pidfd() const { return pidfd_.get(); }
  int control_fd() const { return control_.get(); }
  bool adopted() const { return !child_; }
  // The status the worker reported in its Hello reply.
  const internal::WorkerStatus& initial_status() const { return initial_status_; }

  // Sends `request` (its id is assigned here) and waits for the matching response until
  // `deadline`. DEADLINE_EXCEEDED if none came, UNAVAILABLE if the worker went away. A response
  // with a non-zero code is returned as that status (with the worker's message).
  absl::StatusOr<internal::ControlResponse> Call(internal::ControlRequest request,
                                                 Clock::time_point deadline);

  // Sends `request` without waiting for its response (which is then dropped): for requests whose
  // effect the caller observes through worker events, or when no monitor reads replies.
  absl::Status Send(internal::ControlRequest request);

  // Monitor thread: reads what arrived on the control socket. Every message carries the worker's
  // status; `on_status` gets each one in stream order (with the event's reason, or "reply"),
  // before the call a response belongs to is completed, so a caller that wakes up from Call()
  // already sees its effect and an older status can never overwrite a newer one.
  // UNAVAILABLE when the socket closed.
  absl::Status ReadMessages(const std::function<void(const internal::WorkerStatus&,
                                                     const std::string& reason)>& on_status);

  // True once the process has exited (its pidfd is readable).
  bool Exited() const;
  // After Exited(): reaps the child (when it is ours) and describes how it ended ("exited with
  // status 1", "killed by signal 9").
  std::string Reap();

  // Completes every call still waiting for a reply with `status` and refuses new ones. The
  // monitor calls it once the process has exited: a reply can no longer come, whatever is still
  // unread on the socket.
  void FailPendingCalls(const absl::Status& status) { FailPending(status); }

  // Sends a signal through the pidfd (no pid-reuse race).
  absl::Status Signal(int sig);

 private:
  WorkerProcess(pid_t pid, common::UniqueFd pidfd, common::UniqueFd control, bool child);
  void FailPending(const absl::Status& status);
  // Sends Hello on the control socket, which nobody else reads yet, and returns the worker's
  // reply, skipping the events it may send first (superseded by the status in the reply).
  absl::StatusOr<internal::ControlResponse> ExchangeHello();

  const pid_t pid_;
  const common::UniqueFd pidfd_;
  const common::UniqueFd control_;
  const bool child_;
  internal::WorkerStatus initial_status_;

  // Serialises writers of the control socket.
  std::mutex write_mu_;
  std::mutex pending_mu_;
  std::condition_variable pending_cv_;
  uint64_t next_id_ = 1;
  std::map<uint64_t, std::optional<absl::StatusOr<internal::ControlResponse>>> pending_;
  bool closed_ = false;

  common::FrameReader reader_;  // monitor thread only
};

// Opens a control connection to a worker's unix socket (non-blocking after connect).
absl::StatusOr<common::UniqueFd> ConnectControlSocket(const std::string& path);

}  // namespace blockplane::controller
