#include "controller/device_service.h"

#include "absl/strings/str_cat.h"

namespace blockplane::controller {
namespace {

constexpr std::chrono::seconds kDefaultOperationTimeout{30};
// Room left before the client's deadline for our answer to reach it.
constexpr std::chrono::milliseconds kDeadlineMargin{100};

template <typename T>
grpc::Status Reply(absl::StatusOr<T> result, T* response) {
  if (!result.ok()) return ToGrpc(result.status());
  *response = std::move(*result);
  return grpc::Status::OK;
}

}  // namespace

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::StatusOr<Clock::time_point> OperationDeadline(const grpc::ServerContext& context,
                                                    const google::protobuf::Duration& timeout,
                                                    absl::string_view field) {
  if (timeout.seconds() < 0 || timeout.nanos() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": must not be negative"));
  }
  std::chrono::nanoseconds budget =
      std::chrono::seconds(timeout.seconds()) + std::chrono::nanoseconds(timeout.nanos());
  if (budget.count() == 0) budget = kDefaultOperationTimeout;
  Clock::time_point deadline = Clock::now() + budget;
  auto client_deadline = context.deadline();
  if (client_deadline != std::chrono::system_clock::time_point::max()) {
    auto left = client_deadline - std::chrono::system_clock::now() - kDeadlineMargin;
    deadline = std::min(deadline, Clock::now() + std::chrono::duration_cast<Clock::duration>(left));
  }
  return deadline;
}

grpc::Status DeviceService::AttachDevice(grpc::ServerContext*,
                                         const v1::AttachDeviceRequest* request,
                                         v1::Device* response) {
  return Reply(manager_->Attach(*request), response);
}

grpc::Status DeviceService::DrainDevice(grpc::ServerContext* context,
                                        const v1::DrainDeviceRequest* request,
                                        v1::Device* response) {
  absl::StatusOr<Clock::time_point> deadline =
      OperationDeadline(*context, request->timeout(), "timeout");
  if (!deadline.ok()) return ToGrpc(deadline.status());
  return Reply(manager_->Drain(request->device_id(), *deadline), response);
}

grpc::Status DeviceService::ResumeDevice(grpc::ServerContext*,
                                         const v1::ResumeDeviceRequest* request,
                                         v1::Device* response) {
  return Reply(manager_->Resume(request->device_id()), response);
}

grpc::Status DeviceService::DetachDevice(grpc::ServerContext* context,
                                         const v1::DetachDeviceRequest* request,
                                         v1::DetachDeviceResponse* response) {
  absl::StatusOr<Clock::time_point> deadline =
      OperationDeadline(*context, request->timeout(), "timeout");
  if (!deadline.ok()) return ToGrpc(deadline.status());
  absl::Status status = manager_->Detach(request->device_id(), request->force(), *deadline);
  if (status.ok()) response->set_device_id(request->device_id());
  return ToGrpc(status);
}

grpc::Status DeviceService::ResizeDevice(grpc::ServerContext* context,
                                         const v1::ResizeDeviceRequest* request,
                                         v1::Device* response) {
  absl::StatusOr<Clock::time_point> deadline =
      OperationDeadline(*context, google::protobuf::Duration(), "timeout");
  if (!deadline.ok()) return ToGrpc(deadline.status());
  return Reply(manager_->Resize(*request, *deadline), response);
}

grpc::Status DeviceService::GetDevice(grpc::ServerContext*, const v1::GetDeviceRequest* request,
                                      v1::Device* response) {
  return Reply(manager_->Get(request->device_id()), response);
}

grpc::Status DeviceService::ListDevices(grpc::ServerContext*, const v1::ListDevicesRequest* request,
                                        v1::ListDevicesResponse* response) {
  return Reply(manager_->List(*request), response);
}

grpc::Status DeviceService::WatchDevices(grpc::ServerContext* context,
                                         const v1::WatchDevicesRequest* request,
                                         grpc::ServerWriter<v1::DeviceEvent>* writer) {
  std::vector<v1::Device> snapshot;
  absl::StatusOr<std::shared_ptr<WatchSubscription>> subscription =
      manager_->Watch(request->device_id(), &snapshot);
  if (!subscription.ok()) return ToGrpc(subscription.status());
  for (v1::Device& device : snapshot) {
    v1::DeviceEvent event;
    event.set_kind(v1::DeviceEvent::KIND_SNAPSHOT);
    *event.mutable_device() = std::move(device);
    event.set_previous_state(event.device().status().state());
    if (!writer->Write(event)) return grpc::Status::OK;
  }
  v1::DeviceEvent complete;
  complete.set_kind(v1::DeviceEvent::KIND_SNAPSHOT_COMPLETE);
  if (!writer->Write(complete)) return grpc::Status::OK;
  while (!context->IsCancelled()) {
    absl::StatusOr<std::optional<v1::DeviceEvent>> event =
        (*subscription)->Next(std::chrono::milliseconds(250));
    if (!event.ok()) return ToGrpc(event.status());
    if (event->has_value() && !writer->Write(**event)) break;
  }
  return grpc::Status::OK;
}

grpc::Status DeviceService::GetDeviceStats(grpc::ServerContext* context,
                                           const v1::GetDeviceStatsRequest* request,
                                           v1::DeviceStats* response) {
  absl::StatusOr<Clock::time_point> deadline =
      OperationDeadline(*context, google::protobuf::Duration(), "timeout");
  if (!deadline.ok()) return ToGrpc(deadline.status());
  return Reply(manager_->Stats(request->device_id(), *deadline), response);
}

}  // namespace blockplane::controller
