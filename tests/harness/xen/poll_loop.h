#pragma once

// A minimal single-threaded epoll loop for the emulated Xen host. One thread calls Run(); every
// other method except Stop() must be called on that thread (or before Run()). Callbacks may add and
// remove fds, including their own.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>

#include "absl/status/status.h"
#include "common/unique_fd.h"

namespace blockplane::harness {

class PollLoop {
 public:
  using Callback = std::function<void(uint32_t epoll_events)>;

  PollLoop();
  PollLoop(const PollLoop&) = delete;
  PollLoop& operator=(const PollLoop&) = delete;

  absl::Status Add(int fd, uint32_t events, Callback callback);
  absl::Status Modify(int fd, uint32_t events);
  void Remove(int fd);

  // Runs until Stop(). Returns an error only if epoll itself fails.
  absl::Status Run();
  // Thread-safe and async-signal-safe.
  void Stop();

 private:
  common::UniqueFd epoll_fd_;
  common::UniqueFd stop_fd_;
  // shared_ptr so that a callback that removes itself stays alive until it returns.
  std::map<int, std::shared_ptr<Callback>> callbacks_;
};

}  // namespace blockplane::harness
