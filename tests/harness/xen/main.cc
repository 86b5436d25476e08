// bp-xenhost: the emulated Xen host (xenstored + hypervisor) for tests and the demo.
//
//   bp-xenhost --run-dir DIR [--domain ID[:PAGES[:GRANTS]]]... [--log-level LEVEL]
//
// Creates the sockets described in xen_host.h under DIR, creates each --domain (default 1024
// pages = 4 MiB of guest memory and 1024 grant entries) and introduces it to xenstored, prints
// "READY <DIR>" on stdout once everything listens, and runs until SIGINT or SIGTERM.

#include <signal.h>

#include <charconv>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/logging.h"
#include "tests/harness/xen/xen_host.h"

namespace {

blockplane::harness::XenHost* g_host = nullptr;

void OnSignal(int) {
  if (g_host) g_host->Stop();
}

int Usage() {
  std::fprintf(stderr, "usage: bp-xenhost --run-dir DIR [--domain ID]... [--log-level LEVEL]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace blockplane;
  common::SetLogComponent("bp-xenhost");
  harness::XenHostOptions options;
  struct DomainSpec {
    uint32_t domid = 0;
    uint32_t pages = 1024;
    uint32_t grants = 1024;
  };
  std::vector<DomainSpec> domains;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (i + 1 >= argc) return Usage();
    std::string value = argv[++i];
    if (arg == "--run-dir") {
      options.run_dir = value;
    } else if (arg == "--domain") {
      DomainSpec spec;
      uint32_t* fields[] = {&spec.domid, &spec.pages, &spec.grants};
      const char* cursor = value.data();
      const char* end = value.data() + value.size();
      for (uint32_t* field : fields) {
        auto [next, ec] = std::from_chars(cursor, end, *field);
        if (ec != std::errc()) return Usage();
        cursor = next;
        if (cursor == end) break;
        if (*cursor != ':') return Usage();
        ++cursor;
      }
      if (cursor != end || spec.domid == 0) return Usage();
      domains.push_back(spec);
    } else if (arg == "--log-level") {
      common::LogLevel level;
      if (!common::ParseLogLevel(value, &level)) return Usage();
      common::SetMinLogLevel(level);
    } else {
      return Usage();
    }
  }
  if (options.run_dir.empty()) return Usage();

  auto host = harness::XenHost::Create(options);
  if (!host.ok()) {
    BP_LOG(Error) << "cannot start: " << host.status();
    return 1;
  }
  for (const DomainSpec& spec : domains) {
    if (absl::Status status = (*host)->CreateDomain(spec.domid, spec.pages, spec.grants);
        !status.ok()) {
      BP_LOG(Error) << status;
      return 1;
    }
  }
  g_host = host->get();
  struct sigaction action {};
  action.sa_handler = OnSignal;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  signal(SIGPIPE, SIG_IGN);
  std::printf("READY %s\n", options.run_dir.c_str());
  std::fflush(stdout);
  absl::Status status = (*host)->Run();
  g_host = nullptr;
  if (!status.ok()) {
    BP_LOG(Error) << status;
    return 1;
  }
  return 0;
}
