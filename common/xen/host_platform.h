#pragma once

// The host XenPlatform (libxengnttab, libxenevtchn, libxenstore), with the /dev/xen location as
// a parameter so that the "not a Xen domain" path is testable. Use CreateHostXenPlatform().

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/xen/xen_platform.h"

namespace blockplane::common::xen {

inline constexpr char kDevXen[] = "/dev/xen";

absl::StatusOr<std::unique_ptr<XenPlatform>> CreateHostXenPlatformAt(const std::string& dev_xen);

}  // namespace blockplane::common::xen
