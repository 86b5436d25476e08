// The emulated XenPlatform against the emulated Xen host: grants mapped and copied with the
// hypervisor's checks, event channels, and xenstore through the real libxenstore.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xen/grant_table.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/unique_fd.h"
#include "common/xen/emulated_protocol.h"
#include "common/xen/host_platform.h"
#include "common/xen/xen_platform.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/harness/xen/guest_domain.h"
#include "tests/harness/xen/host_control.h"
#include "tests/harness/xen/test_support.h"
#include "tests/harness/xen/xen_host.h"

namespace blockplane::harness {
namespace {

using common::xen::CreateEmulatedXenPlatform;
using common::xen::EmulatedXenOptions;
using common::xen::EventChannel;
using common::xen::GrantCopySegment;
using common::xen::GrantMapping;
using common::xen::GrantRef;
using common::xen::kXenPageSize;
using common::xen::StatusToErrno;
using common::xen::XenPlatform;
using common::xen::XenStorePermission;
using common::xen::XenStoreWatchEvent;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

constexpr common::xen::DomainId kGuest = 1;
constexpr uint32_t kGuestPages = 64;
constexpr uint32_t kGuestGrants = 32;

bool WaitReadable(int fd, int timeout_ms = 5000) {
  pollfd pfd{fd, POLLIN, 0};
  return poll(&pfd, 1, timeout_ms) == 1;
}

bool IsReadable(int fd) { return WaitReadable(fd, 0); }

// The protection of the mapping that contains `addr`, from /proc/self/maps ("r--s", "rw-s"...).
std::string ProtectionOf(const void* addr) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  uintptr_t target = reinterpret_cast<uintptr_t>(addr);
  while (std::getline(maps, line)) {
    uintptr_t start = 0;
    uintptr_t end = 0;
    char perms[5] = {};
    if (sscanf(line.c_str(), "%lx-%lx %4s", &start, &end, perms) == 3 && target >= start &&
        target < end) {
      return perms;
    }
  }
  return "";
}

class EmulatedPlatformTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    auto xen = StartInProcessXen(dir_.path(), kGuest, kGuestPages, kGuestGrants);
    ASSERT_TRUE(xen.ok()) << xen.status();
    xen_ = std::move(*xen);
  }
  void TearDown() override { EXPECT_TRUE(xen_.Stop().ok()); }

  TempDir dir_;
  InProcessXen xen_;
};

TEST_F(EmulatedPlatformTest, WritableMappingSharesGuestMemoryAndSetsInUseFlags) {
  std::memset(xen_.guest->Page(5).data(), 0xab, kXenPageSize);
  ASSERT_TRUE(xen_.guest->GrantAccess(3, 0, 5, /*readonly=*/false).ok());

  auto mapping = xen_.dom0->grant_table().MapOne(kGuest, 3, /*writable=*/true);
  ASSERT_TRUE(mapping.ok()) << mapping.status();
  EXPECT_EQ((*mapping)->size(), kXenPageSize);
  EXPECT_EQ((*mapping)->data()[0], std::byte{0xab});
  EXPECT_EQ((*mapping)->data()[kXenPageSize - 1], std::byte{0xab});
  EXPECT_EQ(ProtectionOf((*mapping)->data()), "rw-s");
  EXPECT_EQ(xen_.guest->EntryFlags(3) & (GTF_reading | GTF_writing), GTF_reading | GTF_writing);
  EXPECT_FALSE(xen_.guest->EndAccess(3));  // in use: the guest cannot revoke it

  (*mapping)->data()[100] = std::byte{0x11};
  EXPECT_EQ(xen_.guest->Page(5)[100], std::byte{0x11});

  ASSERT_TRUE((*mapping)->Unmap().ok());
  EXPECT_EQ(xen_.guest->EntryFlags(3) & (GTF_reading | GTF_writing), 0);
  EXPECT_TRUE(xen_.guest->EndAccess(3));
  EXPECT_EQ(xen_.guest->EntryFlags(3), 0);
}

TEST_F(EmulatedPlatformTest, ReadOnlyGrantMapsReadOnlyAndRefusesWritable) {
  ASSERT_TRUE(xen_.guest->GrantAccess(4, 0, 6, /*readonly=*/true).ok());
  auto writable = xen_.dom0->grant_table().MapOne(kGuest, 4, /*writable=*/true);
  ASSERT_FALSE(writable.ok());
  EXPECT_EQ(StatusToErrno(writable.status()), EINVAL);
  EXPECT_EQ(xen_.guest->EntryFlags(4), GTF_permit_access | GTF_readonly);  // no pin left behind

  auto readonly = xen_.dom0->grant_table().MapOne(kGuest, 4, /*writable=*/false);
  ASSERT_TRUE(readonly.ok()) << readonly.status();
  EXPECT_FALSE((*readonly)->writable());
  EXPECT_EQ(ProtectionOf((*readonly)->data()), "r--s");
  EXPECT_EQ(xen_.guest->EntryFlags(4) & (GTF_reading | GTF_writing), GTF_reading);
}

TEST_F(EmulatedPlatformTest, MapChecksWhatTheHypervisorChecks) {
  auto& grants = xen_.dom0->grant_table();
  // Out of range ref.
  auto result = grants.MapOne(kGuest, kGuestGrants, false);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(StatusToErrno(result.status()), EINVAL);
  EXPECT_THAT(result.status().message(), HasSubstr("GNTST_bad_gntref"));
  // Never granted (flags 0).
  result = grants.MapOne(kGuest, 7, false);
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(result.status().message(), HasSubstr("GNTST_general_error"));
  // Granted to another domain.
  ASSERT_TRUE(xen_.guest->GrantAccess(8, 2, 1, false).ok());
  result = grants.MapOne(kGuest, 8, false);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(StatusToErrno(result.status()), EINVAL);
  // A hostile guest names a frame outside its memory.
  ASSERT_TRUE(xen_.guest->GrantAccess(9, 0, 1, false).ok());
  xen_.guest->RawEntry(9)->frame = kGuestPages;
  result = grants.MapOne(kGuest, 9, false);
  ASSERT_FALSE(result.ok());
  EXPECT_THAT(result.status().message(), HasSubstr("GNTST_bad_page"));
  EXPECT_EQ(xen_.guest->EntryFlags(9) & (GTF_reading | GTF_writing), 0);
  // Sub-page and transitive grants are not mappable.
  ASSERT_TRUE(xen_.guest->GrantAccess(10, 0, 1, false).ok());
  xen_.guest->RawEntry(10)->flags = GTF_permit_access | GTF_sub_page;
  EXPECT_FALSE(grants.MapOne(kGuest, 10, false).ok());
  xen_.guest->RawEntry(10)->flags = GTF_transitive;
  EXPECT_FALSE(grants.MapOne(kGuest, 10, false).ok());
  // Unknown domain.
  result = grants.MapOne(42, 0, false);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(StatusToErrno(result.status()), ENOENT);  // ESRCH from the hypervisor
}

TEST_F(EmulatedPlatformTest, MultiRefMapIsAllOrNothingAndContiguous) {
  for (GrantRef ref = 0; ref < 3; ++ref) {
    ASSERT_TRUE(xen_.guest->GrantAccess(ref, 0, 10 + ref, false).ok());
    xen_.guest->Page(10 + ref)[0] = std::byte{static_cast<uint8_t>(ref + 1)};
  }
  std::vector<GrantRef> refs = {0, 1, 2, 20};  // 20 was never granted
  auto failed = xen_.dom0->grant_table().Map(kGuest, refs, true);
  ASSERT_FALSE(failed.ok());
  for (GrantRef ref = 0; ref < 3; ++ref) {
    EXPECT_EQ(xen_.guest->EntryFlags(ref) & (GTF_reading | GTF_writing), 0) << ref;
  }
  refs.pop_back();
  auto mapping = xen_.dom0->grant_table().Map(kGuest, refs, true);
  ASSERT_TRUE(mapping.ok()) << mapping.status();
  ASSERT_EQ((*mapping)->size(), 3 * kXenPageSize);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ((*mapping)->page(i)[0], std::byte(i + 1));
  // Two mappings of one grant: flags stay until the last one goes.
  auto second = xen_.dom0->grant_table().MapOne(kGuest, 1, false);
  ASSERT_TRUE(second.ok());
  mapping->reset();  // destruction unmaps
  EXPECT_EQ(xen_.guest->EntryFlags(0) & GTF_reading, 0);
  EXPECT_EQ(xen_.guest->EntryFlags(1) & (GTF_reading | GTF_writing), GTF_reading);
  second->reset();
  EXPECT_EQ(xen_.guest->EntryFlags(1) & GTF_reading, 0);
}

TEST_F(EmulatedPlatformTest, MaxGrantsBoundsMappedPages) {
  auto& grants = xen_.dom0->grant_table();
  ASSERT_TRUE(grants.SetMaxGrants(2).ok());
  EXPECT_EQ(grants.MaxGrants(), 2u);
  for (GrantRef ref = 0; ref < 3; ++ref)
    ASSERT_TRUE(xen_.guest->GrantAccess(ref, 0, ref, false).ok());
  std::vector<GrantRef> three = {0, 1, 2};
  EXPECT_EQ(StatusToErrno(grants.Map(kGuest, three, false).status()), EINVAL);
  auto first = grants.MapOne(kGuest, 0, false);
  auto second = grants.MapOne(kGuest, 1, false);
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(second.ok());
  EXPECT_FALSE(grants.MapOne(kGuest, 2, false).ok());
  first->reset();
  EXPECT_TRUE(grants.MapOne(kGuest, 2, false).ok());
}

TEST_F(EmulatedPlatformTest, GrantCopyBothWaysWithPerSegmentStatus) {
  ASSERT_TRUE(xen_.guest->GrantAccess(1, 0, 20, false).ok());
  ASSERT_TRUE(xen_.guest->GrantAccess(2, 0, 21, /*readonly=*/true).ok());
  std::memcpy(xen_.guest->Page(20).data() + 100, "from-guest", 10);

  char in[10] = {};
  char out[] = "to-guest!";
  char spare[8] = {};
  std::vector<GrantCopySegment> segments = {
      {GrantCopySegment::Direction::kFromGrant, kGuest, 1, 100, 10, in, 1},
      {GrantCopySegment::Direction::kToGrant, kGuest, 1, 4000, 9, out, 1},
      {GrantCopySegment::Direction::kToGrant, kGuest, 1, 4090, 8, spare, 1},  // crosses the page
      {GrantCopySegment::Direction::kToGrant, kGuest, 2, 0, 8, spare, 1},     // read-only grant
      {GrantCopySegment::Direction::kFromGrant, kGuest, 99, 0, 8, spare, 1},  // bad ref
  };
  ASSERT_TRUE(xen_.dom0->grant_table().Copy(segments).ok());
  EXPECT_EQ(segments[0].status, GNTST_okay);
  EXPECT_EQ(std::string(in, 10), "from-guest");
  EXPECT_EQ(segments[1].status, GNTST_okay);
  EXPECT_EQ(std::memcmp(xen_.guest->Page(20).data() + 4000, "to-guest!", 9), 0);
  EXPECT_EQ(segments[2].status, GNTST_bad_copy_arg);
  EXPECT_EQ(segments[3].status, GNTST_general_error);
  EXPECT_EQ(segments[4].status, GNTST_bad_gntref);
  EXPECT_EQ(xen_.guest->EntryFlags(1) & (GTF_reading | GTF_writing), 0);  // copy pins are released
}

TEST_F(EmulatedPlatformTest, GuestCannotMapOrReadOtherDomainsMemory) {
  ASSERT_TRUE(xen_.host->StopThread().ok());  // CreateDomain runs on the loop thread only
  ASSERT_TRUE(xen_.host->CreateDomain(2, 8, 8).ok());
  xen_.host->StartThread();
  auto mapping = xen_.guest_platform->grant_table().MapOne(2, 0, false);
  ASSERT_FALSE(mapping.ok());
  EXPECT_EQ(StatusToErrno(mapping.status()), EACCES);  // EPERM from the hypervisor
}

TEST_F(EmulatedPlatformTest, EventChannelsNotifyBothWays) {
  auto unbound = xen_.guest_platform->AllocUnbound(0);
  ASSERT_TRUE(unbound.ok()) << unbound.status();
  std::unique_ptr<EventChannel> frontend = std::move(*unbound);

  // Only the domain the port is offered to may bind it, and only once.
  EXPECT_EQ(
      StatusToErrno(xen_.dom0->BindInterdomain(kGuest, frontend->local_port() + 100).status()),
      EINVAL);
  auto bound = xen_.dom0->BindInterdomain(kGuest, frontend->local_port());
  ASSERT_TRUE(bound.ok()) << bound.status();
  std::unique_ptr<EventChannel> backend = std::move(*bound);
  EXPECT_EQ(StatusToErrno(xen_.dom0->BindInterdomain(kGuest, frontend->local_port()).status()),
            EINVAL);

  EXPECT_FALSE(IsReadable(backend->ReadinessFd()));
  ASSERT_TRUE(frontend->Notify().ok());
  ASSERT_TRUE(WaitReadable(backend->ReadinessFd()));
  EXPECT_FALSE(IsReadable(frontend->ReadinessFd()));  // notifications go to the other end
  EXPECT_EQ(backend->Ack().value_or(false), true);
  EXPECT_EQ(backend->Ack().value_or(true), false);
  EXPECT_FALSE(IsReadable(backend->ReadinessFd()));

  ASSERT_TRUE(backend->Notify().ok());
  ASSERT_TRUE(backend->Notify().ok());  // coalesced, like a pending bit
  ASSERT_TRUE(WaitReadable(frontend->ReadinessFd()));
  EXPECT_EQ(frontend->Ack().value_or(false), true);
  EXPECT_EQ(frontend->Ack().value_or(true), false);

  // When the backend closes, the frontend's port is unbound again and can be re-bound.
  uint32_t port = frontend->local_port();
  backend.reset();
  auto rebound = xen_.dom0->BindInterdomain(kGuest, port);
  ASSERT_TRUE(rebound.ok()) << rebound.status();
  ASSERT_TRUE((*rebound)->Notify().ok());
  EXPECT_TRUE(WaitReadable(frontend->ReadinessFd()));
}

TEST_F(EmulatedPlatformTest, XenStoreThroughThePlatform) {
  auto& store = xen_.dom0->xenstore();
  ASSERT_TRUE(store.Write("/backend/vbd/1/51712/state", "2", common::xen::kNoTransaction).ok());
  EXPECT_EQ(store.Read("/backend/vbd/1/51712/state", common::xen::kNoTransaction).value_or(""),
            "2");
  EXPECT_THAT(store.Directory("/backend/vbd/1", common::xen::kNoTransaction)
                  .value_or(std::vector<std::string>{}),
              ElementsAre("51712"));
  EXPECT_EQ(StatusToErrno(store.Read("/nope", common::xen::kNoTransaction).status()), ENOENT);
  ASSERT_TRUE(store.Mkdir("/backend/empty", common::xen::kNoTransaction).ok());
  ASSERT_TRUE(store.Remove("/backend/empty", common::xen::kNoTransaction).ok());

  std::vector<XenStorePermission> perms = {{0, XenStorePermission::Access::kNone},
                                           {kGuest, XenStorePermission::Access::kRead}};
  ASSERT_TRUE(
      store.SetPermissions("/backend/vbd/1/51712/state", perms, common::xen::kNoTransaction).ok());
  EXPECT_EQ(store.GetPermissions("/backend/vbd/1/51712/state", common::xen::kNoTransaction)
                .value_or(std::vector<XenStorePermission>{}),
            perms);
  // The guest reads it, cannot write it; writes its own keys by relative path.
  auto& guest_store = xen_.guest_platform->xenstore();
  EXPECT_EQ(
      guest_store.Read("/backend/vbd/1/51712/state", common::xen::kNoTransaction).value_or(""),
      "2");
  EXPECT_EQ(StatusToErrno(
                guest_store.Write("/backend/vbd/1/51712/state", "5", common::xen::kNoTransaction)),
            EACCES);
  ASSERT_TRUE(guest_store.Write("device/vbd/51712/state", "1", common::xen::kNoTransaction).ok());
  EXPECT_EQ(store.Read("/local/domain/1/device/vbd/51712/state", common::xen::kNoTransaction)
                .value_or(""),
            "1");

  // Watches: registration event, then changes, read through the readiness fd.
  ASSERT_TRUE(store.Watch("/local/domain/1/device", "fe").ok());
  std::vector<XenStoreWatchEvent> events;
  while (events.empty()) {
    ASSERT_TRUE(WaitReadable(store.WatchFd()));
    auto batch = store.ReadWatchEvents();
    ASSERT_TRUE(batch.ok());
    events.insert(events.end(), batch->begin(), batch->end());
  }
  EXPECT_EQ(events[0], (XenStoreWatchEvent{"/local/domain/1/device", "fe"}));
  ASSERT_TRUE(guest_store.Write("device/vbd/51712/state", "3", common::xen::kNoTransaction).ok());
  events.clear();
  while (events.empty()) {
    ASSERT_TRUE(WaitReadable(store.WatchFd()));
    auto batch = store.ReadWatchEvents();
    ASSERT_TRUE(batch.ok());
    events.insert(events.end(), batch->begin(), batch->end());
  }
  EXPECT_EQ(events[0], (XenStoreWatchEvent{"/local/domain/1/device/vbd/51712/state", "fe"}));
  ASSERT_TRUE(store.Unwatch("/local/domain/1/device", "fe").ok());
}

TEST_F(EmulatedPlatformTest, RunTransactionRetriesOnConflict) {
  auto& store = xen_.dom0->xenstore();
  ASSERT_TRUE(store.Write("/counter", "0", common::xen::kNoTransaction).ok());
  auto other = CreateEmulatedXenPlatform(EmulatedXenOptions{dir_.path(), 0});
  ASSERT_TRUE(other.ok());
  int attempts = 0;
  absl::Status status = store.RunTransaction([&](common::xen::TransactionId tx) -> absl::Status {
    ++attempts;
    auto value = store.Read("/counter", tx);
    if (!value.ok()) return value.status();
    if (attempts == 1) {  // someone else commits in between, once
      absl::Status interfering =
          (*other)->xenstore().Write("/counter", "10", common::xen::kNoTransaction);
      if (!interfering.ok()) return interfering;
    }
    return store.Write("/counter", std::to_string(std::stoi(*value) + 1), tx);
  });
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_EQ(attempts, 2);
  EXPECT_EQ(store.Read("/counter", common::xen::kNoTransaction).value_or(""), "11");

  // A body error aborts and is returned as is.
  status = store.RunTransaction([&](common::xen::TransactionId tx) -> absl::Status {
    (void)store.Write("/counter", "99", tx);
    return absl::CancelledError("changed my mind");
  });
  EXPECT_TRUE(absl::IsCancelled(status));
  EXPECT_EQ(store.Read("/counter", common::xen::kNoTransaction).value_or(""), "11");
}

TEST_F(EmulatedPlatformTest, DomainLifecycleOverTheHypervisorSocket) {
  auto& store = xen_.dom0->xenstore();
  ASSERT_TRUE(store.Watch("@releaseDomain", "rel").ok());
  ASSERT_TRUE(WaitReadable(store.WatchFd()));
  ASSERT_TRUE(store.ReadWatchEvents().ok());  // the registration event

  EXPECT_TRUE(absl::IsInvalidArgument(CreateGuestDomain(dir_.path(), 5, 0, 8)));
  ASSERT_TRUE(CreateGuestDomain(dir_.path(), 5, 8, 8).ok());
  EXPECT_TRUE(absl::IsAlreadyExists(CreateGuestDomain(dir_.path(), 5, 8, 8)));
  EXPECT_EQ(store.Read("/local/domain/5/domid", common::xen::kNoTransaction).value_or(""), "5");
  auto guest = GuestDomain::Connect(dir_.path(), 5);
  ASSERT_TRUE(guest.ok()) << guest.status();
  EXPECT_EQ((*guest)->pages(), 8u);
  auto guest_store = CreateEmulatedXenPlatform(EmulatedXenOptions{dir_.path(), 5});
  ASSERT_TRUE(guest_store.ok()) << guest_store.status();

  ASSERT_TRUE(DestroyGuestDomain(dir_.path(), 5).ok());
  std::vector<XenStoreWatchEvent> events;
  while (events.empty()) {
    ASSERT_TRUE(WaitReadable(store.WatchFd()));
    auto batch = store.ReadWatchEvents();
    ASSERT_TRUE(batch.ok());
    events = *batch;
  }
  EXPECT_EQ(events[0], (XenStoreWatchEvent{"@releaseDomain", "rel"}));
  EXPECT_FALSE(GuestDomain::Connect(dir_.path(), 5).ok());
  EXPECT_NE(access((dir_.path() + "/xenstored.5").c_str(), F_OK), 0);
  // The released guest's xenstore connection was closed.
  EXPECT_FALSE((*guest_store)->xenstore().Read("domid", common::xen::kNoTransaction).ok());
  EXPECT_TRUE(absl::IsNotFound(DestroyGuestDomain(dir_.path(), 5)));
  // Memory a guest already mapped stays valid after its domain is gone.
  (*guest)->Page(0)[0] = std::byte{1};
}

TEST_F(EmulatedPlatformTest, DomainIdReuseDoesNotMapTheOldDomain) {
  ASSERT_TRUE(CreateGuestDomain(dir_.path(), 6, 8, 8).ok());
  {
    auto old_guest = GuestDomain::Connect(dir_.path(), 6);
    ASSERT_TRUE(old_guest.ok());
    std::memcpy((*old_guest)->Page(2).data(), "old", 3);
    ASSERT_TRUE((*old_guest)->GrantAccess(1, 0, 2, false).ok());
    auto mapping = xen_.dom0->grant_table().MapOne(6, 1, false);
    ASSERT_TRUE(mapping.ok());
    ASSERT_TRUE(DestroyGuestDomain(dir_.path(), 6).ok());
    // A mapping made before the destruction stays readable, as on Xen until unmapped.
    EXPECT_EQ(std::memcmp((*mapping)->data(), "old", 3), 0);
  }
  EXPECT_FALSE(xen_.dom0->grant_table().MapOne(6, 1, false).ok());  // no such domain now
  ASSERT_TRUE(CreateGuestDomain(dir_.path(), 6, 8, 8).ok());
  auto new_guest = GuestDomain::Connect(dir_.path(), 6);
  ASSERT_TRUE(new_guest.ok());
  std::memcpy((*new_guest)->Page(3).data(), "new", 3);
  ASSERT_TRUE((*new_guest)->GrantAccess(1, 0, 3, false).ok());
  auto mapping = xen_.dom0->grant_table().MapOne(6, 1, false);
  ASSERT_TRUE(mapping.ok()) << mapping.status();
  EXPECT_EQ(std::memcmp((*mapping)->data(), "new", 3), 0);
}

// Raw requests on the hypervisor sockets: malformed datagrams and requests a domain may not make.
class HypervisorSocketTest : public EmulatedPlatformTest {
 protected:
  common::UniqueFd Connect(const std::string& path) {
    common::UniqueFd fd(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    EXPECT_EQ(connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    return fd;
  }
  // Sends raw bytes, returns the reply's error (or -1 if no well-formed reply came).
  int Call(int fd, const void* data, size_t size) {
    if (send(fd, data, size, MSG_NOSIGNAL) != static_cast<ssize_t>(size)) return -1;
    if (!WaitReadable(fd)) return -1;
    common::xen::emulated::HypervisorReply reply;
    if (recv(fd, &reply, sizeof(reply), 0) != static_cast<ssize_t>(sizeof(reply))) return -1;
    return reply.error;
  }
  int Call(int fd, common::xen::emulated::HypervisorOp op, uint32_t domid, uint32_t arg0 = 0,
           uint32_t arg1 = 0) {
    common::xen::emulated::HypervisorRequest request;
    request.op = op;
    request.domid = domid;
    request.arg0 = arg0;
    request.arg1 = arg1;
    return Call(fd, &request, sizeof(request));
  }
  // kGrantPin / kGrantUnpin of `refs` granted by kGuest; returns the reply's error.
  int GrantCall(int fd, common::xen::emulated::HypervisorOp op, std::vector<uint32_t> refs,
                bool readonly) {
    common::xen::emulated::GrantBatchRequest request;
    request.header.op = op;
    request.header.domid = kGuest;
    request.header.arg0 = static_cast<uint32_t>(refs.size());
    request.header.arg1 = readonly ? common::xen::emulated::kGrantReadonly : 0;
    std::copy(refs.begin(), refs.end(), request.refs);
    const size_t size = sizeof(request.header) + refs.size() * sizeof(uint32_t);
    if (send(fd, &request, size, MSG_NOSIGNAL) != static_cast<ssize_t>(size)) return -1;
    if (!WaitReadable(fd)) return -1;
    common::xen::emulated::GrantBatchReply reply;
    if (recv(fd, &reply, sizeof(reply), 0) < static_cast<ssize_t>(sizeof(reply.header))) return -1;
    return reply.header.error;
  }
  // Waits (the host notices a hang-up on its own thread) until `ref`'s in-use flags are `flags`.
  bool WaitForInUseFlags(GrantRef ref, uint16_t flags) {
    for (int attempt = 0; attempt < 500; ++attempt) {
      if ((xen_.guest->EntryFlags(ref) & (GTF_reading | GTF_writing)) == flags) return true;
      usleep(10000);
    }
    return false;
  }
};

TEST_F(HypervisorSocketTest, MalformedRequestsGetEinvalAndTheHostSurvives) {
  using common::xen::emulated::HypervisorOp;
  common::UniqueFd fd = Connect(xen_.host->HypervisorSocket(0));
  char short_request[3] = {1, 2, 3};
  EXPECT_EQ(Call(fd.get(), short_request, sizeof(short_request)), EINVAL);
  common::xen::emulated::HypervisorRequest bad_magic;
  bad_magic.magic = 0;
  EXPECT_EQ(Call(fd.get(), &bad_magic, sizeof(bad_magic)), EINVAL);
  EXPECT_EQ(Call(fd.get(), static_cast<HypervisorOp>(77), 1), EINVAL);
  EXPECT_EQ(Call(fd.get(), HypervisorOp::kGetDomainMemory, 0x10000), EINVAL);
  EXPECT_EQ(Call(fd.get(), HypervisorOp::kGetDomainMemory, 9), ESRCH);
  EXPECT_EQ(Call(fd.get(), HypervisorOp::kCreateDomain, 0, 8, 8), EINVAL);         // dom0
  EXPECT_EQ(Call(fd.get(), HypervisorOp::kCreateDomain, 9, 1u << 30, 8), EINVAL);  // too big
  EXPECT_EQ(Call(fd.get(), HypervisorOp::kEvtchnClose, 0, 12345), EINVAL);
  EXPECT_EQ(Call(fd.get(), HypervisorOp::kEvtchnBindInterdomain, 9, 1), ESRCH);
  // Still serving.
  EXPECT_EQ(Call(fd.get(), HypervisorOp::kGetDomainMemory, kGuest), 0);
}

TEST_F(HypervisorSocketTest, GuestsAreConfinedToThemselves) {
  using common::xen::emulated::HypervisorOp;
  common::UniqueFd fd = Connect(xen_.host->HypervisorSocket(kGuest));
  EXPECT_EQ(Call(fd.get(), HypervisorOp::kCreateDomain, 7, 8, 8), EPERM);
  EXPECT_EQ(Call(fd.get(), HypervisorOp::kDestroyDomain, kGuest), EPERM);
  EXPECT_EQ(Call(fd.get(), HypervisorOp::kGetDomainMemory, 0), EPERM);
  // A port offered to dom0 cannot be bound by another guest.
  auto offered = xen_.guest_platform->AllocUnbound(0);
  ASSERT_TRUE(offered.ok());
  ASSERT_TRUE(xen_.host->StopThread().ok());
  ASSERT_TRUE(xen_.host->CreateDomain(3, 8, 8).ok());
  xen_.host->StartThread();
  auto intruder = CreateEmulatedXenPlatform(EmulatedXenOptions{dir_.path(), 3});
  ASSERT_TRUE(intruder.ok()) << intruder.status();
  EXPECT_EQ(StatusToErrno((*intruder)->BindInterdomain(kGuest, (*offered)->local_port()).status()),
            EINVAL);
  EXPECT_TRUE(xen_.dom0->BindInterdomain(kGuest, (*offered)->local_port()).ok());
}

// A backend process that dies (kill -9) never closes its event channels; on Xen the kernel's
// evtchn driver closes them when the process's file is released, so the guest's port is offered
// again and the next backend process can bind it. The emulated host does the same when the dead
// process's hypervisor connection goes away.
TEST_F(HypervisorSocketTest, PortsOfAConnectionThatGoesAwayAreClosed) {
  using common::xen::emulated::HypervisorOp;
  auto offered = xen_.guest_platform->AllocUnbound(0);
  ASSERT_TRUE(offered.ok()) << offered.status();
  const uint32_t port = (*offered)->local_port();
  {
    common::UniqueFd dying = Connect(xen_.host->HypervisorSocket(0));
    ASSERT_EQ(Call(dying.get(), HypervisorOp::kEvtchnBindInterdomain, kGuest, port), 0);
    EXPECT_EQ(StatusToErrno(xen_.dom0->BindInterdomain(kGuest, port).status()), EINVAL);  // taken
  }  // the connection closes without EvtchnClose
  absl::StatusOr<std::unique_ptr<EventChannel>> rebound = absl::UnknownError("not tried");
  for (int attempt = 0; attempt < 500 && !rebound.ok(); ++attempt) {
    rebound = xen_.dom0->BindInterdomain(kGuest, port);
    if (!rebound.ok()) usleep(10000);  // the host notices the hang-up on its own thread
  }
  ASSERT_TRUE(rebound.ok()) << rebound.status();
  ASSERT_TRUE((*rebound)->Notify().ok());
  EXPECT_TRUE(WaitReadable((*offered)->ReadinessFd()));
}

// On Xen, gntdev unmaps everything a process mapped when its file is released (the process died):
// the pins go and GTF_reading/GTF_writing are cleared where no other mapping needs them. The
// emulated host records each pin against the connection that made it and does the same when the
// connection goes away; no connection can release another's pins.
TEST_F(HypervisorSocketTest, PinsOfAConnectionThatGoesAwayAreReleased) {
  using common::xen::emulated::HypervisorOp;
  ASSERT_TRUE(xen_.guest->GrantAccess(3, 0, 5, /*readonly=*/false).ok());
  ASSERT_TRUE(xen_.guest->GrantAccess(4, 0, 6, /*readonly=*/true).ok());
  // Another backend process keeps a read-only mapping of ref 3 throughout.
  auto survivor = xen_.dom0->grant_table().MapOne(kGuest, 3, /*writable=*/false);
  ASSERT_TRUE(survivor.ok()) << survivor.status();

  common::UniqueFd dying = Connect(xen_.host->HypervisorSocket(0));
  ASSERT_EQ(GrantCall(dying.get(), HypervisorOp::kGrantPin, {3, 3}, /*readonly=*/false), 0);
  ASSERT_EQ(GrantCall(dying.get(), HypervisorOp::kGrantPin, {4}, /*readonly=*/true), 0);
  EXPECT_EQ(xen_.guest->EntryFlags(3) & (GTF_reading | GTF_writing), GTF_reading | GTF_writing);
  EXPECT_EQ(xen_.guest->EntryFlags(4) & (GTF_reading | GTF_writing), GTF_reading);

  // A third connection cannot release pins it does not hold, nor can the first release more
  // than it holds or with the other access mode; nothing changes.
  common::UniqueFd other = Connect(xen_.host->HypervisorSocket(0));
  EXPECT_EQ(GrantCall(other.get(), HypervisorOp::kGrantUnpin, {3}, false), EINVAL);
  EXPECT_EQ(GrantCall(other.get(), HypervisorOp::kGrantUnpin, {4}, true), EINVAL);
  EXPECT_EQ(GrantCall(dying.get(), HypervisorOp::kGrantUnpin, {3, 3, 3}, false), EINVAL);
  EXPECT_EQ(GrantCall(dying.get(), HypervisorOp::kGrantUnpin, {4}, false), EINVAL);
  EXPECT_EQ(xen_.guest->EntryFlags(3) & (GTF_reading | GTF_writing), GTF_reading | GTF_writing);
  EXPECT_FALSE(xen_.guest->EndAccess(4));
  // Its own pins it may release, one of the two writable ones here.
  EXPECT_EQ(GrantCall(dying.get(), HypervisorOp::kGrantUnpin, {3}, false), 0);
  EXPECT_EQ(xen_.guest->EntryFlags(3) & (GTF_reading | GTF_writing), GTF_reading | GTF_writing);
  // Malformed batches and guests are refused.
  EXPECT_EQ(GrantCall(other.get(), HypervisorOp::kGrantPin, {}, false), EINVAL);
  common::xen::emulated::HypervisorRequest lying;  // announces 2 refs, carries none
  lying.op = HypervisorOp::kGrantPin;
  lying.domid = kGuest;
  lying.arg0 = 2;
  EXPECT_EQ(Call(other.get(), &lying, sizeof(lying)), EINVAL);
  common::UniqueFd guest_socket = Connect(xen_.host->HypervisorSocket(kGuest));
  EXPECT_EQ(GrantCall(guest_socket.get(), HypervisorOp::kGrantPin, {3}, true), EPERM);

  dying.Reset();                                   // the process dies holding its pins
  ASSERT_TRUE(WaitForInUseFlags(3, GTF_reading));  // the survivor's read pin stays
  ASSERT_TRUE(WaitForInUseFlags(4, 0));
  EXPECT_TRUE(xen_.guest->EndAccess(4));
  EXPECT_FALSE(xen_.guest->EndAccess(3));
  ASSERT_TRUE((*survivor)->Unmap().ok());
  EXPECT_EQ(xen_.guest->EntryFlags(3) & (GTF_reading | GTF_writing), 0);
  EXPECT_TRUE(xen_.guest->EndAccess(3));
}

TEST(HostPlatformTest, FailsClearlyWithoutDevXen) {
  auto platform = common::xen::CreateHostXenPlatformAt("/nonexistent/dev/xen");
  ASSERT_FALSE(platform.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(platform.status()));
  EXPECT_THAT(platform.status().message(), HasSubstr("/nonexistent/dev/xen is absent"));
  EXPECT_THAT(platform.status().message(), HasSubstr("emulated"));
  if (access("/dev/xen", F_OK) != 0) {
    auto real = common::xen::CreateHostXenPlatform();
    ASSERT_FALSE(real.ok());
    EXPECT_THAT(real.status().message(), HasSubstr("/dev/xen is absent"));
  }
}

TEST(EmulatedPlatformCreateTest, FailsWhenTheHostIsNotRunning) {
  TempDir dir;
  auto platform = CreateEmulatedXenPlatform(EmulatedXenOptions{dir.path(), 0});
  ASSERT_FALSE(platform.ok());
  EXPECT_THAT(platform.status().message(), HasSubstr("emulated hypervisor"));
}

// The daemon itself: started as tests and the demo start it.
TEST(XenHostDaemonTest, StartsServesAndStopsOnSigterm) {
  TempDir dir;
  int out[2];
  ASSERT_EQ(pipe2(out, O_CLOEXEC), 0);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], 1);
  std::string binary = BP_XENHOST_PATH;
  std::vector<std::string> args = {binary,   "--run-dir",   dir.path(), "--domain",
                                   "3:16:8", "--log-level", "warning"};
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  ASSERT_EQ(posix_spawn(&pid, binary.c_str(), &actions, nullptr, argv.data(), environ), 0);
  posix_spawn_file_actions_destroy(&actions);
  close(out[1]);

  std::string banner;
  while (banner.find('\n') == std::string::npos) {
    ASSERT_TRUE(WaitReadable(out[0], 10000)) << "no READY line";
    char buffer[256];
    ssize_t got = read(out[0], buffer, sizeof(buffer));
    ASSERT_GT(got, 0);
    banner.append(buffer, static_cast<size_t>(got));
  }
  close(out[0]);
  EXPECT_EQ(banner, "READY " + dir.path() + "\n");

  {
    auto dom0 = CreateEmulatedXenPlatform(EmulatedXenOptions{dir.path(), 0});
    ASSERT_TRUE(dom0.ok()) << dom0.status();
    EXPECT_EQ((*dom0)->xenstore().Read("/local/domain/3/domid", 0).value_or(""), "3");
    auto guest = GuestDomain::Connect(dir.path(), 3);
    ASSERT_TRUE(guest.ok()) << guest.status();
    EXPECT_EQ((*guest)->pages(), 16u);
    EXPECT_EQ((*guest)->grant_entries(), 8u);
    ASSERT_TRUE((*guest)->GrantAccess(7, 0, 15, false).ok());
    std::memcpy((*guest)->Page(15).data(), "daemon", 6);
    auto mapping = (*dom0)->grant_table().MapOne(3, 7, false);
    ASSERT_TRUE(mapping.ok()) << mapping.status();
    EXPECT_EQ(std::memcmp((*mapping)->data(), "daemon", 6), 0);
    CommandResult ls =
        RunXenstoreTool({"xenstore-ls", "/local/domain/3"}, dir.path() + "/xenstored");
    EXPECT_EQ(ls.out, "domid = \"3\"\n");
  }

  ASSERT_EQ(kill(pid, SIGTERM), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_NE(access((dir.path() + "/xenstored").c_str(), F_OK), 0);  // sockets cleaned up
}

}  // namespace
}  // namespace blockplane::harness
