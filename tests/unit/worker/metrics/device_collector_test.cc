#include "worker/metrics/device_collector.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
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
  s.block.flushes_skipped = 6;
  s.block.rmw = 2;
  s.block.split = 5;
  s.block.write_zeroes_withdrawn = 1;
  s.block.highest_written_offset = 1 << 20;
  s.size_bytes = 8 << 20;
  s.state = "draining";
  s.generation = 3;
  s.transport.resize(16);  // as many as a Xen frontend may have; only queue 0 counted
  TransportMetricsSnapshot& t = s.transport[0];
  t.requests_taken = 12;
  t.ring_full_stalls = 2;
  t.invalid = {{"misaligned", 5}, {"bad_discard", 0}};
  t.persistent_hits = 9;
  t.requests_replayed = 7;
  s.loop = {
      .passes = 100, .sleeps = 4, .submit_calls = 20, .sqes_submitted = 320, .completions = 318};
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
  EXPECT_NE(
      text.find(
          R"(blockplane_device_ring_requests_total{device="dev0",frontend="xen",queue="0"} 12)"),
      std::string::npos);
  EXPECT_NE(
      text.find(
          R"(blockplane_device_invalid_requests_total{device="dev0",frontend="xen",queue="0",reason="misaligned"} 5)"),
      std::string::npos);
  EXPECT_NE(
      text.find(
          R"(blockplane_xen_persistent_grant_hits_total{device="dev0",frontend="xen",queue="0"} 9)"),
      std::string::npos);
  EXPECT_NE(
      text.find(
          R"(blockplane_xen_ring_requests_replayed_total{device="dev0",frontend="xen",queue="0"} 7)"),
      std::string::npos);
  const std::string d = R"({device="dev0",frontend="xen"})";
  EXPECT_NE(text.find("blockplane_worker_loop_passes_total" + d + " 100\n"), std::string::npos)
      << text;
  EXPECT_NE(text.find("blockplane_worker_loop_sleeps_total" + d + " 4\n"), std::string::npos);
  EXPECT_NE(text.find("blockplane_worker_loop_submit_calls_total" + d + " 20\n"),
            std::string::npos);
  EXPECT_NE(text.find("blockplane_worker_loop_sqes_total" + d + " 320\n"), std::string::npos);
  EXPECT_NE(text.find("blockplane_worker_loop_completions_total" + d + " 318\n"),
            std::string::npos);
  EXPECT_NE(text.find("blockplane_device_flushes_skipped_total" + d + " 6\n"), std::string::npos);
  EXPECT_NE(text.find("blockplane_device_read_modify_writes_total" + d + " 2\n"),
            std::string::npos);
  EXPECT_NE(text.find("blockplane_device_split_total" + d + " 5\n"), std::string::npos);
  EXPECT_NE(text.find("blockplane_device_bounced_total" + d + " 0\n"), std::string::npos);
  EXPECT_NE(
      text.find(
          R"(blockplane_device_feature_withdrawn{device="dev0",frontend="xen",feature="write_zeroes"} 1)"),
      std::string::npos);
  EXPECT_NE(
      text.find(
          R"(blockplane_device_feature_withdrawn{device="dev0",frontend="xen",feature="discard"} 0)"),
      std::string::npos);
  // Queue 0 alone counted: no series of the 15 others.
  EXPECT_EQ(text.find(R"(queue="1")"), std::string::npos);
}

// The series of family `name`, by their labels (without the device ones).
std::map<std::map<std::string, std::string>, double> Series(
    const std::vector<prometheus::MetricFamily>& families, const std::string& name) {
  std::map<std::map<std::string, std::string>, double> out;
  for (const prometheus::MetricFamily& family : families) {
    if (family.name != name) continue;
    for (const prometheus::ClientMetric& metric : family.metric) {
      std::map<std::string, std::string> labels;
      for (const auto& label : metric.label) {
        if (label.name != "device" && label.name != "frontend") labels[label.name] = label.value;
      }
      EXPECT_FALSE(out.contains(labels)) << name;
      out[labels] = metric.counter.value;
    }
  }
  return out;
}

TEST(DeviceCollectorTest, TransportSeriesPerQueueUpToTheLastQueueThatCounted) {
  DeviceCollector collector("dev0", "xen", [] {
    DeviceMetricsSnapshot s = Snapshot();
    s.transport.assign(16, TransportMetricsSnapshot{});
    // Queues 0, 1 and 3 took requests; queue 2 only mapped its ring; 4..15 never existed.
    s.transport[0].requests_taken = 7;
    s.transport[1].requests_taken = 5;
    s.transport[3].requests_taken = 11;
    s.transport[2].grant_maps = 1;
    for (TransportMetricsSnapshot& t : s.transport) {
      t.invalid = {{"misaligned", 0}, {"bad_discard", 0}};
    }
    s.transport[3].invalid[1].second = 2;
    s.transport[1].persistent_misses = 4;
    return s;
  });
  const std::vector<prometheus::MetricFamily> families = collector.Collect();

  auto requests = Series(families, "blockplane_device_ring_requests_total");
  std::map<std::map<std::string, std::string>, double> expected = {
      {{{"queue", "0"}}, 7}, {{{"queue", "1"}}, 5}, {{{"queue", "2"}}, 0}, {{{"queue", "3"}}, 11}};
  EXPECT_EQ(requests, expected);
  double total = 0;
  for (const auto& [labels, value] : requests) total += value;
  EXPECT_EQ(total, 7 + 5 + 11);  // the device's total is the sum over its queues

  auto maps = Series(families, "blockplane_xen_grant_maps_total");
  EXPECT_EQ(maps.size(), 4u);
  EXPECT_EQ((maps[{{"queue", "2"}}]), 1);
  auto misses = Series(families, "blockplane_xen_persistent_grant_misses_total");
  EXPECT_EQ((misses[{{"queue", "1"}}]), 4);
  EXPECT_EQ((misses[{{"queue", "0"}}]), 0);

  auto invalid = Series(families, "blockplane_device_invalid_requests_total");
  EXPECT_EQ(invalid.size(), 4u * 2);  // every reason of every exported queue
  EXPECT_EQ((invalid[{{"queue", "3"}, {"reason", "bad_discard"}}]), 2);
  EXPECT_EQ((invalid[{{"queue", "0"}, {"reason", "bad_discard"}}]), 0);
  EXPECT_FALSE((invalid.contains({{"queue", "4"}, {"reason", "misaligned"}})));
}

TEST(DeviceCollectorTest, QueueZeroIsExportedBeforeAnythingCounted) {
  DeviceCollector collector("dev0", "xen", [] {
    DeviceMetricsSnapshot s = Snapshot();
    s.transport.assign(16, TransportMetricsSnapshot{});
    return s;
  });
  const std::vector<prometheus::MetricFamily> families = collector.Collect();
  for (const char* name :
       {"blockplane_device_ring_requests_total", "blockplane_device_notifications_sent_total",
        "blockplane_device_ring_full_stalls_total", "blockplane_xen_grant_unmaps_total"}) {
    std::map<std::map<std::string, std::string>, double> expected = {{{{"queue", "0"}}, 0}};
    EXPECT_EQ(Series(families, name), expected) << name;
  }
}

TEST(DeviceCollectorTest, NoTransportFamiliesWithoutAFrontend) {
  DeviceCollector collector("dev0", "none", [] {
    DeviceMetricsSnapshot s = Snapshot();
    s.transport.clear();
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
