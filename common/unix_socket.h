#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "common/unique_fd.h"

namespace blockplane::common {

// Unix stream sockets by path, without the 107-byte sun_path limit: a longer path is reached
// through /proc/self/fd/<fd of its folder>/<name>, so state dirs may live anywhere.

// Binds and listens on `path` (a stale socket file there is replaced). Non-blocking, close-on-exec.
absl::StatusOr<UniqueFd> ListenUnix(const std::string& path, int backlog = 16);

// Connects to `path`. Blocking connect; the returned fd is non-blocking and close-on-exec.
// UNAVAILABLE when nobody listens there.
absl::StatusOr<UniqueFd> ConnectUnix(const std::string& path);

}  // namespace blockplane::common
