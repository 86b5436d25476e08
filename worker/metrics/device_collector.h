#pragma once

// DeviceCollector: the worker's per-device Prometheus metrics, built at scrape time from a
// snapshot (BlockDevice::Stats(): relaxed atomic loads), so the data path pays nothing for
// metrics: no lock, no allocation, no registry update per I/O. GetDeviceStats reads the same
// snapshot (Worker::Stats()), so both report the same numbers.
//
// Threads: Collect() runs on the exporter's threads; `snapshot` must be thread-safe.

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"
#include "worker/block/block_device.h"

namespace blockplane::worker {

// Ring and transport counters of one queue of the frontend (Xen blkif for now).
struct TransportMetricsSnapshot {
  uint64_t requests_taken = 0, responses = 0, notifications_sent = 0, notifications_received = 0;
  uint64_t ring_full_stalls = 0, broken_queues = 0, io_errors = 0;
  std::vector<std::pair<std::string, uint64_t>> invalid;  // by reason
  // Xen grants.
  uint64_t grant_maps = 0, grant_map_failures = 0, grant_unmaps = 0, grant_copies = 0;
  uint64_t grant_copy_failures = 0;
  uint64_t persistent_hits = 0, persistent_misses = 0, persistent_evictions = 0;
  uint64_t requests_replayed = 0;  // answered again from the request journal after a crash

  // Whether any counter is above zero (the queue exists, or existed: a queue that connected has
  // mapped its ring, which grant_maps counts).
  bool Counted() const;
};

struct DeviceMetricsSnapshot {
  BlockDeviceStats block;
  uint64_t size_bytes = 0;
  // One of DeviceCollector::kStates ("waiting_for_frontend", "connected", ...).
  std::string state;
  uint64_t generation = 0;
  // The frontend's counters by queue index, for every queue it could have (Xen: 16); empty
  // without a frontend. Exported with a `queue` label for queues 0..n-1, n being 1 + the highest
  // queue that Counted() (at least 1), so a 1-queue device has one series per counter.
  std::vector<TransportMetricsSnapshot> transport;
  // The worker's event loop (common::EventLoop::Counters), since this generation started.
  struct Loop {
    uint64_t passes = 0, sleeps = 0, submit_calls = 0, sqes_submitted = 0, completions = 0;
  } loop;
};

class DeviceCollector final : public prometheus::Collectable {
 public:
  static constexpr const char* kStates[] = {
      "waiting_for_frontend", "connected", "draining", "drained", "stopping", "failed"};

  // `frontend`: "xen", "vhost_user" or "none".
  DeviceCollector(std::string device_id, std::string frontend,
                  std::function<DeviceMetricsSnapshot()> snapshot);

  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  const std::string device_id_;
  const std::string frontend_;
  const std::function<DeviceMetricsSnapshot()> snapshot_;
};

}  // namespace blockplane::worker
