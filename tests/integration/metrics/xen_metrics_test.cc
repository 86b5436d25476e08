// Xen ring and grant counters on the worker's /metrics, driven by a real guest protocol: the
// emulated Xen host (bp-xenhost), blockplaned --xen-platform=emulated, and the harness' userspace
// blkfront issuing requests. The counters live in the stats segment: after a
// kill -9 of the worker (the guest disconnected first) and a reconnect of the frontend they
// continue from where they were. Each queue counts on its own series (label `queue`).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/xen/xen_platform.h"
#include "gtest/gtest.h"
#include "tests/harness/xen/blkfront.h"
#include "tests/harness/xen/guest_domain.h"
#include "tests/harness/xen/test_support.h"
#include "tests/integration/metrics/metrics_fixture.h"
#include "tests/integration/xen/xen_e2e_fixture.h"
#include "worker/xen/blkif_abi.h"
#include "worker/xen/blkif_request.h"

extern char** environ;

namespace blockplane::testing {
namespace {

using xen_e2e::Blkfront;
using xen_e2e::BlkfrontOp;
using xen_e2e::BlkfrontOptions;
using xen_e2e::kDevid;
using xen_e2e::kGuest;

constexpr uint32_t kPages = 2;  // per request
const std::string kFrontend = "/local/domain/5/device/vbd/51712";

class XenMetricsTest : public xen_e2e::XenE2eTest {
 protected:
  // bp-xenhost, blockplaned (metrics on 127.0.0.1), the guest's handles, and device `id` on a
  // 16 MiB disk `image` with `queues` queues, attached; `device` is what AttachDevice returned.
  void StartAndAttach(const std::string& id, const std::string& image, uint32_t queues,
                      v1::Device* device) {
    StartXenHost(kGuest, 8192, 8192);
    if (HasFatalFailure()) return;
    StartController({"--metrics-host=127.0.0.1"});
    ConnectGuest(kGuest);
    if (HasFatalFailure()) return;

    v1::DeviceSpec spec = XenSpec(controller_->CreateDisk(image, 16 << 20), kGuest, "xvda");
    spec.mutable_xen()->set_max_queues(queues);
    spec.mutable_xen()->set_persistent_grants(true);
    spec.mutable_backend()->set_cache(v1::CACHE_MODE_WRITEBACK);
    grpc::ClientContext ctx;
    v1::AttachDeviceRequest attach;
    attach.set_device_id(id);
    *attach.mutable_spec() = spec;
    grpc::Status attached = controller_->stub().AttachDevice(&ctx, attach, device);
    ASSERT_TRUE(attached.ok()) << attached.error_message();
  }

  void Connect(uint32_t num_queues = 1) {
    blkfront_.reset();
    BlkfrontOptions options;
    options.devid = kDevid;
    options.protocol = "x86_64-abi";
    options.persistent_grants = true;
    options.ring_page_order = 0;
    options.num_queues = num_queues;
    options.slots_per_queue = 16;
    options.max_request_bytes = kPages * 4096;
    options.timeout_ms = 20000;
    blkfront_ = std::make_unique<Blkfront>(guest_platform_.get(), guest_.get(), options);
    absl::Status connected = blkfront_->Connect();
    ASSERT_TRUE(connected.ok()) << connected;
    ASSERT_EQ(blkfront_->queues().size(), num_queues);
    ASSERT_TRUE(blkfront_->persistent_grants());
  }

  // Fails if the backend still maps a ring page or a persistent grant after Closed.
  void DisconnectGuest() { ASSERT_TRUE(blkfront_->Disconnect().ok()); }

  // Kills the worker with SIGKILL once the guest has disconnected (a killed backend cannot hand
  // its rings over) and returns the next generation's device once it waits for a frontend.
  v1::Device KillWorker(const std::string& id) {
    v1::Device restarted;
    EXPECT_TRUE(WaitFor(
        [&] { return GetDevice(id).status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND; }));
    EXPECT_EQ(::kill(GetDevice(id).status().worker_pid(), SIGKILL), 0);
    EXPECT_TRUE(WaitFor([&] {
      restarted = GetDevice(id);
      return restarted.status().worker_generation() == 2 &&
             !restarted.status().metrics_endpoint().empty();
    }));
    EXPECT_TRUE(WaitFor(
        [&] { return GetDevice(id).status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND; }));
    blkfront_.reset();
    EXPECT_TRUE(guest_platform_->xenstore().Write(kFrontend + "/state", "1", 0).ok());
    return restarted;
  }

  // `count` writes then `count` reads of kPages pages each on queue `queue`, from `first_sector`.
  void GuestIo(uint32_t count, uint32_t queue = 0, uint64_t first_sector = 0) {
    std::vector<uint8_t> data(size_t{kPages} * 4096 * count, 0x5a), back(data.size());
    std::vector<harness::GuestIo> writes(count), reads(count);
    const std::span<uint8_t> written(data), read(back);
    for (uint32_t i = 0; i < count; ++i) {
      const uint64_t sector = first_sector + uint64_t{i} * kPages * 8;
      writes[i] =
          harness::GuestIo{.queue = queue,
                           .request = {BlkfrontOp::kWrite, sector, kPages * 8, 0, false},
                           .write_data = written.subspan(size_t{i} * kPages * 4096, kPages * 4096)};
      reads[i] =
          harness::GuestIo{.queue = queue,
                           .request = {BlkfrontOp::kRead, sector, kPages * 8, 0, false},
                           .read_data = read.subspan(size_t{i} * kPages * 4096, kPages * 4096)};
    }
    ASSERT_LT(queue, blkfront_->num_queues());
    auto w = harness::RunGuestRequests(*blkfront_, writes, 8);
    ASSERT_TRUE(w.ok()) << w.status();
    auto r = harness::RunGuestRequests(*blkfront_, reads, 8);
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
};

// Samples of `name` for device `id`, by their `queue` label.
std::map<std::string, double> ByQueue(const std::vector<Sample>& samples, const std::string& name,
                                      const std::string& id) {
  std::map<std::string, double> out;
  for (const Sample& s : samples) {
    if (s.name != name || s.labels.count("device") == 0 || s.labels.at("device") != id) continue;
    EXPECT_EQ(s.labels.count("queue"), 1u) << name;
    if (s.labels.count("queue") == 0) continue;
    EXPECT_EQ(out.count(s.labels.at("queue")), 0u) << name << " queue " << s.labels.at("queue");
    out[s.labels.at("queue")] = s.value;
  }
  return out;
}

TEST_F(XenMetricsTest, RingAndGrantCountersSurviveAWorkerKill) {
  v1::Device device;
  StartAndAttach("xd0", "xd0.img", 1, &device);
  if (HasFatalFailure()) return;

  Connect();
  if (HasFatalFailure()) return;
  GuestIo(10);
  if (HasFatalFailure()) return;
  ASSERT_TRUE(
      WaitFor([&] { return GetDevice("xd0").status().state() == v1::DEVICE_STATE_CONNECTED; }));

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

  // A 1-queue device has one series per ring counter (queue "0"), not one per possible queue.
  EXPECT_EQ(ByQueue(m, "blockplane_device_ring_requests_total", "xd0"),
            (std::map<std::string, double>{{"0", 20}}));

  // The guest disconnects (a killed backend cannot hand its rings over), the worker is killed
  // with SIGKILL, and the guest connects to the next generation and does more I/O.
  DisconnectGuest();
  if (HasFailure()) return;
  v1::Device restarted = KillWorker("xd0");
  if (HasFailure()) return;
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

// Four queues: each queue's requests appear on its own series (queue="0".."3"), the series add
// up to the workload, and each queue's counters continue across a kill -9 of the worker.
TEST_F(XenMetricsTest, FourQueuesCountOnTheirOwnSeriesAcrossAWorkerKill) {
  v1::Device device;
  StartAndAttach("xq0", "xq0.img", 4, &device);
  if (HasFatalFailure()) return;

  // Queue q does 2 + q writes and as many reads: a different count on every queue.
  auto requests_of = [](uint32_t q) { return 2.0 * (2 + q); };
  constexpr uint32_t kQueues = 4;
  Connect(kQueues);
  if (HasFatalFailure()) return;
  double workload = 0;
  for (uint32_t q = 0; q < kQueues; ++q) {
    GuestIo(2 + q, q, uint64_t{q} * 4096);
    if (HasFatalFailure()) return;
    workload += requests_of(q);
  }
  ASSERT_TRUE(
      WaitFor([&] { return GetDevice("xq0").status().frontend().num_queues() == kQueues; }));

  std::vector<Sample> m = Scrape(device.status().metrics_endpoint());
  std::map<std::string, double> requests =
      ByQueue(m, "blockplane_device_ring_requests_total", "xq0");
  std::map<std::string, double> responses =
      ByQueue(m, "blockplane_device_ring_responses_total", "xq0");
  std::map<std::string, double> hits =
      ByQueue(m, "blockplane_xen_persistent_grant_hits_total", "xq0");
  std::map<std::string, double> misses =
      ByQueue(m, "blockplane_xen_persistent_grant_misses_total", "xq0");
  std::map<std::string, double> kicks =
      ByQueue(m, "blockplane_device_notifications_received_total", "xq0");
  std::map<std::string, double> maps = ByQueue(m, "blockplane_xen_grant_maps_total", "xq0");
  ASSERT_EQ(requests.size(), kQueues);  // queues 0..3, none of the 12 the frontend did not use
  double sum = 0;
  for (uint32_t q = 0; q < kQueues; ++q) {
    const std::string label = std::to_string(q);
    EXPECT_EQ(requests[label], requests_of(q)) << "queue " << q;
    EXPECT_EQ(responses[label], requests_of(q)) << "queue " << q;
    EXPECT_EQ(hits[label] + misses[label], requests_of(q) * kPages) << "queue " << q;
    EXPECT_GE(kicks[label], 1) << "queue " << q;
    EXPECT_GE(maps[label], 1 + kPages) << "queue " << q;  // its ring page and its data pages
    sum += requests[label];
  }
  EXPECT_EQ(sum, workload);
  // Every reason of every queue, all zero.
  std::map<std::string, int> invalid_series;
  for (const Sample& s : m) {
    if (s.name != "blockplane_device_invalid_requests_total") continue;
    ++invalid_series[s.labels.count("queue") ? s.labels.at("queue") : "none"];
    EXPECT_EQ(s.value, 0) << s.labels.at("reason");
  }
  std::map<std::string, int> every_reason;
  for (uint32_t q = 0; q < kQueues; ++q) {
    every_reason[std::to_string(q)] = static_cast<int>(worker::xen::kInvalidReasonCount);
  }
  EXPECT_EQ(invalid_series, every_reason);

  // Kill -9 the worker; the guest reconnects with four queues to the next generation and queue q
  // does 1 + q more writes and reads.
  DisconnectGuest();
  if (HasFailure()) return;
  v1::Device restarted = KillWorker("xq0");
  if (HasFailure()) return;
  Connect(kQueues);
  if (HasFatalFailure()) return;
  for (uint32_t q = 0; q < kQueues; ++q) {
    GuestIo(1 + q, q, uint64_t{q} * 4096);
    if (HasFatalFailure()) return;
    workload += 2.0 * (1 + q);
  }
  m = Scrape(restarted.status().metrics_endpoint());
  requests = ByQueue(m, "blockplane_device_ring_requests_total", "xq0");
  responses = ByQueue(m, "blockplane_device_ring_responses_total", "xq0");
  hits = ByQueue(m, "blockplane_xen_persistent_grant_hits_total", "xq0");
  misses = ByQueue(m, "blockplane_xen_persistent_grant_misses_total", "xq0");
  ASSERT_EQ(requests.size(), kQueues);
  sum = 0;
  for (uint32_t q = 0; q < kQueues; ++q) {
    const std::string label = std::to_string(q);
    const double expected = requests_of(q) + 2.0 * (1 + q);
    EXPECT_EQ(requests[label], expected) << "queue " << q;
    EXPECT_EQ(responses[label], expected) << "queue " << q;
    EXPECT_EQ(hits[label] + misses[label], expected * kPages) << "queue " << q;
    sum += requests[label];
  }
  EXPECT_EQ(sum, workload);
  const std::map<std::string, std::string> dev = {{"device", "xq0"}, {"frontend", "xen"}};
  EXPECT_EQ(ValueOf(m, "blockplane_device_worker_generation", dev), 2);
  auto write = dev;
  write["op"] = "write";
  // The block layer saw the same writes: 2+q then 1+q per queue.
  EXPECT_EQ(ValueOf(m, "blockplane_device_operations_total", write), 14 + 10);
}

}  // namespace
}  // namespace blockplane::testing
