#include "worker/backend/null_backend.h"

namespace blockplane::worker {

NullBackend::NullBackend(common::EventLoop* loop, Options options)
    : loop_(loop), options_(options) {}

void NullBackend::Op::OnCompletion(int32_t result, uint32_t) {
  BackendCompletion* completion = done;
  NullBackend* owner = backend;
  owner->ops_.Put(this);
  completion->OnBackendComplete(result < 0 ? result : 0);
}

void NullBackend::SubmitOp(Op* op) {
  if (options_.latency.count() > 0) {
    loop_->AddTimer(options_.latency, [this, op] { loop_->Defer(op, 0); });
    return;
  }
  if (options_.completion == Completion::kDeferred) {
    loop_->Defer(op, 0);
    return;
  }
  if (!loop_->SubmitNop(op)) {
    loop_->AddSqeWaiter([this, op] { SubmitOp(op); });
  }
}

void NullBackend::Complete(BackendCompletion* done) {
  Op* op = ops_.Get(this);
  op->done = done;
  SubmitOp(op);
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
