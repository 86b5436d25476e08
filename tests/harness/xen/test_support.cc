#include "tests/harness/xen/test_support.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <optional>

extern char** environ;

namespace blockplane::harness {
namespace {

int64_t NowMs() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return int64_t{now.tv_sec} * 1000 + now.tv_nsec / 1000000;
}

}  // namespace

TempDir::TempDir() {
  const char* base = getenv("TMPDIR");
  std::string pattern = std::string(base && *base ? base : "/tmp") + "/bp-xen-XXXXXX";
  std::vector<char> buffer(pattern.begin(), pattern.end());
  buffer.push_back('\0');
  if (mkdtemp(buffer.data()) != nullptr) path_ = buffer.data();
}

TempDir::~TempDir() {
  if (path_.empty()) return;
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

CommandResult RunXenstoreTool(const std::vector<std::string>& argv,
                              const std::string& xenstored_path, int timeout_ms) {
  CommandResult result;
  int out_pipe[2];
  int err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0) return result;
  if (pipe2(err_pipe, O_CLOEXEC) != 0) {
    close(out_pipe[0]);
    close(out_pipe[1]);
    return result;
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out_pipe[1], 1);
  posix_spawn_file_actions_adddup2(&actions, err_pipe[1], 2);

  std::vector<std::string> env_strings;
  for (char** env = environ; *env; ++env) {
    if (std::strncmp(*env, "XENSTORED_PATH=", 15) != 0) env_strings.push_back(*env);
  }
  env_strings.push_back("XENSTORED_PATH=" + xenstored_path);
  std::vector<char*> envp;
  for (std::string& entry : env_strings) envp.push_back(entry.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = argv;
  std::vector<char*> argp;
  for (std::string& arg : args) argp.push_back(arg.data());
  argp.push_back(nullptr);

  pid_t pid = -1;
  int spawn_error = posix_spawnp(&pid, argp[0], &actions, nullptr, argp.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  close(out_pipe[1]);
  close(err_pipe[1]);
  if (spawn_error != 0) {
    close(out_pipe[0]);
    close(err_pipe[0]);
    result.err = std::string("spawn failed: ") + std::strerror(spawn_error);
    return result;
  }

  int64_t deadline = NowMs() + timeout_ms;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  int open_count = 2;
  bool killed = false;
  while (open_count > 0) {
    int64_t left = deadline - NowMs();
    if (left <= 0) {
      kill(pid, SIGKILL);
      killed = true;
      break;
    }
    if (poll(fds, 2, static_cast<int>(left)) < 0) continue;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buffer[4096];
      ssize_t got = read(fds[i].fd, buffer, sizeof(buffer));
      if (got > 0) {
        (i == 0 ? result.out : result.err).append(buffer, static_cast<size_t>(got));
      } else {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_count;
      }
    }
  }
  for (pollfd& entry : fds) {
    if (entry.fd >= 0) close(entry.fd);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (!killed && WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  return result;
}

absl::StatusOr<pid_t> SpawnXenHost(const std::string& binary, const std::string& run_dir,
                                   const std::string& domain_spec) {
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("pipe2 failed");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], 1);
  std::vector<std::string> args = {binary,      "--run-dir",   run_dir,  "--domain",
                                   domain_spec, "--log-level", "warning"};
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, binary.c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(out[1]);
  if (rc != 0) {
    close(out[0]);
    return absl::InternalError(std::string("cannot start ") + binary + ": " + strerror(rc));
  }
  std::string banner;
  while (banner.find('\n') == std::string::npos) {
    pollfd pfd{out[0], POLLIN, 0};
    char buffer[256];
    ssize_t got = poll(&pfd, 1, 20000) == 1 ? read(out[0], buffer, sizeof(buffer)) : -1;
    if (got <= 0) break;
    banner.append(buffer, static_cast<size_t>(got));
  }
  close(out[0]);
  if (banner != "READY " + run_dir + "\n") {
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    return absl::UnavailableError("bp-xenhost did not print READY " + run_dir + "; it printed \"" +
                                  banner + "\"");
  }
  return pid;
}

absl::Status InProcessXen::Stop() {
  guest.reset();
  guest_platform.reset();
  dom0.reset();
  if (!host) return absl::OkStatus();
  absl::Status stopped = host->StopThread();
  host.reset();
  return stopped;
}

absl::StatusOr<InProcessXen> StartInProcessXen(const std::string& run_dir,
                                               common::xen::DomainId guest_domid, uint32_t pages,
                                               uint32_t grant_entries) {
  InProcessXen xen;
  absl::StatusOr<std::unique_ptr<XenHost>> host = XenHost::Create(XenHostOptions{run_dir});
  if (!host.ok()) return host.status();
  xen.host = std::move(*host);
  if (absl::Status created = xen.host->CreateDomain(guest_domid, pages, grant_entries);
      !created.ok()) {
    return created;
  }
  xen.host->StartThread();
  auto dom0 = common::xen::CreateEmulatedXenPlatform(common::xen::EmulatedXenOptions{run_dir, 0});
  if (!dom0.ok()) return dom0.status();
  xen.dom0 = std::move(*dom0);
  auto guest_platform =
      common::xen::CreateEmulatedXenPlatform(common::xen::EmulatedXenOptions{run_dir, guest_domid});
  if (!guest_platform.ok()) return guest_platform.status();
  xen.guest_platform = std::move(*guest_platform);
  auto guest = GuestDomain::Connect(run_dir, guest_domid);
  if (!guest.ok()) return guest.status();
  xen.guest = std::move(*guest);
  return xen;
}

absl::StatusOr<std::vector<BlkfrontCompletion>> RunGuestRequests(Blkfront& front,
                                                                 std::span<const GuestIo> ios,
                                                                 uint32_t depth, int timeout_ms,
                                                                 GuestIoProgress* progress) {
  constexpr size_t kSector = 512;
  const uint32_t queues = front.num_queues();
  std::vector<std::vector<size_t>> by_queue(queues);
  for (size_t i = 0; i < ios.size(); ++i) {
    const GuestIo& io = ios[i];
    if (io.queue >= queues) return absl::InvalidArgumentError("no such queue");
    const size_t bytes = size_t{io.request.nr_sectors} * kSector;
    if ((!io.write_data.empty() && io.write_data.size() != bytes) ||
        (!io.read_data.empty() && io.read_data.size() != bytes)) {
      return absl::InvalidArgumentError("data buffer of request " + std::to_string(i) +
                                        " is not nr_sectors * 512 bytes");
    }
    by_queue[io.queue].push_back(i);
  }
  std::vector<size_t> next(queues, 0);
  // Which request each slot of each queue carries.
  std::vector<std::vector<size_t>> in_slot(queues, std::vector<size_t>(front.slots_per_queue(), 0));
  std::vector<BlkfrontCompletion> results(ios.size());
  std::vector<BlkfrontCompletion> reaped(std::max<uint32_t>(front.slots_per_queue(), 1));
  size_t done = 0;
  while (done < ios.size()) {
    for (uint32_t q = 0; q < queues; ++q) {
      uint64_t enqueued = 0;
      while (next[q] < by_queue[q].size() && front.in_flight(q) < depth) {
        std::optional<uint32_t> slot = front.AcquireSlot(q);
        if (!slot) break;
        const size_t index = by_queue[q][next[q]];
        const GuestIo& io = ios[index];
        const SlotView view = front.Slot(q, *slot);
        const size_t offset = size_t{io.request.buffer_sector_offset} * kSector;
        const size_t bytes = size_t{io.request.nr_sectors} * kSector;
        const bool reads = io.request.op == BlkfrontOp::kRead;
        if (offset + (reads || !io.write_data.empty() ? bytes : 0) > view.data.size()) {
          front.ReleaseSlot(q, *slot);
          return absl::InvalidArgumentError("request " + std::to_string(index) +
                                            " is larger than a slot buffer");
        }
        if (!io.write_data.empty()) {
          std::memcpy(view.data.data() + offset, io.write_data.data(), bytes);
        }
        if (reads && io.scrub_read_buffer) std::memset(view.data.data() + offset, 0xee, bytes);
        if (absl::Status status = front.Enqueue(q, *slot, io.request); !status.ok()) {
          front.ReleaseSlot(q, *slot);
          return status;
        }
        in_slot[q][*slot] = index;
        ++next[q];
        ++enqueued;
      }
      if (enqueued == 0) continue;
      if (absl::StatusOr<bool> pushed = front.Push(q); !pushed.ok()) return pushed.status();
      if (progress) progress->pushed.fetch_add(enqueued, std::memory_order_relaxed);
    }
    size_t completed = 0;
    for (uint32_t q = 0; q < queues; ++q) {
      const size_t n = front.Reap(q, reaped);
      for (size_t i = 0; i < n; ++i) {
        const BlkfrontCompletion& completion = reaped[i];
        const size_t index = in_slot[q][completion.slot];
        const GuestIo& io = ios[index];
        if (!io.read_data.empty()) {
          const SlotView view = front.Slot(q, completion.slot);
          std::memcpy(io.read_data.data(),
                      view.data.data() + size_t{io.request.buffer_sector_offset} * kSector,
                      io.read_data.size());
        }
        results[index] = completion;
        front.ReleaseSlot(q, completion.slot);
      }
      completed += n;
    }
    done += completed;
    if (progress) progress->completed.fetch_add(completed, std::memory_order_relaxed);
    if (completed > 0 || done == ios.size()) continue;
    absl::StatusOr<bool> woke = front.WaitForEvent(timeout_ms);
    if (!woke.ok()) return woke.status();
    if (!*woke) {
      return absl::DeadlineExceededError("no response from the backend within " +
                                         std::to_string(timeout_ms) + " ms (" +
                                         std::to_string(ios.size() - done) + " outstanding)");
    }
  }
  return results;
}

bool RevokeSlotGrants(const Blkfront& front, GuestDomain& guest) {
  bool all = true;
  for (uint32_t q = 0; q < front.num_queues(); ++q) {
    for (uint32_t s = 0; s < front.slots_per_queue(); ++s) {
      const SlotView view = front.Slot(q, s);
      for (common::xen::GrantRef ref : view.data_refs) all &= guest.EndAccess(ref);
      for (common::xen::GrantRef ref : view.indirect_refs) all &= guest.EndAccess(ref);
    }
  }
  return all;
}

}  // namespace blockplane::harness
