#include "controller/cli/runner.h"

#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"
#include "blockplane/v1/device.grpc.pb.h"
#include "common/pem_file.h"
#include "controller/cli/output.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

namespace blockplane::controller::cli {
namespace {

using Stub = v1::DeviceService::Stub;

// A drain or detach with a --timeout longer than the default deadline would otherwise always end in
// DEADLINE_EXCEEDED on the client first; leave the server this much time to answer after it.
constexpr absl::Duration kTimeoutSlack = absl::Seconds(10);

absl::Duration RequestTimeout(const google::protobuf::Duration& timeout) {
  return absl::Seconds(timeout.seconds()) + absl::Nanoseconds(timeout.nanos());
}

// The deadline of the whole command: --deadline, or long enough for a requested drain timeout.
absl::Duration CommandDeadline(const Invocation& invocation) {
  const GlobalOptions& global = invocation.global;
  if (global.deadline_set) return global.deadline;
  absl::Duration timeout = absl::ZeroDuration();
  if (const auto* drain = std::get_if<v1::DrainDeviceRequest>(&invocation.request)) {
    timeout = RequestTimeout(drain->timeout());
  } else if (const auto* detach = std::get_if<v1::DetachDeviceRequest>(&invocation.request)) {
    if (!detach->force()) timeout = RequestTimeout(detach->timeout());
  }
  return std::max(global.deadline, timeout + kTimeoutSlack);
}

// Registers a context with the canceller for the duration of one call.
class ScopedCall {
 public:
  ScopedCall(CallCanceller* canceller, grpc::ClientContext* context) : canceller_(canceller) {
    if (canceller_ != nullptr) canceller_->SetContext(context);
  }
  ~ScopedCall() {
    if (canceller_ != nullptr) canceller_->SetContext(nullptr);
  }
  ScopedCall(const ScopedCall&) = delete;
  ScopedCall& operator=(const ScopedCall&) = delete;

 private:
  CallCanceller* canceller_;
};

class Caller {
 public:
  Caller(const Invocation& invocation, const std::shared_ptr<grpc::ChannelInterface>& channel,
         std::ostream& out, std::ostream& err, CallCanceller* canceller)
      : invocation_(invocation),
        stub_(v1::DeviceService::NewStub(channel)),
        out_(out),
        err_(err),
        canceller_(canceller),
        deadline_(std::chrono::system_clock::now() +
                  absl::ToChronoMilliseconds(CommandDeadline(invocation))) {}

  int operator()(const v1::AttachDeviceRequest& request) {
    return Unary<v1::Device>(&Stub::AttachDevice, request);
  }
  int operator()(const v1::DrainDeviceRequest& request) {
    return Unary<v1::Device>(&Stub::DrainDevice, request);
  }
  int operator()(const v1::ResumeDeviceRequest& request) {
    return Unary<v1::Device>(&Stub::ResumeDevice, request);
  }
  int operator()(const v1::DetachDeviceRequest& request) {
    return Unary<v1::DetachDeviceResponse>(&Stub::DetachDevice, request);
  }
  int operator()(const v1::ResizeDeviceRequest& request) {
    return Unary<v1::Device>(&Stub::ResizeDevice, request);
  }
  int operator()(const v1::GetDeviceRequest& request) {
    return Unary<v1::Device>(&Stub::GetDevice, request);
  }
  int operator()(const v1::GetDeviceStatsRequest& request) {
    return Unary<v1::DeviceStats>(&Stub::GetDeviceStats, request);
  }

  // Follows next_page_token to the end and prints all devices at once (one table, or one
  // ListDevicesResponse in JSON with an empty next_page_token).
  int operator()(const v1::ListDevicesRequest& first_request) {
    v1::ListDevicesRequest request = first_request;
    v1::ListDevicesResponse all;
    while (true) {
      grpc::ClientContext context;
      context.set_deadline(deadline_);
      v1::ListDevicesResponse page;
      grpc::Status status;
      {
        ScopedCall call(canceller_, &context);
        status = stub_->ListDevices(&context, request, &page);
      }
      if (!status.ok()) return Fail(status);
      for (v1::Device& device : *page.mutable_devices()) *all.add_devices() = std::move(device);
      if (page.next_page_token().empty()) break;
      if (page.next_page_token() == request.page_token()) {
        err_ << "bpctl: the server returned the same page token twice; giving up\n";
        return kExitServerError;
      }
      request.set_page_token(page.next_page_token());
    }
    if (invocation_.global.json) {
      out_ << FormatJson(all, /*multiline=*/true);
    } else {
      out_ << FormatDeviceTable({all.devices().begin(), all.devices().end()});
    }
    return kExitOk;
  }

  int operator()(const v1::WatchDevicesRequest& request) {
    grpc::ClientContext context;
    if (invocation_.global.deadline_set) context.set_deadline(deadline_);
    grpc::Status status;
    {
      ScopedCall call(canceller_, &context);
      std::unique_ptr<grpc::ClientReader<v1::DeviceEvent>> reader =
          stub_->WatchDevices(&context, request);
      v1::DeviceEvent event;
      while (reader->Read(&event)) {
        out_ << (invocation_.global.json ? FormatJson(event, /*multiline=*/false)
                                         : FormatEvent(event));
        out_.flush();
      }
      status = reader->Finish();
    }
    if (status.ok()) return kExitOk;
    if (status.error_code() == grpc::StatusCode::CANCELLED && canceller_ != nullptr &&
        canceller_->cancelled()) {
      return kExitOk;
    }
    if (status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED &&
        invocation_.global.deadline_set) {
      return kExitOk;
    }
    return Fail(status);
  }

 private:
  template <typename Response, typename Method, typename Request>
  int Unary(Method method, const Request& request) {
    grpc::ClientContext context;
    context.set_deadline(deadline_);
    Response response;
    grpc::Status status;
    {
      ScopedCall call(canceller_, &context);
      status = ((*stub_).*method)(&context, request, &response);
    }
    if (!status.ok()) return Fail(status);
    Print(response);
    return kExitOk;
  }

  void Print(const v1::Device& device) {
    out_ << (invocation_.global.json ? FormatJson(device, true) : FormatDevice(device));
  }
  void Print(const v1::DeviceStats& stats) {
    out_ << (invocation_.global.json ? FormatJson(stats, true) : FormatStats(stats));
  }
  void Print(const v1::DetachDeviceResponse& response) {
    if (invocation_.global.json) {
      out_ << FormatJson(response, true);
    } else {
      out_ << "Detached " << response.device_id() << ".\n";
    }
  }

  int Fail(const grpc::Status& status) {
    err_ << "bpctl: " << StatusCodeName(status.error_code()) << ": " << status.error_message()
         << "\n";
    return kExitServerError;
  }

  const Invocation& invocation_;
  std::unique_ptr<Stub> stub_;
  std::ostream& out_;
  std::ostream& err_;
  CallCanceller* canceller_;
  std::chrono::system_clock::time_point deadline_;
};

}  // namespace

void CallCanceller::Cancel() {
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_ = true;
  if (context_ != nullptr) context_->TryCancel();
}

bool CallCanceller::cancelled() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cancelled_;
}

void CallCanceller::SetContext(grpc::ClientContext* context) {
  std::lock_guard<std::mutex> lock(mu_);
  context_ = context;
  if (context_ != nullptr && cancelled_) context_->TryCancel();
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const GlobalOptions& options) {
  if (options.address.empty()) {
    return grpc::CreateChannel(absl::StrCat("unix:", options.socket),
                               grpc::InsecureChannelCredentials());
  }
  if (options.tls_ca_file.empty()) {
    return grpc::CreateChannel(options.address, grpc::InsecureChannelCredentials());
  }
  grpc::SslCredentialsOptions ssl;
  absl::StatusOr<std::string> ca = common::ReadPemFile("--tls-ca", options.tls_ca_file);
  if (!ca.ok()) return ca.status();
  absl::StatusOr<std::string> cert = common::ReadPemFile("--tls-cert", options.tls_cert_file);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = common::ReadPemFile("--tls-key", options.tls_key_file);
  if (!key.ok()) return key.status();
  ssl.pem_root_certs = *ca;
  ssl.pem_cert_chain = *cert;
  ssl.pem_private_key = *key;
  return grpc::CreateChannel(options.address, grpc::SslCredentials(ssl));
}

std::string StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return absl::StrCat("CODE_", static_cast<int>(code));
  }
}

int Run(const Invocation& invocation, const std::shared_ptr<grpc::ChannelInterface>& channel,
        std::ostream& out, std::ostream& err, CallCanceller* canceller) {
  Caller caller(invocation, channel, out, err, canceller);
  return std::visit(caller, invocation.request);
}

}  // namespace blockplane::controller::cli
