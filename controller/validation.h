#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "blockplane/v1/device.pb.h"

namespace blockplane::controller {

// Request validation. Every error message starts with the path of the offending field
// ("spec.backend.path: ...") and says what to fix. Pure functions except InspectBacking, which
// looks at the file system.

inline constexpr size_t kMaxDeviceIdLength = 64;
inline constexpr uint32_t kMaxXenDomid = 32751;  // DOMID_FIRST_RESERVED - 1
inline constexpr uint32_t kMaxXenQueues = 16;
inline constexpr uint32_t kMaxRingPageOrder = 4;
inline constexpr uint32_t kMaxIndirectSegments = 256;
inline constexpr uint32_t kMaxXenPollUs = 10'000'000;  // 10 s, as --xen-poll-us
inline constexpr uint32_t kMaxVhostQueues = 64;
// Capacity limit of a null backend (spec.backend.null.size_bytes): 1 PiB.
inline constexpr uint64_t kMaxNullBackendSize = uint64_t{1} << 50;

// 1-64 characters of [a-z0-9._-], starting with a letter or digit. `field` names it in errors.
absl::Status ValidateDeviceId(absl::string_view id, absl::string_view field = "device_id");

// Xen virtual-device specifier to the number written to xenstore, following Xen's
// docs/misc/vbd-interface.txt: xvd<disk>[<part>] (202<<8 | disk<<4 | part for disk < 16 and
// part < 16, else 1<<28 | disk<<8 | part), hd[a-t][0-63], sd[a-p][0-15], or a decimal number.
absl::StatusOr<uint32_t> ParseXenVirtualDevice(absl::string_view text);

// The canonical spelling of a virtual-device number: xvd names for xvd numbers, else decimal.
std::string XenVirtualDeviceName(uint32_t number);

// Checks the spec's fields on their own (enums known, numbers in range, exactly one frontend).
absl::Status ValidateSpec(const v1::DeviceSpec& spec);

// The spec with every default written out, so that two requests that mean the same device compare
// equal (AttachDevice idempotency) and the registry records what the worker actually runs.
// Call after ValidateSpec.
v1::DeviceSpec NormalizeSpec(const v1::DeviceSpec& spec);

struct BackingInfo {
  std::string resolved_path;  // symlinks resolved
  uint64_t size_bytes = 0;
  bool is_block_device = false;
};

// Resolves the backing path and checks it against the backing roots: it must exist, be a regular
// file or a block device, lie under a root after resolving symlinks, and have a non-zero size that
// is a multiple of the logical block size. INVALID_ARGUMENT for a path outside the roots,
// FAILED_PRECONDITION for the state of the file. Not for null backends (spec.backend.null), which
// have no file.
absl::StatusOr<BackingInfo> InspectBacking(const v1::BackendSpec& backend,
                                           const std::vector<std::string>& backing_roots);

// Checks a resize request against the device's current size and highest written offset.
absl::Status ValidateResize(const v1::Device& device, const v1::ResizeDeviceRequest& request);

uint32_t LogicalBlockSize(const v1::BackendSpec& backend);

}  // namespace blockplane::controller
