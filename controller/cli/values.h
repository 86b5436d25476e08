#pragma once

// Parsing and printing of the values bpctl accepts on its command line: sizes, durations, numbers
// and the API's enums. Pure functions; errors are absl::InvalidArgumentError with a message that
// names the offending text, suitable for a usage error.

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "blockplane/v1/device.pb.h"

namespace blockplane::controller::cli {

// "4096", "512K", "2G", "1.5G", "10GiB", "3t": binary units (K = 1024). Fractions are allowed only
// when the result is a whole number of bytes. Fails on overflow of uint64.
absl::StatusOr<uint64_t> ParseSize(absl::string_view text);

// 2147483648 -> "2G", 1536 -> "1.5K", 1000 -> "1000". Exact values use no decimal; other values
// get one decimal, rounded down so a printed size is never larger than the real one.
std::string FormatSize(uint64_t bytes);

// "30s", "500ms", "1m30s", "2h", and a plain integer meaning seconds. Negative durations and
// infinity are refused.
absl::StatusOr<absl::Duration> ParseDuration(absl::string_view text);

// Decimal unsigned integers that fit the type; no sign, no suffix.
absl::StatusOr<uint32_t> ParseUint32(absl::string_view text);
absl::StatusOr<int32_t> ParseNonNegativeInt32(absl::string_view text);

// "true|false|yes|no|1|0|on|off".
absl::StatusOr<bool> ParseBool(absl::string_view text);

// Enum values by their short, lower-case name, as shown in bpctl's output ("writeback",
// "waiting-for-frontend", "vhost-user"). Matching ignores case and treats '_' like '-'.
absl::StatusOr<v1::CacheMode> ParseCacheMode(absl::string_view text);
absl::StatusOr<v1::DiscardMode> ParseDiscardMode(absl::string_view text);
absl::StatusOr<v1::NullCompletion> ParseNullCompletion(absl::string_view text);
absl::StatusOr<v1::DetectZeroes> ParseDetectZeroes(absl::string_view text);
absl::StatusOr<v1::ErrorPolicy> ParseErrorPolicy(absl::string_view text);
absl::StatusOr<v1::ImageFormat> ParseImageFormat(absl::string_view text);
absl::StatusOr<uint32_t> ParseLogicalBlockSize(absl::string_view text);
absl::StatusOr<v1::DeviceState> ParseDeviceState(absl::string_view text);
absl::StatusOr<v1::FrontendKind> ParseFrontendKind(absl::string_view text);

// Short names for output; an unknown number prints as the number ("cachemode(99)").
std::string CacheModeName(v1::CacheMode value);
std::string DiscardModeName(v1::DiscardMode value);
std::string DetectZeroesName(v1::DetectZeroes value);
std::string ErrorPolicyName(v1::ErrorPolicy value);
std::string ImageFormatName(v1::ImageFormat value);
std::string DeviceStateName(v1::DeviceState value);
std::string FrontendKindName(v1::FrontendKind value);
std::string EventKindName(v1::DeviceEvent::Kind value);

}  // namespace blockplane::controller::cli
