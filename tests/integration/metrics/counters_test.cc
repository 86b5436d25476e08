// Per-device counters live in the controller's stats segment: a worker killed with SIGKILL loses
// no count, and the next generation continues from the same values.
#include <signal.h>
#include <sys/stat.h>

#include <filesystem>
#include <thread>

#include "gtest/gtest.h"
#include "tests/integration/metrics/metrics_fixture.h"

namespace blockplane::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

TEST(CountersTest, CountersContinueAcrossAWorkerKilledWithSigkill) {
  ControllerProcess controller({"--enable-self-test-io"});
  controller.Start();
  v1::Device device = AttachTestDevice(controller, "dev0", 16 * kMiB);
  const std::string segment = controller.state_dir() + "/stats/dev0.stats";
  ASSERT_TRUE(std::filesystem::exists(segment));

  v1::DeviceStats after_io = RunSelfTestIo(controller, "dev0", 100, 8192, /*write=*/true);
  RunSelfTestIo(controller, "dev0", 50, 4096, /*write=*/false);
  v1::DeviceStats before = GetDeviceStats(controller, "dev0");
  EXPECT_EQ(OpOf(after_io, "write").bytes(), 100u * 8192);
  EXPECT_EQ(OpOf(before, "write").operations(), 100u);
  EXPECT_EQ(OpOf(before, "write").bytes(), 100u * 8192);
  EXPECT_EQ(OpOf(before, "read").operations(), 50u);
  EXPECT_EQ(OpOf(before, "read").bytes(), 50u * 4096);
  EXPECT_GT(OpOf(before, "write").total_time_ns(), 0u);
  EXPECT_EQ(before.highest_written_offset(), 100u * 8192);

  pid_t first = device.status().worker_pid();
  ASSERT_EQ(::kill(first, SIGKILL), 0);
  ASSERT_TRUE(WaitFor([&] {
    v1::Device d = GetDevice(controller, "dev0");
    return d.status().worker_generation() == 2 && d.status().worker_pid() != first &&
           d.status().worker_pid() > 0 && ProcessAlive(d.status().worker_pid()) &&
           d.status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
  }));

  // The new generation starts where the old one stopped: nothing lost, nothing reset.
  v1::DeviceStats restarted = GetDeviceStats(controller, "dev0");
  EXPECT_EQ(restarted.worker_generation(), 2u);
  EXPECT_EQ(OpOf(restarted, "write").bytes(), OpOf(before, "write").bytes());
  EXPECT_EQ(OpOf(restarted, "read").bytes(), OpOf(before, "read").bytes());
  EXPECT_EQ(OpOf(restarted, "write").total_time_ns(), OpOf(before, "write").total_time_ns());
  // Gauges belong to the generation.
  EXPECT_EQ(restarted.highest_written_offset(), 0u);

  v1::DeviceStats more = RunSelfTestIo(controller, "dev0", 10, 4096, /*write=*/true);
  EXPECT_EQ(OpOf(more, "write").operations(), 110u);
  EXPECT_EQ(OpOf(more, "write").bytes(), 100u * 8192 + 10 * 4096);
  EXPECT_EQ(OpOf(more, "read").operations(), 50u);

  // Detach removes the segment; a new device of the same id starts from zero.
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    v1::DetachDeviceRequest req;
    req.set_device_id("dev0");
    v1::DetachDeviceResponse resp;
    grpc::Status s = controller.stub().DetachDevice(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_FALSE(std::filesystem::exists(segment));
}

// Issue 5: kill -9 the worker while I/O is in flight; the counters keep what was counted and
// keep growing from there.
TEST(CountersTest, CountersSurviveAKillInTheMiddleOfALoad) {
  ControllerProcess controller({"--enable-self-test-io"});
  controller.Start();
  v1::Device device = AttachTestDevice(controller, "dev0", 64 * kMiB);
  constexpr uint32_t kOps = 1000000;  // far more than completes before the kill
  std::thread load([&] {
    auto stub = internal::Diagnostics::NewStub(controller.channel());
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    internal::SelfTestIoCall call;
    call.set_device_id("dev0");
    call.mutable_io()->set_ops(kOps);
    call.mutable_io()->set_bytes(4096);
    call.mutable_io()->set_write(true);
    call.mutable_io()->set_queue_depth(8);
    v1::DeviceStats stats;
    grpc::Status s = stub->SelfTestIo(&ctx, call, &stats);
    EXPECT_FALSE(s.ok()) << "the load finished before the worker was killed";
  });
  // Mid-load: writes are being counted.
  uint64_t seen = 0;
  ASSERT_TRUE(WaitFor([&] {
    seen = OpOf(GetDeviceStats(controller, "dev0"), "write").operations();
    return seen >= 2000;
  }));
  pid_t first = device.status().worker_pid();
  ASSERT_EQ(::kill(first, SIGKILL), 0);
  load.join();
  ASSERT_TRUE(WaitFor([&] {
    v1::Device d = GetDevice(controller, "dev0");
    return d.status().worker_generation() == 2 && d.status().worker_pid() != first &&
           d.status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
  }));
  v1::DeviceStats restarted = GetDeviceStats(controller, "dev0");
  const v1::OpStats writes = OpOf(restarted, "write");
  // Nothing counted before the kill is lost, and the load really was cut short.
  EXPECT_GE(writes.operations(), seen);
  EXPECT_LT(writes.operations(), kOps);
  // ops and bytes are separate counters: a kill between the two updates of one request (at most
  // queue-depth requests) is the only allowed difference.
  EXPECT_NEAR(static_cast<double>(writes.bytes()), 4096.0 * writes.operations(), 4096.0 * 8);

  v1::DeviceStats more = RunSelfTestIo(controller, "dev0", 10, 4096, /*write=*/true);
  EXPECT_EQ(OpOf(more, "write").operations(), writes.operations() + 10);
  EXPECT_EQ(OpOf(more, "write").bytes(), writes.bytes() + 10 * 4096);
}

TEST(CountersTest, SegmentOfAnotherLayoutIsReplacedNotTrusted) {
  ControllerProcess controller({"--enable-self-test-io"});
  controller.Start();
  std::filesystem::create_directories(controller.state_dir() + "/stats");
  {
    // Garbage where the segment goes (e.g. left by an incompatible version).
    FILE* f = fopen((controller.state_dir() + "/stats/dev1.stats").c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::string junk(4096, '\x7f');
    fwrite(junk.data(), 1, junk.size(), f);
    fclose(f);
  }
  AttachTestDevice(controller, "dev1", 4 * kMiB);
  v1::DeviceStats stats = RunSelfTestIo(controller, "dev1", 3, 4096, /*write=*/true);
  EXPECT_EQ(OpOf(stats, "write").operations(), 3u);
  EXPECT_EQ(OpOf(stats, "write").bytes(), 3u * 4096);
  EXPECT_EQ(OpOf(stats, "read").operations(), 0u);
}

TEST(CountersTest, SelfTestIoRejectsBadRequests) {
  ControllerProcess controller({"--enable-self-test-io"});
  controller.Start();
  AttachTestDevice(controller, "dev2", 4 * kMiB);
  auto stub = internal::Diagnostics::NewStub(controller.channel());
  for (auto [ops, bytes] : {std::pair<uint32_t, uint32_t>{0, 4096}, {1, 100}, {1, 8 << 20}}) {
    grpc::ClientContext ctx;
    internal::SelfTestIoCall call;
    call.set_device_id("dev2");
    call.mutable_io()->set_ops(ops);
    call.mutable_io()->set_bytes(bytes);
    v1::DeviceStats stats;
    grpc::Status s = stub->SelfTestIo(&ctx, call, &stats);
    EXPECT_EQ(s.error_code(), grpc::INVALID_ARGUMENT) << ops << " " << bytes;
  }
}

TEST(CountersTest, DiagnosticsAreOffByDefault) {
  ControllerProcess controller;
  controller.Start();
  AttachTestDevice(controller, "dev3", 4 * kMiB);
  auto stub = internal::Diagnostics::NewStub(controller.channel());
  grpc::ClientContext ctx;
  internal::SelfTestIoCall call;
  call.set_device_id("dev3");
  call.mutable_io()->set_ops(1);
  call.mutable_io()->set_bytes(4096);
  v1::DeviceStats stats;
  EXPECT_EQ(stub->SelfTestIo(&ctx, call, &stats).error_code(), grpc::UNIMPLEMENTED);
}

}  // namespace
}  // namespace blockplane::testing
