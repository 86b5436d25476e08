#pragma once

// Sending and receiving one datagram with file descriptors (SCM_RIGHTS) on a unix socket.

#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/unique_fd.h"

namespace blockplane::common::xen {

// Sends `data` and `fds` (which stay owned by the caller) as one message.
absl::Status SendWithFds(int socket, std::span<const std::byte> data, std::span<const int> fds);

struct ReceivedMessage {
  size_t size = 0;  // bytes written into the caller's buffer
  std::vector<UniqueFd> fds;
  bool truncated = false;  // the datagram or its fds did not fit
};

// Receives one message into `buffer` and takes ownership of up to `max_fds` fds (extra ones are
// closed and reported as truncated). Blocks if the socket is blocking; EOF gives size 0.
absl::StatusOr<ReceivedMessage> ReceiveWithFds(int socket, std::span<std::byte> buffer,
                                               int max_fds);

}  // namespace blockplane::common::xen
