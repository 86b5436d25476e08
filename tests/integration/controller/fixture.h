#pragma once

#include <signal.h>
#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "blockplane/v1/device.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace blockplane::testing {

// Where the build put blockplaned, blockplane-worker and bpctl.
std::string BinaryPath(const std::string& name);

struct CommandResult {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};
// Runs a command (argv[0] is a path) and collects its output. Bounded: killed after 60 s.
CommandResult RunCommand(const std::vector<std::string>& argv);

// A real blockplaned in a private temp dir: its own socket, state dir and backing root. Every
// worker it starts carries a tag in its environment so that teardown can find and kill the
// workers (they run in their own sessions and outlive the controller on purpose).
class ControllerProcess {
 public:
  explicit ControllerProcess(std::vector<std::string> extra_flags = {});
  ~ControllerProcess();

  // Starts blockplaned and waits until its health service answers (bounded).
  void Start();
  // Sends `sig` and waits for the controller to exit (bounded).
  void Stop(int sig = SIGTERM);
  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // Creates a sparse disk image of `size` bytes under the backing root; returns its path.
  std::string CreateDisk(const std::string& name, uint64_t size);

  // Runs bpctl against this controller.
  CommandResult Bpctl(std::vector<std::string> args);

  v1::DeviceService::Stub& stub() { return *stub_; }
  std::shared_ptr<grpc::Channel> channel() { return channel_; }

  const std::string& dir() const { return dir_; }
  const std::string& socket_path() const { return socket_path_; }
  const std::string& state_dir() const { return state_dir_; }
  const std::string& disks_dir() const { return disks_dir_; }
  const std::string& log_path() const { return log_path_; }

  // Pids of live blockplane-worker processes started by this fixture's controllers.
  std::vector<pid_t> WorkerPids() const;

 private:
  std::vector<std::string> extra_flags_;
  std::string dir_, socket_path_, state_dir_, disks_dir_, log_path_;
  pid_t pid_ = -1;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::DeviceService::Stub> stub_;
};

// A spec for a xen device backed by `path`.
v1::DeviceSpec XenSpec(const std::string& path, uint32_t domid = 5,
                       const std::string& vdev = "xvda");

// Polls `condition` every 10 ms until it is true or `timeout_ms` passes; returns its last value.
bool WaitFor(const std::function<bool()>& condition, int timeout_ms = 10000);

// True if a process with this pid exists (and is not a zombie).
bool ProcessAlive(pid_t pid);

// GetDevice over gRPC; fails the test (and returns an empty Device) on error.
v1::Device GetDevice(ControllerProcess& controller, const std::string& id);

// GetDeviceStats over gRPC; fails the test (and returns empty stats) on error.
v1::DeviceStats GetDeviceStats(ControllerProcess& controller, const std::string& id);

// The stats of `op` ("read", "write", ...) in `stats`; an empty OpStats if absent.
v1::OpStats OpOf(const v1::DeviceStats& stats, const std::string& op);

// DrainDevice / ResumeDevice over gRPC: the call's status; `out` gets the device it returned.
grpc::Status DrainDevice(ControllerProcess& controller, const std::string& id, v1::Device* out);
grpc::Status ResumeDevice(ControllerProcess& controller, const std::string& id, v1::Device* out);

}  // namespace blockplane::testing
