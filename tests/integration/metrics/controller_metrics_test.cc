// blockplaned's /metrics and /sd: API calls, devices by state, worker spawns/restarts/crashes,
// registry write latency; service discovery lists each worker's endpoint with device labels.
#include <signal.h>

#include <fstream>
#include <regex>
#include <sstream>

#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "tests/integration/metrics/metrics_fixture.h"

namespace blockplane::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

TEST(ControllerMetricsTest, MetricsAndServiceDiscovery) {
  ControllerProcess controller(
      {"--enable-self-test-io", "--metrics-host=127.0.0.1", "--metrics-listen=127.0.0.1:0"});
  controller.Start();
  std::string endpoint = ControllerMetricsEndpoint(controller);
  ASSERT_FALSE(endpoint.empty());

  v1::Device device = AttachTestDevice(controller, "dev0", 4 * kMiB);
  {
    grpc::ClientContext ctx;
    v1::GetDeviceRequest req;
    req.set_device_id("nope");
    v1::Device out;
    EXPECT_EQ(controller.stub().GetDevice(&ctx, req, &out).error_code(), grpc::NOT_FOUND);
  }

  std::string text = HttpGet(endpoint, "/metrics");
  EXPECT_EQ(PromtoolCheckMetrics(text, controller.dir()), "") << text;
  std::vector<Sample> m = ParseExposition(text);
  EXPECT_EQ(ValueOf(m, "blockplane_controller_api_calls_total",
                    {{"method", "DeviceService/AttachDevice"}, {"code", "OK"}}),
            1);
  EXPECT_EQ(ValueOf(m, "blockplane_controller_api_calls_total",
                    {{"method", "DeviceService/GetDevice"}, {"code", "NOT_FOUND"}}),
            1);
  EXPECT_EQ(ValueOf(m, "blockplane_controller_api_call_duration_seconds_count",
                    {{"method", "DeviceService/AttachDevice"}}),
            1);
  EXPECT_EQ(ValueOf(m, "blockplane_controller_devices", {{"state", "waiting_for_frontend"}}), 1);
  EXPECT_EQ(ValueOf(m, "blockplane_controller_devices", {{"state", "failed"}}), 0);
  EXPECT_EQ(ValueOf(m, "blockplane_controller_device_state",
                    {{"device", "dev0"}, {"state", "waiting_for_frontend"}}),
            1);
  EXPECT_EQ(ValueOf(m, "blockplane_controller_worker_spawns_total"), 1);
  EXPECT_EQ(ValueOf(m, "blockplane_controller_worker_crashes_total"), 0);
  EXPECT_GE(ValueOf(m, "blockplane_controller_registry_write_duration_seconds_count"), 1);
  EXPECT_GT(ValueOf(m, "process_open_fds"), 3);

  // Service discovery: the worker's endpoint with the device's labels.
  google::protobuf::ListValue groups;
  std::string sd = HttpGet(endpoint, "/sd");
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(sd, &groups).ok()) << sd;
  ASSERT_EQ(groups.values_size(), 1) << sd;
  const auto& group = groups.values(0).struct_value().fields();
  ASSERT_EQ(group.at("targets").list_value().values_size(), 1);
  EXPECT_EQ(group.at("targets").list_value().values(0).string_value(),
            device.status().metrics_endpoint());
  const auto& labels = group.at("labels").struct_value().fields();
  EXPECT_EQ(labels.at("device").string_value(), "dev0");
  EXPECT_EQ(labels.at("frontend").string_value(), "xen");
  EXPECT_EQ(labels.at("domid").string_value(), "5");
  // The target really serves the device's metrics.
  EXPECT_NE(HttpGet(device.status().metrics_endpoint(), "/metrics")
                .find("blockplane_device_bytes_total{device=\"dev0\""),
            std::string::npos);

  // A crash: counted, restarted, and /sd follows the new worker's port.
  pid_t first = device.status().worker_pid();
  ASSERT_EQ(::kill(first, SIGKILL), 0);
  v1::Device restarted;
  ASSERT_TRUE(WaitFor([&] {
    restarted = GetDevice(controller, "dev0");
    return restarted.status().worker_generation() == 2 &&
           !restarted.status().metrics_endpoint().empty() &&
           restarted.status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
  }));
  m = ParseExposition(HttpGet(endpoint, "/metrics"));
  EXPECT_EQ(ValueOf(m, "blockplane_controller_worker_spawns_total"), 2);
  EXPECT_EQ(ValueOf(m, "blockplane_controller_worker_restarts_total"), 1);
  EXPECT_EQ(ValueOf(m, "blockplane_controller_worker_crashes_total"), 1);
  sd = HttpGet(endpoint, "/sd");
  EXPECT_NE(sd.find(restarted.status().metrics_endpoint()), std::string::npos) << sd;
}

TEST(ControllerMetricsTest, EmptyDiscoveryWithoutDevices) {
  ControllerProcess controller({"--metrics-listen=127.0.0.1:0"});
  controller.Start();
  std::string endpoint = ControllerMetricsEndpoint(controller);
  ASSERT_FALSE(endpoint.empty());
  google::protobuf::ListValue groups;
  std::string sd = HttpGet(endpoint, "/sd");
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(sd, &groups).ok()) << sd;
  EXPECT_EQ(groups.values_size(), 0);
}

}  // namespace
}  // namespace blockplane::testing
