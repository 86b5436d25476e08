#pragma once

// SelfTestIo: the worker's own test and diagnostic I/O path (not a frontend).
//
// Runs a fixed workload (SelfTestIoRequest: `ops` requests of `bytes` each, read or write,
// sequential from `offset`, wrapping at the end of the device) through a BlockDevice, exactly as
// a frontend would: the requests go through the block layer, the backend and the accounting. It
// exists so that tests (and an operator checking a device) can produce real, counted I/O before a
// guest frontend is connected; the Xen/vhost-user frontends replace it for real traffic.
//
// Writes write a fixed non-zero pattern: the device's data is overwritten.
// Threading: loop thread only. Ownership: the caller keeps the SelfTestIo alive until `done` has
// run, and the BlockDevice alive as long as the SelfTestIo (destroy the device first if the loop
// stopped with requests in flight: their buffers stay valid until the SelfTestIo goes).

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "blockplane/internal/worker.pb.h"
#include "worker/block/block_device.h"

namespace blockplane::worker {

class SelfTestIo {
 public:
  static constexpr uint32_t kMaxBytes = 1u << 20;
  static constexpr uint32_t kMaxOps = 1u << 20;
  static constexpr uint32_t kMaxQueueDepth = 64;

  struct Result {
    uint64_t completed = 0;
    uint64_t failed = 0;
    int first_error = 0;  // negative errno of the first failure
  };

  // Validates the request (InvalidArgument names the field) and starts it; `done` runs on the loop
  // thread once every request has completed, never inside Start().
  static absl::StatusOr<std::unique_ptr<SelfTestIo>> Start(
      BlockDevice* device, const internal::SelfTestIoRequest& request,
      std::function<void(const Result&)> done);
  ~SelfTestIo();
  SelfTestIo(const SelfTestIo&) = delete;
  SelfTestIo& operator=(const SelfTestIo&) = delete;

  bool finished() const { return result_.completed == total_; }

 private:
  class Slot final : public BlockCompletion {
   public:
    void OnBlockComplete(int result) override { owner->OnComplete(this, result); }
    SelfTestIo* owner = nullptr;
    uint8_t* buffer = nullptr;
    iovec iov{};
  };

  SelfTestIo(BlockDevice* device, const internal::SelfTestIoRequest& request,
             std::function<void(const Result&)> done);
  void SubmitNext(Slot* slot);
  void OnComplete(Slot* slot, int result);

  BlockDevice* device_;
  const bool write_;
  const uint32_t bytes_;
  const uint64_t total_;
  uint64_t next_offset_;
  uint64_t submitted_ = 0;
  Result result_;
  std::function<void(const Result&)> done_;
  std::vector<std::unique_ptr<Slot>> slots_;
};

}  // namespace blockplane::worker
