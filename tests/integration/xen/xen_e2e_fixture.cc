#include "tests/integration/xen/xen_e2e_fixture.h"

#include <signal.h>
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace blockplane::xen_e2e {

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

int64_t JsonNumber(const std::string& json, const std::string& key) {
  size_t at = json.find(key);
  if (at == std::string::npos) return -1;
  return std::strtoll(json.c_str() + at + key.size(), nullptr, 10);
}

void XenE2eTest::TearDown() {
  blkfront_.reset();
  controller_.reset();  // kills the workers
  guest_.reset();
  guest_platform_.reset();
  dom0_.reset();
  if (xenhost_pid_ > 0) {
    kill(xenhost_pid_, SIGTERM);
    int status = 0;
    waitpid(xenhost_pid_, &status, 0);
  }
}

void XenE2eTest::StartXenHost(common::xen::DomainId guest, uint32_t pages, uint32_t grants) {
  absl::StatusOr<pid_t> pid = harness::SpawnXenHost(
      BP_XENHOST_PATH, run_dir_.path(),
      std::to_string(guest) + ":" + std::to_string(pages) + ":" + std::to_string(grants));
  ASSERT_TRUE(pid.ok()) << pid.status();
  xenhost_pid_ = *pid;
}

void XenE2eTest::StartController(const std::vector<std::string>& extra_flags) {
  std::vector<std::string> flags = {"--xen-platform=emulated", "--xen-run-dir=" + run_dir_.path()};
  flags.insert(flags.end(), extra_flags.begin(), extra_flags.end());
  controller_ = std::make_unique<testing::ControllerProcess>(flags);
  controller_->Start();
}

void XenE2eTest::ConnectGuest(common::xen::DomainId guest) {
  auto domain = harness::GuestDomain::Connect(run_dir_.path(), guest);
  ASSERT_TRUE(domain.ok()) << domain.status();
  guest_ = std::move(*domain);
  auto platform = common::xen::CreateEmulatedXenPlatform({run_dir_.path(), guest});
  ASSERT_TRUE(platform.ok()) << platform.status();
  guest_platform_ = std::move(*platform);
}

}  // namespace blockplane::xen_e2e
