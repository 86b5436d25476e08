#pragma once

// MetricsServer: blockplaned's HTTP endpoint for Prometheus, on civetweb (no HTTP code of ours):
//   /metrics  the controller's own metrics (ControllerMetrics, devices by state, process), in
//             the text format (prometheus-cpp's TextSerializer);
//   /sd       Prometheus HTTP service discovery (http_sd_configs): one target group per device
//             whose worker serves /metrics, labelled device, frontend and domid (Xen) or socket
//             (vhost-user). A restarting worker drops out until its successor reports its port.
//
// Threads: civetweb's; the callbacks (device list) must be thread-safe.

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "blockplane/v1/device.pb.h"
#include "controller/metrics/controller_metrics.h"

class CivetServer;

namespace blockplane::controller {

class MetricsServer {
 public:
  // Every device, with its status (state, metrics_endpoint). Called at each scrape.
  using DeviceLister = std::function<std::vector<v1::Device>()>;

  // Listens on `listen` (host:port, port 0: the kernel picks). Unavailable if it cannot bind.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& listen,
                                                              ControllerMetrics* metrics,
                                                              DeviceLister devices);
  ~MetricsServer();

  // host:port actually listened on.
  const std::string& endpoint() const { return endpoint_; }

  // The bodies, exposed for unit tests.
  std::string MetricsText() const;
  std::string ServiceDiscoveryJson() const;

 private:
  class Handler;
  MetricsServer(ControllerMetrics* metrics, DeviceLister devices);

  ControllerMetrics* const metrics_;
  const DeviceLister devices_;
  std::unique_ptr<Handler> metrics_handler_, sd_handler_;
  std::unique_ptr<CivetServer> server_;
  std::string endpoint_;
};

}  // namespace blockplane::controller
