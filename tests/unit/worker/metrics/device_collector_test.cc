#include "worker/metrics/device_collector.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "prometheus/text_serializer.h"

namespace blockplane::worker {
namespace {

std::string Render(const DeviceCollector& collector) {
  return prometheus::TextSerializer().Serialize(collector.Collect());
}

DeviceMetricsSnapshot Snapshot() {
  DeviceMetricsSnapshot s;
  BlockOpStats& write = s.block.ops[int(BlockOp::kWrite)];
  write.ops = 10;
  write.failed = 2;
  write.invalid = 1;
  write.bytes = 40960;
  write.total_time_ns = 1'500'000'000;
  write.latency_histogram[0] = 1;                    // < 1 us
  write.latency_histogram[4] = 3;                    // [8, 16) us
  write.latency_histogram[kLatencyBuckets - 2] = 7;  // < 16.8 s
  write.latency_histogram[kLatencyBuckets - 1] = 1;  // beyond
  s.block.in_flight = 4;
  s.block.highest_written_offset = 1 << 20;
  s.size_bytes = 8 << 20;
  s.state = "draining";
  s.generation = 3;
  TransportMetricsSnapshot& t = s.transport.emplace();
  t.requests_taken = 12;
  t.ring_full_stalls = 2;
  t.invalid = {{"misaligned", 5}, {"bad_discard", 0}};
  t.persistent_hits = 9;
  return s;
}

TEST(DeviceCollectorTest, HistogramIsCumulativeWithTheBlockLayersBounds) {
  DeviceCollector collector("dev0", "xen", Snapshot);
  std::string text = Render(collector);
  const std::string w = R"(device="dev0",frontend="xen",op="write")";
  EXPECT_NE(text.find("blockplane_device_latency_seconds_bucket{" + w + ",le=\"1e-06\"} 1\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("blockplane_device_latency_seconds_bucket{" + w + ",le=\"8e-06\"} 1\n"),
            std::string::npos);
  EXPECT_NE(text.find("blockplane_device_latency_seconds_bucket{" + w + ",le=\"1.6e-05\"} 4\n"),
            std::string::npos);
  EXPECT_NE(text.find("blockplane_device_latency_seconds_bucket{" + w + ",le=\"16.777216\"} 11\n"),
            std::string::npos);
  EXPECT_NE(text.find("blockplane_device_latency_seconds_bucket{" + w + ",le=\"+Inf\"} 12\n"),
            std::string::npos);
  EXPECT_NE(text.find("blockplane_device_latency_seconds_count{" + w + "} 12\n"),
            std::string::npos);
  EXPECT_NE(text.find("blockplane_device_latency_seconds_sum{" + w + "} 1.5\n"), std::string::npos);
  EXPECT_NE(text.find("blockplane_device_operations_total{" + w + "} 10\n"), std::string::npos);
  EXPECT_NE(text.find("blockplane_device_failed_total{" + w + "} 2\n"), std::string::npos);
  EXPECT_NE(text.find("blockplane_device_invalid_total{" + w + "} 1\n"), std::string::npos);
  EXPECT_NE(
      text.find(R"(blockplane_device_state{device="dev0",frontend="xen",state="draining"} 1)"),
      std::string::npos);
  EXPECT_NE(
      text.find(R"(blockplane_device_state{device="dev0",frontend="xen",state="connected"} 0)"),
      std::string::npos);
  EXPECT_NE(text.find(R"(blockplane_device_in_flight_requests{device="dev0",frontend="xen"} 4)"),
            std::string::npos);
  EXPECT_NE(text.find(R"(blockplane_device_ring_requests_total{device="dev0",frontend="xen"} 12)"),
            std::string::npos);
  EXPECT_NE(
      text.find(
          R"(blockplane_device_invalid_requests_total{device="dev0",frontend="xen",reason="misaligned"} 5)"),
      std::string::npos);
  EXPECT_NE(
      text.find(R"(blockplane_xen_persistent_grant_hits_total{device="dev0",frontend="xen"} 9)"),
      std::string::npos);
}

TEST(DeviceCollectorTest, NoTransportFamiliesWithoutAFrontend) {
  DeviceCollector collector("dev0", "none", [] {
    DeviceMetricsSnapshot s = Snapshot();
    s.transport.reset();
    return s;
  });
  EXPECT_EQ(Render(collector).find("blockplane_device_ring_requests_total"), std::string::npos);
}

TEST(DeviceCollectorTest, PromtoolFindsNoProblem) {
  if (system("command -v promtool > /dev/null 2>&1") != 0) GTEST_SKIP() << "no promtool";
  DeviceCollector collector("dev\"0", "vhost_user", Snapshot);  // a label value to escape
  char path[] = "/tmp/blockplane-metrics-XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  std::string text = Render(collector);
  ASSERT_EQ(write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  close(fd);
  std::string command = std::string("promtool check metrics < ") + path + " 2>&1";
  FILE* p = popen(command.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  int status = pclose(p);
  unlink(path);
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(out, "") << text;
}

}  // namespace
}  // namespace blockplane::worker
