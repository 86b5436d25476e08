#include "worker/metrics/device_collector.h"

#include <algorithm>
#include <string>

#include "common/metrics/process_collector.h"

namespace blockplane::worker {

using common::AddCounter;
using common::AddGauge;
using common::MakeFamily;
using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

namespace {

struct TransportCounter {
  const char* name;
  const char* help;
  uint64_t TransportMetricsSnapshot::*value;
};
// Exported before the invalid-request family.
constexpr TransportCounter kRingCounters[] = {
    {"blockplane_device_ring_requests_total", "Requests taken from the frontend's rings.",
     &TransportMetricsSnapshot::requests_taken},
    {"blockplane_device_ring_responses_total", "Responses written to the frontend's rings.",
     &TransportMetricsSnapshot::responses},
    {"blockplane_device_notifications_sent_total",
     "Notifications (event channel kicks) sent to the frontend.",
     &TransportMetricsSnapshot::notifications_sent},
    {"blockplane_device_notifications_received_total",
     "Notifications (event channel kicks) received from the frontend.",
     &TransportMetricsSnapshot::notifications_received},
    {"blockplane_device_ring_full_stalls_total",
     "Polls that found every request slot of a ring outstanding (like blkback's oo_req).",
     &TransportMetricsSnapshot::ring_full_stalls},
    {"blockplane_device_broken_queues_total",
     "Queues stopped because the frontend broke the ring protocol.",
     &TransportMetricsSnapshot::broken_queues},
    {"blockplane_device_error_responses_total",
     "Requests answered with an error after the I/O failed.", &TransportMetricsSnapshot::io_errors},
};
// Exported after it.
constexpr TransportCounter kGrantCounters[] = {
    {"blockplane_xen_grant_maps_total", "Grant pages mapped.",
     &TransportMetricsSnapshot::grant_maps},
    {"blockplane_xen_grant_map_failures_total", "Grant map calls that failed.",
     &TransportMetricsSnapshot::grant_map_failures},
    {"blockplane_xen_grant_unmaps_total", "Grant pages unmapped.",
     &TransportMetricsSnapshot::grant_unmaps},
    {"blockplane_xen_grant_copies_total", "Grant copy segments.",
     &TransportMetricsSnapshot::grant_copies},
    {"blockplane_xen_grant_copy_failures_total", "Grant copy segments that failed.",
     &TransportMetricsSnapshot::grant_copy_failures},
    {"blockplane_xen_persistent_grant_hits_total",
     "Segments served from the persistent grant cache.",
     &TransportMetricsSnapshot::persistent_hits},
    {"blockplane_xen_persistent_grant_misses_total",
     "Segments whose grant was not in the persistent grant cache.",
     &TransportMetricsSnapshot::persistent_misses},
    {"blockplane_xen_persistent_grant_evictions_total", "Persistent grants unmapped to make room.",
     &TransportMetricsSnapshot::persistent_evictions},
    {"blockplane_xen_ring_requests_replayed_total",
     "Requests a killed worker had taken and not answered, answered again by the next worker "
     "from the request journal.",
     &TransportMetricsSnapshot::requests_replayed},
};

void AddTransport(const std::vector<TransportMetricsSnapshot>& queues,
                  const std::vector<ClientMetric::Label>& device, std::vector<MetricFamily>* out) {
  size_t exported = 1;
  for (size_t q = 0; q < queues.size(); ++q) {
    if (queues[q].Counted()) exported = q + 1;
  }
  exported = std::min(exported, queues.size());
  std::vector<std::vector<ClientMetric::Label>> labels(exported, device);
  for (size_t q = 0; q < exported; ++q) labels[q].push_back({"queue", std::to_string(q)});

  auto add = [&](const TransportCounter& c) {
    out->push_back(MakeFamily(c.name, c.help, MetricType::Counter));
    for (size_t q = 0; q < exported; ++q) {
      AddCounter(out->back(), labels[q], static_cast<double>(queues[q].*c.value));
    }
  };
  for (const TransportCounter& c : kRingCounters) add(c);
  out->push_back(MakeFamily("blockplane_device_invalid_requests_total",
                            "Requests refused by the frontend's validation, by reason.",
                            MetricType::Counter));
  for (size_t q = 0; q < exported; ++q) {
    for (const auto& [reason, value] : queues[q].invalid) {
      std::vector<ClientMetric::Label> with_reason = labels[q];
      with_reason.push_back({"reason", reason});
      AddCounter(out->back(), std::move(with_reason), static_cast<double>(value));
    }
  }
  for (const TransportCounter& c : kGrantCounters) add(c);
}

}  // namespace

bool TransportMetricsSnapshot::Counted() const {
  for (const TransportCounter& c : kRingCounters) {
    if (this->*c.value != 0) return true;
  }
  for (const TransportCounter& c : kGrantCounters) {
    if (this->*c.value != 0) return true;
  }
  for (const auto& [reason, value] : invalid) {
    if (value != 0) return true;
  }
  return false;
}

DeviceCollector::DeviceCollector(std::string device_id, std::string frontend,
                                 std::function<DeviceMetricsSnapshot()> snapshot)
    : device_id_(std::move(device_id)),
      frontend_(std::move(frontend)),
      snapshot_(std::move(snapshot)) {}

std::vector<MetricFamily> DeviceCollector::Collect() const {
  const DeviceMetricsSnapshot s = snapshot_();
  const std::vector<ClientMetric::Label> device = {{"device", device_id_}, {"frontend", frontend_}};
  auto with_op = [&](int op) {
    std::vector<ClientMetric::Label> labels = device;
    labels.push_back({"op", BlockOpName(static_cast<BlockOp>(op))});
    return labels;
  };

  MetricFamily ops =
      MakeFamily("blockplane_device_operations_total",
                 "Requests completed successfully, by operation.", MetricType::Counter);
  MetricFamily bytes =
      MakeFamily("blockplane_device_bytes_total",
                 "Bytes transferred by successful requests, by operation.", MetricType::Counter);
  MetricFamily failed =
      MakeFamily("blockplane_device_failed_total",
                 "Requests that completed with an I/O error, by operation.", MetricType::Counter);
  MetricFamily invalid =
      MakeFamily("blockplane_device_invalid_total",
                 "Requests rejected before any I/O (misaligned, out of range, read-only), by "
                 "operation.",
                 MetricType::Counter);
  MetricFamily time = MakeFamily("blockplane_device_time_seconds_total",
                                 "Total time from admission to completion of requests, by "
                                 "operation.",
                                 MetricType::Counter);
  MetricFamily latency = MakeFamily("blockplane_device_latency_seconds",
                                    "Request latency from admission to completion, by operation.",
                                    MetricType::Histogram);
  for (int op = 0; op < kBlockOpCount; ++op) {
    const BlockOpStats& o = s.block.ops[op];
    AddCounter(ops, with_op(op), static_cast<double>(o.ops));
    AddCounter(bytes, with_op(op), static_cast<double>(o.bytes));
    AddCounter(failed, with_op(op), static_cast<double>(o.failed));
    AddCounter(invalid, with_op(op), static_cast<double>(o.invalid));
    AddCounter(time, with_op(op), static_cast<double>(o.total_time_ns) / 1e9);
    ClientMetric& h = latency.metric.emplace_back();
    h.label = with_op(op);
    uint64_t cumulative = 0;
    for (int b = 0; b < kLatencyBuckets; ++b) {
      cumulative += o.latency_histogram[b];
      const uint64_t bound = LatencyBucketUpperBoundNs(b);
      h.histogram.bucket.push_back({cumulative, bound == UINT64_MAX
                                                    ? std::numeric_limits<double>::infinity()
                                                    : static_cast<double>(bound) / 1e9});
    }
    h.histogram.sample_count = cumulative;
    h.histogram.sample_sum = static_cast<double>(o.total_time_ns) / 1e9;
  }

  std::vector<MetricFamily> out;
  out.push_back(std::move(ops));
  out.push_back(std::move(bytes));
  out.push_back(std::move(failed));
  out.push_back(std::move(invalid));
  out.push_back(std::move(time));
  out.push_back(std::move(latency));
  out.push_back(MakeFamily("blockplane_device_in_flight_requests",
                           "Requests admitted and not yet completed.", MetricType::Gauge));
  AddGauge(out.back(), device, static_cast<double>(s.block.in_flight));
  out.push_back(MakeFamily("blockplane_device_queued_requests",
                           "Requests waiting while the device is drained or stopped on an error.",
                           MetricType::Gauge));
  AddGauge(out.back(), device, static_cast<double>(s.block.queued + s.block.parked));
  out.push_back(
      MakeFamily("blockplane_device_size_bytes", "Size of the device.", MetricType::Gauge));
  AddGauge(out.back(), device, static_cast<double>(s.size_bytes));
  out.push_back(MakeFamily("blockplane_device_highest_written_offset_bytes",
                           "End of the highest successful write since the worker started.",
                           MetricType::Gauge));
  AddGauge(out.back(), device, static_cast<double>(s.block.highest_written_offset));
  out.push_back(MakeFamily("blockplane_device_seconds_since_last_io",
                           "Time since the last completed request (0 while requests are in "
                           "flight).",
                           MetricType::Gauge));
  AddGauge(out.back(), device, static_cast<double>(s.block.idle_ns) / 1e9);
  out.push_back(MakeFamily("blockplane_device_state",
                           "1 for the worker's current device state, 0 for the others.",
                           MetricType::Gauge));
  for (const char* state : kStates) {
    std::vector<ClientMetric::Label> labels = device;
    labels.push_back({"state", state});
    AddGauge(out.back(), std::move(labels), s.state == state ? 1 : 0);
  }
  out.push_back(MakeFamily("blockplane_device_worker_generation",
                           "Generation of the worker serving the device (1 + restarts).",
                           MetricType::Gauge));
  AddGauge(out.back(), device, static_cast<double>(s.generation));
  // The worker's loop. Not in the stats segment: these restart at 0 with each generation, which
  // Prometheus' rate() treats as a counter reset.
  const struct {
    const char* name;
    const char* help;
    uint64_t value;
  } loop[] = {
      {"blockplane_worker_loop_passes_total", "Passes of the worker's event loop.", s.loop.passes},
      {"blockplane_worker_loop_sleeps_total",
       "Loop passes that waited in the kernel for something to happen (few while polling).",
       s.loop.sleeps},
      {"blockplane_worker_loop_submit_calls_total", "io_uring_enter calls that submitted SQEs.",
       s.loop.submit_calls},
      {"blockplane_worker_loop_sqes_total", "SQEs submitted to the worker's io_uring.",
       s.loop.sqes_submitted},
      {"blockplane_worker_loop_completions_total", "CQEs reaped from the worker's io_uring.",
       s.loop.completions},
  };
  for (const auto& c : loop) {
    out.push_back(MakeFamily(c.name, c.help, MetricType::Counter));
    AddCounter(out.back(), device, static_cast<double>(c.value));
  }
  // The block layer's own work (BlockDeviceStats), kept in the stats segment like the
  // per-operation counters.
  const struct {
    const char* name;
    const char* help;
    uint64_t value;
  } block[] = {
      {"blockplane_device_flushes_skipped_total",
       "Flushes answered without a backend flush: nothing was written since the last one.",
       s.block.flushes_skipped},
      {"blockplane_device_read_modify_writes_total",
       "Writes padded to the backend's alignment with a read-modify-write.", s.block.rmw},
      {"blockplane_device_bounced_total", "Requests staged through a bounce buffer.",
       s.block.bounced},
      {"blockplane_device_split_total",
       "Requests split into several backend operations (the backend's limits).", s.block.split},
      {"blockplane_device_serialising_waits_total",
       "Requests that waited for an overlapping read-modify-write.", s.block.serialising_waits},
      {"blockplane_device_zero_writes_detected_total",
       "Writes of zeroes turned into write-zeroes (detect-zeroes).", s.block.zero_writes_detected},
      {"blockplane_device_write_zeroes_fallbacks_total",
       "Write-zeroes requests done by writing zero buffers.", s.block.write_zeroes_fallbacks},
      {"blockplane_device_error_stops_total",
       "Times the device stopped on an I/O error (error policy stop).", s.block.error_stops},
  };
  for (const auto& c : block) {
    out.push_back(MakeFamily(c.name, c.help, MetricType::Counter));
    AddCounter(out.back(), device, static_cast<double>(c.value));
  }
  out.push_back(MakeFamily("blockplane_device_feature_withdrawn",
                           "1 once the backend refused a feature (EOPNOTSUPP) and the block layer "
                           "stopped using it, by feature.",
                           MetricType::Gauge));
  for (const auto& [feature, withdrawn] :
       {std::pair<const char*, uint64_t>{"discard", s.block.discard_withdrawn},
        std::pair<const char*, uint64_t>{"write_zeroes", s.block.write_zeroes_withdrawn}}) {
    std::vector<ClientMetric::Label> labels = device;
    labels.push_back({"feature", feature});
    AddGauge(out.back(), std::move(labels), withdrawn != 0 ? 1 : 0);
  }
  if (!s.transport.empty()) AddTransport(s.transport, device, &out);
  return out;
}

}  // namespace blockplane::worker
