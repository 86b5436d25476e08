#pragma once

// FaultyBackend: wraps another backend and injects failures and delays, for tests (the LevelDB
// ErrorEnv idea). Rules match by operation type and byte range; a matching operation can be let
// through for the first `skip_first` matches, then fail with `error` (a positive errno) up to
// `max_failures` times, each time with `probability` (seeded, reproducible), optionally after
// `delay`. Operations that do not fail are forwarded to the inner backend (after the delay).
// Injected failures complete on a later loop pass, never inside the submitting call.
//
// `short_transfer` models what a short read/write looks like from above (the backend contract is
// all-or-error, backends resubmit short transfers themselves): the read or write runs as two inner
// operations, a seeded random aligned prefix and then the rest, so concurrent requests can observe
// the half-done transfer. With `error` set as well, the prefix lands and then the request fails
// (a partial write followed by ENOSPC/EIO).

#include <chrono>
#include <cstdint>
#include <random>
#include <vector>

#include "common/event_loop.h"
#include "worker/backend/backend.h"
#include "worker/backend/object_pool.h"

namespace blockplane::worker {

enum class FaultOp : uint32_t {
  kRead = 1u << 0,
  kWrite = 1u << 1,
  kFlush = 1u << 2,
  kDiscard = 1u << 3,
  kWriteZeroes = 1u << 4,
};
inline constexpr uint32_t kAllFaultOps = 0x1f;
constexpr uint32_t operator|(FaultOp a, FaultOp b) {
  return static_cast<uint32_t>(a) | static_cast<uint32_t>(b);
}
constexpr uint32_t operator|(uint32_t a, FaultOp b) { return a | static_cast<uint32_t>(b); }

struct FaultRule {
  uint32_t ops = kAllFaultOps;      // FaultOp bits
  uint64_t range_start = 0;         // matches operations overlapping [range_start, range_end);
  uint64_t range_end = UINT64_MAX;  // flushes match any range
  int error = 5;                    // EIO; 0 = do not fail, only delay
  uint64_t skip_first = 0;          // let this many matching operations through first
  int64_t max_failures = -1;        // -1 = unlimited
  double probability = 1.0;
  std::chrono::nanoseconds delay{0};
  bool short_transfer = false;  // reads and writes only
};

class FaultyBackend final : public Backend {
 public:
  struct Stats {
    uint64_t ops_seen[5] = {};  // by FaultOp bit index
    uint64_t injected_failures = 0;
    uint64_t delayed = 0;
    uint64_t short_transfers = 0;
  };

  // Does not own `inner`; `inner` and `loop` must outlive this object. Loop thread only.
  FaultyBackend(common::EventLoop* loop, Backend* inner, uint64_t seed = 1);

  int AddRule(FaultRule rule);  // returns the rule index
  void ClearRules() { rules_.clear(); }
  const Stats& stats() const { return stats_; }
  uint64_t ops_seen(FaultOp op) const;

  uint64_t Capacity() const override { return inner_->Capacity(); }
  const BackendLimits& Limits() const override { return inner_->Limits(); }
  bool SupportsDiscard() const override { return inner_->SupportsDiscard(); }
  bool SupportsWriteZeroes() const override { return inner_->SupportsWriteZeroes(); }
  bool SupportsFua() const override { return inner_->SupportsFua(); }

  void Read(uint64_t offset, const iovec* iov, int iovcnt, BackendCompletion* done) override;
  void Write(uint64_t offset, const iovec* iov, int iovcnt, uint32_t flags,
             BackendCompletion* done) override;
  void Flush(BackendCompletion* done) override;
  void Discard(uint64_t offset, uint64_t length, BackendCompletion* done) override;
  void WriteZeroes(uint64_t offset, uint64_t length, uint32_t flags,
                   BackendCompletion* done) override;
  absl::Status Grow(uint64_t new_capacity) override { return inner_->Grow(new_capacity); }
  absl::Status RegisterMemory(iovec region) override { return inner_->RegisterMemory(region); }
  void UnregisterMemory(iovec region) override { inner_->UnregisterMemory(region); }
  BackendCounters Counters() const override { return inner_->Counters(); }

 private:
  struct RuleState {
    FaultRule rule;
    uint64_t matched = 0;
    int64_t failed = 0;
  };
  struct Call {
    FaultOp op;
    uint64_t offset;
    uint64_t length;
    const iovec* iov;
    int iovcnt;
    uint32_t flags;
    BackendCompletion* done;
  };
  struct Failure final : public common::CompletionHandler {
    explicit Failure(FaultyBackend* owner) : owner(owner) {}
    void OnCompletion(int32_t result, uint32_t) override;
    FaultyBackend* owner;
    BackendCompletion* done = nullptr;
  };

  // A read or write done in two parts (short_transfer).
  struct Torn final : public BackendCompletion {
    explicit Torn(FaultyBackend* owner) : owner(owner) {}
    void OnBackendComplete(int result) override { owner->OnTornPart(this, result); }
    FaultyBackend* owner;
    Call call{};
    std::vector<iovec> head;
    std::vector<iovec> tail;
    uint64_t head_length = 0;
    int error_after_head = 0;
    bool in_tail = false;
  };

  void Handle(const Call& call);
  void Forward(const Call& call);
  void StartTorn(const Call& call, int error_after_head);
  void OnTornPart(Torn* torn, int result);

  common::EventLoop* loop_;
  Backend* inner_;
  std::mt19937_64 rng_;
  std::vector<RuleState> rules_;
  ObjectPool<Failure> failures_;
  ObjectPool<Torn> torn_;
  Stats stats_;
};

}  // namespace blockplane::worker
