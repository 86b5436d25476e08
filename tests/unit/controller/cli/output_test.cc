#include "controller/cli/output.h"

#include "absl/strings/match.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"

namespace blockplane::controller::cli {
namespace {

v1::Device MakeDevice(const std::string& text) {
  v1::Device device;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &device));
  return device;
}

const char kXenDevice[] = R"pb(
  id: "dev0"
  spec {
    backend { path: "/srv/disk.img" cache: CACHE_MODE_WRITEBACK read_only: true }
    xen { domid: 5 virtual_device: "xvda" max_queues: 2 }
  }
  status {
    state: DEVICE_STATE_CONNECTED
    size_bytes: 2147483648
    worker_pid: 4242
    worker_generation: 3
    state_changed_at { seconds: 1795302000 nanos: 5000000 }
    frontend { xen_backend_state: "Connected" xen_frontend_state: "Connected" num_queues: 2 }
    last_error: "worker exited with status 1"
  })pb";

const char kVhostDevice[] = R"pb(
  id: "vm1.disk0"
  spec {
    backend { path: "/srv/vm1.img" }
    vhost_user { socket_path: "/run/vm1.sock" }
  }
  status { state: DEVICE_STATE_WAITING_FOR_FRONTEND size_bytes: 1536 })pb";

TEST(FormatTableTest, PadsColumnsToTheWidestCellWithoutTrailingSpaces) {
  EXPECT_EQ(
      FormatTable({{"ID", "STATE", "SIZE"}, {"a-long-id", "x", "1G"}, {"b", "connected", ""}}),
      "ID         STATE      SIZE\n"
      "a-long-id  x          1G\n"
      "b          connected\n");
  EXPECT_EQ(FormatTable({}), "");
}

TEST(FormatDeviceTableTest, OneAlignedRowPerDevice) {
  const std::string table = FormatDeviceTable({MakeDevice(kXenDevice), MakeDevice(kVhostDevice)});
  EXPECT_EQ(table,
            "ID         STATE                 SIZE  PID   GEN  FRONTEND                  BACKING\n"
            "dev0       connected             2G    4242  3    xen domid=5 vdev=xvda     "
            "/srv/disk.img\n"
            "vm1.disk0  waiting-for-frontend  1.5K  -     0    vhost-user /run/vm1.sock  "
            "/srv/vm1.img\n");
  EXPECT_EQ(FormatDeviceTable({}), "No devices.\n");
}

TEST(FormatDeviceTest, ShowsSpecAndStatus) {
  const std::string text = FormatDevice(MakeDevice(kXenDevice));
  for (const char* expected :
       {"id:               dev0\n",
        "state:            connected (since 2026-11-21T23:00:00.005Z)\n",
        "size:             2G (2147483648 bytes)\n", "backing:          /srv/disk.img\n",
        "cache=writeback", "read-only=yes", "discard=ignore", "detect-zeroes=off", "lbs=512",
        "error-policy=report", "xen domid=5 vdev=xvda max-queues=2",
        "max-indirect-segments=default(32)", "persistent-grants=yes", "poll-us=default",
        "xenbus:           backend=Connected frontend=Connected queues=2",
        "worker:           pid=4242 generation=3 restarts=0\n",
        "last error:       worker exited with status 1\n", "created:          -\n"}) {
    EXPECT_TRUE(absl::StrContains(text, expected)) << "missing: " << expected << "\nin:\n" << text;
  }
  v1::Device polled = MakeDevice(kXenDevice);
  polled.mutable_spec()->mutable_xen()->set_poll_us(250);
  EXPECT_TRUE(absl::StrContains(FormatDevice(polled), "poll-us=250")) << FormatDevice(polled);
  const std::string vhost = FormatDevice(MakeDevice(kVhostDevice));
  EXPECT_TRUE(absl::StrContains(
      vhost, "vhost-user /run/vm1.sock queues=default(1) queue-size=default(256)"))
      << vhost;
  EXPECT_FALSE(absl::StrContains(vhost, "last error")) << vhost;
  EXPECT_FALSE(absl::StrContains(vhost, "xenbus")) << vhost;
}

TEST(FormatJsonTest, ProtobufJsonMappingThatParsesBack) {
  const v1::Device device = MakeDevice(kXenDevice);
  const std::string json = FormatJson(device, /*multiline=*/true);
  EXPECT_TRUE(absl::StrContains(json, "\"id\": \"dev0\"")) << json;
  EXPECT_TRUE(absl::StrContains(json, "\"state\": \"DEVICE_STATE_CONNECTED\"")) << json;
  EXPECT_TRUE(absl::StrContains(json, "\"workerPid\": 4242")) << json;
  // 64-bit integers are strings in the protobuf JSON mapping.
  EXPECT_TRUE(absl::StrContains(json, "\"sizeBytes\": \"2147483648\"")) << json;
  // Zero values are printed, so scripts need not know the defaults.
  EXPECT_TRUE(absl::StrContains(json, "\"restartCount\": 0")) << json;
  EXPECT_EQ(json.back(), '\n');

  v1::Device parsed;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(json, &parsed).ok());
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(parsed, device));

  const std::string line = FormatJson(device, /*multiline=*/false);
  EXPECT_EQ(line.find('\n'), line.size() - 1) << line;
}

TEST(FormatStatsTest, SummaryAndOperationTable) {
  v1::DeviceStats stats;
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(
      R"pb(device_id: "dev0"
           size_bytes: 1048576
           in_flight: 3
           idle_ns: 1500000000
           ops { op: "read" operations: 4 bytes: 16384 total_time_ns: 4000000 }
           ops { op: "flush" }
           loop { passes: 10 sleeps: 2 submit_calls: 3 sqes_submitted: 48 completions: 47 })pb",
      &stats));
  const std::string text = FormatStats(stats);
  EXPECT_TRUE(absl::StrContains(
      text, "worker loop:        10 passes, 2 slept, 48 SQEs in 3 submits, 47 completions\n"))
      << text;
  EXPECT_TRUE(absl::StrContains(text, "in flight:          3\n")) << text;
  EXPECT_TRUE(absl::StrContains(text, "idle:               1.5s\n")) << text;
  EXPECT_TRUE(absl::StrContains(text, "block layer:        -\n")) << text;
  EXPECT_TRUE(absl::StrContains(text,
                                "OP     OPERATIONS  BYTES  FAILED  INVALID  AVG LATENCY\n"
                                "read   4           16K    0       0        1ms\n"
                                "flush  0           0      0       0        -\n"))
      << text;
}

TEST(FormatStatsTest, BlockLayerLineListsOnlyWhatHappened) {
  v1::DeviceStats stats;
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(
      R"pb(device_id: "dev0"
           block_layer {
             flushes_skipped: 7
             read_modify_writes: 2
             bounced: 3
             split: 0
             discard_withdrawn: true
           })pb",
      &stats));
  const std::string text = FormatStats(stats);
  EXPECT_TRUE(absl::StrContains(text,
                                "block layer:        7 flushes skipped, 2 read-modify-writes, 3 "
                                "bounced, discard withdrawn\n"))
      << text;
}

TEST(FormatEventTest, OneLinePerEvent) {
  v1::DeviceEvent event;
  event.set_kind(v1::DeviceEvent::KIND_STATE_CHANGED);
  event.set_revision(17);
  event.set_previous_state(v1::DEVICE_STATE_WAITING_FOR_FRONTEND);
  *event.mutable_device() = MakeDevice(kXenDevice);
  event.mutable_time()->set_seconds(1795302000);
  EXPECT_EQ(FormatEvent(event),
            "2026-11-21T23:00:00.000Z rev=17 state-changed dev0 waiting-for-frontend->connected "
            "size=2G pid=4242 gen=3 error=\"worker exited with status 1\"\n");

  v1::DeviceEvent complete;
  complete.set_kind(v1::DeviceEvent::KIND_SNAPSHOT_COMPLETE);
  complete.set_revision(16);
  EXPECT_EQ(FormatEvent(complete), "- rev=16 snapshot-complete\n");
}

}  // namespace
}  // namespace blockplane::controller::cli
