// Xen ring and grant counters on the worker's /metrics, driven by a real guest protocol: the
// emulated Xen host (bp-xenhost), blockplaned --xen-platform=emulated, and the harness' userspace
// blkfront with blkif_guest_io issuing requests. The counters live in the stats segment: after a
// kill -9 of the worker (the guest disconnected first) and a reconnect of the frontend they
// continue from where they were.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "common/xen/xen_platform.h"
#include "gtest/gtest.h"
#include "tests/harness/xen/blkfront.h"
#include "tests/harness/xen/guest_domain.h"
#include "tests/harness/xen/test_support.h"
#include "tests/integration/metrics/metrics_fixture.h"
#include "tests/integration/xen/blkif_guest_io.h"

extern char** environ;

namespace blockplane::testing {
namespace {

using harness::Blkfront;
using harness::BlkfrontOptions;
using harness::GuestDomain;
using xen_e2e::GuestQueue;
using xen_e2e::GuestRequest;

constexpr common::xen::DomainId kGuest = 5;
constexpr uint32_t kDevid = 51712;  // xvda
constexpr uint32_t kDataFirstFrame = 128;
constexpr uint32_t kPages = 2;  // per request
const std::string kFrontend = "/local/domain/5/device/vbd/51712";

class XenMetricsTest : public ::testing::Test {
 protected:
  void TearDown() override {
    queue_.reset();
    blkfront_.reset();
    controller_.reset();
    guest_.reset();
    guest_platform_.reset();
    if (xenhost_pid_ > 0) {
      kill(xenhost_pid_, SIGTERM);
      waitpid(xenhost_pid_, nullptr, 0);
    }
  }

  void StartXenHost() {
    absl::StatusOr<pid_t> pid =
        harness::SpawnXenHost(BP_XENHOST_PATH, run_dir_.path(), "5:8192:8192");
    ASSERT_TRUE(pid.ok()) << pid.status();
    xenhost_pid_ = *pid;
  }

  void Connect() {
    queue_.reset();
    BlkfrontOptions options;
    options.devid = kDevid;
    options.protocol = "x86_64-abi";
    options.persistent_grants = true;
    options.ring_page_order = 0;
    options.num_queues = 1;
    options.timeout_ms = 20000;
    blkfront_ = std::make_unique<Blkfront>(guest_platform_.get(), guest_.get(), options);
    absl::Status connected = blkfront_->Connect();
    ASSERT_TRUE(connected.ok()) << connected;
    queue_ = std::make_unique<GuestQueue>(
        guest_.get(), &blkfront_->queues()[0], worker::xen::Protocol::kX86_64, 0,
        blkfront_->backend_info().feature_persistent, kDataFirstFrame, 16, kPages);
  }

  // `count` writes then `count` reads of kPages pages each.
  void GuestIo(uint32_t count) {
    std::vector<uint8_t> data(size_t{kPages} * 4096 * count, 0x5a), back(data.size());
    std::vector<GuestRequest> writes(count), reads(count);
    for (uint32_t i = 0; i < count; ++i) {
      writes[i] = GuestRequest{.operation = BLKIF_OP_WRITE,
                               .sector = uint64_t{i} * kPages * 8,
                               .pages = kPages,
                               .write_data = &data[size_t{i} * kPages * 4096]};
      reads[i] = GuestRequest{.operation = BLKIF_OP_READ,
                              .sector = uint64_t{i} * kPages * 8,
                              .pages = kPages,
                              .read_data = &back[size_t{i} * kPages * 4096]};
    }
    auto w = queue_->Run(writes, 8);
    ASSERT_TRUE(w.ok()) << w.status();
    auto r = queue_->Run(reads, 8);
    ASSERT_TRUE(r.ok()) << r.status();
    for (const auto& response : *w) ASSERT_EQ(response.status, BLKIF_RSP_OKAY);
    for (const auto& response : *r) ASSERT_EQ(response.status, BLKIF_RSP_OKAY);
    ASSERT_TRUE(back == data);
  }

  std::vector<Sample> Scrape(const std::string& endpoint) {
    std::string text = HttpGet(endpoint, "/metrics");
    EXPECT_EQ(PromtoolCheckMetrics(text, controller_->dir()), "") << text;
    return ParseExposition(text);
  }

  harness::TempDir run_dir_;
  pid_t xenhost_pid_ = -1;
  std::unique_ptr<ControllerProcess> controller_;
  std::unique_ptr<GuestDomain> guest_;
  std::unique_ptr<common::xen::XenPlatform> guest_platform_;
  std::unique_ptr<Blkfront> blkfront_;
  std::unique_ptr<GuestQueue> queue_;
};

TEST_F(XenMetricsTest, RingAndGrantCountersSurviveAWorkerKill) {
  StartXenHost();
  if (HasFatalFailure()) return;
  controller_ = std::make_unique<ControllerProcess>(std::vector<std::string>{
      "--xen-platform=emulated", "--xen-run-dir=" + run_dir_.path(), "--metrics-host=127.0.0.1"});
  controller_->Start();
  auto guest = GuestDomain::Connect(run_dir_.path(), kGuest);
  ASSERT_TRUE(guest.ok()) << guest.status();
  guest_ = std::move(*guest);
  auto platform = common::xen::CreateEmulatedXenPlatform({run_dir_.path(), kGuest});
  ASSERT_TRUE(platform.ok()) << platform.status();
  guest_platform_ = std::move(*platform);

  v1::DeviceSpec spec = XenSpec(controller_->CreateDisk("xd0.img", 16 << 20), kGuest, "xvda");
  spec.mutable_xen()->set_max_queues(1);
  spec.mutable_xen()->set_persistent_grants(true);
  spec.mutable_backend()->set_cache(v1::CACHE_MODE_WRITEBACK);
  grpc::ClientContext ctx;
  v1::AttachDeviceRequest attach;
  attach.set_device_id("xd0");
  *attach.mutable_spec() = spec;
  v1::Device device;
  grpc::Status attached = controller_->stub().AttachDevice(&ctx, attach, &device);
  ASSERT_TRUE(attached.ok()) << attached.error_message();

  Connect();
  if (HasFatalFailure()) return;
  GuestIo(10);
  if (HasFatalFailure()) return;
  ASSERT_TRUE(WaitFor([&] {
    return GetDevice(*controller_, "xd0").status().state() == v1::DEVICE_STATE_CONNECTED;
  }));

  const std::map<std::string, std::string> dev = {{"device", "xd0"}, {"frontend", "xen"}};
  auto write = dev;
  write["op"] = "write";
  std::vector<Sample> m = Scrape(device.status().metrics_endpoint());
  EXPECT_EQ(ValueOf(m, "blockplane_device_ring_requests_total", dev), 20);
  EXPECT_EQ(ValueOf(m, "blockplane_device_ring_responses_total", dev), 20);
  EXPECT_GE(ValueOf(m, "blockplane_device_notifications_received_total", dev), 1);
  EXPECT_GE(ValueOf(m, "blockplane_device_notifications_sent_total", dev), 1);
  const double grants = ValueOf(m, "blockplane_xen_persistent_grant_hits_total", dev) +
                        ValueOf(m, "blockplane_xen_persistent_grant_misses_total", dev);
  EXPECT_EQ(grants, 20 * kPages);
  EXPECT_EQ(ValueOf(m, "blockplane_device_bytes_total", write), 10 * kPages * 4096);
  auto misaligned = dev;
  misaligned["reason"] = "misaligned";
  EXPECT_EQ(ValueOf(m, "blockplane_device_invalid_requests_total", misaligned), 0);
  auto connected = dev;
  connected["state"] = "connected";
  EXPECT_EQ(ValueOf(m, "blockplane_device_state", connected), 1);

  // The guest disconnects (a killed backend cannot hand its rings over), the worker is killed
  // with SIGKILL, and the guest connects to the next generation and does more I/O.
  ASSERT_TRUE(blkfront_->Disconnect().ok());
  EXPECT_TRUE(queue_->RevokePersistentGrants());
  ASSERT_TRUE(WaitFor([&] {
    return GetDevice(*controller_, "xd0").status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
  }));
  ASSERT_EQ(::kill(GetDevice(*controller_, "xd0").status().worker_pid(), SIGKILL), 0);
  v1::Device restarted;
  ASSERT_TRUE(WaitFor([&] {
    restarted = GetDevice(*controller_, "xd0");
    return restarted.status().worker_generation() == 2 &&
           !restarted.status().metrics_endpoint().empty();
  }));
  ASSERT_TRUE(WaitFor([&] {
    return GetDevice(*controller_, "xd0").status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
  }));
  queue_.reset();
  blkfront_.reset();
  ASSERT_TRUE(guest_platform_->xenstore().Write(kFrontend + "/state", "1", 0).ok());
  Connect();
  if (HasFatalFailure()) return;
  GuestIo(5);
  if (HasFatalFailure()) return;
  m = Scrape(restarted.status().metrics_endpoint());
  EXPECT_EQ(ValueOf(m, "blockplane_device_ring_requests_total", dev), 30);
  EXPECT_EQ(ValueOf(m, "blockplane_device_ring_responses_total", dev), 30);
  EXPECT_EQ(ValueOf(m, "blockplane_device_bytes_total", write), 15 * kPages * 4096);
  EXPECT_EQ(ValueOf(m, "blockplane_xen_persistent_grant_hits_total", dev) +
                ValueOf(m, "blockplane_xen_persistent_grant_misses_total", dev),
            30 * kPages);
  EXPECT_EQ(ValueOf(m, "blockplane_device_worker_generation", dev), 2);
}

}  // namespace
}  // namespace blockplane::testing
