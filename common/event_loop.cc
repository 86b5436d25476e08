#include "common/event_loop.h"

#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace blockplane::common {

int64_t MonotonicNanos() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

struct EventLoop::Ring {
  io_uring ring;
};

namespace {

// Completions nobody waits for (the result of POLL_REMOVE).
class IgnoreCompletion final : public CompletionHandler {
 public:
  void OnCompletion(int32_t, uint32_t) override {}
};
IgnoreCompletion ignore_completion;

}  // namespace

class EventLoop::WatchHandler final : public CompletionHandler {
 public:
  WatchHandler(EventLoop* loop, FdWatchState* state) : loop_(loop), state_(state) {}
  void OnCompletion(int32_t result, uint32_t cqe_flags) override;

 private:
  EventLoop* loop_;
  FdWatchState* state_;
};

struct EventLoop::FdWatchState {
  FdWatchState(EventLoop* loop, FdWatch id_in, int fd_in, uint32_t events_in,
               std::function<void(uint32_t)> cb)
      : id(id_in), fd(fd_in), events(events_in), callback(std::move(cb)), handler(loop, this) {}
  FdWatch id;
  int fd;
  uint32_t events;
  std::function<void(uint32_t)> callback;
  WatchHandler handler;
  bool armed = false;
  bool removed = false;
  bool in_callback = false;
};

void EventLoop::WatchHandler::OnCompletion(int32_t result, uint32_t cqe_flags) {
  FdWatchState* state = state_;
  EventLoop* loop = loop_;
  if (!(cqe_flags & IORING_CQE_F_MORE)) state->armed = false;
  if (!state->removed) {
    uint32_t revents = 0;
    if (result >= 0) {
      revents = static_cast<uint32_t>(result);
    } else if (result == -EBADF) {
      revents = POLLNVAL;
    }
    if (revents != 0) {
      state->in_callback = true;
      state->callback(revents);
      state->in_callback = false;
    }
  }
  if (state->armed) return;
  if (state->removed) {
    loop->watches_.erase(state->id);  // destroys *this; nothing may follow
    return;
  }
  if (result != -EBADF) loop->ArmPoll(state);
}

absl::StatusOr<std::unique_ptr<EventLoop>> EventLoop::Create(Options options) {
  std::unique_ptr<EventLoop> loop(new EventLoop(options));
  absl::Status status = loop->Init();
  if (!status.ok()) return status;
  return loop;
}

EventLoop::EventLoop(Options options) : options_(options), ring_(std::make_unique<Ring>()) {
  if (options_.queue_depth == 0) options_.queue_depth = 256;
  if (options_.max_completions_per_batch == 0) options_.max_completions_per_batch = 64;
  if (options_.max_completions_per_batch > 256) options_.max_completions_per_batch = 256;
  if (options_.max_batches_per_pass == 0) options_.max_batches_per_pass = 1;
}

absl::Status EventLoop::Init() {
  UpdateNow();
  // COOP_TASKRUN avoids interrupting the loop thread for every completion; TASKRUN_FLAG tells the
  // peek in liburing to enter the kernel when task work is pending (needed while busy polling).
  const uint32_t flag_sets[] = {
      IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
      IORING_SETUP_CQSIZE};
  int ret = -EINVAL;
  for (uint32_t flags : flag_sets) {
    io_uring_params params;
    std::memset(&params, 0, sizeof(params));
    params.flags = flags;
    params.cq_entries = options_.queue_depth * 4;
    ret = io_uring_queue_init_params(options_.queue_depth, &ring_->ring, &params);
    if (ret != -EINVAL) break;
  }
  if (ret < 0) {
    ring_.reset();
    return absl::InternalError(absl::StrCat("io_uring_queue_init: ", strerror(-ret)));
  }
  if (options_.registered_file_slots > 0) {
    int r = io_uring_register_files_sparse(&ring_->ring, options_.registered_file_slots);
    if (r == 0) file_slots_used_.assign(options_.registered_file_slots, false);
  }
  if (options_.registered_buffer_slots > 0) {
    int r = io_uring_register_buffers_sparse(&ring_->ring, options_.registered_buffer_slots);
    if (r == 0) buffer_slots_used_.assign(options_.registered_buffer_slots, false);
  }
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) return absl::InternalError(absl::StrCat("eventfd: ", strerror(errno)));
  wake_watch_ = AddFd(wake_fd_, POLLIN, [this](uint32_t) { OnWakeFd(); });
  io_uring_submit(&ring_->ring);
  pending_sqes_ = 0;
  return absl::OkStatus();
}

EventLoop::~EventLoop() {
  if (ring_) io_uring_queue_exit(&ring_->ring);  // cancels outstanding polls and I/O
  if (wake_fd_ >= 0) close(wake_fd_);
}

void EventLoop::Post(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lock(posted_mu_);
    posted_.push_back(std::move(task));
  }
  Wake();
}

void EventLoop::Wake() {
  if (!wake_pending_.exchange(true, std::memory_order_acq_rel)) {
    uint64_t one = 1;
    ssize_t n = write(wake_fd_, &one, sizeof(one));
    (void)n;  // EAGAIN means the counter is already non-zero: the loop is woken anyway
  }
}

void EventLoop::OnWakeFd() {
  uint64_t value;
  ssize_t n = read(wake_fd_, &value, sizeof(value));
  (void)n;
}

void EventLoop::Stop() {
  stop_.store(true, std::memory_order_release);
  Wake();
}

bool EventLoop::IsLoopThread() const {
  return loop_thread_.load(std::memory_order_acquire) == std::this_thread::get_id();
}

EventLoop::FdWatch EventLoop::AddFd(int fd, uint32_t poll_events,
                                    std::function<void(uint32_t)> callback) {
  FdWatch id = next_watch_id_++;
  auto state = std::make_unique<FdWatchState>(this, id, fd, poll_events, std::move(callback));
  FdWatchState* raw = state.get();
  watches_.emplace(id, std::move(state));
  ArmPoll(raw);
  return id;
}

void EventLoop::ArmPoll(FdWatchState* state) {
  io_uring_sqe* sqe = GetSqe();
  if (sqe == nullptr) {
    FdWatch id = state->id;
    AddSqeWaiter([this, id] {
      auto it = watches_.find(id);
      if (it != watches_.end() && !it->second->removed && !it->second->armed) {
        ArmPoll(it->second.get());
      }
    });
    return;
  }
  io_uring_prep_poll_multishot(sqe, state->fd, state->events);
  CommitSqe(sqe, &state->handler);
  state->armed = true;
}

void EventLoop::RemoveFd(FdWatch watch) {
  auto it = watches_.find(watch);
  if (it == watches_.end() || it->second->removed) return;
  FdWatchState* state = it->second.get();
  state->removed = true;
  if (state->armed) {
    // The final CQE of the poll (without F_MORE) erases the state.
    io_uring_sqe* sqe = GetSqe();
    while (sqe == nullptr) {
      io_uring_submit(&ring_->ring);
      sqe = GetSqe();
    }
    io_uring_prep_poll_remove(sqe, reinterpret_cast<uint64_t>(&state->handler));
    CommitSqe(sqe, &ignore_completion);
    return;
  }
  if (!state->in_callback) watches_.erase(it);
  // else: WatchHandler::OnCompletion erases it after the callback returns.
}

EventLoop::TimerId EventLoop::AddTimer(std::chrono::nanoseconds after,
                                       std::function<void()> callback) {
  TimerId id = next_timer_id_++;
  int64_t deadline = MonotonicNanos() + std::max<int64_t>(0, after.count());
  timers_.emplace(std::make_pair(deadline, id), Timer{std::move(callback)});
  timer_deadlines_.emplace(id, deadline);
  return id;
}

void EventLoop::CancelTimer(TimerId id) {
  auto it = timer_deadlines_.find(id);
  if (it == timer_deadlines_.end()) return;
  timers_.erase(std::make_pair(it->second, id));
  timer_deadlines_.erase(it);
}

int64_t EventLoop::NanosUntilNextTimer() const {
  if (timers_.empty()) return -1;
  int64_t delta = timers_.begin()->first.first - MonotonicNanos();
  return delta < 0 ? 0 : delta;
}

bool EventLoop::RunDueTimers() {
  if (timers_.empty()) return false;
  int64_t now = now_ns_;
  bool ran = false;
  // Bounded so a timer that re-adds itself with zero delay cannot starve the ring.
  for (int i = 0; i < 1024 && !timers_.empty(); ++i) {
    auto it = timers_.begin();
    if (it->first.first > now) break;
    std::function<void()> callback = std::move(it->second.callback);
    timer_deadlines_.erase(it->first.second);
    timers_.erase(it);
    callback();
    ran = true;
  }
  return ran;
}

bool EventLoop::RunPosted() {
  if (!wake_pending_.load(std::memory_order_acquire)) return false;
  wake_pending_.store(false, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(posted_mu_);
    running_posted_.swap(posted_);
  }
  if (running_posted_.empty()) return false;
  for (auto& task : running_posted_) task();
  running_posted_.clear();
  return true;
}

bool EventLoop::RunDeferred() {
  if (deferred_.empty()) return false;
  running_deferred_.swap(deferred_);
  for (const DeferredCompletion& d : running_deferred_) d.handler->OnCompletion(d.result, 0);
  running_deferred_.clear();
  return true;
}

void EventLoop::RunSqeWaiters() {
  if (sqe_waiters_.empty()) return;
  running_sqe_waiters_.swap(sqe_waiters_);
  for (auto& retry : running_sqe_waiters_) retry();
  running_sqe_waiters_.clear();
}

bool EventLoop::ReapCompletions() {
  struct Reaped {
    CompletionHandler* handler;
    int32_t result;
    uint32_t flags;
  };
  io_uring_cqe* cqes[256];
  Reaped reaped[256];
  bool any = false;
  for (uint32_t batch = 0; batch < options_.max_batches_per_pass; ++batch) {
    unsigned n = io_uring_peek_batch_cqe(&ring_->ring, cqes, options_.max_completions_per_batch);
    if (n == 0) break;
    // Copy out and release the CQ slots first, so handlers that submit more I/O have room.
    for (unsigned i = 0; i < n; ++i) {
      reaped[i] = {static_cast<CompletionHandler*>(io_uring_cqe_get_data(cqes[i])), cqes[i]->res,
                   cqes[i]->flags};
    }
    io_uring_cq_advance(&ring_->ring, n);
    counters_.completions.Add(n);
    for (unsigned i = 0; i < n; ++i) {
      if (reaped[i].handler != nullptr) {
        reaped[i].handler->OnCompletion(reaped[i].result, reaped[i].flags);
      }
    }
    any = true;
    if (n < options_.max_completions_per_batch) break;
  }
  return any;
}

io_uring_sqe* EventLoop::GetSqe() {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_->ring);
  if (sqe == nullptr) {
    counters_.sq_full.Add(1);
    int r = io_uring_submit(&ring_->ring);
    if (r > 0) {
      counters_.submit_calls.Add(1);
      counters_.sqes_submitted.Add(static_cast<uint64_t>(r));
    }
    pending_sqes_ = io_uring_sq_ready(&ring_->ring);
    pending_io_sqes_ = 0;
    sqe = io_uring_get_sqe(&ring_->ring);
    if (sqe == nullptr) return nullptr;
  }
  ++pending_sqes_;
  return sqe;
}

void EventLoop::CommitSqe(io_uring_sqe* sqe, CompletionHandler* handler) {
  io_uring_sqe_set_data(sqe, handler);
}

void EventLoop::CommitIoSqe(io_uring_sqe* sqe, CompletionHandler* handler) {
  io_uring_sqe_set_data(sqe, handler);
  if (options_.io_submit_batch == 0 || ++pending_io_sqes_ < options_.io_submit_batch) return;
  int r = io_uring_submit(&ring_->ring);
  if (r > 0) {
    counters_.submit_calls.Add(1);
    counters_.early_io_submits.Add(1);
    counters_.sqes_submitted.Add(static_cast<uint64_t>(r));
  }
  pending_sqes_ = io_uring_sq_ready(&ring_->ring);
  pending_io_sqes_ = 0;
}

bool EventLoop::SubmitNop(CompletionHandler* handler) {
  io_uring_sqe* sqe = GetSqe();
  if (sqe == nullptr) return false;
  io_uring_prep_nop(sqe);
  CommitSqe(sqe, handler);
  return true;
}

void EventLoop::Defer(CompletionHandler* handler, int32_t result) {
  deferred_.push_back({handler, result});
}

void EventLoop::AddSqeWaiter(std::function<void()> retry) {
  sqe_waiters_.push_back(std::move(retry));
}

absl::StatusOr<int> EventLoop::RegisterFile(int fd) {
  for (size_t slot = 0; slot < file_slots_used_.size(); ++slot) {
    if (file_slots_used_[slot]) continue;
    int r = io_uring_register_files_update(&ring_->ring, slot, &fd, 1);
    if (r < 0) {
      return absl::InternalError(absl::StrCat("io_uring_register_files_update: ", strerror(-r)));
    }
    file_slots_used_[slot] = true;
    return static_cast<int>(slot);
  }
  return absl::ResourceExhaustedError("no free registered-file slot");
}

void EventLoop::UnregisterFile(int slot) {
  if (slot < 0 || static_cast<size_t>(slot) >= file_slots_used_.size()) return;
  int fd = -1;
  io_uring_register_files_update(&ring_->ring, slot, &fd, 1);
  file_slots_used_[slot] = false;
}

absl::StatusOr<int> EventLoop::RegisterBuffer(iovec region) {
  for (size_t slot = 0; slot < buffer_slots_used_.size(); ++slot) {
    if (buffer_slots_used_[slot]) continue;
    __u64 tag = 0;
    int r = io_uring_register_buffers_update_tag(&ring_->ring, slot, &region, &tag, 1);
    if (r < 0) {
      return absl::InternalError(
          absl::StrCat("io_uring_register_buffers_update_tag: ", strerror(-r)));
    }
    buffer_slots_used_[slot] = true;
    return static_cast<int>(slot);
  }
  if (buffer_slots_used_.empty()) {
    return absl::UnavailableError("registered buffers are not available on this ring");
  }
  return absl::ResourceExhaustedError("no free registered-buffer slot");
}

void EventLoop::UnregisterBuffer(int slot) {
  if (slot < 0 || static_cast<size_t>(slot) >= buffer_slots_used_.size()) return;
  iovec empty = {nullptr, 0};
  __u64 tag = 0;
  io_uring_register_buffers_update_tag(&ring_->ring, slot, &empty, &tag, 1);
  buffer_slots_used_[slot] = false;
}

void EventLoop::RunOnce(bool block) {
  loop_thread_.store(std::this_thread::get_id(), std::memory_order_release);
  counters_.passes.Add(1);
  UpdateNow();
  bool work = ReapCompletions();
  work |= RunDueTimers();
  work |= RunPosted();
  work |= RunDeferred();
  RunSqeWaiters();

  // Sleep only after a pass that found nothing to do, so callers of RunUntil() see the effects
  // of every pass before the loop blocks.
  bool sleep = block && !work && !stop_.load(std::memory_order_acquire) && deferred_.empty() &&
               sqe_waiters_.empty() && !wake_pending_.load(std::memory_order_acquire);
  if (options_.poll_window_us > 0 && (work || sleep)) {
    // The pass's start time: a pass that found work is timed from when it started (short next to
    // any poll window), and one that found none took no time. No second clock read per pass.
    const int64_t now = now_ns_;
    if (work) last_work_ns_ = now;
    if (now - last_work_ns_ < int64_t{options_.poll_window_us} * 1000) sleep = false;
  }
  int64_t timer_ns = sleep ? NanosUntilNextTimer() : -1;
  if (sleep && timer_ns == 0) sleep = false;

  if (sleep) {
    io_uring_cqe* cqe = nullptr;
    __kernel_timespec ts;
    __kernel_timespec* tsp = nullptr;
    if (timer_ns > 0) {
      ts.tv_sec = timer_ns / 1'000'000'000;
      ts.tv_nsec = timer_ns % 1'000'000'000;
      tsp = &ts;
    }
    counters_.sleeps.Add(1);
    unsigned ready = io_uring_sq_ready(&ring_->ring);
    int r = io_uring_submit_and_wait_timeout(&ring_->ring, &cqe, 1, tsp, nullptr);
    if (ready > 0) {
      counters_.submit_calls.Add(1);
      counters_.sqes_submitted.Add(ready);
    }
    (void)r;  // -ETIME (timer due) and -EINTR just start the next pass
    pending_sqes_ = 0;
    pending_io_sqes_ = 0;
  } else if (io_uring_sq_ready(&ring_->ring) > 0) {
    int r = io_uring_submit(&ring_->ring);
    if (r > 0) {
      counters_.submit_calls.Add(1);
      counters_.sqes_submitted.Add(static_cast<uint64_t>(r));
    }
    pending_sqes_ = 0;
    pending_io_sqes_ = 0;
  }
}

EventLoop::Counters EventLoop::counters() const {
  Counters c;
  c.passes = counters_.passes.Get();
  c.submit_calls = counters_.submit_calls.Get();
  c.sqes_submitted = counters_.sqes_submitted.Get();
  c.completions = counters_.completions.Get();
  c.sleeps = counters_.sleeps.Get();
  c.sq_full = counters_.sq_full.Get();
  c.early_io_submits = counters_.early_io_submits.Get();
  return c;
}

void EventLoop::Run() {
  // For as long as this thread runs the loop, io_uring_enter takes the ring from the thread's
  // registered-ring table instead of looking up (and, in a multi-threaded process, reference
  // counting) the ring's fd on every call. Registration is per thread, which is why it is done
  // here: only this thread enters the ring until Run() returns (RunOnce/RunUntil callers may
  // hop threads, so they keep the plain fd). Best effort: kernels before 5.18 refuse it.
  const bool registered = io_uring_register_ring_fd(&ring_->ring) == 1;
  while (true) {
    RunOnce(/*block=*/true);
    if (stop_.exchange(false, std::memory_order_acq_rel)) break;
  }
  if (registered) io_uring_unregister_ring_fd(&ring_->ring);
}

void EventLoop::RunUntil(const std::function<bool()>& done) {
  while (!done()) RunOnce(/*block=*/true);
}

}  // namespace blockplane::common
