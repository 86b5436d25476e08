// The userspace blkfront's XenbusState handshake against a minimal scripted backend (test code, not
// the worker's blkif backend), all through the emulated XenPlatform and the emulated host.

#include <poll.h>
#include <stdint.h>
#include <xen/grant_table.h>

#include <cerrno>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/xen/xen_platform.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/harness/xen/blkfront.h"
#include "tests/harness/xen/guest_domain.h"
#include "tests/harness/xen/test_support.h"

#ifndef xen_mb
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#endif
#include <xen/io/blkif.h>

namespace blockplane::harness {
namespace {

using common::xen::GrantRef;
using common::xen::kNoTransaction;
using common::xen::XenPlatform;
using ::testing::HasSubstr;

constexpr common::xen::DomainId kGuest = 2;
constexpr uint32_t kDevid = 51712;
constexpr int kTimeoutMs = 10000;

bool WaitReadable(int fd, int timeout_ms = kTimeoutMs) {
  pollfd pfd{fd, POLLIN, 0};
  return poll(&pfd, 1, timeout_ms) == 1;
}

struct FakeBackendReport {
  absl::Status status;
  std::string protocol;
  uint32_t queues = 0;
  uint32_t ring_pages_per_queue = 0;
  bool rings_initialised = false;
};

// Plays the backend side of the handshake once (every queue: map the ring, bind the event
// channel, answer one kick), then the close sequence.
void RunFakeBackend(XenPlatform* dom0, VbdPaths paths, uint32_t max_ring_page_order,
                    uint32_t max_queues, FakeBackendReport* report) {
  auto& store = dom0->xenstore();
  auto fail = [&](absl::Status status) { report->status = std::move(status); };
  const std::string& be = paths.backend;
  const std::string& fe = paths.frontend;
  for (auto [key, value] : std::vector<std::pair<std::string, std::string>>{
           {"/max-ring-page-order", std::to_string(max_ring_page_order)},
           {"/multi-queue-max-queues", std::to_string(max_queues)},
           {"/feature-persistent", "1"},
           {"/feature-flush-cache", "1"},
           {"/state", "2"}}) {
    if (absl::Status status = store.Write(be + key, value, kNoTransaction); !status.ok()) {
      return fail(status);
    }
  }
  auto state = WaitForXenbusState(
      store, fe + "/state", "be", [](XenbusState s) { return s == XenbusState::kInitialised; },
      [](XenbusState s) { return s == XenbusState::kClosed; }, kTimeoutMs);
  if (!state.ok()) return fail(state.status());

  uint32_t order = 0;
  if (auto text = store.Read(fe + "/ring-page-order", kNoTransaction); text.ok()) {
    order = std::stoul(*text);
  }
  uint32_t queues = 1;
  if (auto text = store.Read(fe + "/multi-queue-num-queues", kNoTransaction); text.ok()) {
    queues = std::stoul(*text);
  }
  auto protocol = store.Read(fe + "/protocol", kNoTransaction);
  if (!protocol.ok()) return fail(protocol.status());
  report->protocol = *protocol;
  report->queues = queues;
  report->ring_pages_per_queue = 1u << order;
  report->rings_initialised = true;

  std::vector<std::unique_ptr<common::xen::GrantMapping>> rings;
  std::vector<std::unique_ptr<common::xen::EventChannel>> channels;
  for (uint32_t q = 0; q < queues; ++q) {
    const std::string dir = queues > 1 ? fe + "/queue-" + std::to_string(q) : fe;
    std::vector<GrantRef> refs;
    for (uint32_t i = 0; i < (1u << order); ++i) {
      auto ref = store.Read(order == 0 ? dir + "/ring-ref" : dir + "/ring-ref" + std::to_string(i),
                            kNoTransaction);
      if (!ref.ok()) return fail(ref.status());
      refs.push_back(std::stoul(*ref));
    }
    auto ring = dom0->grant_table().Map(kGuest, refs, /*writable=*/true);
    if (!ring.ok()) return fail(ring.status());
    blkif_sring header;
    std::memcpy(&header, (*ring)->data(), sizeof(header));  // copy out once, then look
    report->rings_initialised &= header.req_prod == 0 && header.rsp_prod == 0 &&
                                 header.req_event == 1 && header.rsp_event == 1;
    rings.push_back(std::move(*ring));
    auto port = store.Read(dir + "/event-channel", kNoTransaction);
    if (!port.ok()) return fail(port.status());
    auto channel = dom0->BindInterdomain(kGuest, std::stoul(*port));
    if (!channel.ok()) return fail(channel.status());
    channels.push_back(std::move(*channel));
  }

  for (auto [key, value] :
       std::vector<std::pair<std::string, std::string>>{{"/sectors", "2048"},
                                                        {"/sector-size", "512"},
                                                        {"/physical-sector-size", "4096"},
                                                        {"/info", "0"},
                                                        {"/state", "4"}}) {
    if (absl::Status status = store.Write(be + key, value, kNoTransaction); !status.ok()) {
      return fail(status);
    }
  }
  // One kick per queue from the frontend, each answered on the same queue.
  for (auto& channel : channels) {
    if (!WaitReadable(channel->ReadinessFd())) return fail(absl::DeadlineExceededError("kick"));
    (void)channel->Ack();
    if (absl::Status status = channel->Notify(); !status.ok()) return fail(status);
  }

  state = WaitForXenbusState(
      store, fe + "/state", "be", [](XenbusState s) { return s == XenbusState::kClosing; }, nullptr,
      kTimeoutMs);
  if (!state.ok()) return fail(state.status());
  if (absl::Status status = store.Write(be + "/state", "5", kNoTransaction); !status.ok()) {
    return fail(status);
  }
  state = WaitForXenbusState(
      store, fe + "/state", "be", [](XenbusState s) { return s == XenbusState::kClosed; }, nullptr,
      kTimeoutMs);
  if (!state.ok()) return fail(state.status());
  rings.clear();
  channels.clear();
  report->status = store.Write(be + "/state", "6", kNoTransaction);
}

struct HandshakeParams {
  uint32_t wanted_order;
  uint32_t wanted_queues;
};

class BlkfrontHandshakeTest : public ::testing::TestWithParam<HandshakeParams> {
 protected:
  void SetUp() override {
    auto xen = StartInProcessXen(dir_.path(), kGuest, 64, 32);
    ASSERT_TRUE(xen.ok()) << xen.status();
    xen_ = std::move(*xen);
    ASSERT_TRUE(WriteVbdToolstackEntries(xen_.dom0->xenstore(), kGuest, 0, kDevid).ok());
    paths_ = VbdPathsFor(kGuest, 0, kDevid);
  }
  void TearDown() override { EXPECT_TRUE(xen_.Stop().ok()); }

  TempDir dir_;
  InProcessXen xen_;
  VbdPaths paths_;
};

TEST_P(BlkfrontHandshakeTest, ConnectsKicksAndCloses) {
  const HandshakeParams params = GetParam();
  constexpr uint32_t kBackendMaxOrder = 2;
  constexpr uint32_t kBackendMaxQueues = 4;
  FakeBackendReport report;
  std::thread backend(RunFakeBackend, xen_.dom0.get(), paths_, kBackendMaxOrder, kBackendMaxQueues,
                      &report);

  BlkfrontOptions options;
  options.devid = kDevid;
  options.ring_page_order = params.wanted_order;
  options.num_queues = params.wanted_queues;
  options.first_ring_frame = 8;
  options.first_ring_ref = 4;
  Blkfront front(xen_.guest_platform.get(), xen_.guest.get(), options);
  absl::Status connected = front.Connect();
  ASSERT_TRUE(connected.ok()) << connected;
  EXPECT_EQ(front.paths().backend, paths_.backend);
  EXPECT_EQ(front.backend_domid(), 0);
  EXPECT_EQ(front.backend_info().sectors, 2048u);
  EXPECT_EQ(front.backend_info().physical_sector_size, 4096u);
  EXPECT_TRUE(front.backend_info().feature_persistent);
  EXPECT_TRUE(front.backend_info().feature_flush_cache);
  const uint32_t order = std::min(params.wanted_order, kBackendMaxOrder);
  const uint32_t queues = std::min(params.wanted_queues, kBackendMaxQueues);
  EXPECT_EQ(front.ring_page_order(), order);
  ASSERT_EQ(front.queues().size(), queues);
  std::vector<GrantRef> all_refs;
  for (const BlkfrontQueue& queue : front.queues()) {
    EXPECT_EQ(queue.ring_refs.size(), 1u << order);
    all_refs.insert(all_refs.end(), queue.ring_refs.begin(), queue.ring_refs.end());
  }
  EXPECT_EQ(xen_.dom0->xenstore().Read(paths_.frontend + "/state", kNoTransaction).value_or(""),
            "4");
  // While the backend maps the rings, the guest sees every ring grant in use.
  for (GrantRef ref : all_refs) {
    EXPECT_EQ(xen_.guest->EntryFlags(ref) & (GTF_reading | GTF_writing), GTF_reading | GTF_writing)
        << ref;
  }

  for (const BlkfrontQueue& queue : front.queues()) {
    ASSERT_TRUE(queue.event_channel->Notify().ok());
    ASSERT_TRUE(WaitReadable(queue.event_channel->ReadinessFd()));
    EXPECT_EQ(queue.event_channel->Ack().value_or(false), true);
  }

  absl::Status closed = front.Disconnect();
  backend.join();
  ASSERT_TRUE(report.status.ok()) << report.status;
  ASSERT_TRUE(closed.ok()) << closed;
  EXPECT_EQ(report.protocol, "x86_64-abi");
  EXPECT_EQ(report.queues, queues);
  EXPECT_EQ(report.ring_pages_per_queue, 1u << order);
  EXPECT_TRUE(report.rings_initialised);
  for (GrantRef ref : all_refs) EXPECT_EQ(xen_.guest->EntryFlags(ref), 0) << ref;  // revoked
  EXPECT_EQ(xen_.dom0->xenstore().Read(paths_.frontend + "/state", kNoTransaction).value_or(""),
            "6");
}

INSTANTIATE_TEST_SUITE_P(RingOrdersAndQueues, BlkfrontHandshakeTest,
                         ::testing::Values(HandshakeParams{0, 1}, HandshakeParams{1, 1},
                                           HandshakeParams{3, 1},  // order capped at 2
                                           HandshakeParams{0, 4}, HandshakeParams{2, 4},
                                           HandshakeParams{1, 8}));  // queues capped at 4

TEST_F(BlkfrontHandshakeTest, GuestCannotWriteTheBackendDirectory) {
  auto status =
      xen_.guest_platform->xenstore().Write(paths_.backend + "/state", "4", kNoTransaction);
  EXPECT_EQ(common::xen::StatusToErrno(status), EACCES);
  EXPECT_EQ(
      xen_.guest_platform->xenstore().Read(paths_.backend + "/state", kNoTransaction).value_or(""),
      "1");
}

TEST_F(BlkfrontHandshakeTest, BackendClosingDuringHandshakeFailsConnect) {
  ASSERT_TRUE(xen_.dom0->xenstore().Write(paths_.backend + "/state", "5", kNoTransaction).ok());
  Blkfront front(xen_.guest_platform.get(), xen_.guest.get(), BlkfrontOptions{});
  absl::Status status = front.Connect();
  EXPECT_TRUE(absl::IsFailedPrecondition(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("state 5"));
}

// A backend left Closed by an earlier frontend is not a failure: the new frontend says
// Initialising and waits for InitWait (here it never comes, so the wait times out).
TEST_F(BlkfrontHandshakeTest, ClosedBackendIsWaitedFor) {
  ASSERT_TRUE(xen_.dom0->xenstore().Write(paths_.backend + "/state", "6", kNoTransaction).ok());
  ASSERT_TRUE(xen_.dom0->xenstore().Write(paths_.frontend + "/state", "6", kNoTransaction).ok());
  BlkfrontOptions options;
  options.timeout_ms = 200;
  Blkfront front(xen_.guest_platform.get(), xen_.guest.get(), options);
  EXPECT_TRUE(absl::IsDeadlineExceeded(front.Connect()));
  EXPECT_EQ(xen_.dom0->xenstore().Read(paths_.frontend + "/state", kNoTransaction).value_or(""),
            "1");
}

TEST_F(BlkfrontHandshakeTest, NoBackendTimesOut) {
  BlkfrontOptions options;
  options.timeout_ms = 200;  // bounded wait for a state that never comes
  Blkfront front(xen_.guest_platform.get(), xen_.guest.get(), options);
  EXPECT_TRUE(absl::IsDeadlineExceeded(front.Connect()));
}

TEST_F(BlkfrontHandshakeTest, ToolstackEntriesAreVisibleWithXenstoreLs) {
  CommandResult ls = RunXenstoreTool({"xenstore-ls", paths_.frontend}, dir_.path() + "/xenstored");
  ASSERT_EQ(ls.exit_code, 0) << ls.err;
  EXPECT_THAT(ls.out, HasSubstr("backend = \"" + paths_.backend + "\""));
  EXPECT_THAT(ls.out, HasSubstr("state = \"1\""));
  ASSERT_TRUE(RemoveVbdToolstackEntries(xen_.dom0->xenstore(), kGuest, 0, kDevid).ok());
  EXPECT_FALSE(xen_.dom0->xenstore().Read(paths_.frontend, kNoTransaction).ok());
  EXPECT_FALSE(xen_.dom0->xenstore().Read(paths_.backend, kNoTransaction).ok());
}

}  // namespace
}  // namespace blockplane::harness
