#pragma once

// RamBackend: a backend over a byte vector, for tests. It enforces Limits() like a strict
// O_DIRECT device (misaligned requests fail with -EINVAL and are counted), so tests prove that the
// block layer pads, bounces and splits. Data moves when an operation *executes*, which happens on
// a later loop pass; with a reorder seed, operations queued in the same pass execute in a seeded
// random order and some are postponed by a pass, to expose ordering bugs in the layers above.

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "common/event_loop.h"
#include "worker/backend/backend.h"
#include "worker/backend/object_pool.h"

namespace blockplane::worker {

class RamBackend final : public Backend {
 public:
  struct Options {
    uint64_t capacity = 1 << 20;
    BackendLimits limits;
    bool supports_discard = true;
    bool supports_write_zeroes = true;
    bool supports_fua = false;
    uint64_t reorder_seed = 0;  // 0: execute in submission order
  };
  struct Stats {
    uint64_t reads = 0, writes = 0, flushes = 0, discards = 0, write_zeroes = 0;
    uint64_t misaligned = 0;  // requests refused for violating Limits()
    uint64_t max_in_flight = 0;
  };

  // `loop` must outlive the backend. Loop thread only.
  RamBackend(common::EventLoop* loop, Options options);

  uint64_t Capacity() const override { return data_.size(); }
  const BackendLimits& Limits() const override { return options_.limits; }
  bool SupportsDiscard() const override { return options_.supports_discard; }
  bool SupportsWriteZeroes() const override { return options_.supports_write_zeroes; }
  bool SupportsFua() const override { return options_.supports_fua; }

  void Read(uint64_t offset, const iovec* iov, int iovcnt, BackendCompletion* done) override;
  void Write(uint64_t offset, const iovec* iov, int iovcnt, uint32_t flags,
             BackendCompletion* done) override;
  void Flush(BackendCompletion* done) override;
  void Discard(uint64_t offset, uint64_t length, BackendCompletion* done) override;
  void WriteZeroes(uint64_t offset, uint64_t length, uint32_t flags,
                   BackendCompletion* done) override;
  absl::Status Grow(uint64_t new_capacity) override;

  std::span<uint8_t> data() { return data_; }
  const Stats& stats() const { return stats_; }
  uint64_t in_flight() const { return pending_.size() + executing_; }

 private:
  enum class Kind { kRead, kWrite, kFlush, kDiscard, kWriteZeroes };
  struct Op {
    Kind kind;
    uint64_t offset;
    uint64_t length;
    const iovec* iov;
    int iovcnt;
    BackendCompletion* done;
  };
  class Tick final : public common::CompletionHandler {
   public:
    explicit Tick(RamBackend* backend) : backend_(backend) {}
    void OnCompletion(int32_t, uint32_t) override { backend_->RunTick(); }

   private:
    RamBackend* backend_;
  };

  void Queue(Op op);
  void RunTick();
  int Execute(const Op& op);
  bool CheckRw(uint64_t offset, const iovec* iov, int iovcnt, uint64_t* length);

  common::EventLoop* loop_;
  Options options_;
  std::vector<uint8_t> data_;
  std::vector<Op> pending_;
  std::vector<Op> running_;
  Tick tick_{this};
  bool tick_scheduled_ = false;
  uint64_t executing_ = 0;
  std::mt19937_64 rng_;
  Stats stats_;
};

}  // namespace blockplane::worker
