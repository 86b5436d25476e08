// Dataplane benchmark driver (not a test): prints one JSON object per run on stdout.
//
//   dataplane_bench nop --batch 32 --seconds 5
//       Raw io_uring NOP rate with liburing directly (the baseline; this file is the one place
//       outside common/event_loop.cc and worker/backend/uring_backend.cc that includes
//       <liburing.h>, because the baseline must not go through our abstractions).
//   dataplane_bench block-null --qd 32 --seconds 5 [--poll-us 0]
//       BlockDevice + NullBackend, 4 KiB reads at queue depth 32 on one EventLoop.
//   dataplane_bench randread --file F --qd 32 --seconds 5 [--buffered] [--no-block-layer]
//                            [--io-batch K]   (EventLoop::Options::io_submit_batch; 0 = per pass)
//       4 KiB random reads over the whole file, through BlockDevice + UringBackend (or the
//       backend alone), O_DIRECT unless --buffered.
//
// tests/bench/run.sh runs these next to fio and writes JSON and a markdown table.

#include <liburing.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/event_loop.h"
#include "worker/backend/null_backend.h"
#include "worker/backend/uring_backend.h"
#include "worker/block/block_device.h"

namespace blockplane::bench {
namespace {

using common::EventLoop;
using common::MonotonicNanos;
using worker::BlockCompletion;
using worker::BlockDevice;
using worker::BlockOp;
using worker::BlockRequest;

struct Args {
  std::string mode;
  int batch = 32;
  int qd = 32;
  double seconds = 5;
  uint32_t poll_us = 0;
  int io_batch = -1;  // -1: EventLoop default
  std::string file;
  bool buffered = false;
  bool block_layer = true;
};

int64_t ProcessCpuNanos() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

// `cpu_ns`: process CPU time (user + system, all threads) spent during the run; the PMU is not
// available on every VM, so CPU time per request stands in for cycles per request.
void Report(const Args& args, const char* name, uint64_t ops, int64_t ns, int64_t cpu_ns) {
  double seconds = ns / 1e9;
  std::printf(
      "{\"bench\":\"%s\",\"qd\":%d,\"batch\":%d,\"buffered\":%s,\"block_layer\":%s,"
      "\"ops\":%llu,\"seconds\":%.3f,\"ops_per_sec\":%.0f,\"ns_per_op\":%.1f,"
      "\"cpu_ns_per_op\":%.1f}\n",
      name, args.qd, args.batch, args.buffered ? "true" : "false",
      args.block_layer ? "true" : "false", static_cast<unsigned long long>(ops), seconds,
      ops / seconds, ops ? static_cast<double>(ns) / ops : 0.0,
      ops ? static_cast<double>(cpu_ns) / ops : 0.0);
  std::fflush(stdout);
}

int RawNop(const Args& args) {
  io_uring ring;
  if (io_uring_queue_init(std::max(64, args.batch * 2), &ring, 0) != 0) return 1;
  io_uring_cqe* cqes[256];
  uint64_t ops = 0;
  const int64_t cpu_start = ProcessCpuNanos();
  const int64_t start = MonotonicNanos();
  const int64_t end = start + static_cast<int64_t>(args.seconds * 1e9);
  int64_t now = start;
  while (now < end) {
    for (int iter = 0; iter < 256; ++iter) {
      for (int i = 0; i < args.batch; ++i) {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring);
        io_uring_prep_nop(sqe);
        io_uring_sqe_set_data(sqe, &ring);
      }
      io_uring_submit_and_wait(&ring, args.batch);
      unsigned got = 0;
      while (got < static_cast<unsigned>(args.batch)) {
        unsigned n = io_uring_peek_batch_cqe(&ring, cqes, 256);
        for (unsigned i = 0; i < n; ++i) {
          if (io_uring_cqe_get_data(cqes[i]) == nullptr) std::abort();
        }
        io_uring_cq_advance(&ring, n);
        got += n;
      }
      ops += args.batch;
    }
    now = MonotonicNanos();
  }
  Report(args, "io_uring_nop", ops, now - start, ProcessCpuNanos() - cpu_start);
  io_uring_queue_exit(&ring);
  return 0;
}

// Keeps `qd` reads in flight; each completion submits the next one.
class ReadLoad {
 public:
  struct Slot final : public BlockCompletion, public worker::BackendCompletion {
    ReadLoad* load;
    iovec iov;
    void OnBlockComplete(int result) override { load->Done(this, result); }
    void OnBackendComplete(int result) override { load->Done(this, result); }
  };

  ReadLoad(EventLoop* loop, BlockDevice* device, worker::Backend* backend, int qd, uint64_t span,
           uint64_t seed)
      : loop_(loop), device_(device), backend_(backend), span_blocks_(span / 4096), rng_(seed) {
    slots_.resize(qd);
    for (Slot& slot : slots_) {
      slot.load = this;
      slot.iov = {aligned_alloc(4096, 4096), 4096};
    }
  }
  ~ReadLoad() {
    for (Slot& slot : slots_) free(slot.iov.iov_base);
  }

  void Start(int64_t deadline) {
    deadline_ = deadline;
    for (Slot& slot : slots_) Issue(&slot);
  }
  uint64_t ops() const { return ops_; }
  int errors() const { return errors_; }
  bool finished() const { return outstanding_ == 0; }

 private:
  uint64_t NextOffset() {
    rng_ ^= rng_ << 13;
    rng_ ^= rng_ >> 7;
    rng_ ^= rng_ << 17;
    return (rng_ % span_blocks_) * 4096;
  }
  void Issue(Slot* slot) {
    ++outstanding_;
    if (device_ != nullptr) {
      device_->Submit({.op = BlockOp::kRead,
                       .flags = 0,
                       .offset = NextOffset(),
                       .length = 0,
                       .iov = &slot->iov,
                       .iovcnt = 1},
                      slot);
    } else {
      backend_->Read(NextOffset(), &slot->iov, 1, slot);
    }
  }
  void Done(Slot* slot, int result) {
    --outstanding_;
    if (result != 0) ++errors_;
    ++ops_;
    // Check the clock every 1024 completions; keep the load up until the deadline.
    if ((ops_ & 1023) == 0 && MonotonicNanos() >= deadline_) stopping_ = true;
    if (!stopping_) {
      Issue(slot);
    } else if (outstanding_ == 0) {
      loop_->Stop();
    }
  }

  EventLoop* loop_;
  BlockDevice* device_;
  worker::Backend* backend_;
  uint64_t span_blocks_;
  uint64_t rng_;
  std::vector<Slot> slots_;
  uint64_t ops_ = 0;
  int outstanding_ = 0;
  int errors_ = 0;
  bool stopping_ = false;
  int64_t deadline_ = 0;
};

int RunLoad(const Args& args, const char* name, EventLoop* loop, BlockDevice* device,
            worker::Backend* backend, uint64_t span) {
  ReadLoad load(loop, device, backend, args.qd, span, 0x9e3779b97f4a7c15ull);
  const int64_t cpu_start = ProcessCpuNanos();
  const int64_t start = MonotonicNanos();
  load.Start(start + static_cast<int64_t>(args.seconds * 1e9));
  loop->Run();
  const int64_t elapsed = MonotonicNanos() - start;
  if (load.errors() != 0) {
    std::fprintf(stderr, "%d requests failed\n", load.errors());
    return 1;
  }
  Report(args, name, load.ops(), elapsed, ProcessCpuNanos() - cpu_start);
  return 0;
}

int BlockNull(const Args& args) {
  EventLoop::Options options;
  options.poll_window_us = args.poll_us;
  auto loop = EventLoop::Create(options);
  if (!loop.ok()) return 1;
  worker::NullBackend::Options null_options;
  null_options.limits.request_alignment = 512;
  null_options.limits.buffer_alignment = 512;
  auto backend = std::make_unique<worker::NullBackend>(loop->get(), null_options);
  auto device = BlockDevice::Create(loop->get(), std::move(backend), {});
  if (!device.ok()) return 1;
  return RunLoad(args, "block_null_read4k", loop->get(), device->get(), nullptr,
                 (*device)->capacity());
}

int RandRead(const Args& args) {
  EventLoop::Options options;
  options.poll_window_us = args.poll_us;
  if (args.io_batch >= 0) options.io_submit_batch = static_cast<uint32_t>(args.io_batch);
  auto loop = EventLoop::Create(options);
  if (!loop.ok()) return 1;
  worker::UringBackend::Options backend_options;
  backend_options.cache = args.buffered ? worker::CacheMode::kWriteback : worker::CacheMode::kNone;
  auto backend = worker::UringBackend::Open(loop->get(), args.file, backend_options);
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", backend.status().ToString().c_str());
    return 1;
  }
  const uint64_t span = (*backend)->Capacity();
  if (!args.block_layer) {
    return RunLoad(args, "uring_randread4k", loop->get(), nullptr, backend->get(), span);
  }
  auto device = BlockDevice::Create(loop->get(), std::move(backend).value(), {});
  if (!device.ok()) return 1;
  return RunLoad(args, "uring_randread4k", loop->get(), device->get(), nullptr, span);
}

}  // namespace
}  // namespace blockplane::bench

int main(int argc, char** argv) {
  blockplane::bench::Args args;
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s nop|block-null|randread [options]\n", argv[0]);
    return 2;
  }
  args.mode = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string flag = argv[i];
    auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : ""; };
    if (flag == "--batch") {
      args.batch = std::atoi(value());
    } else if (flag == "--qd") {
      args.qd = std::atoi(value());
    } else if (flag == "--seconds") {
      args.seconds = std::atof(value());
    } else if (flag == "--io-batch") {
      args.io_batch = std::atoi(value());
    } else if (flag == "--poll-us") {
      args.poll_us = static_cast<uint32_t>(std::atoi(value()));
    } else if (flag == "--file") {
      args.file = value();
    } else if (flag == "--buffered") {
      args.buffered = true;
    } else if (flag == "--no-block-layer") {
      args.block_layer = false;
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (args.batch < 1 || args.batch > 128 || args.qd < 1) return 2;
  if (args.mode == "nop") return blockplane::bench::RawNop(args);
  if (args.mode == "block-null") return blockplane::bench::BlockNull(args);
  if (args.mode == "randread") return blockplane::bench::RandRead(args);
  std::fprintf(stderr, "unknown mode %s\n", args.mode.c_str());
  return 2;
}
