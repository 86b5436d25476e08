// The Xen data path on one CPU (not a test): prints one JSON object on stdout.
//
//   xen_path_bench [--qd 32] [--seconds 5 | --ops N] [--completion nop|deferred]
//
// The worker's blkif backend (worker/xen/blkif_backend) over BlockDevice + NullBackend, and the
// userspace blkfront (tests/harness/xen/blkfront), both in this process and on this thread, on
// the in-process emulated Xen host: persistent grants, one queue, 4 KiB random reads at queue
// depth `qd`, the backend polling (no event-channel kicks). Each round the guest fills the ring
// up to `qd` and pushes, the backend's event loop runs one pass, and the guest reaps.
//
// What it measures is the CPU cost of one request through both sides of the ring, with no
// hand-off between CPUs: tests/bench/xen/run.sh measures the same stack with the guest and the
// worker on two vCPUs, where the rate also depends on how fast cache lines move between them
// (on a VM that changes with where the host puts the vCPUs). Here the result is steady, so small
// changes to the per-request path show in an interleaved A/B of two builds.

#include <stdlib.h>
#include <string.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <thread>

#include "common/event_loop.h"
#include "common/xen/xen_platform.h"
#include "tests/harness/xen/blkfront.h"
#include "tests/harness/xen/test_support.h"
#include "worker/backend/null_backend.h"
#include "worker/block/block_device.h"
#include "worker/xen/blkif_backend.h"

namespace blockplane::bench {
namespace {

using harness::Blkfront;
using harness::BlkfrontCompletion;
using harness::BlkfrontOp;
using harness::BlkfrontOptions;
using harness::BlkfrontRequest;

constexpr common::xen::DomainId kGuest = 5;
constexpr uint32_t kDevid = 51712;
constexpr uint64_t kDiskBytes = uint64_t{1} << 30;

struct Args {
  int qd = 32;
  double seconds = 5;
  uint64_t ops = 0;  // 0: run for `seconds`
  worker::NullBackend::Completion completion = worker::NullBackend::Completion::kNop;
};

int Fail(const std::string& what) {
  std::fprintf(stderr, "xen_path_bench: %s\n", what.c_str());
  return 1;
}

int Run(const Args& args) {
  harness::TempDir dir;
  auto xen = harness::StartInProcessXen(dir.path(), kGuest, 4096, 4096);
  if (!xen.ok()) return Fail(std::string(xen.status().message()));
  if (absl::Status s = harness::WriteVbdToolstackEntries(xen->dom0->xenstore(), kGuest, 0, kDevid);
      !s.ok()) {
    return Fail(std::string(s.message()));
  }
  const harness::VbdPaths paths = harness::VbdPathsFor(kGuest, 0, kDevid);

  auto loop = common::EventLoop::Create();
  if (!loop.ok()) return Fail(std::string(loop.status().message()));
  auto platform =
      common::xen::CreateEmulatedXenPlatform(common::xen::EmulatedXenOptions{dir.path(), 0});
  if (!platform.ok()) return Fail(std::string(platform.status().message()));
  worker::NullBackend::Options null;
  null.capacity = kDiskBytes;
  null.completion = args.completion;
  auto device = worker::BlockDevice::Create(
      loop->get(), std::make_unique<worker::NullBackend>(loop->get(), null), {});
  if (!device.ok()) return Fail(std::string(device.status().message()));
  worker::xen::BlkifBackendOptions options;
  options.frontend_domid = kGuest;
  options.devid = kDevid;
  options.backend_path = paths.backend;
  options.max_queues = 1;
  options.poll_ns = 3'600'000'000'000;  // polls for as long as it runs: no kicks
  auto blkback = std::make_unique<worker::xen::BlkifBackend>(
      loop->get(), platform->get(), device->get(), options, worker::xen::BlkifBackend::Callbacks{});
  if (absl::Status s = blkback->Start(); !s.ok()) return Fail(std::string(s.message()));

  // The handshake needs both sides at once: the backend's loop on a thread until connected.
  std::atomic<bool> stop{false};
  auto run_loop = [&] {
    (*loop)->RunUntil([&] { return stop.load(); });
    stop = false;
  };
  std::thread loop_thread(run_loop);
  BlkfrontOptions front_options;
  front_options.devid = kDevid;
  front_options.num_queues = 1;
  auto front =
      std::make_unique<Blkfront>(xen->guest_platform.get(), xen->guest.get(), front_options);
  absl::Status connected = front->Connect();
  (*loop)->Post([&] { stop = true; });
  loop_thread.join();
  if (!connected.ok()) return Fail(std::string(connected.message()));
  if (!front->persistent_grants()) return Fail("the frontend did not negotiate persistent grants");

  const int qd = std::min<int>(args.qd, static_cast<int>(front->slots_per_queue()));
  std::mt19937_64 random(1);
  const uint64_t blocks = kDiskBytes / 4096;
  std::array<BlkfrontCompletion, 64> completions;
  uint64_t ops = 0, errors = 0, passes = 0;
  int in_flight = 0;
  auto round = [&]() -> bool {
    while (in_flight < qd) {
      std::optional<uint32_t> slot = front->AcquireSlot(0);
      if (!slot) break;
      BlkfrontRequest read{BlkfrontOp::kRead, (random() % blocks) * 8, 8, 0, false};
      if (absl::Status s = front->Enqueue(0, *slot, read); !s.ok()) {
        Fail(std::string(s.message()));
        return false;
      }
      ++in_flight;
    }
    if (auto pushed = front->Push(0); !pushed.ok()) {
      Fail(std::string(pushed.status().message()));
      return false;
    }
    (*loop)->RunOnce(/*block=*/false);
    ++passes;
    const size_t n = front->Reap(0, completions, /*want_event=*/false);
    for (size_t i = 0; i < n; ++i) {
      if (completions[i].status != BLKIF_RSP_OKAY) ++errors;
      front->ReleaseSlot(0, completions[i].slot);
    }
    in_flight -= static_cast<int>(n);
    ops += n;
    return true;
  };
  // Warm up: every slot's pages become persistent grants, pools grow to the queue depth.
  for (int i = 0; i < 1000; ++i) {
    if (!round()) return 1;
  }
  ops = errors = passes = 0;
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::duration<double>(args.seconds);
  while (args.ops ? ops < args.ops : std::chrono::steady_clock::now() < deadline) {
    for (int i = 0; i < 64; ++i) {
      if (!round()) return 1;
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const worker::xen::BlkifBackendStats stats = blkback->Stats();

  // Disconnect with the backend's loop running again, then stop everything on its thread.
  std::thread closing(run_loop);
  absl::Status closed = front->Disconnect();
  (*loop)->Post([&] {
    blkback.reset();
    stop = true;
  });
  closing.join();
  if (!closed.ok()) return Fail(std::string(closed.message()));

  std::printf(
      "{\"bench\":\"xen_path_one_cpu\",\"qd\":%d,\"completion\":\"%s\",\"ops\":%llu,"
      "\"seconds\":%.3f,\"ops_per_sec\":%.0f,\"ns_per_op\":%.1f,\"requests_per_pass\":%.2f,"
      "\"persistent_misses\":%llu,\"errors\":%llu}\n",
      qd, args.completion == worker::NullBackend::Completion::kNop ? "nop" : "deferred",
      static_cast<unsigned long long>(ops), seconds, ops / seconds, seconds * 1e9 / ops,
      static_cast<double>(ops) / passes, static_cast<unsigned long long>(stats.persistent_misses),
      static_cast<unsigned long long>(errors));
  return errors == 0 ? 0 : 1;
}

}  // namespace
}  // namespace blockplane::bench

int main(int argc, char** argv) {
  blockplane::bench::Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
    if (value == nullptr) {
      std::fprintf(stderr, "xen_path_bench: %s needs a value\n", flag.c_str());
      return 2;
    }
    ++i;
    if (flag == "--qd") {
      args.qd = atoi(value);
    } else if (flag == "--seconds") {
      args.seconds = atof(value);
    } else if (flag == "--ops") {
      args.ops = strtoull(value, nullptr, 10);
    } else if (flag == "--completion" && strcmp(value, "nop") == 0) {
      args.completion = blockplane::worker::NullBackend::Completion::kNop;
    } else if (flag == "--completion" && strcmp(value, "deferred") == 0) {
      args.completion = blockplane::worker::NullBackend::Completion::kDeferred;
    } else {
      std::fprintf(stderr,
                   "usage: xen_path_bench [--qd N] [--seconds S | --ops N] "
                   "[--completion nop|deferred]\n");
      return 2;
    }
  }
  if (args.qd < 1 || args.seconds <= 0) {
    std::fprintf(stderr, "xen_path_bench: --qd and --seconds must be positive\n");
    return 2;
  }
  return blockplane::bench::Run(args);
}
