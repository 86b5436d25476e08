#include "controller/diagnostics_service.h"

#include "controller/device_service.h"

namespace blockplane::controller {

grpc::Status DiagnosticsService::SelfTestIo(grpc::ServerContext* context,
                                            const internal::SelfTestIoCall* request,
                                            v1::DeviceStats* response) {
  // A workload may take a while: up to 5 minutes, or the client's deadline.
  google::protobuf::Duration timeout;
  timeout.set_seconds(300);
  absl::StatusOr<Clock::time_point> deadline = OperationDeadline(*context, timeout, "timeout");
  if (!deadline.ok()) return ToGrpc(deadline.status());
  absl::StatusOr<v1::DeviceStats> stats =
      manager_->SelfTestIo(request->device_id(), request->io(), *deadline);
  if (!stats.ok()) return ToGrpc(stats.status());
  *response = std::move(*stats);
  return grpc::Status::OK;
}

}  // namespace blockplane::controller
