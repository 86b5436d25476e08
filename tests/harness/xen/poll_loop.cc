#include "tests/harness/xen/poll_loop.h"

#include <errno.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>
#include <string>

namespace blockplane::harness {

PollLoop::PollLoop()
    : epoll_fd_(::epoll_create1(EPOLL_CLOEXEC)),
      stop_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.fd = stop_fd_.get();
  ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, stop_fd_.get(), &event);
}

absl::Status PollLoop::Add(int fd, uint32_t events, Callback callback) {
  epoll_event event{};
  event.events = events;
  event.data.fd = fd;
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, fd, &event) != 0) {
    return absl::InternalError(std::string("epoll_ctl add: ") + std::strerror(errno));
  }
  callbacks_[fd] = std::make_shared<Callback>(std::move(callback));
  return absl::OkStatus();
}

absl::Status PollLoop::Modify(int fd, uint32_t events) {
  epoll_event event{};
  event.events = events;
  event.data.fd = fd;
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, fd, &event) != 0) {
    return absl::InternalError(std::string("epoll_ctl mod: ") + std::strerror(errno));
  }
  return absl::OkStatus();
}

void PollLoop::Remove(int fd) {
  ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_DEL, fd, nullptr);
  callbacks_.erase(fd);
}

absl::Status PollLoop::Run() {
  epoll_event events[64];
  while (true) {
    int count = ::epoll_wait(epoll_fd_.get(), events, 64, -1);
    if (count < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(std::string("epoll_wait: ") + std::strerror(errno));
    }
    for (int i = 0; i < count; ++i) {
      int fd = events[i].data.fd;
      if (fd == stop_fd_.get()) {
        uint64_t count;
        [[maybe_unused]] ssize_t got = ::read(stop_fd_.get(), &count, sizeof(count));
        return absl::OkStatus();  // Run() may be called again later
      }
      auto it = callbacks_.find(fd);
      if (it == callbacks_.end()) continue;  // removed by an earlier callback in this batch
      std::shared_ptr<Callback> callback = it->second;
      (*callback)(events[i].events);
    }
  }
}

void PollLoop::Stop() {
  uint64_t one = 1;
  [[maybe_unused]] ssize_t written = ::write(stop_fd_.get(), &one, sizeof(one));
}

}  // namespace blockplane::harness
