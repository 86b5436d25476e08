#include "controller/cli/values.h"

#include <limits>

#include "gtest/gtest.h"

namespace blockplane::controller::cli {
namespace {

TEST(ParseSizeTest, AcceptsPlainBytesAndBinarySuffixes) {
  EXPECT_EQ(*ParseSize("0"), 0u);
  EXPECT_EQ(*ParseSize("4096"), 4096u);
  EXPECT_EQ(*ParseSize("512B"), 512u);
  EXPECT_EQ(*ParseSize("1K"), 1024u);
  EXPECT_EQ(*ParseSize("1k"), 1024u);
  EXPECT_EQ(*ParseSize("1KiB"), 1024u);
  EXPECT_EQ(*ParseSize("1KB"), 1024u);
  EXPECT_EQ(*ParseSize("3M"), 3u << 20);
  EXPECT_EQ(*ParseSize("2G"), uint64_t{2} << 30);
  EXPECT_EQ(*ParseSize("10GiB"), uint64_t{10} << 30);
  EXPECT_EQ(*ParseSize("1T"), uint64_t{1} << 40);
  EXPECT_EQ(*ParseSize("2P"), uint64_t{2} << 50);
  EXPECT_EQ(*ParseSize("15E"), uint64_t{15} << 60);
}

TEST(ParseSizeTest, AcceptsFractionsThatAreWholeBytes) {
  EXPECT_EQ(*ParseSize("1.5K"), 1536u);
  EXPECT_EQ(*ParseSize("0.5G"), uint64_t{1} << 29);
  EXPECT_EQ(*ParseSize(".25M"), uint64_t{1} << 18);
  EXPECT_EQ(*ParseSize("1.0"), 1u);
  EXPECT_FALSE(ParseSize("1.3K").ok());  // 1331.2 bytes
  EXPECT_FALSE(ParseSize("0.5").ok());
}

TEST(ParseSizeTest, RefusesGarbageAndOverflow) {
  for (const char* bad : {"", "K", "-1", "1X", "1KX", "1 K", "1..2K", "1.2.3", "abc", "+5", "1e9",
                          "16E", "18446744073709551616", "99999999999999999999G"}) {
    EXPECT_FALSE(ParseSize(bad).ok()) << bad;
  }
  EXPECT_EQ(*ParseSize("18446744073709551615"), std::numeric_limits<uint64_t>::max());
  const auto status = ParseSize("12Q").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("\"12Q\""), absl::string_view::npos) << status.message();
}

TEST(FormatSizeTest, ExactValuesHaveNoDecimals) {
  EXPECT_EQ(FormatSize(0), "0");
  EXPECT_EQ(FormatSize(1000), "1000");
  EXPECT_EQ(FormatSize(1024), "1K");
  EXPECT_EQ(FormatSize(1536), "1.5K");
  EXPECT_EQ(FormatSize(uint64_t{2} << 30), "2G");
  EXPECT_EQ(FormatSize((uint64_t{2} << 30) - 1), "1.9G");  // rounded down, never up
  EXPECT_EQ(FormatSize(uint64_t{1} << 40), "1T");
  EXPECT_EQ(FormatSize(std::numeric_limits<uint64_t>::max()), "15.9E");
}

TEST(FormatSizeTest, RoundTripsThroughParseSize) {
  for (uint64_t bytes :
       {uint64_t{1}, uint64_t{512}, uint64_t{1} << 20, uint64_t{3} << 40, uint64_t{1536}}) {
    EXPECT_EQ(*ParseSize(FormatSize(bytes)), bytes) << bytes;
  }
}

TEST(ParseDurationTest, AcceptsUnitsAndPlainSeconds) {
  EXPECT_EQ(*ParseDuration("30s"), absl::Seconds(30));
  EXPECT_EQ(*ParseDuration("500ms"), absl::Milliseconds(500));
  EXPECT_EQ(*ParseDuration("1m30s"), absl::Seconds(90));
  EXPECT_EQ(*ParseDuration("2h"), absl::Hours(2));
  EXPECT_EQ(*ParseDuration("45"), absl::Seconds(45));
  EXPECT_EQ(*ParseDuration("0"), absl::ZeroDuration());
}

TEST(ParseDurationTest, RefusesNegativeInfiniteAndGarbage) {
  for (const char* bad : {"", "-1s", "-5", "inf", "10 parsecs", "s", "1d"}) {
    EXPECT_FALSE(ParseDuration(bad).ok()) << bad;
  }
}

TEST(ParseNumberTest, Uint32Range) {
  EXPECT_EQ(*ParseUint32("0"), 0u);
  EXPECT_EQ(*ParseUint32("32751"), 32751u);
  EXPECT_EQ(*ParseUint32("4294967295"), 4294967295u);
  for (const char* bad : {"", "4294967296", "-1", "+1", "1.5", "0x10", "12a"}) {
    EXPECT_FALSE(ParseUint32(bad).ok()) << bad;
  }
  EXPECT_EQ(*ParseNonNegativeInt32("1000"), 1000);
  EXPECT_FALSE(ParseNonNegativeInt32("2147483648").ok());
  EXPECT_FALSE(ParseNonNegativeInt32("-1").ok());
}

TEST(ParseBoolTest, Words) {
  EXPECT_TRUE(*ParseBool("true"));
  EXPECT_TRUE(*ParseBool("YES"));
  EXPECT_FALSE(*ParseBool("false"));
  EXPECT_FALSE(*ParseBool("0"));
  EXPECT_FALSE(ParseBool("maybe").ok());
}

TEST(EnumTest, ParsesShortNamesIgnoringCaseAndUnderscores) {
  EXPECT_EQ(*ParseCacheMode("none"), v1::CACHE_MODE_NONE);
  EXPECT_EQ(*ParseCacheMode("WriteBack"), v1::CACHE_MODE_WRITEBACK);
  EXPECT_EQ(*ParseCacheMode("writethrough"), v1::CACHE_MODE_WRITETHROUGH);
  EXPECT_EQ(*ParseDiscardMode("unmap"), v1::DISCARD_MODE_UNMAP);
  EXPECT_EQ(*ParseDiscardMode("ignore"), v1::DISCARD_MODE_IGNORE);
  EXPECT_EQ(*ParseDetectZeroes("on"), v1::DETECT_ZEROES_ON);
  EXPECT_EQ(*ParseDetectZeroes("unmap"), v1::DETECT_ZEROES_UNMAP);
  EXPECT_EQ(*ParseErrorPolicy("stop"), v1::ERROR_POLICY_STOP);
  EXPECT_EQ(*ParseImageFormat("raw"), v1::IMAGE_FORMAT_RAW);
  EXPECT_EQ(*ParseDeviceState("waiting-for-frontend"), v1::DEVICE_STATE_WAITING_FOR_FRONTEND);
  EXPECT_EQ(*ParseDeviceState("WAITING_FOR_FRONTEND"), v1::DEVICE_STATE_WAITING_FOR_FRONTEND);
  EXPECT_EQ(*ParseFrontendKind("vhost-user"), v1::FRONTEND_KIND_VHOST_USER);
  EXPECT_EQ(*ParseFrontendKind("xen"), v1::FRONTEND_KIND_XEN);
  EXPECT_EQ(*ParseLogicalBlockSize("4096"), 4096u);
  EXPECT_EQ(*ParseLogicalBlockSize("512"), 512u);
}

TEST(EnumTest, RefusesUnknownAndUnspecifiedListingTheChoices) {
  const auto status = ParseCacheMode("fast").status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(),
            "invalid cache mode \"fast\" (one of: none, writeback, writethrough)");
  EXPECT_FALSE(ParseCacheMode("unspecified").ok());
  EXPECT_FALSE(ParseDeviceState("unspecified").ok());
  EXPECT_FALSE(ParseFrontendKind("").ok());
  EXPECT_FALSE(ParseLogicalBlockSize("1024").ok());
  EXPECT_FALSE(ParseLogicalBlockSize("0").ok());
}

TEST(EnumTest, NamesRoundTripAndSpellOutDefaults) {
  for (auto mode : {v1::CACHE_MODE_NONE, v1::CACHE_MODE_WRITEBACK, v1::CACHE_MODE_WRITETHROUGH}) {
    EXPECT_EQ(*ParseCacheMode(CacheModeName(mode)), mode);
  }
  for (int s = 1; s <= 7; ++s) {
    const auto state = static_cast<v1::DeviceState>(s);
    EXPECT_EQ(*ParseDeviceState(DeviceStateName(state)), state);
  }
  EXPECT_EQ(CacheModeName(v1::CACHE_MODE_UNSPECIFIED), "none");
  EXPECT_EQ(DiscardModeName(v1::DISCARD_MODE_UNSPECIFIED), "ignore");
  EXPECT_EQ(DetectZeroesName(v1::DETECT_ZEROES_UNSPECIFIED), "off");
  EXPECT_EQ(ErrorPolicyName(v1::ERROR_POLICY_UNSPECIFIED), "report");
  EXPECT_EQ(DeviceStateName(v1::DEVICE_STATE_DRAINED), "drained");
  EXPECT_EQ(FrontendKindName(v1::FRONTEND_KIND_VHOST_USER), "vhost-user");
  EXPECT_EQ(EventKindName(v1::DeviceEvent::KIND_SNAPSHOT_COMPLETE), "snapshot-complete");
  EXPECT_EQ(CacheModeName(static_cast<v1::CacheMode>(99)), "cachemode(99)");
}

}  // namespace
}  // namespace blockplane::controller::cli
