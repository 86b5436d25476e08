#include "worker/backend/faulty_backend.h"

#include <bit>

namespace blockplane::worker {

FaultyBackend::FaultyBackend(common::EventLoop* loop, Backend* inner, uint64_t seed)
    : loop_(loop), inner_(inner), rng_(seed) {}

int FaultyBackend::AddRule(FaultRule rule) {
  rules_.push_back({rule});
  return static_cast<int>(rules_.size() - 1);
}

uint64_t FaultyBackend::ops_seen(FaultOp op) const {
  return stats_.ops_seen[std::countr_zero(static_cast<uint32_t>(op))];
}

void FaultyBackend::Failure::OnCompletion(int32_t result, uint32_t) {
  BackendCompletion* completion = done;
  owner->failures_.Put(this);
  completion->OnBackendComplete(result);
}

void FaultyBackend::Handle(const Call& call) {
  ++stats_.ops_seen[std::countr_zero(static_cast<uint32_t>(call.op))];
  int error = 0;
  bool torn = false;
  std::chrono::nanoseconds delay{0};
  for (RuleState& state : rules_) {
    const FaultRule& rule = state.rule;
    if (!(rule.ops & static_cast<uint32_t>(call.op))) continue;
    if (call.op != FaultOp::kFlush &&
        (call.offset >= rule.range_end || call.offset + call.length <= rule.range_start)) {
      continue;
    }
    if (state.matched++ < rule.skip_first) continue;
    if (rule.probability < 1.0 &&
        std::uniform_real_distribution<double>(0.0, 1.0)(rng_) >= rule.probability) {
      continue;
    }
    if (rule.error != 0) {
      if (rule.max_failures >= 0 && state.failed >= rule.max_failures) continue;
      ++state.failed;
      error = rule.error;
    }
    if (rule.short_transfer && (call.op == FaultOp::kRead || call.op == FaultOp::kWrite) &&
        call.length >= 2 * inner_->Limits().request_alignment) {
      torn = true;
    }
    if (rule.delay > delay) delay = rule.delay;
    if (error != 0) break;
  }
  if (error != 0) ++stats_.injected_failures;
  if (torn) {
    ++stats_.short_transfers;
    if (delay.count() > 0) {
      loop_->AddTimer(delay, [this, call, error] { StartTorn(call, error); });
    } else {
      StartTorn(call, error);
    }
    return;
  }
  if (delay.count() > 0) {
    ++stats_.delayed;
    loop_->AddTimer(delay, [this, call, error] {
      if (error != 0) {
        call.done->OnBackendComplete(-error);
      } else {
        Forward(call);
      }
    });
    return;
  }
  if (error != 0) {
    Failure* failure = failures_.Get(this);
    failure->done = call.done;
    loop_->Defer(failure, -error);
    return;
  }
  Forward(call);
}

void FaultyBackend::Forward(const Call& call) {
  switch (call.op) {
    case FaultOp::kRead:
      inner_->Read(call.offset, call.iov, call.iovcnt, call.done);
      break;
    case FaultOp::kWrite:
      inner_->Write(call.offset, call.iov, call.iovcnt, call.flags, call.done);
      break;
    case FaultOp::kFlush:
      inner_->Flush(call.done);
      break;
    case FaultOp::kDiscard:
      inner_->Discard(call.offset, call.length, call.done);
      break;
    case FaultOp::kWriteZeroes:
      inner_->WriteZeroes(call.offset, call.length, call.flags, call.done);
      break;
  }
}

void FaultyBackend::StartTorn(const Call& call, int error_after_head) {
  Torn* torn = torn_.Get(this);
  torn->call = call;
  torn->error_after_head = error_after_head;
  torn->in_tail = false;
  torn->head.clear();
  torn->tail.clear();
  const uint64_t align = inner_->Limits().request_alignment;
  const uint64_t blocks = call.length / align;
  torn->head_length = align * (1 + rng_() % (blocks - 1));
  uint64_t left = torn->head_length;
  for (int i = 0; i < call.iovcnt; ++i) {
    const iovec& v = call.iov[i];
    if (left >= v.iov_len) {
      torn->head.push_back(v);
      left -= v.iov_len;
    } else if (left > 0) {
      torn->head.push_back({v.iov_base, left});
      torn->tail.push_back({static_cast<uint8_t*>(v.iov_base) + left, v.iov_len - left});
      left = 0;
    } else {
      torn->tail.push_back(v);
    }
  }
  Call head = call;
  head.iov = torn->head.data();
  head.iovcnt = static_cast<int>(torn->head.size());
  head.length = torn->head_length;
  head.done = torn;
  Forward(head);
}

void FaultyBackend::OnTornPart(Torn* torn, int result) {
  BackendCompletion* done = torn->call.done;
  if (result < 0 || torn->in_tail || torn->error_after_head != 0) {
    // Failure of either part, the tail's success, or the injected failure after the head.
    const int final_result = result < 0 ? result : (torn->in_tail ? 0 : -torn->error_after_head);
    torn_.Put(torn);
    done->OnBackendComplete(final_result);
    return;
  }
  torn->in_tail = true;
  Call tail = torn->call;
  tail.offset += torn->head_length;
  tail.iov = torn->tail.data();
  tail.iovcnt = static_cast<int>(torn->tail.size());
  tail.length -= torn->head_length;
  tail.done = torn;
  Forward(tail);
}

static uint64_t IovLength(const iovec* iov, int iovcnt) {
  uint64_t total = 0;
  for (int i = 0; i < iovcnt; ++i) total += iov[i].iov_len;
  return total;
}

void FaultyBackend::Read(uint64_t offset, const iovec* iov, int iovcnt, BackendCompletion* done) {
  Handle({FaultOp::kRead, offset, IovLength(iov, iovcnt), iov, iovcnt, 0, done});
}

void FaultyBackend::Write(uint64_t offset, const iovec* iov, int iovcnt, uint32_t flags,
                          BackendCompletion* done) {
  Handle({FaultOp::kWrite, offset, IovLength(iov, iovcnt), iov, iovcnt, flags, done});
}

void FaultyBackend::Flush(BackendCompletion* done) {
  Handle({FaultOp::kFlush, 0, 0, nullptr, 0, 0, done});
}

void FaultyBackend::Discard(uint64_t offset, uint64_t length, BackendCompletion* done) {
  Handle({FaultOp::kDiscard, offset, length, nullptr, 0, 0, done});
}

void FaultyBackend::WriteZeroes(uint64_t offset, uint64_t length, uint32_t flags,
                                BackendCompletion* done) {
  Handle({FaultOp::kWriteZeroes, offset, length, nullptr, 0, flags, done});
}

}  // namespace blockplane::worker
