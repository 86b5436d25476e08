#pragma once

// Process metrics of the calling process (CPU seconds, memory, open file descriptors, start
// time), read from /proc/self at scrape time, with the names Prometheus' client libraries use
// (process_cpu_seconds_total, ...). prometheus-cpp has no such collector.
//
// Threads: Collect() may run on any thread (the exporter's).

#include <vector>

#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"

namespace blockplane::common {

class ProcessCollector final : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override;
};

// Helpers for collectors that build their families at scrape time.
prometheus::MetricFamily MakeFamily(const char* name, const char* help,
                                    prometheus::MetricType type);
prometheus::ClientMetric& AddGauge(prometheus::MetricFamily& family,
                                   std::vector<prometheus::ClientMetric::Label> labels,
                                   double value);
prometheus::ClientMetric& AddCounter(prometheus::MetricFamily& family,
                                     std::vector<prometheus::ClientMetric::Label> labels,
                                     double value);

}  // namespace blockplane::common
