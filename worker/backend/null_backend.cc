#include "worker/backend/null_backend.h"

namespace blockplane::worker {

NullBackend::NullBackend(common::EventLoop* loop, Options options)
    : loop_(loop), options_(options) {}

void NullBackend::Complete(BackendCompletion* done) {
  if (options_.latency.count() > 0) {
    loop_->AddTimer(options_.latency, [this, done] { loop_->Defer(done, 0); });
    return;
  }
  if (options_.completion == Completion::kDeferred) {
    loop_->Defer(done, 0);
    return;
  }
  if (!loop_->SubmitNop(done)) {
    loop_->AddSqeWaiter([this, done] { Complete(done); });
  }
}

void NullBackend::Read(uint64_t, const iovec* iov, int iovcnt, BackendCompletion* done) {
  if (options_.zero_reads) {
    for (int i = 0; i < iovcnt; ++i) std::memset(iov[i].iov_base, 0, iov[i].iov_len);
  }
  Complete(done);
}

void NullBackend::Write(uint64_t, const iovec*, int, uint32_t, BackendCompletion* done) {
  Complete(done);
}

absl::Status NullBackend::Grow(uint64_t new_capacity) {
  // Any size: nothing is stored, and after a shrink (BlockDevice keeps the backend's capacity)
  // a later grow may ask for less than the capacity the backend was created with.
  options_.capacity = new_capacity;
  return absl::OkStatus();
}

}  // namespace blockplane::worker
