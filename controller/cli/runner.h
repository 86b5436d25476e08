#pragma once

// Sends the request of an Invocation to a DeviceService and prints the answer. Separate from main()
// so that unit tests can run it against an in-process fake service.

#include <memory>
#include <mutex>
#include <ostream>

#include "absl/status/statusor.h"
#include "controller/cli/command_line.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"

namespace blockplane::controller::cli {

// Lets another thread (main's signal thread, on Ctrl-C) cancel the call in progress. Thread-safe.
class CallCanceller {
 public:
  // Cancels the current call, and any call started afterwards.
  void Cancel();
  bool cancelled() const;

  // Run() registers the context of each call before starting it and clears it (nullptr) after the
  // call finished; the context must stay alive while registered.
  void SetContext(grpc::ClientContext* context);

 private:
  mutable std::mutex mu_;
  grpc::ClientContext* context_ = nullptr;
  bool cancelled_ = false;
};

// A channel to the socket or the address of `options` (with mutual TLS when the --tls-* files are
// set; InvalidArgument if one cannot be read). Does not connect yet.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const GlobalOptions& options);

// "NOT_FOUND" for grpc::StatusCode::NOT_FOUND.
std::string StatusCodeName(grpc::StatusCode code);

// Performs the call and prints the result to `out` (errors to `err` as
// "bpctl: CODE: message"). Returns kExitOk or kExitServerError. `invocation.help` must be unset.
// `canceller` may be null. A watch ended by the canceller or by an explicit --deadline exits 0.
int Run(const Invocation& invocation, const std::shared_ptr<grpc::ChannelInterface>& channel,
        std::ostream& out, std::ostream& err, CallCanceller* canceller);

}  // namespace blockplane::controller::cli
