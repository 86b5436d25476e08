#include "worker/backend/ram_backend.h"

#include <errno.h>

#include <algorithm>
#include <cstring>

namespace blockplane::worker {

RamBackend::RamBackend(common::EventLoop* loop, Options options)
    : loop_(loop), options_(options), data_(options.capacity, 0), rng_(options.reorder_seed) {}

bool RamBackend::CheckRw(uint64_t offset, const iovec* iov, int iovcnt, uint64_t* length) {
  const BackendLimits& l = options_.limits;
  uint64_t total = 0;
  bool ok = iovcnt > 0 && static_cast<uint32_t>(iovcnt) <= l.max_segments;
  for (int i = 0; ok && i < iovcnt; ++i) {
    if (reinterpret_cast<uintptr_t>(iov[i].iov_base) % l.buffer_alignment != 0 ||
        iov[i].iov_len % l.buffer_alignment != 0) {
      ok = false;
    }
    total += iov[i].iov_len;
  }
  ok = ok && offset % l.request_alignment == 0 && total % l.request_alignment == 0 &&
       total <= l.max_transfer && total > 0;
  *length = total;
  if (!ok) ++stats_.misaligned;
  return ok;
}

void RamBackend::Read(uint64_t offset, const iovec* iov, int iovcnt, BackendCompletion* done) {
  uint64_t length = 0;
  if (!CheckRw(offset, iov, iovcnt, &length)) {
    Queue({Kind::kRead, offset, 0, nullptr, -EINVAL, done});
    return;
  }
  Queue({Kind::kRead, offset, length, iov, iovcnt, done});
}

void RamBackend::Write(uint64_t offset, const iovec* iov, int iovcnt, uint32_t,
                       BackendCompletion* done) {
  uint64_t length = 0;
  if (!CheckRw(offset, iov, iovcnt, &length)) {
    Queue({Kind::kWrite, offset, 0, nullptr, -EINVAL, done});
    return;
  }
  Queue({Kind::kWrite, offset, length, iov, iovcnt, done});
}

void RamBackend::Flush(BackendCompletion* done) { Queue({Kind::kFlush, 0, 0, nullptr, 0, done}); }

void RamBackend::Discard(uint64_t offset, uint64_t length, BackendCompletion* done) {
  Queue({Kind::kDiscard, offset, length, nullptr, 0, done});
}

void RamBackend::WriteZeroes(uint64_t offset, uint64_t length, uint32_t, BackendCompletion* done) {
  Queue({Kind::kWriteZeroes, offset, length, nullptr, 0, done});
}

void RamBackend::Queue(Op op) {
  pending_.push_back(op);
  stats_.max_in_flight = std::max<uint64_t>(stats_.max_in_flight, in_flight());
  if (!tick_scheduled_) {
    tick_scheduled_ = true;
    loop_->Defer(&tick_, 0);
  }
}

void RamBackend::RunTick() {
  tick_scheduled_ = false;
  running_.swap(pending_);
  if (options_.reorder_seed != 0) {
    std::shuffle(running_.begin(), running_.end(), rng_);
    // Postpone about a quarter of the operations by a pass.
    size_t keep = 0;
    for (size_t i = 0; i < running_.size(); ++i) {
      if (rng_() % 4 == 0) {
        pending_.push_back(running_[i]);
      } else {
        running_[keep++] = running_[i];
      }
    }
    running_.resize(keep);
    if (!pending_.empty()) {
      tick_scheduled_ = true;
      loop_->Defer(&tick_, 0);
    }
  }
  executing_ = running_.size();
  // Completions may queue new operations (into pending_), never into running_.
  for (size_t i = 0; i < running_.size(); ++i) {
    Op op = running_[i];
    int result = Execute(op);
    --executing_;
    op.done->OnBackendComplete(result);
  }
  running_.clear();
}

int RamBackend::Execute(const Op& op) {
  if (op.iovcnt < 0) return op.iovcnt;  // refused at submission
  const BackendLimits& l = options_.limits;
  switch (op.kind) {
    case Kind::kRead:
    case Kind::kWrite: {
      if (op.offset > data_.size() || op.length > data_.size() - op.offset) return -EINVAL;
      uint64_t pos = op.offset;
      for (int i = 0; i < op.iovcnt; ++i) {
        uint8_t* base = static_cast<uint8_t*>(op.iov[i].iov_base);
        if (op.kind == Kind::kRead) {
          std::memcpy(base, data_.data() + pos, op.iov[i].iov_len);
        } else {
          std::memcpy(data_.data() + pos, base, op.iov[i].iov_len);
        }
        pos += op.iov[i].iov_len;
      }
      ++(op.kind == Kind::kRead ? stats_.reads : stats_.writes);
      return 0;
    }
    case Kind::kFlush:
      ++stats_.flushes;
      return 0;
    case Kind::kDiscard:
    case Kind::kWriteZeroes: {
      bool discard = op.kind == Kind::kDiscard;
      if (discard ? !options_.supports_discard : !options_.supports_write_zeroes) {
        return -EOPNOTSUPP;
      }
      uint64_t max = discard ? l.max_discard : l.max_write_zeroes;
      if (op.length == 0 || (max != 0 && op.length > max) || op.offset % l.request_alignment != 0 ||
          op.length % l.request_alignment != 0 ||
          (discard && l.discard_granularity != 0 &&
           (op.offset % l.discard_granularity != 0 || op.length % l.discard_granularity != 0))) {
        ++stats_.misaligned;
        return -EINVAL;
      }
      if (op.offset > data_.size() || op.length > data_.size() - op.offset) return -EINVAL;
      std::memset(data_.data() + op.offset, 0, op.length);
      ++(discard ? stats_.discards : stats_.write_zeroes);
      return 0;
    }
  }
  return -EINVAL;
}

absl::Status RamBackend::Grow(uint64_t new_capacity) {
  if (new_capacity < data_.size()) return absl::InvalidArgumentError("cannot shrink");
  data_.resize(new_capacity, 0);
  return absl::OkStatus();
}

}  // namespace blockplane::worker
