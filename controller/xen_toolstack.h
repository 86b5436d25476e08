#pragma once

// XenToolstack: what a Xen toolstack (libxl) does in xenstore for a vbd, so that the worker's blkif
// backend and the guest's blkfront can find each other:
//
//   /local/domain/<be>/backend/vbd/<fe>/<devid>/  frontend, frontend-id, online, state (1),
//       params, mode, type, dev, device-type, removable, bootable, discard-enable
//       owned by the backend domain, readable by the guest
//   /local/domain/<fe>/device/vbd/<devid>/        backend, backend-id, state (1),
//       virtual-device, device-type
//       owned by the guest, readable by the backend domain
//
// Written in one transaction at attach (before the worker starts), removed at detach (after the
// worker has closed the backend). The platform is opened on first use, so a controller started
// with --xen-platform=host on a machine without Xen serves everything but Xen attaches, which fail
// with FAILED_PRECONDITION saying why.
//
// Thread-safe (one mutex around the platform; xenstore calls are short).

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "blockplane/v1/device.pb.h"
#include "common/xen/xen_platform.h"

namespace blockplane::controller {

class XenToolstack {
 public:
  // `platform`: "host" or "emulated" (then `run_dir` is bp-xenhost's --run-dir).
  XenToolstack(std::string platform, std::string run_dir);
  ~XenToolstack();

  // Writes both directories for `spec.xen()` (spec normalised; `devid` its parsed
  // virtual_device). FailedPrecondition if the Xen platform cannot be opened.
  absl::Status AddVbd(const v1::DeviceSpec& spec, uint32_t devid);
  // Removes both directories; missing ones are not an error.
  absl::Status RemoveVbd(const v1::DeviceSpec& spec, uint32_t devid);

  static std::string BackendPath(common::xen::DomainId backend, uint32_t frontend, uint32_t devid);
  static std::string FrontendPath(uint32_t frontend, uint32_t devid);

 private:
  absl::StatusOr<common::xen::XenPlatform*> PlatformLocked();

  const std::string platform_kind_;
  const std::string run_dir_;
  std::mutex mu_;
  std::unique_ptr<common::xen::XenPlatform> platform_;  // guarded by mu_
};

}  // namespace blockplane::controller
