#pragma once

#include "blockplane/internal/diagnostics.grpc.pb.h"
#include "controller/device_manager.h"

namespace blockplane::controller {

// blockplane.internal.Diagnostics: test and diagnostic calls, registered only with
// --enable-self-test-io (they overwrite device data). Thin: decode, deadline, DeviceManager.
class DiagnosticsService final : public internal::Diagnostics::Service {
 public:
  explicit DiagnosticsService(DeviceManager* manager) : manager_(manager) {}

  grpc::Status SelfTestIo(grpc::ServerContext* context, const internal::SelfTestIoCall* request,
                          v1::DeviceStats* response) override;

 private:
  DeviceManager* const manager_;
};

}  // namespace blockplane::controller
