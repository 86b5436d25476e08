#pragma once

// WorkerExporter: the worker's /metrics endpoint, served by prometheus-cpp's pull Exposer (its
// embedded civetweb; no HTTP code of ours) with the device's and the process's collectors.
//
// Threads: the Exposer runs its own threads; construct and destroy on the worker's thread.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "prometheus/collectable.h"

namespace prometheus {
class Exposer;
}

namespace blockplane::worker {

class WorkerExporter {
 public:
  // Listens on `listen` (host:port; port 0: the kernel picks). Unavailable if it cannot bind.
  static absl::StatusOr<std::unique_ptr<WorkerExporter>> Start(
      const std::string& listen, std::shared_ptr<prometheus::Collectable> device);
  ~WorkerExporter();

  // host:port actually listened on (the picked port), for WorkerStatus.metrics_endpoint.
  const std::string& endpoint() const { return endpoint_; }

 private:
  WorkerExporter() = default;
  std::shared_ptr<prometheus::Collectable> device_;
  std::shared_ptr<prometheus::Collectable> process_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::string endpoint_;
};

}  // namespace blockplane::worker
