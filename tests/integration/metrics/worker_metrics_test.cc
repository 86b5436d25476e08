// The worker's /metrics: served by prometheus-cpp on a kernel-picked port reported to the
// controller, clean under `promtool check metrics`, and equal to GetDeviceStats and bpctl stats.
#include <signal.h>

#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "tests/integration/metrics/metrics_fixture.h"

namespace blockplane::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

TEST(WorkerMetricsTest, MetricsMatchGetDeviceStatsAndBpctlAndPassPromtool) {
  ControllerProcess controller({"--enable-self-test-io", "--metrics-host=127.0.0.1"});
  controller.Start();
  v1::Device device = AttachTestDevice(controller, "dev0", 8 * kMiB);
  const std::string endpoint = device.status().metrics_endpoint();
  ASSERT_EQ(endpoint.rfind("127.0.0.1:", 0), 0u) << endpoint;
  ASSERT_NE(endpoint, "127.0.0.1:0");

  RunSelfTestIo(controller, "dev0", 64, 4096, /*write=*/true);
  RunSelfTestIo(controller, "dev0", 32, 8192, /*write=*/false);

  // No I/O runs now, so the three views must agree exactly.
  v1::DeviceStats grpc_stats = GetDeviceStats(controller, "dev0");
  std::string text = HttpGet(endpoint, "/metrics");
  CommandResult bpctl = controller.Bpctl({"--json", "stats", "dev0"});
  ASSERT_EQ(bpctl.exit_code, 0) << bpctl.err;
  v1::DeviceStats cli_stats;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(bpctl.out, &cli_stats).ok()) << bpctl.out;

  EXPECT_EQ(PromtoolCheckMetrics(text, controller.dir()), "") << text;
  std::vector<Sample> m = ParseExposition(text);
  const std::map<std::string, std::string> dev = {{"device", "dev0"}, {"frontend", "xen"}};
  EXPECT_EQ(OpOf(grpc_stats, "write").bytes(), 64u * 4096);
  EXPECT_EQ(OpOf(grpc_stats, "read").bytes(), 32u * 8192);
  for (const v1::DeviceStats* stats : {&grpc_stats, &cli_stats}) {
    for (const char* op : {"read", "write", "flush", "discard", "write_zeroes"}) {
      auto labels = dev;
      labels["op"] = op;
      v1::OpStats o = OpOf(*stats, op);
      EXPECT_EQ(ValueOf(m, "blockplane_device_operations_total", labels), o.operations()) << op;
      EXPECT_EQ(ValueOf(m, "blockplane_device_bytes_total", labels), o.bytes()) << op;
      EXPECT_EQ(ValueOf(m, "blockplane_device_failed_total", labels), o.failed()) << op;
      EXPECT_EQ(ValueOf(m, "blockplane_device_invalid_total", labels), o.invalid()) << op;
      EXPECT_NEAR(ValueOf(m, "blockplane_device_time_seconds_total", labels),
                  o.total_time_ns() / 1e9, 1e-9 + o.total_time_ns() / 1e9 * 1e-9)
          << op;
      // Every completed request is in the latency histogram.
      EXPECT_EQ(ValueOf(m, "blockplane_device_latency_seconds_count", labels),
                o.operations() + o.failed())
          << op;
      labels["le"] = "+Inf";
      EXPECT_EQ(ValueOf(m, "blockplane_device_latency_seconds_bucket", labels),
                o.operations() + o.failed())
          << op;
    }
    EXPECT_EQ(ValueOf(m, "blockplane_device_size_bytes", dev), stats->size_bytes());
    EXPECT_EQ(ValueOf(m, "blockplane_device_highest_written_offset_bytes", dev),
              stats->highest_written_offset());
    EXPECT_EQ(ValueOf(m, "blockplane_device_in_flight_requests", dev), stats->in_flight());
  }
  EXPECT_EQ(grpc_stats.size_bytes(), 8 * kMiB);
  EXPECT_EQ(grpc_stats.highest_written_offset(), 64u * 4096);
  // Buckets resolve 10 us to 10 s.
  auto write = dev;
  write["op"] = "write";
  write["le"] = "1.6e-05";
  EXPECT_GE(ValueOf(m, "blockplane_device_latency_seconds_bucket", write), 0);
  write["le"] = "16.777216";
  EXPECT_EQ(ValueOf(m, "blockplane_device_latency_seconds_bucket", write), 64);
  auto state = dev;
  state["state"] = "waiting_for_frontend";
  EXPECT_EQ(ValueOf(m, "blockplane_device_state", state), 1);
  state["state"] = "failed";
  EXPECT_EQ(ValueOf(m, "blockplane_device_state", state), 0);
  EXPECT_EQ(ValueOf(m, "blockplane_device_worker_generation", dev), 1);
  // The loop went round and used its ring for the 64 writes (and reads) above; the scrape came
  // after the gRPC stats, so its counters are at least those.
  EXPECT_GE(ValueOf(m, "blockplane_worker_loop_passes_total", dev),
            static_cast<double>(grpc_stats.loop().passes()));
  EXPECT_GE(ValueOf(m, "blockplane_worker_loop_sqes_total", dev),
            static_cast<double>(grpc_stats.loop().sqes_submitted()));
  EXPECT_GE(grpc_stats.loop().sqes_submitted(), 64u);
  EXPECT_GE(ValueOf(m, "blockplane_worker_loop_completions_total", dev), 64);
  EXPECT_GT(ValueOf(m, "blockplane_worker_loop_submit_calls_total", dev), 0);
  EXPECT_GT(ValueOf(m, "process_open_fds"), 3);
  EXPECT_GT(ValueOf(m, "process_resident_memory_bytes"), 1 << 20);
  EXPECT_GE(ValueOf(m, "process_cpu_seconds_total"), 0);
}

TEST(WorkerMetricsTest, NoEndpointWithoutMetricsHost) {
  ControllerProcess controller;
  controller.Start();
  v1::Device device = AttachTestDevice(controller, "dev0", 4 * kMiB);
  EXPECT_EQ(device.status().metrics_endpoint(), "");
}

}  // namespace
}  // namespace blockplane::testing
