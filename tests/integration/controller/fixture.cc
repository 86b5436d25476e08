#include "tests/integration/controller/fixture.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "gtest/gtest.h"

extern char** environ;

namespace blockplane::testing {
namespace {

constexpr const char* kTagVariable = "BLOCKPLANE_TEST_TAG";

std::string ReadAll(int fd) {
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  return out;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

std::string BinaryPath(const std::string& name) {
  return std::string(BLOCKPLANE_BIN_DIR) + "/" + name;
}

bool WaitFor(const std::function<bool()>& condition, int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return condition();
}

bool ProcessAlive(pid_t pid) {
  if (pid <= 0) return false;
  std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  if (stat.empty()) return false;
  size_t close = stat.rfind(')');
  return close != std::string::npos && close + 2 < stat.size() && stat[close + 2] != 'Z';
}

CommandResult RunCommand(const std::vector<std::string>& argv) {
  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0) {
    throw std::runtime_error("pipe failed");
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out_pipe[1], 1);
  posix_spawn_file_actions_adddup2(&actions, err_pipe[1], 2);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid;
  int rc = posix_spawn(&pid, argv[0].c_str(), &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  CommandResult result;
  if (rc != 0) {
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    result.err = std::string("spawn failed: ") + strerror(rc);
    return result;
  }
  // Drain both pipes; stdout first is fine for the small outputs tests produce.
  std::thread err_reader([&] { result.err = ReadAll(err_pipe[0]); });
  result.out = ReadAll(out_pipe[0]);
  err_reader.join();
  ::close(out_pipe[0]);
  ::close(err_pipe[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

ControllerProcess::ControllerProcess(std::vector<std::string> extra_flags)
    : extra_flags_(std::move(extra_flags)) {
  char tmpl[] = "/tmp/bpt.XXXXXX";
  if (mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
  dir_ = tmpl;
  socket_path_ = dir_ + "/api.sock";
  state_dir_ = dir_ + "/state";
  disks_dir_ = dir_ + "/disks";
  log_path_ = dir_ + "/blockplaned.log";
  std::filesystem::create_directories(disks_dir_);
}

ControllerProcess::~ControllerProcess() {
  if (pid_ > 0) Stop(SIGKILL);
  for (pid_t worker : WorkerPids()) ::kill(worker, SIGKILL);
  WaitFor([&] { return WorkerPids().empty(); }, 5000);
  if (::testing::Test::HasFailure()) {
    std::cerr << "---- blockplaned log (" << log_path_ << ") ----\n"
              << ReadFile(log_path_) << "---- end of log ----\n";
  }
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

void ControllerProcess::Start() {
  std::vector<std::string> argv = {BinaryPath("blockplaned"), "--socket=" + socket_path_,
                                   "--state-dir=" + state_dir_, "--backing-root=" + disks_dir_,
                                   "--worker-binary=" + BinaryPath("blockplane-worker")};
  argv.insert(argv.end(), extra_flags_.begin(), extra_flags_.end());
  std::vector<char*> args;
  for (std::string& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  // The tag lets teardown find this test's workers, which inherit the environment.
  std::vector<std::string> env_strings;
  for (char** e = environ; *e; ++e) env_strings.emplace_back(*e);
  env_strings.push_back(std::string(kTagVariable) + "=" + dir_);
  std::vector<char*> env;
  for (std::string& e : env_strings) env.push_back(e.data());
  env.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 2, log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND,
                                   0644);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  int rc = posix_spawn(&pid_, argv[0].c_str(), &actions, nullptr, args.data(), env.data());
  posix_spawn_file_actions_destroy(&actions);
  ASSERT_EQ(rc, 0) << "cannot start blockplaned: " << strerror(rc);

  // Connect only once the socket exists: a failed first attempt costs gRPC's 1 s reconnect backoff.
  WaitFor(
      [&] { return std::filesystem::exists(socket_path_) || waitpid(pid_, nullptr, WNOHANG) != 0; },
      15000);
  channel_ = grpc::CreateChannel("unix:" + socket_path_, grpc::InsecureChannelCredentials());
  stub_ = v1::DeviceService::NewStub(channel_);
  bool up = WaitFor(
      [&] {
        int status;
        if (waitpid(pid_, &status, WNOHANG) == pid_) {
          pid_ = -1;
          return true;  // exited: reported below
        }
        return channel_->WaitForConnected(std::chrono::system_clock::now() +
                                          std::chrono::milliseconds(50));
      },
      15000);
  ASSERT_TRUE(up && pid_ > 0) << "blockplaned did not start; log:\n" << ReadFile(log_path_);
}

void ControllerProcess::Stop(int sig) {
  if (pid_ <= 0) return;
  // Like a CLI that has exited: an idle connection would hold the server's shutdown until its
  // grace period ends.
  stub_.reset();
  channel_.reset();
  ::kill(pid_, sig);
  int status;
  bool exited = WaitFor([&] { return waitpid(pid_, &status, WNOHANG) == pid_; }, 40000);
  if (!exited) {
    ::kill(pid_, SIGKILL);
    waitpid(pid_, &status, 0);
    ADD_FAILURE() << "blockplaned did not exit after signal " << sig;
  }
  pid_ = -1;
}

std::string ControllerProcess::CreateDisk(const std::string& name, uint64_t size) {
  std::string path = disks_dir_ + "/" + name;
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  EXPECT_GE(fd, 0) << path << ": " << strerror(errno);
  EXPECT_EQ(::ftruncate(fd, static_cast<off_t>(size)), 0);
  ::close(fd);
  return path;
}

CommandResult ControllerProcess::Bpctl(std::vector<std::string> args) {
  args.insert(args.begin(), {BinaryPath("bpctl"), "--socket", socket_path_});
  return RunCommand(args);
}

std::vector<pid_t> ControllerProcess::WorkerPids() const {
  std::vector<pid_t> pids;
  std::string tag = std::string(kTagVariable) + "=" + dir_;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return pids;
  while (dirent* d = readdir(proc)) {
    char* end;
    long pid = strtol(d->d_name, &end, 10);
    if (*end != '\0' || pid <= 0) continue;
    std::string base = "/proc/" + std::string(d->d_name);
    std::string cmdline = ReadFile(base + "/cmdline");
    if (cmdline.find("blockplane-worker") == std::string::npos) continue;
    std::string env = ReadFile(base + "/environ");
    size_t at = env.find(tag);
    // Whole entry: the tag must end at a NUL.
    if (at != std::string::npos &&
        (at + tag.size() == env.size() || env[at + tag.size()] == '\0') &&
        ProcessAlive(static_cast<pid_t>(pid))) {
      pids.push_back(static_cast<pid_t>(pid));
    }
  }
  closedir(proc);
  return pids;
}

v1::DeviceSpec XenSpec(const std::string& path, uint32_t domid, const std::string& vdev) {
  v1::DeviceSpec spec;
  spec.mutable_backend()->set_path(path);
  spec.mutable_xen()->set_domid(domid);
  spec.mutable_xen()->set_virtual_device(vdev);
  return spec;
}

v1::Device GetDevice(ControllerProcess& controller, const std::string& id) {
  grpc::ClientContext ctx;
  v1::GetDeviceRequest req;
  req.set_device_id(id);
  v1::Device out;
  grpc::Status s = controller.stub().GetDevice(&ctx, req, &out);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return out;
}

v1::DeviceStats GetDeviceStats(ControllerProcess& controller, const std::string& id) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::GetDeviceStatsRequest req;
  req.set_device_id(id);
  v1::DeviceStats out;
  grpc::Status s = controller.stub().GetDeviceStats(&ctx, req, &out);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return out;
}

v1::OpStats OpOf(const v1::DeviceStats& stats, const std::string& op) {
  for (const v1::OpStats& o : stats.ops()) {
    if (o.op() == op) return o;
  }
  return v1::OpStats();
}

grpc::Status DrainDevice(ControllerProcess& controller, const std::string& id, v1::Device* out) {
  grpc::ClientContext ctx;
  v1::DrainDeviceRequest req;
  req.set_device_id(id);
  return controller.stub().DrainDevice(&ctx, req, out);
}

grpc::Status ResumeDevice(ControllerProcess& controller, const std::string& id, v1::Device* out) {
  grpc::ClientContext ctx;
  v1::ResumeDeviceRequest req;
  req.set_device_id(id);
  return controller.stub().ResumeDevice(&ctx, req, out);
}

}  // namespace blockplane::testing
