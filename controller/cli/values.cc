#include "controller/cli/values.h"

#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/strip.h"
#include "google/protobuf/descriptor.h"

namespace blockplane::controller::cli {
namespace {

using google::protobuf::EnumDescriptor;

// "CACHE_MODE_WRITE_BACK" with prefix "CACHE_MODE_" -> "write-back".
std::string ShortName(absl::string_view full_name, absl::string_view prefix) {
  absl::string_view rest = full_name;
  absl::ConsumePrefix(&rest, prefix);
  return absl::StrReplaceAll(absl::AsciiStrToLower(rest), {{"_", "-"}});
}

std::string Normalize(absl::string_view text) {
  return absl::StrReplaceAll(absl::AsciiStrToLower(absl::StripAsciiWhitespace(text)), {{"_", "-"}});
}

// Parses a short enum name; the UNSPECIFIED value (number 0) is not accepted. `what` names the
// kind of value in the error message.
absl::StatusOr<int> ParseEnum(const EnumDescriptor* descriptor, absl::string_view prefix,
                              absl::string_view what, absl::string_view text) {
  const std::string wanted = Normalize(text);
  std::vector<std::string> allowed;
  for (int i = 0; i < descriptor->value_count(); ++i) {
    const auto* value = descriptor->value(i);
    if (value->number() == 0) continue;
    std::string name = ShortName(value->name(), prefix);
    if (name == wanted) return value->number();
    allowed.push_back(std::move(name));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "invalid ", what, " \"", text, "\" (one of: ", absl::StrJoin(allowed, ", "), ")"));
}

std::string EnumName(const EnumDescriptor* descriptor, absl::string_view prefix, int number,
                     absl::string_view unspecified_name) {
  if (number == 0) return std::string(unspecified_name);
  const auto* value = descriptor->FindValueByNumber(number);
  if (value == nullptr) {
    return absl::StrCat(ShortName(descriptor->name(), ""), "(", number, ")");
  }
  return ShortName(value->name(), prefix);
}

constexpr struct {
  char suffix;
  int shift;
} kUnits[] = {{'K', 10}, {'M', 20}, {'G', 30}, {'T', 40}, {'P', 50}, {'E', 60}};

}  // namespace

absl::StatusOr<uint64_t> ParseSize(absl::string_view text) {
  const auto invalid = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("invalid size \"", text, "\": ", why));
  };
  absl::string_view rest = absl::StripAsciiWhitespace(text);
  size_t digits_end = 0;
  while (digits_end < rest.size() &&
         (absl::ascii_isdigit(rest[digits_end]) || rest[digits_end] == '.')) {
    ++digits_end;
  }
  absl::string_view number = rest.substr(0, digits_end);
  absl::string_view unit = rest.substr(digits_end);
  if (number.empty() || number == ".") {
    return invalid("expected a number with an optional K, M, G, T suffix");
  }
  int shift = 0;
  if (!unit.empty()) {
    const char first = absl::ascii_toupper(unit[0]);
    bool found = false;
    for (const auto& u : kUnits) {
      if (u.suffix == first) {
        shift = u.shift;
        found = true;
      }
    }
    absl::string_view tail = unit.substr(found ? 1 : 0);
    if (!found && !(tail == "B" || tail == "b")) {
      return invalid("unknown unit (use K, M, G, T, P or E)");
    }
    if (found && !(tail.empty() || tail == "B" || tail == "b" || tail == "iB" || tail == "ib")) {
      return invalid("unknown unit (use K, M, G, T, P or E)");
    }
  }
  const size_t dot = number.find('.');
  absl::string_view whole_text = number.substr(0, dot);
  absl::string_view fraction_text =
      dot == absl::string_view::npos ? absl::string_view() : number.substr(dot + 1);
  if (fraction_text.find('.') != absl::string_view::npos) return invalid("more than one '.'");
  if (whole_text.empty()) whole_text = "0";
  uint64_t whole = 0;
  if (!absl::SimpleAtoi(whole_text, &whole)) return invalid("too large");
  if (shift > 0 && whole > (std::numeric_limits<uint64_t>::max() >> shift)) {
    return invalid("too large");
  }
  uint64_t bytes = whole << shift;
  if (!fraction_text.empty()) {
    // The fraction, scaled by the unit, must be a whole number of bytes: value = f / 10^n *
    // 2^shift. Digits beyond 19 cannot change that answer for shifts up to 60 without overflow, so
    // refuse.
    if (fraction_text.size() > 18) return invalid("too many decimals");
    uint64_t fraction = 0;
    if (!absl::SimpleAtoi(fraction_text, &fraction)) return invalid("bad fraction");
    uint64_t denominator = 1;
    for (size_t i = 0; i < fraction_text.size(); ++i) denominator *= 10;
    // fraction * 2^shift / denominator, computed without overflow via 128-bit arithmetic.
    const unsigned __int128 scaled = static_cast<unsigned __int128>(fraction) << shift;
    if (scaled % denominator != 0) return invalid("not a whole number of bytes");
    const unsigned __int128 extra = scaled / denominator;
    const unsigned __int128 total = static_cast<unsigned __int128>(bytes) + extra;
    if (total > std::numeric_limits<uint64_t>::max()) return invalid("too large");
    bytes = static_cast<uint64_t>(total);
  }
  return bytes;
}

std::string FormatSize(uint64_t bytes) {
  for (int i = static_cast<int>(std::size(kUnits)) - 1; i >= 0; --i) {
    const uint64_t unit = uint64_t{1} << kUnits[i].shift;
    if (bytes < unit) continue;
    const uint64_t whole = bytes / unit;
    const uint64_t tenths = (bytes % unit) * 10 / unit;  // rounded down
    if (bytes % unit == 0) return absl::StrCat(whole, std::string(1, kUnits[i].suffix));
    return absl::StrCat(whole, ".", tenths, std::string(1, kUnits[i].suffix));
  }
  return absl::StrCat(bytes);
}

absl::StatusOr<absl::Duration> ParseDuration(absl::string_view text) {
  absl::string_view trimmed = absl::StripAsciiWhitespace(text);
  int64_t seconds = 0;
  absl::Duration duration;
  if (absl::SimpleAtoi(trimmed, &seconds)) {
    duration = absl::Seconds(seconds);
  } else if (!absl::ParseDuration(trimmed, &duration)) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid duration \"", text, "\" (examples: 30s, 500ms, 2m, 1h30m)"));
  }
  if (duration < absl::ZeroDuration() || duration == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid duration \"", text, "\": must be finite and not negative"));
  }
  return duration;
}

absl::StatusOr<uint32_t> ParseUint32(absl::string_view text) {
  uint64_t value = 0;
  if (text.empty() || !absl::ascii_isdigit(text[0]) || !absl::SimpleAtoi(text, &value) ||
      value > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid number \"", text, "\" (expected 0..4294967295)"));
  }
  return static_cast<uint32_t>(value);
}

absl::StatusOr<int32_t> ParseNonNegativeInt32(absl::string_view text) {
  uint64_t value = 0;
  if (text.empty() || !absl::ascii_isdigit(text[0]) || !absl::SimpleAtoi(text, &value) ||
      value > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid number \"", text, "\" (expected 0..2147483647)"));
  }
  return static_cast<int32_t>(value);
}

absl::StatusOr<bool> ParseBool(absl::string_view text) {
  const std::string value = Normalize(text);
  if (value == "true" || value == "yes" || value == "1" || value == "on") return true;
  if (value == "false" || value == "no" || value == "0" || value == "off") return false;
  return absl::InvalidArgumentError(
      absl::StrCat("invalid boolean \"", text, "\" (one of: true, false)"));
}

absl::StatusOr<v1::CacheMode> ParseCacheMode(absl::string_view text) {
  auto n = ParseEnum(v1::CacheMode_descriptor(), "CACHE_MODE_", "cache mode", text);
  if (!n.ok()) return n.status();
  return static_cast<v1::CacheMode>(*n);
}

absl::StatusOr<v1::DiscardMode> ParseDiscardMode(absl::string_view text) {
  auto n = ParseEnum(v1::DiscardMode_descriptor(), "DISCARD_MODE_", "discard mode", text);
  if (!n.ok()) return n.status();
  return static_cast<v1::DiscardMode>(*n);
}

absl::StatusOr<v1::NullCompletion> ParseNullCompletion(absl::string_view text) {
  auto n = ParseEnum(v1::NullCompletion_descriptor(), "NULL_COMPLETION_", "null completion", text);
  if (!n.ok()) return n.status();
  return static_cast<v1::NullCompletion>(*n);
}

absl::StatusOr<v1::DetectZeroes> ParseDetectZeroes(absl::string_view text) {
  auto n = ParseEnum(v1::DetectZeroes_descriptor(), "DETECT_ZEROES_", "detect-zeroes mode", text);
  if (!n.ok()) return n.status();
  return static_cast<v1::DetectZeroes>(*n);
}

absl::StatusOr<v1::ErrorPolicy> ParseErrorPolicy(absl::string_view text) {
  auto n = ParseEnum(v1::ErrorPolicy_descriptor(), "ERROR_POLICY_", "error policy", text);
  if (!n.ok()) return n.status();
  return static_cast<v1::ErrorPolicy>(*n);
}

absl::StatusOr<v1::ImageFormat> ParseImageFormat(absl::string_view text) {
  auto n = ParseEnum(v1::ImageFormat_descriptor(), "IMAGE_FORMAT_", "image format", text);
  if (!n.ok()) return n.status();
  return static_cast<v1::ImageFormat>(*n);
}

absl::StatusOr<uint32_t> ParseLogicalBlockSize(absl::string_view text) {
  const std::string value = Normalize(text);
  if (value == "512") return 512;
  if (value == "4096" || value == "4k") return 4096;
  return absl::InvalidArgumentError(
      absl::StrCat("invalid logical block size \"", text, "\" (one of: 512, 4096)"));
}

absl::StatusOr<v1::DeviceState> ParseDeviceState(absl::string_view text) {
  auto n = ParseEnum(v1::DeviceState_descriptor(), "DEVICE_STATE_", "device state", text);
  if (!n.ok()) return n.status();
  return static_cast<v1::DeviceState>(*n);
}

absl::StatusOr<v1::FrontendKind> ParseFrontendKind(absl::string_view text) {
  auto n = ParseEnum(v1::FrontendKind_descriptor(), "FRONTEND_KIND_", "frontend kind", text);
  if (!n.ok()) return n.status();
  return static_cast<v1::FrontendKind>(*n);
}

// The names of UNSPECIFIED spell out the documented default.
std::string CacheModeName(v1::CacheMode value) {
  return EnumName(v1::CacheMode_descriptor(), "CACHE_MODE_", value, "none");
}
std::string DiscardModeName(v1::DiscardMode value) {
  return EnumName(v1::DiscardMode_descriptor(), "DISCARD_MODE_", value, "ignore");
}
std::string DetectZeroesName(v1::DetectZeroes value) {
  return EnumName(v1::DetectZeroes_descriptor(), "DETECT_ZEROES_", value, "off");
}
std::string ErrorPolicyName(v1::ErrorPolicy value) {
  return EnumName(v1::ErrorPolicy_descriptor(), "ERROR_POLICY_", value, "report");
}
std::string ImageFormatName(v1::ImageFormat value) {
  return EnumName(v1::ImageFormat_descriptor(), "IMAGE_FORMAT_", value, "raw");
}
std::string DeviceStateName(v1::DeviceState value) {
  return EnumName(v1::DeviceState_descriptor(), "DEVICE_STATE_", value, "unspecified");
}
std::string FrontendKindName(v1::FrontendKind value) {
  return EnumName(v1::FrontendKind_descriptor(), "FRONTEND_KIND_", value, "none");
}
std::string EventKindName(v1::DeviceEvent::Kind value) {
  return EnumName(v1::DeviceEvent::Kind_descriptor(), "KIND_", value, "unspecified");
}

}  // namespace blockplane::controller::cli
