#pragma once

#include <memory>

#include "absl/status/status.h"
#include "common/unique_fd.h"
#include "controller/device_manager.h"
#include "controller/device_service.h"
#include "controller/diagnostics_service.h"
#include "controller/metrics/controller_metrics.h"
#include "controller/metrics/metrics_server.h"
#include "controller/options.h"
#include "controller/registry.h"

namespace grpc {
class Server;
}

namespace blockplane::controller {

// The daemon: registry, device manager and gRPC server wired together.
class Controller {
 public:
  explicit Controller(ControllerOptions options);
  ~Controller();

  // Opens the registry (refusing a state dir another blockplaned holds), re-adopts workers, and
  // starts serving. Errors say what to fix.
  absl::Status Start();
  // Stops accepting calls, finishes the ones in progress (up to a few seconds), and stops the
  // device monitors (and the workers, with --stop-workers-on-exit).
  void Shutdown();
  // The TCP port actually bound (after Start; 0 without --listen-tcp).
  int tcp_port() const { return tcp_port_; }

 private:
  ControllerOptions options_;
  common::UniqueFd state_lock_;
  std::unique_ptr<Registry> registry_;
  std::unique_ptr<DeviceManager> manager_;
  std::unique_ptr<DeviceService> service_;
  std::unique_ptr<DiagnosticsService> diagnostics_;  // --enable-self-test-io only
  // --metrics-listen only; metrics_ outlives the manager and the API server that record into it.
  std::unique_ptr<ControllerMetrics> metrics_;
  std::unique_ptr<MetricsServer> metrics_server_;
  std::unique_ptr<grpc::Server> server_;
  int tcp_port_ = 0;
};

}  // namespace blockplane::controller
