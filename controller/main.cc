// blockplaned: flags -> Controller -> run until SIGTERM/SIGINT.
#include <signal.h>

#include <iostream>

#include "common/logging.h"
#include "controller/controller.h"
#include "controller/options.h"

int main(int argc, char** argv) {
  using namespace blockplane;
  absl::StatusOr<controller::ControllerOptions> options =
      controller::ParseControllerFlags(argc, argv);
  if (!options.ok()) {
    std::cerr << "blockplaned: " << options.status().message() << "\n";
    return 2;
  }
  if (options->help) {
    std::cout << controller::ControllerUsage();
    return 0;
  }
  common::SetLogComponent("blockplaned");
  common::LogLevel level;
  common::ParseLogLevel(options->log_level, &level);
  common::SetMinLogLevel(level);

  // Signals are taken synchronously by this thread; every other thread inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  controller::Controller daemon(*options);
  if (absl::Status s = daemon.Start(); !s.ok()) {
    BP_LOG(Error) << s.message();
    return 1;
  }
  int sig = 0;
  sigwait(&signals, &sig);
  BP_LOG(Info) << "received " << strsignal(sig) << "; shutting down"
               << (options->stop_workers_on_exit ? " and stopping workers"
                                                 : " (workers keep running)");
  daemon.Shutdown();
  return 0;
}
