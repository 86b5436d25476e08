#pragma once

#include "blockplane/v1/device.grpc.pb.h"
#include "controller/device_manager.h"

namespace blockplane::controller {

// gRPC handlers: decode, compute the deadline, call the DeviceManager, encode. No state of their
// own. Long calls (drain, detach, resize, stats) end before the client's gRPC deadline so that the
// client gets our DEADLINE_EXCEEDED message (with the in-flight count) rather than its own.
class DeviceService final : public v1::DeviceService::Service {
 public:
  explicit DeviceService(DeviceManager* manager) : manager_(manager) {}

  grpc::Status AttachDevice(grpc::ServerContext* context, const v1::AttachDeviceRequest* request,
                            v1::Device* response) override;
  grpc::Status DrainDevice(grpc::ServerContext* context, const v1::DrainDeviceRequest* request,
                           v1::Device* response) override;
  grpc::Status ResumeDevice(grpc::ServerContext* context, const v1::ResumeDeviceRequest* request,
                            v1::Device* response) override;
  grpc::Status DetachDevice(grpc::ServerContext* context, const v1::DetachDeviceRequest* request,
                            v1::DetachDeviceResponse* response) override;
  grpc::Status ResizeDevice(grpc::ServerContext* context, const v1::ResizeDeviceRequest* request,
                            v1::Device* response) override;
  grpc::Status GetDevice(grpc::ServerContext* context, const v1::GetDeviceRequest* request,
                         v1::Device* response) override;
  grpc::Status ListDevices(grpc::ServerContext* context, const v1::ListDevicesRequest* request,
                           v1::ListDevicesResponse* response) override;
  grpc::Status WatchDevices(grpc::ServerContext* context, const v1::WatchDevicesRequest* request,
                            grpc::ServerWriter<v1::DeviceEvent>* writer) override;
  grpc::Status GetDeviceStats(grpc::ServerContext* context,
                              const v1::GetDeviceStatsRequest* request,
                              v1::DeviceStats* response) override;

 private:
  DeviceManager* const manager_;
};

// The one place absl::Status becomes grpc::Status (the codes share their numbers).
grpc::Status ToGrpc(const absl::Status& status);

// When a long operation must give up: `timeout` (or `default_timeout` when unset), but no later
// than shortly before the client's gRPC deadline. INVALID_ARGUMENT for a negative timeout.
absl::StatusOr<Clock::time_point> OperationDeadline(const grpc::ServerContext& context,
                                                    const google::protobuf::Duration& timeout,
                                                    absl::string_view field);

}  // namespace blockplane::controller
