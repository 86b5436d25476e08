#include "common/unix_socket.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace blockplane::common {
namespace {

// Fills `addr` for `path`; for a long path, opens its folder into `dir` and goes through /proc.
absl::Status Address(const std::string& path, sockaddr_un* addr, UniqueFd* dir) {
  *addr = {};
  addr->sun_family = AF_UNIX;
  std::string target = path;
  if (path.size() >= sizeof(addr->sun_path)) {
    size_t slash = path.rfind('/');
    if (slash == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("socket path too long: ", path));
    }
    std::string folder = slash == 0 ? "/" : path.substr(0, slash);
    dir->Reset(::open(folder.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
    if (!*dir) {
      return absl::UnavailableError(absl::StrCat("open ", folder, ": ", strerror(errno)));
    }
    target = absl::StrCat("/proc/self/fd/", dir->get(), path.substr(slash));
    if (target.size() >= sizeof(addr->sun_path)) {
      return absl::InvalidArgumentError(absl::StrCat("socket name too long: ", path));
    }
  }
  memcpy(addr->sun_path, target.c_str(), target.size() + 1);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<UniqueFd> ListenUnix(const std::string& path, int backlog) {
  sockaddr_un addr;
  UniqueFd dir;
  if (absl::Status s = Address(path, &addr, &dir); !s.ok()) return s;
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return absl::InternalError(absl::StrCat("socket: ", strerror(errno)));
  ::unlink(path.c_str());  // a stale socket of an earlier process
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(fd.get(), backlog) != 0) {
    return absl::InternalError(absl::StrCat("listen on ", path, ": ", strerror(errno)));
  }
  return fd;
}

absl::StatusOr<UniqueFd> ConnectUnix(const std::string& path) {
  sockaddr_un addr;
  UniqueFd dir;
  if (absl::Status s = Address(path, &addr, &dir); !s.ok()) return s;
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return absl::InternalError(absl::StrCat("socket: ", strerror(errno)));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return absl::UnavailableError(absl::StrCat("connect ", path, ": ", strerror(errno)));
  }
  int flags = ::fcntl(fd.get(), F_GETFL);
  ::fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK);
  return fd;
}

}  // namespace blockplane::common
