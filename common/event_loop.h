#pragma once

// A single-threaded event loop built on one io_uring.
//
// Everything the loop waits for is a ring operation: fd readiness (multishot POLL_ADD), the
// cross-thread wake-up (an eventfd polled on the ring), backend I/O (SQEs submitted by backends)
// and the timer deadline (the timeout of io_uring_submit_and_wait_timeout). Each pass of Run()
// reaps completions in bounded batches, runs due timers, posted tasks and deferred completions,
// then submits every SQE queued during the pass with a single io_uring_enter.
//
// Threading: one thread calls Run(); every method except Post(), Stop() and IsLoopThread() must be
// called on that thread (or before Run() starts, from the creating thread). Callbacks always run
// on the loop thread. Callbacks must not throw.
//
// liburing stays out of this header (style rule: only common/event_loop.cc and
// worker/backend/uring_backend.cc include <liburing.h>); io_uring_sqe is only forward-declared.

#include <sys/types.h>
#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

struct io_uring_sqe;

namespace blockplane::common {

// Monotonic clock in nanoseconds (CLOCK_MONOTONIC), shared by the loop's timers and accounting.
int64_t MonotonicNanos();

// Receives the completion of one ring operation. Intrusive (the submitter owns the handler and
// keeps it alive until OnCompletion runs), so submitting I/O does not allocate.
class CompletionHandler {
 public:
  // `result` is the CQE's res field (bytes or 0 on success, -errno on failure); `cqe_flags` its
  // flags. Runs on the loop thread.
  virtual void OnCompletion(int32_t result, uint32_t cqe_flags) = 0;

 protected:
  ~CompletionHandler() = default;
};

class EventLoop {
 public:
  struct Options {
    // Submission queue size; the completion queue gets 4x so it does not overflow while
    // multishot polls and I/O complete together.
    uint32_t queue_depth = 256;
    // Adaptive polling: after a pass that did work, keep polling the completion queue for this
    // many microseconds before sleeping in the kernel. 0 sleeps as soon as there is nothing to
    // do. Polling trades a busy core for wake-up latency (tens of microseconds on VMs).
    uint32_t poll_window_us = 0;
    // Upper bound of completions reaped per batch (one peek), and of batches per pass.
    uint32_t max_completions_per_batch = 64;
    uint32_t max_batches_per_pass = 8;
    // Device I/O SQEs (CommitIoSqe) are submitted as soon as this many are pending, instead of
    // waiting for the end of the pass: the kernel plugs a submitted batch until all of it has
    // been issued, so one big batch leaves the device idle meanwhile (measured on a virtio disk:
    // 4k randread QD32 at 1/2/4/8/pass = 59k/58k/58k/55k/49k IOPS, docs/performance.md).
    // 0 = only once per pass.
    uint32_t io_submit_batch = 4;
    // Slots in the sparse registered-file table (RegisterFile). 0 disables registered files.
    uint32_t registered_file_slots = 64;
    // Slots in the sparse registered-buffer table (RegisterBuffer). 0 disables them.
    uint32_t registered_buffer_slots = 64;
  };

  using FdWatch = uint64_t;  // 0 is never a valid handle
  using TimerId = uint64_t;  // 0 is never a valid id
  static constexpr FdWatch kInvalidFdWatch = 0;
  static constexpr TimerId kInvalidTimer = 0;

  // What the loop did since it was created. Written by the loop thread; counters() may be read
  // from any thread (each field is read atomically; the set is not one snapshot).
  struct Counters {
    uint64_t passes = 0;
    uint64_t submit_calls = 0;
    uint64_t sqes_submitted = 0;
    uint64_t completions = 0;
    uint64_t sleeps = 0;
    uint64_t sq_full = 0;
    uint64_t early_io_submits = 0;  // submits triggered by io_submit_batch
  };

  // Creates the ring, the wake-up eventfd and its poll. Fails with the errno of io_uring_setup
  // (for example when io_uring is disabled by sysctl or seccomp).
  static absl::StatusOr<std::unique_ptr<EventLoop>> Create(Options options);
  static absl::StatusOr<std::unique_ptr<EventLoop>> Create() { return Create(Options()); }
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Runs `task` on the loop thread during a later pass. The only thread-safe way in; wakes a
  // sleeping loop through the eventfd. Tasks posted after Stop() run if Run() is called again,
  // and are destroyed without running when the loop is destroyed.
  void Post(std::function<void()> task);

  // Watches `fd` for `poll_events` (POLLIN, POLLOUT, ...) with a multishot poll (re-armed when the
  // kernel ends it). `callback` gets the returned events each time the fd is ready. The fd must
  // stay open until RemoveFd(); the loop does not own it. RemoveFd() may be called from inside the
  // callback; after it returns the callback is not called again.
  FdWatch AddFd(int fd, uint32_t poll_events, std::function<void(uint32_t revents)> callback);
  void RemoveFd(FdWatch watch);

  // Runs `callback` once, `after` from now (monotonic clock), on the loop thread. Timers due at
  // the same time run in the order they were added. CancelTimer() of a fired or unknown id is a
  // no-op.
  TimerId AddTimer(std::chrono::nanoseconds after, std::function<void()> callback);
  void CancelTimer(TimerId id);

  // Runs passes until Stop(). Must be called by one thread at a time; that thread becomes the
  // loop thread for the duration.
  void Run();
  // Makes Run() return after the current pass. Thread-safe; may be called before Run().
  void Stop();
  // Runs passes until `done()` is true (checked after each pass). For tests and tools that drive
  // the loop from the thread that owns it.
  void RunUntil(const std::function<bool()>& done);
  // Runs exactly one pass; when `block` is true it may sleep until something happens.
  void RunOnce(bool block);
  bool IsLoopThread() const;

  // ---- Ring access for backends (worker/backend/uring_backend.cc) and NullBackend. ----
  //
  // GetSqe() returns a zeroed SQE to fill in, or nullptr when the submission queue is full even
  // after flushing it to the kernel: the caller must keep the operation and retry later (see
  // AddSqeWaiter). The SQE must be passed to CommitSqe() before control returns to the loop.
  // CommitSqe() sets the user data to `handler`; the SQE is submitted at the end of the pass.
  io_uring_sqe* GetSqe();
  void CommitSqe(io_uring_sqe* sqe, CompletionHandler* handler);
  // Like CommitSqe, for SQEs that start device I/O: submitted once Options::io_submit_batch of
  // them are pending (see there), the rest at the end of the pass.
  void CommitIoSqe(io_uring_sqe* sqe, CompletionHandler* handler);
  // Queues an IORING_OP_NOP that completes with result 0. Returns false if the SQ is full.
  bool SubmitNop(CompletionHandler* handler);
  // Calls handler->OnCompletion(result, 0) during the next pass, without a ring round trip. For
  // backends that complete synchronously (RAM, injected faults) but must not complete inside
  // the submitting call. Amortised allocation-free.
  void Defer(CompletionHandler* handler, int32_t result);
  // Runs `retry` once, at the end of the next pass (after submission), so that an operation
  // that found the SQ full can try again. Allocates; only for the back-pressure path.
  void AddSqeWaiter(std::function<void()> retry);

  // Registers `fd` in the ring's sparse file table. Returns the slot index for IOSQE_FIXED_FILE,
  // or an error when the table is full or the kernel refuses. UnregisterFile frees the slot.
  absl::StatusOr<int> RegisterFile(int fd);
  void UnregisterFile(int slot);
  // Registers `region` (pinned by the kernel until unregistered; at most 1 GiB) in the ring's
  // sparse buffer table for IORING_OP_READ_FIXED/WRITE_FIXED. Returns the buffer index. The memory
  // must stay mapped until UnregisterBuffer(); I/O already submitted keeps its own reference.
  absl::StatusOr<int> RegisterBuffer(iovec region);
  void UnregisterBuffer(int slot);

  // The monotonic time read once at the start of the current pass (like libuv's uv_now), for
  // per-request accounting without a clock read per request (clock_gettime is slow on some VMs).
  // Accurate to the length of one pass. Loop thread.
  int64_t now_ns() const { return now_ns_; }
  // Re-reads the clock (for callers outside Run(), such as tests driving the loop by hand).
  int64_t UpdateNow() { return now_ns_ = MonotonicNanos(); }

  Counters counters() const;
  const Options& options() const { return options_; }

 private:
  struct Ring;  // wraps struct io_uring
  struct FdWatchState;
  struct Timer {
    std::function<void()> callback;
  };
  struct DeferredCompletion {
    CompletionHandler* handler;
    int32_t result;
  };
  class WatchHandler;

  explicit EventLoop(Options options);
  absl::Status Init();
  void ArmPoll(FdWatchState* state);
  bool ReapCompletions();
  bool RunDueTimers();
  bool RunPosted();
  bool RunDeferred();
  void RunSqeWaiters();
  void OnWakeFd();
  void Wake();
  int64_t NanosUntilNextTimer() const;

  Options options_;
  std::unique_ptr<Ring> ring_;
  int wake_fd_ = -1;
  FdWatch wake_watch_ = kInvalidFdWatch;

  std::atomic<bool> stop_{false};
  std::atomic<std::thread::id> loop_thread_{};

  std::mutex posted_mu_;
  std::vector<std::function<void()>> posted_;  // guarded by posted_mu_
  std::vector<std::function<void()>> running_posted_;
  std::atomic<bool> wake_pending_{false};

  uint64_t next_watch_id_ = 1;
  std::unordered_map<FdWatch, std::unique_ptr<FdWatchState>> watches_;

  uint64_t next_timer_id_ = 1;
  // (deadline ns, id) -> timer; ordered by deadline then id (FIFO among equal deadlines).
  std::map<std::pair<int64_t, TimerId>, Timer> timers_;
  std::unordered_map<TimerId, int64_t> timer_deadlines_;

  std::vector<DeferredCompletion> deferred_;
  std::vector<DeferredCompletion> running_deferred_;
  std::vector<std::function<void()>> sqe_waiters_;
  std::vector<std::function<void()>> running_sqe_waiters_;

  std::vector<bool> file_slots_used_;
  std::vector<bool> buffer_slots_used_;
  uint32_t pending_sqes_ = 0;
  uint32_t pending_io_sqes_ = 0;
  int64_t last_work_ns_ = 0;
  int64_t now_ns_ = 0;
  // One writer (the loop thread), any reader: relaxed load + store, no read-modify-write.
  struct AtomicCounter {
    std::atomic<uint64_t> value{0};
    void Add(uint64_t n) {
      value.store(value.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
    }
    uint64_t Get() const { return value.load(std::memory_order_relaxed); }
  };
  struct {
    AtomicCounter passes, submit_calls, sqes_submitted, completions, sleeps, sq_full;
    AtomicCounter early_io_submits;
  } counters_;
};

}  // namespace blockplane::common
