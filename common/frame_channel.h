#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace google::protobuf {
class MessageLite;
}

namespace blockplane::common {

// Frames on a stream socket: a 4-byte little-endian length, then that many bytes of one serialized
// protobuf message. Used for the controller <-> worker control channel.
inline constexpr uint32_t kMaxFrameBytes = 4 << 20;

// Writes one whole frame. Blocks until written (the socket may be non-blocking: EAGAIN waits with
// poll). Never raises SIGPIPE. Returns UNAVAILABLE when the peer has gone.
absl::Status WriteFrame(int fd, const google::protobuf::MessageLite& message);

// Accumulates bytes read from a socket and cuts them into frames. Not thread-safe: one reader.
class FrameReader {
 public:
  // Reads what is available now (one read(2)). Returns UNAVAILABLE on EOF or a socket error,
  // OK otherwise (also when nothing was available on a non-blocking socket).
  absl::Status ReadAvailable(int fd);

  // The next complete frame's payload, if one has arrived. DATA_LOSS if the peer announced a frame
  // larger than kMaxFrameBytes (the stream cannot be resynchronised: close it).
  absl::StatusOr<std::optional<std::string>> NextFrame();

 private:
  std::string buffer_;
  size_t consumed_ = 0;
};

// Reads frames until one complete frame has arrived or the timeout passes. Blocking helper for
// request/response exchanges where nothing else is waiting on the socket (the worker's start-up
// handshake, tests). DEADLINE_EXCEEDED on timeout.
absl::StatusOr<std::string> ReadFrameBlocking(int fd, FrameReader& reader, int timeout_ms);

}  // namespace blockplane::common
