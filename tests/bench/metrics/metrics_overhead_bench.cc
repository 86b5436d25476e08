// Hot-path cost of metrics (issue 5: at most 3% of IOPS versus metrics disabled).
//
// What metrics change on the data path: the block layer's per-operation counters live in the
// mapped stats segment (MAP_SHARED file) instead of the BlockDevice object, and a scraper thread
// reads them (DeviceCollector::Collect, the worker's /metrics) concurrently. This driver runs
// BlockDevice + NullBackend, 4 KiB reads at QD32 on one EventLoop (the same load as
// `dataplane_bench block-null`), alternating the two configurations so machine noise hits both:
//   off: counters inside the BlockDevice, no scraper;
//   on:  counters in a stats segment, and Collect() every `--scrape-ms` (default 100 ms, ten
//        times a 1 s Prometheus scrape interval) on another thread.
// Prints one JSON line per run and a summary line with the median IOPS of each and on/off.
//
//   metrics_overhead_bench [--seconds 2] [--reps 5] [--scrape-ms 100]
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "common/event_loop.h"
#include "worker/backend/null_backend.h"
#include "worker/block/block_device.h"
#include "worker/metrics/device_collector.h"
#include "worker/metrics/stats_segment.h"

namespace blockplane::bench {
namespace {

using common::EventLoop;
using common::MonotonicNanos;
using worker::BlockCompletion;
using worker::BlockDevice;
using worker::BlockOp;

class ReadLoad {
 public:
  struct Slot final : public BlockCompletion {
    ReadLoad* load;
    iovec iov;
    void OnBlockComplete(int result) override { load->Done(this, result); }
  };

  ReadLoad(EventLoop* loop, BlockDevice* device, int qd)
      : loop_(loop), device_(device), span_blocks_(device->capacity() / 4096), slots_(qd) {
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

 private:
  void Issue(Slot* slot) {
    rng_ ^= rng_ << 13;
    rng_ ^= rng_ >> 7;
    rng_ ^= rng_ << 17;
    ++outstanding_;
    worker::BlockRequest request;
    request.op = BlockOp::kRead;
    request.offset = (rng_ % span_blocks_) * 4096;
    request.iov = &slot->iov;
    request.iovcnt = 1;
    device_->Submit(request, slot);
  }
  void Done(Slot* slot, int result) {
    --outstanding_;
    if (result != 0) ++errors_;
    ++ops_;
    if ((ops_ & 1023) == 0 && MonotonicNanos() >= deadline_) stopping_ = true;
    if (!stopping_) {
      Issue(slot);
    } else if (outstanding_ == 0) {
      loop_->Stop();
    }
  }

  EventLoop* loop_;
  BlockDevice* device_;
  uint64_t span_blocks_;
  uint64_t rng_ = 0x9e3779b97f4a7c15ull;
  std::vector<Slot> slots_;
  uint64_t ops_ = 0;
  int outstanding_ = 0;
  int errors_ = 0;
  bool stopping_ = false;
  int64_t deadline_ = 0;
};

// IOPS of one run; < 0 on error.
double Run(bool metrics, double seconds, int scrape_ms, const std::string& segment_path) {
  auto loop = EventLoop::Create();
  if (!loop.ok()) return -1;
  worker::NullBackend::Options null_options;
  null_options.limits.request_alignment = 512;
  null_options.limits.buffer_alignment = 512;
  std::unique_ptr<worker::StatsSegment> segment;
  worker::BlockDeviceOptions options;
  if (metrics) {
    worker::RemoveStatsSegment(segment_path);  // each run counts from zero
    if (!worker::PrepareStatsSegment(segment_path, "bench").ok()) return -1;
    auto opened = worker::StatsSegment::Open(segment_path, "bench", 1);
    if (!opened.ok()) return -1;
    segment = std::move(*opened);
    options.counters = segment->block_ops();
  }
  auto device = BlockDevice::Create(
      loop->get(), std::make_unique<worker::NullBackend>(loop->get(), null_options), options);
  if (!device.ok()) return -1;

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> scrapes{0};
  std::thread scraper;
  worker::DeviceCollector collector("bench", "none", [&] {
    worker::DeviceMetricsSnapshot s;
    s.block = (*device)->Stats();
    return s;
  });
  if (metrics) {
    scraper = std::thread([&] {
      while (!stop.load()) {
        if (!collector.Collect().empty()) scrapes.fetch_add(1);
        std::this_thread::sleep_for(std::chrono::milliseconds(scrape_ms));
      }
    });
  }
  ReadLoad load(loop->get(), device->get(), 32);
  const int64_t start = MonotonicNanos();
  load.Start(start + static_cast<int64_t>(seconds * 1e9));
  (*loop)->Run();
  const int64_t elapsed = MonotonicNanos() - start;
  stop = true;
  if (scraper.joinable()) scraper.join();
  if (load.errors() != 0) return -1;
  if (metrics && (*device)->Stats().ops[int(BlockOp::kRead)].ops != load.ops()) return -1;
  double iops = static_cast<double>(load.ops()) * 1e9 / static_cast<double>(elapsed);
  std::printf("{\"metrics\":%s,\"ops\":%llu,\"seconds\":%.3f,\"iops\":%.0f,\"scrapes\":%llu}\n",
              metrics ? "true" : "false", static_cast<unsigned long long>(load.ops()),
              static_cast<double>(elapsed) / 1e9, iops,
              static_cast<unsigned long long>(scrapes.load()));
  std::fflush(stdout);
  return iops;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

}  // namespace
}  // namespace blockplane::bench

int main(int argc, char** argv) {
  double seconds = 2;
  int reps = 5;
  int scrape_ms = 100;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    const char* value = i + 1 < argc ? argv[++i] : "0";
    if (flag == "--seconds") {
      seconds = std::atof(value);
    } else if (flag == "--reps") {
      reps = std::atoi(value);
    } else if (flag == "--scrape-ms") {
      scrape_ms = std::max(1, std::atoi(value));
    } else {
      std::fprintf(stderr, "usage: %s [--seconds S] [--reps N] [--scrape-ms MS]\n", argv[0]);
      return 2;
    }
  }
  char dir[] = "/tmp/blockplane-metrics-bench-XXXXXX";
  if (mkdtemp(dir) == nullptr) return 1;
  const std::string segment = std::string(dir) + "/bench.stats";
  std::vector<double> off, on;
  for (int r = 0; r < reps; ++r) {
    // Alternate which goes first so a drifting machine does not favour one side.
    for (bool metrics : r % 2 ? std::vector<bool>{true, false} : std::vector<bool>{false, true}) {
      double iops = blockplane::bench::Run(metrics, seconds, scrape_ms, segment);
      if (iops < 0) {
        std::fprintf(stderr, "run failed\n");
        return 1;
      }
      (metrics ? on : off).push_back(iops);
    }
  }
  unlink(segment.c_str());
  rmdir(dir);
  const double m_off = blockplane::bench::Median(off), m_on = blockplane::bench::Median(on);
  std::printf(
      "{\"summary\":true,\"median_iops_off\":%.0f,\"median_iops_on\":%.0f,\"on_over_off\":%.4f}\n",
      m_off, m_on, m_on / m_off);
  return 0;
}
