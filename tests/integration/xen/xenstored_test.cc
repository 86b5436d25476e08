// The emulated xenstored driven by the real libxenstore, the real xenstore-* tools, and raw
// xs_wire messages.

#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <xen/io/xs_wire.h>
extern "C" {
#include <xenstore.h>
}

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/harness/xen/test_support.h"
#include "tests/harness/xen/xen_host.h"

namespace blockplane::harness {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

struct XsCloser {
  void operator()(xs_handle* handle) const { xs_close(handle); }
};
using XsHandle = std::unique_ptr<xs_handle, XsCloser>;

XsHandle OpenXs(const std::string& socket_path) {
  setenv("XENSTORED_PATH", socket_path.c_str(), 1);
  XsHandle handle(xs_open(XS_OPEN_SOCKETONLY));
  unsetenv("XENSTORED_PATH");
  return handle;
}

std::string ReadString(xs_handle* handle, const std::string& path, xs_transaction_t tx = XBT_NULL) {
  unsigned int len = 0;
  char* value = static_cast<char*>(xs_read(handle, tx, path.c_str(), &len));
  if (!value) return "<errno " + std::string(strerrorname_np(errno)) + ">";
  std::string result(value, len);
  free(value);
  return result;
}

int ReadErrno(xs_handle* handle, const std::string& path) {
  unsigned int len = 0;
  errno = 0;
  void* value = xs_read(handle, XBT_NULL, path.c_str(), &len);
  if (value) {
    free(value);
    return 0;
  }
  return errno;
}

bool Write(xs_handle* handle, const std::string& path, const std::string& value,
           xs_transaction_t tx = XBT_NULL) {
  return xs_write(handle, tx, path.c_str(), value.data(), value.size());
}

std::vector<std::string> Directory(xs_handle* handle, const std::string& path) {
  unsigned int num = 0;
  char** entries = xs_directory(handle, XBT_NULL, path.c_str(), &num);
  std::vector<std::string> result;
  if (!entries) return result;
  for (unsigned int i = 0; i < num; ++i) result.emplace_back(entries[i]);
  free(entries);
  return result;
}

// Waits (bounded) for the next watch event on `handle`; returns "path|token" or "<timeout>".
std::string NextWatchEvent(xs_handle* handle, int timeout_ms = 5000) {
  while (true) {
    if (char** event = xs_check_watch(handle)) {
      std::string result = std::string(event[XS_WATCH_PATH]) + "|" + event[XS_WATCH_TOKEN];
      free(event);
      return result;
    }
    pollfd pfd{xs_fileno(handle), POLLIN, 0};
    if (poll(&pfd, 1, timeout_ms) <= 0) return "<timeout>";
  }
}

class XenstoredTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    auto host = XenHost::Create(XenHostOptions{dir_.path()});
    ASSERT_TRUE(host.ok()) << host.status();
    host_ = std::move(*host);
    host_->StartThread();
    dom0_ = OpenXs(host_->XenstoredSocket(0));
    ASSERT_TRUE(dom0_);
  }
  void TearDown() override {
    dom0_.reset();
    if (host_) {
      EXPECT_TRUE(host_->StopThread().ok());
    }
  }

  // Introduces `domid` through the wire (as a toolstack would) and connects as that guest.
  XsHandle IntroduceAndConnect(unsigned domid) {
    EXPECT_TRUE(xs_introduce_domain(dom0_.get(), domid, 0, 0));
    return OpenXs(host_->XenstoredSocket(domid));
  }

  TempDir dir_;
  std::unique_ptr<XenHost> host_;
  XsHandle dom0_;
};

TEST_F(XenstoredTest, ReadWriteDirectoryAndMissingNodes) {
  ASSERT_TRUE(Write(dom0_.get(), "/vm/1/name", "guest-one"));
  ASSERT_TRUE(Write(dom0_.get(), "/vm/1/uuid", "1234"));
  EXPECT_EQ(ReadString(dom0_.get(), "/vm/1/name"), "guest-one");
  EXPECT_EQ(ReadString(dom0_.get(), "/vm/1"), "");  // implicitly created parent
  EXPECT_THAT(Directory(dom0_.get(), "/vm/1"), UnorderedElementsAre("name", "uuid"));
  EXPECT_EQ(ReadErrno(dom0_.get(), "/vm/2"), ENOENT);
  EXPECT_EQ(ReadErrno(dom0_.get(), "/vm//bad"), EINVAL);
  // Values are bytes, not strings.
  std::string binary("a\0b", 3);
  ASSERT_TRUE(Write(dom0_.get(), "/vm/1/blob", binary));
  EXPECT_EQ(ReadString(dom0_.get(), "/vm/1/blob"), binary);

  ASSERT_TRUE(xs_mkdir(dom0_.get(), XBT_NULL, "/vm/1/empty"));
  EXPECT_TRUE(Directory(dom0_.get(), "/vm/1/empty").empty());
  ASSERT_TRUE(xs_rm(dom0_.get(), XBT_NULL, "/vm/1"));
  EXPECT_EQ(ReadErrno(dom0_.get(), "/vm/1/name"), ENOENT);
  EXPECT_TRUE(xs_rm(dom0_.get(), XBT_NULL, "/vm/1"));  // parent exists: fine, like xenstored
  errno = 0;
  EXPECT_FALSE(xs_rm(dom0_.get(), XBT_NULL, "/nope/deeper"));
  EXPECT_EQ(errno, ENOENT);
}

TEST_F(XenstoredTest, PermissionsRoundTrip) {
  ASSERT_TRUE(Write(dom0_.get(), "/shared/key", "v"));
  unsigned int num = 0;
  xs_permissions* perms = xs_get_permissions(dom0_.get(), XBT_NULL, "/shared/key", &num);
  ASSERT_NE(perms, nullptr);
  ASSERT_EQ(num, 1u);
  EXPECT_EQ(perms[0].id, 0u);
  EXPECT_EQ(perms[0].perms, XS_PERM_NONE);
  free(perms);

  xs_permissions wanted[2] = {{3, XS_PERM_NONE}, {5, XS_PERM_READ | XS_PERM_WRITE}};
  ASSERT_TRUE(xs_set_permissions(dom0_.get(), XBT_NULL, "/shared/key", wanted, 2));
  perms = xs_get_permissions(dom0_.get(), XBT_NULL, "/shared/key", &num);
  ASSERT_NE(perms, nullptr);
  ASSERT_EQ(num, 2u);
  EXPECT_EQ(perms[0].id, 3u);
  EXPECT_EQ(perms[1].id, 5u);
  EXPECT_EQ(perms[1].perms, static_cast<unsigned>(XS_PERM_READ | XS_PERM_WRITE));
  free(perms);
}

TEST_F(XenstoredTest, WatchFiresOnRegistrationThenOnChangesBelowThePath) {
  ASSERT_TRUE(Write(dom0_.get(), "/watched/a", "1"));
  ASSERT_GE(xs_fileno(dom0_.get()), 0);
  ASSERT_TRUE(xs_watch(dom0_.get(), "/watched", "tok"));
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "/watched|tok");

  ASSERT_TRUE(Write(dom0_.get(), "/elsewhere", "x"));  // must not fire
  ASSERT_TRUE(Write(dom0_.get(), "/watchedX", "x"));   // sibling with the same prefix: no event
  ASSERT_TRUE(Write(dom0_.get(), "/watched/b/c", "2"));
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "/watched/b|tok");  // created parent
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "/watched/b/c|tok");
  ASSERT_TRUE(xs_rm(dom0_.get(), XBT_NULL, "/watched/a"));
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "/watched/a|tok");

  ASSERT_TRUE(xs_unwatch(dom0_.get(), "/watched", "tok"));
  ASSERT_TRUE(xs_watch(dom0_.get(), "/marker", "m"));
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "/marker|m");
  ASSERT_TRUE(Write(dom0_.get(), "/watched/after", "3"));  // unwatched: no event
  ASSERT_TRUE(Write(dom0_.get(), "/marker", "4"));
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "/marker|m");
}

TEST_F(XenstoredTest, ConflictingTransactionEndsWithEagain) {
  ASSERT_TRUE(Write(dom0_.get(), "/counter", "1"));
  XsHandle other = OpenXs(host_->XenstoredSocket(0));
  ASSERT_TRUE(other);

  xs_transaction_t tx = xs_transaction_start(dom0_.get());
  ASSERT_NE(tx, XBT_NULL);
  EXPECT_EQ(ReadString(dom0_.get(), "/counter", tx), "1");
  ASSERT_TRUE(Write(other.get(), "/counter", "5"));         // concurrent commit
  EXPECT_EQ(ReadString(dom0_.get(), "/counter", tx), "1");  // snapshot isolation
  ASSERT_TRUE(Write(dom0_.get(), "/counter", "2", tx));
  errno = 0;
  EXPECT_FALSE(xs_transaction_end(dom0_.get(), tx, false));
  EXPECT_EQ(errno, EAGAIN);
  EXPECT_EQ(ReadString(dom0_.get(), "/counter"), "5");

  // Retry, as callers do on EAGAIN: now it commits.
  tx = xs_transaction_start(dom0_.get());
  ASSERT_NE(tx, XBT_NULL);
  EXPECT_EQ(ReadString(dom0_.get(), "/counter", tx), "5");
  ASSERT_TRUE(Write(dom0_.get(), "/counter", "6", tx));
  ASSERT_TRUE(Write(other.get(), "/unrelated", "x"));  // no conflict
  EXPECT_TRUE(xs_transaction_end(dom0_.get(), tx, false));
  EXPECT_EQ(ReadString(other.get(), "/counter"), "6");

  // Abort discards.
  tx = xs_transaction_start(dom0_.get());
  ASSERT_TRUE(Write(dom0_.get(), "/counter", "7", tx));
  EXPECT_TRUE(xs_transaction_end(dom0_.get(), tx, true));
  EXPECT_EQ(ReadString(dom0_.get(), "/counter"), "6");
}

TEST_F(XenstoredTest, TransactionChangesFireWatchesOnlyAtCommit) {
  ASSERT_GE(xs_fileno(dom0_.get()), 0);
  ASSERT_TRUE(xs_watch(dom0_.get(), "/txw", "t"));
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "/txw|t");
  xs_transaction_t tx = xs_transaction_start(dom0_.get());
  ASSERT_TRUE(Write(dom0_.get(), "/txw", "in-tx", tx));
  EXPECT_EQ(ReadErrno(dom0_.get(), "/txw"), ENOENT);  // not visible outside yet
  EXPECT_EQ(xs_check_watch(dom0_.get()), nullptr);
  ASSERT_TRUE(xs_transaction_end(dom0_.get(), tx, false));
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "/txw|t");
  EXPECT_EQ(ReadString(dom0_.get(), "/txw"), "in-tx");
}

TEST_F(XenstoredTest, GuestWritesOnlyUnderItsHomeAndWherePermsAllow) {
  XsHandle guest = IntroduceAndConnect(7);
  ASSERT_TRUE(guest);

  errno = 0;
  EXPECT_FALSE(Write(guest.get(), "/local/domain/0/evil", "x"));
  EXPECT_EQ(errno, EACCES);
  errno = 0;
  EXPECT_FALSE(Write(guest.get(), "/toplevel", "x"));
  EXPECT_EQ(errno, EACCES);
  EXPECT_EQ(ReadErrno(guest.get(), "/local/domain/0/name"), EACCES);

  EXPECT_TRUE(Write(guest.get(), "/local/domain/7/data/x", "1"));
  EXPECT_TRUE(Write(guest.get(), "data/y", "2"));  // relative to its home
  EXPECT_EQ(ReadString(dom0_.get(), "/local/domain/7/data/y"), "2");
  unsigned int num = 0;
  xs_permissions* perms = xs_get_permissions(dom0_.get(), XBT_NULL, "/local/domain/7/data/y", &num);
  ASSERT_NE(perms, nullptr);
  EXPECT_EQ(perms[0].id, 7u);  // the guest owns what it creates
  free(perms);

  // A backend directory shared the way a toolstack shares it: read-only, then read-write.
  ASSERT_TRUE(Write(dom0_.get(), "/local/domain/0/backend/vbd/7/51712/state", "1"));
  xs_permissions read_only[2] = {{0, XS_PERM_NONE}, {7, XS_PERM_READ}};
  ASSERT_TRUE(xs_set_permissions(dom0_.get(), XBT_NULL, "/local/domain/0/backend/vbd/7/51712/state",
                                 read_only, 2));
  EXPECT_EQ(ReadString(guest.get(), "/local/domain/0/backend/vbd/7/51712/state"), "1");
  errno = 0;
  EXPECT_FALSE(Write(guest.get(), "/local/domain/0/backend/vbd/7/51712/state", "6"));
  EXPECT_EQ(errno, EACCES);
  xs_permissions read_write[2] = {{0, XS_PERM_NONE}, {7, XS_PERM_READ | XS_PERM_WRITE}};
  ASSERT_TRUE(xs_set_permissions(dom0_.get(), XBT_NULL, "/local/domain/0/backend/vbd/7/51712/state",
                                 read_write, 2));
  EXPECT_TRUE(Write(guest.get(), "/local/domain/0/backend/vbd/7/51712/state", "6"));

  // Another guest sees nothing of domain 7.
  XsHandle neighbour = IntroduceAndConnect(8);
  ASSERT_TRUE(neighbour);
  EXPECT_EQ(ReadErrno(neighbour.get(), "/local/domain/7/data/x"), EACCES);
  errno = 0;
  EXPECT_FALSE(Write(neighbour.get(), "/local/domain/7/data/x", "z"));
  EXPECT_EQ(errno, EACCES);
  // Guests may not introduce domains.
  errno = 0;
  EXPECT_FALSE(xs_introduce_domain(neighbour.get(), 9, 0, 0));
  EXPECT_EQ(errno, EACCES);
}

TEST_F(XenstoredTest, LargeDirectoriesGoThroughDirectoryPart) {
  // More than XENSTORE_PAYLOAD_MAX bytes of names: XS_DIRECTORY answers E2BIG and libxenstore
  // falls back to XS_DIRECTORY_PART.
  std::vector<std::string> expected;
  for (int i = 0; i < 300; ++i) {
    std::string name = "child-with-a-long-name-" + std::to_string(i);
    ASSERT_TRUE(Write(dom0_.get(), "/big/" + name, ""));
    expected.push_back(name);
  }
  EXPECT_THAT(Directory(dom0_.get(), "/big"), ::testing::UnorderedElementsAreArray(expected));
}

TEST_F(XenstoredTest, GuestQuotasGiveEnospc) {
  XsHandle guest = IntroduceAndConnect(6);
  ASSERT_TRUE(guest);
  int created = 0;
  int error = 0;
  for (int i = 0; i < 1100; ++i) {
    errno = 0;
    if (!Write(guest.get(), "n/" + std::to_string(i), "")) {
      error = errno;
      break;
    }
    ++created;
  }
  EXPECT_EQ(error, ENOSPC);
  EXPECT_GT(created, 900);
  EXPECT_LT(created, 1000);  // "n" and the home directory count too
  ASSERT_TRUE(xs_rm(guest.get(), XBT_NULL, "n/0"));
  EXPECT_TRUE(Write(guest.get(), "n/again", ""));                  // room again
  EXPECT_TRUE(Write(dom0_.get(), "/local/domain/6/by-dom0", ""));  // dom0 has no quota

  std::vector<xs_transaction_t> open;
  for (int i = 0; i < 10; ++i) {
    xs_transaction_t tx = xs_transaction_start(guest.get());
    ASSERT_NE(tx, XBT_NULL) << i;
    open.push_back(tx);
  }
  errno = 0;
  EXPECT_EQ(xs_transaction_start(guest.get()), XBT_NULL);
  EXPECT_EQ(errno, ENOSPC);
  for (xs_transaction_t tx : open) EXPECT_TRUE(xs_transaction_end(guest.get(), tx, true));
  xs_transaction_t tx = xs_transaction_start(guest.get());
  EXPECT_NE(tx, XBT_NULL);
  xs_transaction_end(guest.get(), tx, true);
}

TEST_F(XenstoredTest, GuestWatchSeesOnlyReadableNodesWithRelativePaths) {
  XsHandle guest = IntroduceAndConnect(4);
  ASSERT_TRUE(guest);
  ASSERT_GE(xs_fileno(guest.get()), 0);
  ASSERT_TRUE(xs_watch(guest.get(), "device", "dev"));
  EXPECT_EQ(NextWatchEvent(guest.get()), "device|dev");
  ASSERT_TRUE(Write(dom0_.get(), "/local/domain/4/device/vbd/51712/state", "1"));
  EXPECT_EQ(NextWatchEvent(guest.get()), "device|dev");  // "device" itself was created
  EXPECT_EQ(NextWatchEvent(guest.get()), "device/vbd|dev");
}

TEST_F(XenstoredTest, DomainPathIntroduceAndRelease) {
  char* path = xs_get_domain_path(dom0_.get(), 12);
  ASSERT_NE(path, nullptr);
  EXPECT_STREQ(path, "/local/domain/12");
  free(path);

  ASSERT_GE(xs_fileno(dom0_.get()), 0);
  ASSERT_TRUE(xs_watch(dom0_.get(), "@introduceDomain", "intro"));
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "@introduceDomain|intro");
  ASSERT_TRUE(xs_watch(dom0_.get(), "@releaseDomain", "rel"));
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "@releaseDomain|rel");

  XsHandle guest = IntroduceAndConnect(12);
  ASSERT_TRUE(guest);
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "@introduceDomain|intro");
  EXPECT_TRUE(xs_is_domain_introduced(dom0_.get(), 12));
  EXPECT_EQ(ReadString(dom0_.get(), "/local/domain/12/domid"), "12");

  ASSERT_TRUE(xs_release_domain(dom0_.get(), 12));
  EXPECT_EQ(NextWatchEvent(dom0_.get()), "@releaseDomain|rel");
  EXPECT_FALSE(xs_is_domain_introduced(dom0_.get(), 12));
  EXPECT_NE(access(host_->XenstoredSocket(12).c_str(), F_OK), 0);
  errno = 0;
  EXPECT_FALSE(xs_release_domain(dom0_.get(), 12));
  EXPECT_EQ(errno, ENOENT);
}

// Raw wire checks: what libxenstore hides (error strings, req_id of watch events).
class RawXenstoredTest : public XenstoredTest {
 protected:
  int Connect() {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::string path = host_->XenstoredSocket(0);
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    return fd;
  }
  static void Send(int fd, uint32_t type, uint32_t req_id, const std::string& payload) {
    xsd_sockmsg header{type, req_id, 0, static_cast<uint32_t>(payload.size())};
    std::string message(reinterpret_cast<const char*>(&header), sizeof(header));
    message += payload;
    ASSERT_EQ(write(fd, message.data(), message.size()), static_cast<ssize_t>(message.size()));
  }
  static bool ReadExact(int fd, void* buffer, size_t len) {
    char* out = static_cast<char*>(buffer);
    while (len > 0) {
      pollfd pfd{fd, POLLIN, 0};
      if (poll(&pfd, 1, 5000) <= 0) return false;
      ssize_t got = read(fd, out, len);
      if (got <= 0) return false;
      out += got;
      len -= static_cast<size_t>(got);
    }
    return true;
  }
  static std::pair<xsd_sockmsg, std::string> Receive(int fd) {
    xsd_sockmsg header{};
    if (!ReadExact(fd, &header, sizeof(header))) return {xsd_sockmsg{XS_INVALID, 0, 0, 0}, ""};
    std::string payload(header.len, '\0');
    if (!ReadExact(fd, payload.data(), payload.size())) return {header, "<short>"};
    return {header, payload};
  }
};

TEST_F(RawXenstoredTest, ErrorsAreErrnoNamesAndWatchEventsHaveReqIdZero) {
  int fd = Connect();
  Send(fd, XS_READ, 41, std::string("/missing\0", 9));
  auto [header, payload] = Receive(fd);
  EXPECT_EQ(header.type, static_cast<uint32_t>(XS_ERROR));
  EXPECT_EQ(header.req_id, 41u);
  EXPECT_EQ(payload, std::string("ENOENT\0", 7));

  Send(fd, 999, 42, "");
  std::tie(header, payload) = Receive(fd);
  EXPECT_EQ(header.type, static_cast<uint32_t>(XS_ERROR));
  EXPECT_EQ(payload, std::string("EINVAL\0", 7));

  Send(fd, XS_TRANSACTION_END, 43, std::string("T\0", 2));  // tx_id 0 is no transaction
  std::tie(header, payload) = Receive(fd);
  EXPECT_EQ(payload, std::string("ENOENT\0", 7));

  Send(fd, XS_WATCH, 44, std::string("/w\0tk\0", 6));
  std::tie(header, payload) = Receive(fd);
  EXPECT_EQ(header.type, static_cast<uint32_t>(XS_WATCH));
  EXPECT_EQ(header.req_id, 44u);
  EXPECT_EQ(payload, std::string("OK\0", 3));
  std::tie(header, payload) = Receive(fd);
  EXPECT_EQ(header.type, static_cast<uint32_t>(XS_WATCH_EVENT));
  EXPECT_EQ(header.req_id, 0u);
  EXPECT_EQ(payload, std::string("/w\0tk\0", 6));
  close(fd);
}

TEST_F(RawXenstoredTest, OversizedMessageDropsTheConnection) {
  int fd = Connect();
  xsd_sockmsg header{XS_READ, 1, 0, XENSTORE_PAYLOAD_MAX + 1};
  ASSERT_EQ(write(fd, &header, sizeof(header)), static_cast<ssize_t>(sizeof(header)));
  pollfd pfd{fd, POLLIN, 0};
  ASSERT_EQ(poll(&pfd, 1, 5000), 1);
  char byte;
  EXPECT_EQ(read(fd, &byte, 1), 0);  // EOF
  close(fd);
  // The daemon still serves others.
  EXPECT_TRUE(Write(dom0_.get(), "/still", "alive"));
}

// Hostile clients: every message type with random payloads, truncated strings and bogus
// transaction ids. The daemon must answer or drop the client, and keep serving others.
TEST_F(RawXenstoredTest, SurvivesGarbageMessages) {
  uint64_t seed = 0x9e3779b97f4a7c15;
  auto next = [&seed]() {
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    return seed;
  };
  const std::string alphabet("/ab@\0.-_xyz09", 13);
  for (int connection = 0; connection < 20; ++connection) {
    int fd = Connect();
    for (int i = 0; i < 50; ++i) {
      uint32_t type = static_cast<uint32_t>(next() % (XS_TYPE_COUNT + 2));
      if (type == XS_INTRODUCE || type == XS_RELEASE) type = XS_READ;  // keep domains stable
      std::string payload(next() % 64, '\0');
      for (char& c : payload) c = alphabet[next() % alphabet.size()];
      xsd_sockmsg header{type, static_cast<uint32_t>(i), static_cast<uint32_t>(next() % 4),
                         static_cast<uint32_t>(payload.size())};
      std::string message(reinterpret_cast<const char*>(&header), sizeof(header));
      message += payload;
      if (write(fd, message.data(), message.size()) != static_cast<ssize_t>(message.size())) {
        break;  // dropped by the daemon: allowed
      }
    }
    close(fd);
  }
  // Still healthy and consistent.
  ASSERT_TRUE(Write(dom0_.get(), "/after/garbage", "ok"));
  EXPECT_EQ(ReadString(dom0_.get(), "/after/garbage"), "ok");
  CommandResult ls = RunXenstoreTool({"xenstore-ls", "/after"}, host_->XenstoredSocket(0));
  EXPECT_EQ(ls.out, "garbage = \"ok\"\n");
}

TEST_F(RawXenstoredTest, ClientThatStopsReadingIsDroppedNotBuffered) {
  int fd = Connect();
  Send(fd, XS_WATCH, 1, std::string("/\0all\0", 7));  // every change, and never read
  const std::string long_name = "/" + std::string(3000, 'x');
  bool dropped = false;
  for (int i = 0; i < 4000 && !dropped; ++i) {
    ASSERT_TRUE(Write(dom0_.get(), long_name, std::to_string(i)));
    // Drain nothing; check (without waiting) whether the daemon hung up on us.
    if (i % 100 == 99) {
      int pending = 0;
      dropped = recv(fd, &pending, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
    }
  }
  // Read what the kernel buffered; the stream must end (EOF), not carry megabytes more.
  size_t total = 0;
  char buffer[65536];
  while (true) {
    pollfd pfd{fd, POLLIN, 0};
    ASSERT_EQ(poll(&pfd, 1, 5000), 1) << "connection neither closed nor readable";
    ssize_t got = read(fd, buffer, sizeof(buffer));
    if (got <= 0) break;
    total += static_cast<size_t>(got);
    ASSERT_LT(total, 8u << 20);
  }
  close(fd);
  EXPECT_TRUE(Write(dom0_.get(), "/still/serving", "1"));
}

TEST_F(XenstoredTest, RealXenstoreToolsWork) {
  const std::string socket = host_->XenstoredSocket(0);
  CommandResult result =
      RunXenstoreTool({"xenstore-write", "/vm/a", "alpha", "/vm/b", "beta"}, socket);
  ASSERT_EQ(result.exit_code, 0) << result.err;
  result = RunXenstoreTool({"xenstore-read", "/vm/a"}, socket);
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_EQ(result.out, "alpha\n");
  EXPECT_EQ(ReadString(dom0_.get(), "/vm/b"), "beta");

  result = RunXenstoreTool({"xenstore-ls", "/vm"}, socket);
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_EQ(result.out, "a = \"alpha\"\nb = \"beta\"\n");

  result = RunXenstoreTool({"xenstore-list", "/vm"}, socket);
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_EQ(result.out, "a\nb\n");

  result = RunXenstoreTool({"xenstore-read", "/vm/missing"}, socket);
  EXPECT_NE(result.exit_code, 0);
  EXPECT_THAT(result.err, HasSubstr("/vm/missing"));

  result = RunXenstoreTool({"xenstore-rm", "/vm/a"}, socket);
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_EQ(ReadErrno(dom0_.get(), "/vm/a"), ENOENT);

  // A guest's tool is confined like the guest.
  ASSERT_TRUE(xs_introduce_domain(dom0_.get(), 3, 0, 0));
  result = RunXenstoreTool({"xenstore-write", "/vm/evil", "x"}, host_->XenstoredSocket(3));
  EXPECT_NE(result.exit_code, 0);
  result = RunXenstoreTool({"xenstore-write", "name", "guest-three"}, host_->XenstoredSocket(3));
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_EQ(ReadString(dom0_.get(), "/local/domain/3/name"), "guest-three");

  result = RunXenstoreTool({"xenstore-ls", "-p", "/local/domain/3"}, socket);
  ASSERT_EQ(result.exit_code, 0) << result.err;
  EXPECT_THAT(result.out, HasSubstr("name = \"guest-three\""));
  EXPECT_THAT(result.out, HasSubstr("(n3)"));
}

TEST_F(XenstoredTest, XenstoreWatchToolReportsChanges) {
  const std::string socket = host_->XenstoredSocket(0);
  // -n 2: the registration event and one change, then exit; no timing involved.
  ASSERT_TRUE(Write(dom0_.get(), "/tw", "0"));
  std::string out;
  std::atomic<bool> done{false};
  std::thread watcher([&] {
    out = RunXenstoreTool({"xenstore-watch", "-n", "2", "/tw"}, socket, 10000).out;
    done = true;
  });
  // The tool exits after the registration event plus one change. Its registration time is not
  // observable from here, so keep changing the node (bounded) until it has seen one and exited.
  for (int i = 0; i < 2000 && !done; ++i) {
    ASSERT_TRUE(Write(dom0_.get(), "/tw/k", std::to_string(i)));
    pollfd none{-1, 0, 0};
    poll(&none, 1, 5);
  }
  watcher.join();
  EXPECT_THAT(out, HasSubstr("/tw\n"));
  EXPECT_THAT(out, HasSubstr("/tw/k\n"));
}

}  // namespace
}  // namespace blockplane::harness
