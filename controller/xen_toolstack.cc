#include "controller/xen_toolstack.h"

#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "controller/validation.h"

namespace blockplane::controller {

using common::xen::DomainId;
using common::xen::TransactionId;
using common::xen::XenStorePermission;

XenToolstack::XenToolstack(std::string platform, std::string run_dir)
    : platform_kind_(std::move(platform)), run_dir_(std::move(run_dir)) {}

XenToolstack::~XenToolstack() = default;

std::string XenToolstack::BackendPath(DomainId backend, uint32_t frontend, uint32_t devid) {
  return absl::StrCat("/local/domain/", backend, "/backend/vbd/", frontend, "/", devid);
}

std::string XenToolstack::FrontendPath(uint32_t frontend, uint32_t devid) {
  return absl::StrCat("/local/domain/", frontend, "/device/vbd/", devid);
}

absl::StatusOr<common::xen::XenPlatform*> XenToolstack::PlatformLocked() {
  if (platform_) return platform_.get();
  absl::StatusOr<std::unique_ptr<common::xen::XenPlatform>> platform =
      absl::InvalidArgumentError(absl::StrCat("unknown Xen platform \"", platform_kind_, "\""));
  if (platform_kind_ == "host") {
    platform = common::xen::CreateHostXenPlatform();
  } else if (platform_kind_ == "emulated") {
    common::xen::EmulatedXenOptions options;
    options.run_dir = run_dir_;
    options.domid = 0;
    platform = common::xen::CreateEmulatedXenPlatform(options);
  }
  if (!platform.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("spec.xen: the Xen platform (--xen-platform=", platform_kind_,
                     ") is not available: ", platform.status().message()));
  }
  platform_ = std::move(*platform);
  return platform_.get();
}

absl::Status XenToolstack::AddVbd(const v1::DeviceSpec& spec, uint32_t devid) {
  std::lock_guard lock(mu_);
  absl::StatusOr<common::xen::XenPlatform*> platform = PlatformLocked();
  if (!platform.ok()) return platform.status();
  const DomainId backend = (*platform)->domid();
  const DomainId frontend = static_cast<DomainId>(spec.xen().domid());
  const std::string be = BackendPath(backend, frontend, devid);
  const std::string fe = FrontendPath(frontend, devid);
  const std::vector<XenStorePermission> backend_perms = {
      {backend, XenStorePermission::Access::kNone}, {frontend, XenStorePermission::Access::kRead}};
  const std::vector<XenStorePermission> frontend_perms = {
      {frontend, XenStorePermission::Access::kNone}, {backend, XenStorePermission::Access::kRead}};
  std::vector<std::pair<std::string, std::string>> backend_keys = {
      {"", ""},
      {"frontend", fe},
      {"frontend-id", std::to_string(frontend)},
      {"online", "1"},
      {"state", "1"},
      {"params", spec.backend().has_null() ? "null" : spec.backend().path()},
      {"mode", spec.backend().read_only() ? "r" : "w"},
      {"type", "blockplane"},
      {"dev", spec.xen().virtual_device()},
      {"device-type", "disk"},
      {"removable", "0"},
      {"bootable", "1"},
      {"discard-enable", spec.backend().discard() == v1::DISCARD_MODE_UNMAP ? "1" : "0"},
  };
  std::vector<std::pair<std::string, std::string>> frontend_keys = {
      {"", ""},
      {"backend", be},
      {"backend-id", std::to_string(backend)},
      {"state", "1"},
      {"virtual-device", std::to_string(devid)},
      {"device-type", "disk"},
  };
  common::xen::XenStore& store = (*platform)->xenstore();
  absl::Status status = store.RunTransaction([&](TransactionId tx) -> absl::Status {
    // Stale directories of an earlier attach would leave keys of another negotiation behind.
    (void)store.Remove(be, tx);
    (void)store.Remove(fe, tx);
    for (const auto& [dir, keys, perms] :
         {std::tie(be, backend_keys, backend_perms), std::tie(fe, frontend_keys, frontend_perms)}) {
      for (const auto& [key, value] : keys) {
        const std::string path = key.empty() ? dir : dir + "/" + key;
        if (absl::Status s = store.Write(path, value, tx); !s.ok()) return s;
        if (absl::Status s = store.SetPermissions(path, perms, tx); !s.ok()) return s;
      }
    }
    return absl::OkStatus();
  });
  if (!status.ok()) {
    return absl::Status(
        status.code(),
        absl::StrCat("spec.xen: writing the vbd's xenstore entries: ", status.message()));
  }
  BP_LOG(Info) << "xenstore: vbd " << be << " <-> " << fe;
  return absl::OkStatus();
}

absl::Status XenToolstack::RemoveVbd(const v1::DeviceSpec& spec, uint32_t devid) {
  std::lock_guard lock(mu_);
  absl::StatusOr<common::xen::XenPlatform*> platform = PlatformLocked();
  if (!platform.ok()) return platform.status();
  const DomainId frontend = static_cast<DomainId>(spec.xen().domid());
  const std::string be = BackendPath((*platform)->domid(), frontend, devid);
  const std::string fe = FrontendPath(frontend, devid);
  common::xen::XenStore& store = (*platform)->xenstore();
  absl::Status status = store.RunTransaction([&](TransactionId tx) -> absl::Status {
    for (const std::string& path : {fe, be}) {
      if (absl::Status s = store.Remove(path, tx); !s.ok() && !absl::IsNotFound(s)) return s;
    }
    return absl::OkStatus();
  });
  if (!status.ok()) {
    BP_LOG(Error) << "xenstore: cannot remove vbd " << be << ": " << status.message();
  }
  return status;
}

}  // namespace blockplane::controller
