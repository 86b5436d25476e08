#pragma once

// UringBackend: a regular file or a block device driven through the worker's EventLoop ring.
//
// - Cache modes: kNone opens with O_DIRECT (needs aligned buffers; Limits() says how aligned),
//   kWriteback is buffered, kWritethrough is buffered with O_DSYNC.
// - Reads/writes are IORING_OP_READ/WRITE (one iovec) or READV/WRITEV; FUA writes carry RWF_DSYNC.
//   Flush is IORING_OP_FSYNC with IORING_FSYNC_DATASYNC.
// - Files: discard = fallocate(PUNCH_HOLE|KEEP_SIZE), write-zeroes = fallocate(ZERO_RANGE), or
//   PUNCH_HOLE when unmapping is allowed, all as IORING_OP_FALLOCATE. Block devices: write-zeroes
//   through fallocate on the device (the kernel's blkdev_issue_zeroout, what BLKZEROOUT does);
//   discard through the BLKDISCARD ioctl on a helper thread (io_uring has no discard op on this
//   liburing), completed back on the loop.
// - Short transfers are resubmitted for the rest (a read that hits end of file is zero-filled; a
//   write that makes no progress fails with -ENOSPC); -EAGAIN/-EINTR are resubmitted; a full SQ
//   queues the operation until the loop has room. -EOPNOTSUPP from discard or write-zeroes
//   withdraws the feature (SupportsDiscard()/SupportsWriteZeroes() turn false) and is counted.
// - The file is registered in the ring's file table when possible (IOSQE_FIXED_FILE).
//
// Thread: loop thread only (Open included). The backend must outlive every operation submitted
// to it: destroy it only when no completion is outstanding.

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "common/event_loop.h"
#include "worker/backend/backend.h"
#include "worker/backend/object_pool.h"

namespace blockplane::worker {

enum class CacheMode { kNone, kWriteback, kWritethrough };

class UringBackend final : public Backend {
 public:
  struct Options {
    CacheMode cache = CacheMode::kNone;
    bool read_only = false;
    bool register_file = true;
    // 0 = probe (statx DIOALIGN / the device's logical block size). Larger values force a
    // coarser alignment, e.g. 4096 to emulate a 4K-native disk.
    uint32_t request_alignment = 0;
    // Testing only: cap the bytes of each read/write SQE so that every larger request takes the
    // short-transfer resubmission path. 0 = off.
    uint32_t max_bytes_per_sqe_for_testing = 0;
  };

  // Opens `path` (must exist). Fails with the errno of open/fstat, or when O_DIRECT is requested
  // on a file system that does not support it.
  static absl::StatusOr<std::unique_ptr<UringBackend>> Open(common::EventLoop* loop,
                                                            const std::string& path,
                                                            Options options);
  ~UringBackend() override;

  uint64_t Capacity() const override { return capacity_; }
  const BackendLimits& Limits() const override { return limits_; }
  bool SupportsDiscard() const override { return discard_supported_; }
  bool SupportsWriteZeroes() const override { return write_zeroes_supported_; }
  bool SupportsFua() const override { return true; }

  void Read(uint64_t offset, const iovec* iov, int iovcnt, BackendCompletion* done) override;
  void Write(uint64_t offset, const iovec* iov, int iovcnt, uint32_t flags,
             BackendCompletion* done) override;
  void Flush(BackendCompletion* done) override;
  void Discard(uint64_t offset, uint64_t length, BackendCompletion* done) override;
  void WriteZeroes(uint64_t offset, uint64_t length, uint32_t flags,
                   BackendCompletion* done) override;
  absl::Status Grow(uint64_t new_capacity) override;
  // Registers `region` as an io_uring fixed buffer; single-buffer reads and writes inside it then
  // use IORING_OP_READ_FIXED / WRITE_FIXED (no per-I/O page pinning in the kernel).
  absl::Status RegisterMemory(iovec region) override;
  void UnregisterMemory(iovec region) override;
  BackendCounters Counters() const override { return counters_; }

  bool is_block_device() const { return is_block_device_; }
  bool uses_registered_file() const { return file_slot_ >= 0; }
  int fd() const { return fd_; }

 private:
  enum class Kind { kRead, kWrite, kFlush, kDiscard, kZeroRange, kPunchHole, kBlkDiscard };
  struct Op final : public common::CompletionHandler {
    explicit Op(UringBackend* backend) : backend(backend) {}
    void OnCompletion(int32_t result, uint32_t cqe_flags) override;
    UringBackend* backend;
    Kind kind = Kind::kRead;
    uint64_t offset = 0;
    uint64_t length = 0;  // remaining bytes (read/write) or range length
    uint32_t flags = 0;
    bool refused = false;  // failed before reaching the kernel (feature withdrawn)
    const iovec* iov = nullptr;
    int iovcnt = 0;
    std::vector<iovec> iov_storage;  // the rest, once a transfer has been short
    std::vector<iovec> capped_iov;   // max_bytes_per_sqe_for_testing only
    BackendCompletion* done = nullptr;
  };

  UringBackend(common::EventLoop* loop, Options options);
  Op* NewOp(Kind kind, uint64_t offset, uint64_t length, BackendCompletion* done);
  void Submit(Op* op);
  void SubmitQueued();
  void Finish(Op* op, int result);
  void Advance(Op* op, uint64_t bytes);
  void OnResult(Op* op, int result);
  void RunBlkDiscard(Op* op);

  common::EventLoop* loop_;
  Options options_;
  int fd_ = -1;
  int file_slot_ = -1;
  bool is_block_device_ = false;
  uint64_t capacity_ = 0;
  BackendLimits limits_;
  bool discard_supported_ = true;
  bool write_zeroes_supported_ = true;
  BackendCounters counters_;
  ObjectPool<Op> ops_;
  struct Region {
    uintptr_t start;
    uintptr_t end;
    int slot;
  };
  // The registered region containing [base, base + length), or nullptr.
  const Region* FindRegion(const void* base, size_t length) const;
  std::vector<Region> regions_;  // sorted by start, non-overlapping
  std::deque<Op*> waiting_for_sqe_;
  bool sqe_waiter_armed_ = false;

  // Helper thread for blocking ioctls (BLKDISCARD); started on first use.
  std::thread helper_;
  std::mutex helper_mu_;
  std::condition_variable helper_cv_;
  std::deque<Op*> helper_queue_;  // guarded by helper_mu_
  bool helper_stop_ = false;      // guarded by helper_mu_
};

}  // namespace blockplane::worker
