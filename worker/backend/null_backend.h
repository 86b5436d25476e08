#pragma once

// NullBackend: reads return zeroes, writes are dropped. For benchmarks of the layers above.
// By default every request completes through an io_uring NOP on the loop's ring (or after
// `latency` via a loop timer), so a benchmark measures the full submit/reap path, not a function
// call. Completion::kDeferred completes on the loop's next pass with no kernel call instead, as
// QEMU's null-co and SPDK's null bdev do: what is measured is then the stack above alone.

#include <chrono>
#include <cstring>

#include "common/event_loop.h"
#include "worker/backend/backend.h"

namespace blockplane::worker {

class NullBackend final : public Backend {
 public:
  enum class Completion { kNop, kDeferred };
  struct Options {
    uint64_t capacity = uint64_t{1} << 30;
    Completion completion = Completion::kNop;
    BackendLimits limits;
    // Reads fill their buffers with zeroes (costs a memset); false leaves buffers untouched.
    bool zero_reads = false;
    std::chrono::nanoseconds latency{0};
  };
  // `loop` must outlive the backend. Loop thread only.
  NullBackend(common::EventLoop* loop, Options options);

  uint64_t Capacity() const override { return options_.capacity; }
  const BackendLimits& Limits() const override { return options_.limits; }
  bool SupportsDiscard() const override { return true; }
  bool SupportsWriteZeroes() const override { return true; }
  bool SupportsFua() const override { return true; }

  void Read(uint64_t offset, const iovec* iov, int iovcnt, BackendCompletion* done) override;
  void Write(uint64_t offset, const iovec* iov, int iovcnt, uint32_t flags,
             BackendCompletion* done) override;
  void Flush(BackendCompletion* done) override { Complete(done); }
  void Discard(uint64_t, uint64_t, BackendCompletion* done) override { Complete(done); }
  void WriteZeroes(uint64_t, uint64_t, uint32_t, BackendCompletion* done) override {
    Complete(done);
  }
  absl::Status Grow(uint64_t new_capacity) override;

 private:
  // Completes `done` through the loop: the NOP's (or the deferred event's) handler is `done`
  // itself (BackendCompletion is a loop completion handler), so nothing is allocated or pooled.
  void Complete(BackendCompletion* done);

  common::EventLoop* loop_;
  Options options_;
};

}  // namespace blockplane::worker
