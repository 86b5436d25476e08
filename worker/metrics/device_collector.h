#pragma once

// DeviceCollector: the worker's per-device Prometheus metrics, built at scrape time from a
// snapshot (BlockDevice::Stats(): relaxed atomic loads), so the data path pays nothing for
// metrics: no lock, no allocation, no registry update per I/O. GetDeviceStats reads the same
// snapshot (Worker::Stats()), so both report the same numbers.
//
// Threads: Collect() runs on the exporter's threads; `snapshot` must be thread-safe.

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"
#include "worker/block/block_device.h"

namespace blockplane::worker {

// Ring and transport counters of the frontend (Xen blkif for now).
struct TransportMetricsSnapshot {
  uint64_t requests_taken = 0, responses = 0, notifications_sent = 0, notifications_received = 0;
  uint64_t ring_full_stalls = 0, broken_queues = 0, io_errors = 0;
  std::vector<std::pair<std::string, uint64_t>> invalid;  // by reason
  // Xen grants.
  uint64_t grant_maps = 0, grant_map_failures = 0, grant_unmaps = 0, grant_copies = 0;
  uint64_t grant_copy_failures = 0;
  uint64_t persistent_hits = 0, persistent_misses = 0, persistent_evictions = 0;
};

struct DeviceMetricsSnapshot {
  BlockDeviceStats block;
  uint64_t size_bytes = 0;
  // One of DeviceCollector::kStates ("waiting_for_frontend", "connected", ...).
  std::string state;
  uint64_t generation = 0;
  std::optional<TransportMetricsSnapshot> transport;
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
