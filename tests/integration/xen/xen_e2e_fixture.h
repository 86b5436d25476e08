#pragma once

// The set-up the Xen end-to-end tests share: bp-xenhost (the emulated Xen host) on a fresh run
// dir, a real blockplaned --xen-platform=emulated on it, and the guest's handles (GuestDomain and
// its emulated XenPlatform). Test-only.

#include <stdint.h>
#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "common/xen/xen_platform.h"
#include "gtest/gtest.h"
#include "tests/harness/xen/blkfront.h"
#include "tests/harness/xen/guest_domain.h"
#include "tests/harness/xen/test_support.h"
#include "tests/integration/controller/fixture.h"

namespace blockplane::xen_e2e {

using harness::Blkfront;
using harness::BlkfrontCompletion;
using harness::BlkfrontOp;
using harness::BlkfrontOptions;
using harness::GuestDomain;
using harness::TempDir;

inline constexpr common::xen::DomainId kGuest = 5;  // the guest bp-xenhost is started with
inline constexpr uint32_t kDevid = 51712;           // xvda
inline constexpr size_t kPage = 4096;
inline constexpr uint32_t kSectorsPerPage = 8;

// The whole of the file at `path` (empty if it cannot be read).
std::string ReadWholeFile(const std::string& path);

// The number after `key` (e.g. "\"ops\":") in `json` (bp-blkfront's JSON); -1 if absent.
int64_t JsonNumber(const std::string& json, const std::string& key);

// A fixture base: starts the pieces on request and, in TearDown, closes the frontend, stops the
// controller (which kills the workers), closes the guest's and dom0's handles, then stops
// bp-xenhost (SIGTERM) and reaps it.
class XenE2eTest : public ::testing::Test {
 protected:
  void TearDown() override;

  // Spawns bp-xenhost with guest `guest` of `pages` pages and `grants` grant entries.
  void StartXenHost(common::xen::DomainId guest, uint32_t pages, uint32_t grants);

  // Starts blockplaned with --xen-platform=emulated --xen-run-dir=<run dir> and `extra_flags`.
  void StartController(const std::vector<std::string>& extra_flags = {});

  // Opens guest_ and guest_platform_ for domain `guest`.
  void ConnectGuest(common::xen::DomainId guest);

  // The device `id` as the controller reports it (testing::GetDevice).
  v1::Device GetDevice(const std::string& id = "xd0") {
    return testing::GetDevice(*controller_, id);
  }

  harness::TempDir run_dir_;
  pid_t xenhost_pid_ = -1;
  std::unique_ptr<testing::ControllerProcess> controller_;
  std::unique_ptr<harness::GuestDomain> guest_;
  std::unique_ptr<common::xen::XenPlatform> guest_platform_;
  std::unique_ptr<common::xen::XenPlatform> dom0_;
  std::unique_ptr<harness::Blkfront> blkfront_;
};

}  // namespace blockplane::xen_e2e
