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
#include "tests/harness/xen/xen_host.h"

#ifndef xen_mb
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#endif
#include <xen/io/blkif.h>

namespace blockplane::harness {
namespace {

using common::xen::CreateEmulatedXenPlatform;
using common::xen::EmulatedXenOptions;
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
  uint32_t ring_pages = 0;
  bool ring_initialised = false;
};

// Plays the backend side of the handshake once, then the close sequence.
void RunFakeBackend(XenPlatform* dom0, VbdPaths paths, uint32_t max_ring_page_order,
                    FakeBackendReport* report) {
  auto& store = dom0->xenstore();
  auto fail = [&](absl::Status status) { report->status = std::move(status); };
  const std::string& be = paths.backend;
  const std::string& fe = paths.frontend;
  for (auto [key, value] : std::vector<std::pair<std::string, std::string>>{
           {"/max-ring-page-order", std::to_string(max_ring_page_order)},
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

  std::vector<GrantRef> refs;
  auto order_text = store.Read(fe + "/ring-page-order", kNoTransaction);
  if (order_text.ok()) {
    uint32_t order = std::stoul(*order_text);
    for (uint32_t i = 0; i < (1u << order); ++i) {
      auto ref = store.Read(fe + "/ring-ref" + std::to_string(i), kNoTransaction);
      if (!ref.ok()) return fail(ref.status());
      refs.push_back(std::stoul(*ref));
    }
  } else {
    auto ref = store.Read(fe + "/ring-ref", kNoTransaction);
    if (!ref.ok()) return fail(ref.status());
    refs.push_back(std::stoul(*ref));
  }
  auto port = store.Read(fe + "/event-channel", kNoTransaction);
  auto protocol = store.Read(fe + "/protocol", kNoTransaction);
  if (!port.ok()) return fail(port.status());
  if (!protocol.ok()) return fail(protocol.status());
  report->protocol = *protocol;
  report->ring_pages = static_cast<uint32_t>(refs.size());

  auto ring = dom0->grant_table().Map(kGuest, refs, /*writable=*/true);
  if (!ring.ok()) return fail(ring.status());
  blkif_sring header;
  std::memcpy(&header, (*ring)->data(), sizeof(header));  // copy out once, then look
  report->ring_initialised = header.req_prod == 0 && header.rsp_prod == 0 &&
                             header.req_event == 1 && header.rsp_event == 1;
  auto channel = dom0->BindInterdomain(kGuest, std::stoul(*port));
  if (!channel.ok()) return fail(channel.status());

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
  // One kick from the frontend, answered with one kick back.
  if (!WaitReadable((*channel)->ReadinessFd())) return fail(absl::DeadlineExceededError("kick"));
  (void)(*channel)->Ack();
  if (absl::Status status = (*channel)->Notify(); !status.ok()) return fail(status);

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
  ring->reset();
  channel->reset();
  report->status = store.Write(be + "/state", "6", kNoTransaction);
}

class BlkfrontHandshakeTest : public ::testing::TestWithParam<uint32_t> {
 protected:
  void SetUp() override {
    auto host = XenHost::Create(XenHostOptions{dir_.path()});
    ASSERT_TRUE(host.ok()) << host.status();
    host_ = std::move(*host);
    ASSERT_TRUE(host_->CreateDomain(kGuest, 64, 32).ok());
    host_->StartThread();
    auto dom0 = CreateEmulatedXenPlatform(EmulatedXenOptions{dir_.path(), 0});
    ASSERT_TRUE(dom0.ok()) << dom0.status();
    dom0_ = std::move(*dom0);
    auto guest_platform = CreateEmulatedXenPlatform(EmulatedXenOptions{dir_.path(), kGuest});
    ASSERT_TRUE(guest_platform.ok()) << guest_platform.status();
    guest_platform_ = std::move(*guest_platform);
    auto guest = GuestDomain::Connect(dir_.path(), kGuest);
    ASSERT_TRUE(guest.ok()) << guest.status();
    guest_ = std::move(*guest);
    ASSERT_TRUE(WriteVbdToolstackEntries(dom0_->xenstore(), kGuest, 0, kDevid).ok());
    paths_ = VbdPathsFor(kGuest, 0, kDevid);
  }
  void TearDown() override {
    guest_.reset();
    guest_platform_.reset();
    dom0_.reset();
    if (host_) {
      EXPECT_TRUE(host_->StopThread().ok());
    }
  }

  TempDir dir_;
  std::unique_ptr<XenHost> host_;
  std::unique_ptr<XenPlatform> dom0_;
  std::unique_ptr<XenPlatform> guest_platform_;
  std::unique_ptr<GuestDomain> guest_;
  VbdPaths paths_;
};

TEST_P(BlkfrontHandshakeTest, ConnectsKicksAndCloses) {
  const uint32_t wanted_order = GetParam();
  constexpr uint32_t kBackendMaxOrder = 2;
  FakeBackendReport report;
  std::thread backend(RunFakeBackend, dom0_.get(), paths_, kBackendMaxOrder, &report);

  BlkfrontOptions options;
  options.devid = kDevid;
  options.ring_page_order = wanted_order;
  options.first_ring_frame = 8;
  options.first_ring_ref = 4;
  Blkfront front(guest_platform_.get(), guest_.get(), options);
  absl::Status connected = front.Connect();
  ASSERT_TRUE(connected.ok()) << connected;
  EXPECT_EQ(front.paths().backend, paths_.backend);
  EXPECT_EQ(front.backend_domid(), 0);
  EXPECT_EQ(front.backend_info().sectors, 2048u);
  EXPECT_EQ(front.backend_info().physical_sector_size, 4096u);
  EXPECT_TRUE(front.backend_info().feature_persistent);
  EXPECT_TRUE(front.backend_info().feature_flush_cache);
  const uint32_t order = std::min(wanted_order, kBackendMaxOrder);
  EXPECT_EQ(front.ring_page_order(), order);
  EXPECT_EQ(front.ring_refs().size(), 1u << order);
  EXPECT_EQ(dom0_->xenstore().Read(paths_.frontend + "/state", kNoTransaction).value_or(""), "4");
  // While the backend maps the ring, the guest sees the grant in use.
  EXPECT_EQ(guest_->EntryFlags(4) & (GTF_reading | GTF_writing), GTF_reading | GTF_writing);

  ASSERT_TRUE(front.event_channel()->Notify().ok());
  ASSERT_TRUE(WaitReadable(front.event_channel()->ReadinessFd()));
  EXPECT_EQ(front.event_channel()->Ack().value_or(false), true);

  absl::Status closed = front.Disconnect();
  backend.join();
  ASSERT_TRUE(report.status.ok()) << report.status;
  ASSERT_TRUE(closed.ok()) << closed;
  EXPECT_EQ(report.protocol, "x86_64-abi");
  EXPECT_EQ(report.ring_pages, 1u << order);
  EXPECT_TRUE(report.ring_initialised);
  EXPECT_EQ(guest_->EntryFlags(4), 0);  // revoked
  EXPECT_EQ(dom0_->xenstore().Read(paths_.frontend + "/state", kNoTransaction).value_or(""), "6");
}

INSTANTIATE_TEST_SUITE_P(RingPageOrders, BlkfrontHandshakeTest, ::testing::Values(0u, 1u, 3u));

TEST_F(BlkfrontHandshakeTest, GuestCannotWriteTheBackendDirectory) {
  auto status = guest_platform_->xenstore().Write(paths_.backend + "/state", "4", kNoTransaction);
  EXPECT_EQ(common::xen::StatusToErrno(status), EACCES);
  EXPECT_EQ(
      guest_platform_->xenstore().Read(paths_.backend + "/state", kNoTransaction).value_or(""),
      "1");
}

TEST_F(BlkfrontHandshakeTest, BackendClosingDuringHandshakeFailsConnect) {
  ASSERT_TRUE(dom0_->xenstore().Write(paths_.backend + "/state", "6", kNoTransaction).ok());
  Blkfront front(guest_platform_.get(), guest_.get(), BlkfrontOptions{});
  absl::Status status = front.Connect();
  EXPECT_TRUE(absl::IsFailedPrecondition(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("state 6"));
}

TEST_F(BlkfrontHandshakeTest, NoBackendTimesOut) {
  BlkfrontOptions options;
  options.timeout_ms = 200;  // bounded wait for a state that never comes
  Blkfront front(guest_platform_.get(), guest_.get(), options);
  EXPECT_TRUE(absl::IsDeadlineExceeded(front.Connect()));
}

TEST_F(BlkfrontHandshakeTest, ToolstackEntriesAreVisibleWithXenstoreLs) {
  CommandResult ls = RunXenstoreTool({"xenstore-ls", paths_.frontend}, dir_.path() + "/xenstored");
  ASSERT_EQ(ls.exit_code, 0) << ls.err;
  EXPECT_THAT(ls.out, HasSubstr("backend = \"" + paths_.backend + "\""));
  EXPECT_THAT(ls.out, HasSubstr("state = \"1\""));
  ASSERT_TRUE(RemoveVbdToolstackEntries(dom0_->xenstore(), kGuest, 0, kDevid).ok());
  EXPECT_FALSE(dom0_->xenstore().Read(paths_.frontend, kNoTransaction).ok());
  EXPECT_FALSE(dom0_->xenstore().Read(paths_.backend, kNoTransaction).ok());
}

}  // namespace
}  // namespace blockplane::harness
