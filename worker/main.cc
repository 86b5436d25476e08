// blockplane-worker: config from --config-fd -> Worker -> run. Started by blockplaned.
#include <signal.h>
#include <unistd.h>

#include <iostream>
#include <string>

#include "absl/strings/numbers.h"
#include "common/logging.h"
#include "common/unique_fd.h"
#include "worker/worker.h"

namespace {

constexpr const char* kUsage =
    "Usage: blockplane-worker --config-fd=N [--log-level=LEVEL]\n"
    "Serves one blockplane device. Started and supervised by blockplaned, which passes a\n"
    "blockplane.internal.WorkerConfig message on file descriptor N.\n";

}  // namespace

int main(int argc, char** argv) {
  using namespace blockplane;
  int config_fd = -1;
  common::LogLevel level = common::LogLevel::kInfo;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--config-fd=", 0) == 0) {
      if (!absl::SimpleAtoi(arg.substr(12), &config_fd) || config_fd < 0) config_fd = -1;
    } else if (arg.rfind("--log-level=", 0) == 0) {
      if (!common::ParseLogLevel(arg.substr(12), &level)) {
        std::cerr << "blockplane-worker: unknown log level " << arg.substr(12) << "\n";
        return 2;
      }
    } else if (arg == "--help") {
      std::cout << kUsage;
      return 0;
    } else {
      std::cerr << "blockplane-worker: unknown argument " << arg << "\n" << kUsage;
      return 2;
    }
  }
  if (config_fd < 0) {
    std::cerr << kUsage;
    return 2;
  }
  std::string bytes;
  {
    common::UniqueFd fd(config_fd);
    char buf[65536];
    ssize_t n;
    while ((n = ::read(fd.get(), buf, sizeof(buf))) > 0) bytes.append(buf, static_cast<size_t>(n));
  }
  internal::WorkerConfig config;
  if (!config.ParseFromString(bytes) || config.device_id().empty()) {
    std::cerr << "blockplane-worker: no valid WorkerConfig on fd " << config_fd << "\n";
    return 2;
  }
  common::SetLogComponent("worker[" + config.device_id() + "]");
  common::SetMinLogLevel(level);
  signal(SIGPIPE, SIG_IGN);

  worker::Worker w(std::move(config));
  if (absl::Status s = w.Init(); !s.ok()) {
    BP_LOG(Error) << s.message();
    return 1;
  }
  return w.Run();
}
