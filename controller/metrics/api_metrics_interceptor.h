#pragma once

// A gRPC server interceptor that records every API call (method, status code, duration) in
// ControllerMetrics: one place for all handlers, none of which knows about metrics.

#include <memory>

#include "controller/metrics/controller_metrics.h"
#include "grpcpp/support/server_interceptor.h"

namespace blockplane::controller {

class ApiMetricsInterceptorFactory final
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit ApiMetricsInterceptorFactory(ControllerMetrics* metrics) : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override;

 private:
  ControllerMetrics* const metrics_;  // outlives the server
};

}  // namespace blockplane::controller
