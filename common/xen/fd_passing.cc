#include "common/xen/fd_passing.h"

#include <errno.h>
#include <sys/socket.h>

#include <cstring>
#include <string>

namespace blockplane::common::xen {
namespace {

constexpr int kMaxFds = 16;

}  // namespace

absl::Status SendWithFds(int socket, std::span<const std::byte> data, std::span<const int> fds) {
  if (fds.size() > kMaxFds) return absl::InvalidArgumentError("too many fds");
  iovec iov{const_cast<std::byte*>(data.data()), data.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  }
  while (true) {
    ssize_t sent = ::sendmsg(socket, &msg, MSG_NOSIGNAL);
    if (sent >= 0) {
      if (static_cast<size_t>(sent) != data.size()) return absl::DataLossError("short send");
      return absl::OkStatus();
    }
    if (errno == EINTR) continue;
    return absl::UnavailableError(std::string("sendmsg: ") + std::strerror(errno));
  }
}

absl::StatusOr<ReceivedMessage> ReceiveWithFds(int socket, std::span<std::byte> buffer,
                                               int max_fds) {
  iovec iov{buffer.data(), buffer.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)] = {};
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t got;
  do {
    got = ::recvmsg(socket, &msg, MSG_CMSG_CLOEXEC);
  } while (got < 0 && errno == EINTR);
  if (got < 0) return absl::UnavailableError(std::string("recvmsg: ") + std::strerror(errno));
  ReceivedMessage result;
  result.size = static_cast<size_t>(got);
  result.truncated = (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
  for (cmsghdr* cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
    if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
      if (static_cast<int>(result.fds.size()) < max_fds) {
        result.fds.emplace_back(fd);
      } else {
        UniqueFd discard(fd);
        result.truncated = true;
      }
    }
  }
  return result;
}

}  // namespace blockplane::common::xen
