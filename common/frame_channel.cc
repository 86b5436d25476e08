#include "common/frame_channel.h"

#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>

#include "google/protobuf/message_lite.h"

namespace blockplane::common {
namespace {

absl::Status WriteAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n > 0) {
      data += n;
      size -= static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      pollfd p{fd, POLLOUT, 0};
      if (::poll(&p, 1, 5000) == 0)
        return absl::UnavailableError("control socket: peer not reading");
      continue;
    }
    return absl::UnavailableError(std::string("control socket: ") + strerror(errno));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteFrame(int fd, const google::protobuf::MessageLite& message) {
  std::string payload;
  if (!message.SerializeToString(&payload)) return absl::InternalError("serialize failed");
  if (payload.size() > kMaxFrameBytes) return absl::InternalError("frame too large");
  std::string frame(4, '\0');
  uint32_t len = static_cast<uint32_t>(payload.size());
  for (int i = 0; i < 4; ++i) frame[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  frame += payload;
  return WriteAll(fd, frame.data(), frame.size());
}

absl::Status FrameReader::ReadAvailable(int fd) {
  char chunk[16384];
  for (;;) {
    ssize_t n = ::recv(fd, chunk, sizeof(chunk), MSG_DONTWAIT);
    if (n > 0) {
      buffer_.append(chunk, static_cast<size_t>(n));
      return absl::OkStatus();
    }
    if (n == 0) return absl::UnavailableError("control socket closed by peer");
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return absl::OkStatus();
    return absl::UnavailableError(std::string("control socket: ") + strerror(errno));
  }
}

absl::StatusOr<std::optional<std::string>> FrameReader::NextFrame() {
  size_t available = buffer_.size() - consumed_;
  if (available < 4) return std::nullopt;
  const auto* p = reinterpret_cast<const unsigned char*>(buffer_.data() + consumed_);
  uint32_t len = p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24);
  if (len > kMaxFrameBytes) {
    return absl::DataLossError("control socket: frame of " + std::to_string(len) +
                               " bytes exceeds the limit");
  }
  if (available < 4 + static_cast<size_t>(len)) return std::nullopt;
  std::string frame = buffer_.substr(consumed_ + 4, len);
  consumed_ += 4 + len;
  if (consumed_ == buffer_.size()) {
    buffer_.clear();
    consumed_ = 0;
  } else if (consumed_ > 65536) {
    buffer_.erase(0, consumed_);
    consumed_ = 0;
  }
  return frame;
}

absl::StatusOr<std::string> ReadFrameBlocking(int fd, FrameReader& reader, int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    auto frame = reader.NextFrame();
    if (!frame.ok()) return frame.status();
    if (frame->has_value()) return std::move(**frame);
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
    if (left <= 0) return absl::DeadlineExceededError("control socket: no reply in time");
    pollfd pfd{fd, POLLIN, 0};
    int r = ::poll(&pfd, 1, static_cast<int>(left));
    if (r < 0 && errno != EINTR) return absl::UnavailableError(strerror(errno));
    if (r > 0) {
      absl::Status s = reader.ReadAvailable(fd);
      if (!s.ok()) return s;
    }
  }
}

}  // namespace blockplane::common
