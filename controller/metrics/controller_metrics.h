#pragma once

// ControllerMetrics: what blockplaned counts about itself, recorded by the gRPC interceptor and
// the DeviceManager and served by MetricsServer. The header has no prometheus-cpp types, so the
// DeviceManager depends only on these few methods.
//
// Threads: every method is thread-safe (prometheus-cpp metrics are atomics; families are created
// once, series on first use).

#include <memory>
#include <string>

namespace prometheus {
class Registry;
}

namespace blockplane::controller {

class ControllerMetrics {
 public:
  ControllerMetrics();
  ~ControllerMetrics();

  // One finished API call: `method` as "Service/Method" without the package path, `code` as a
  // gRPC status code name ("OK", "NOT_FOUND", ...).
  void ApiCall(const std::string& method, const std::string& code, double seconds);
  void WorkerSpawned();    // every worker process started (attach, restart, resume of FAILED)
  void WorkerRestarted();  // started to replace one that died
  void WorkerCrashed();    // died or could not start without being asked to stop
  void RegistryWrite(double seconds);

  std::shared_ptr<prometheus::Registry> registry() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace blockplane::controller
