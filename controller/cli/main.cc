// bpctl: the operator CLI of blockplaned. See `bpctl --help` and docs/api.md.

#include <signal.h>

#include <cstdlib>
#include <iostream>
#include <thread>

#include "controller/cli/command_line.h"
#include "controller/cli/runner.h"

namespace {

// Ctrl-C and SIGTERM cancel the call in progress (watch then ends with status 0) instead of
// killing the process mid-call. The signals are blocked before gRPC starts its threads, so only
// this thread receives them.
void CancelOnSignals(blockplane::controller::cli::CallCanceller* canceller) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  std::thread([signals, canceller] {
    int signal = 0;
    while (sigwait(&signals, &signal) == 0) canceller->Cancel();
  }).detach();
}

}  // namespace

int main(int argc, char** argv) {
  namespace cli = blockplane::controller::cli;
  // bpctl reports every failed call itself ("bpctl: UNAVAILABLE: ..."); gRPC's own log lines
  // (a failed TLS handshake is logged at error level) would only repeat it in another format.
  // An operator can still turn them on with GRPC_VERBOSITY.
  setenv("GRPC_VERBOSITY", "NONE", /*overwrite=*/0);
  cli::ParseDefaults defaults;
  if (const char* socket = std::getenv("BLOCKPLANE_SOCKET"); socket != nullptr && *socket != 0) {
    defaults.socket = socket;
  }
  const absl::StatusOr<cli::Invocation> invocation =
      cli::ParseCommandLine(std::vector<std::string>(argv + 1, argv + argc), defaults);
  if (!invocation.ok()) {
    std::cerr << "bpctl: " << invocation.status().message()
              << "\nRun 'bpctl --help' or 'bpctl COMMAND --help' for usage.\n";
    return cli::kExitUsage;
  }
  if (invocation->help.has_value()) {
    std::cout << *invocation->help;
    return cli::kExitOk;
  }
  static cli::CallCanceller canceller;
  CancelOnSignals(&canceller);
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = cli::MakeChannel(invocation->global);
  if (!channel.ok()) {
    std::cerr << "bpctl: " << channel.status().message() << "\n";
    return cli::kExitUsage;
  }
  const int code = cli::Run(*invocation, *channel, std::cout, std::cerr, &canceller);
  std::cout.flush();
  return code;
}
