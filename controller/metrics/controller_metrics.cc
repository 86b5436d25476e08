#include "controller/metrics/controller_metrics.h"

#include "prometheus/counter.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace blockplane::controller {

struct ControllerMetrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  prometheus::Family<prometheus::Counter>& api_calls =
      prometheus::BuildCounter()
          .Name("blockplane_controller_api_calls_total")
          .Help("Finished gRPC API calls by method and gRPC status code.")
          .Register(*registry);
  prometheus::Family<prometheus::Histogram>& api_latency =
      prometheus::BuildHistogram()
          .Name("blockplane_controller_api_call_duration_seconds")
          .Help("Time from receiving a gRPC API call to sending its status, by method.")
          .Register(*registry);
  prometheus::Counter& spawns = prometheus::BuildCounter()
                                    .Name("blockplane_controller_worker_spawns_total")
                                    .Help("Worker processes started.")
                                    .Register(*registry)
                                    .Add({});
  prometheus::Counter& restarts = prometheus::BuildCounter()
                                      .Name("blockplane_controller_worker_restarts_total")
                                      .Help("Worker processes started to replace one that died.")
                                      .Register(*registry)
                                      .Add({});
  prometheus::Counter& crashes =
      prometheus::BuildCounter()
          .Name("blockplane_controller_worker_crashes_total")
          .Help("Workers that died (or failed to start) without being asked to stop.")
          .Register(*registry)
          .Add({});
  prometheus::Histogram& registry_writes =
      prometheus::BuildHistogram()
          .Name("blockplane_controller_registry_write_duration_seconds")
          .Help("Duration of registry (SQLite) write transactions.")
          .Register(*registry)
          .Add({}, prometheus::Histogram::BucketBoundaries{0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                                                           0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                           1, 2.5});
};

namespace {
const prometheus::Histogram::BucketBoundaries kApiBuckets = {
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
}  // namespace

ControllerMetrics::ControllerMetrics() : impl_(std::make_unique<Impl>()) {}
ControllerMetrics::~ControllerMetrics() = default;

void ControllerMetrics::ApiCall(const std::string& method, const std::string& code,
                                double seconds) {
  impl_->api_calls.Add({{"method", method}, {"code", code}}).Increment();
  impl_->api_latency.Add({{"method", method}}, kApiBuckets).Observe(seconds);
}

void ControllerMetrics::WorkerSpawned() { impl_->spawns.Increment(); }
void ControllerMetrics::WorkerRestarted() { impl_->restarts.Increment(); }
void ControllerMetrics::WorkerCrashed() { impl_->crashes.Increment(); }
void ControllerMetrics::RegistryWrite(double seconds) { impl_->registry_writes.Observe(seconds); }

std::shared_ptr<prometheus::Registry> ControllerMetrics::registry() const {
  return impl_->registry;
}

}  // namespace blockplane::controller
