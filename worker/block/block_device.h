#pragma once

// BlockDevice: the block layer of a worker, with the semantics of QEMU's block/io.c.
//
// A frontend (Xen blkif, virtio-blk) turns ring entries into BlockRequests and calls Submit();
// the device validates them, pads unaligned requests (bounce buffers, read-modify-write),
// serialises overlapping requests while an RMW is in flight, splits requests above the backend's
// limits, skips flushes when nothing was written since the last one, converts all-zero writes
// (detect-zeroes), queues requests while drained or stopped on an error, and accounts every
// request per operation type.
//
// Ownership: the device owns the backend; the loop must outlive the device. The caller owns each
// BlockRequest's iovec array and buffers and the BlockCompletion, and keeps them alive until the
// completion runs.
// Threading: every method runs on the loop thread, except Stats(), which any thread may call.
// Completions run on the loop thread and never inside Submit() (always on a later loop pass), so
// a frontend may submit a whole ring's worth of requests and then handle completions.
// Failure: results are 0 or a negative errno. Invalid requests (misaligned, beyond capacity,
// writes to a read-only device) fail with -EINVAL / -EROFS and are counted as `invalid`.
// I/O errors follow the error policy: kReport completes the request with the error (counted as
// `failed`); kStop parks it, stops admitting requests, and calls on_error_stop once; the operator
// fixes the backend and calls ResumeAfterError(), which retries the parked requests in order
// before the queued ones, so nothing is lost.
// The device must be idle (drained, no completion outstanding) when it is destroyed.

#include <sys/uio.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/event_loop.h"
#include "worker/backend/backend.h"
#include "worker/backend/object_pool.h"

namespace blockplane::worker {

enum class BlockOp : uint8_t { kRead = 0, kWrite = 1, kFlush = 2, kDiscard = 3, kWriteZeroes = 4 };
inline constexpr int kBlockOpCount = 5;
const char* BlockOpName(BlockOp op);  // "read", "write", "flush", "discard", "write_zeroes"

// Request flags.
inline constexpr uint32_t kBlockFua = 1u << 0;       // write: durable on completion
inline constexpr uint32_t kBlockMayUnmap = 1u << 1;  // write-zeroes: may deallocate
inline constexpr uint32_t kBlockNoFallback = 1u
                                             << 2;  // write-zeroes: fail rather than write zeroes

struct BlockRequest {
  BlockOp op = BlockOp::kRead;
  uint32_t flags = 0;
  uint64_t offset = 0;  // bytes; multiple of the logical block size
  uint64_t length = 0;  // discard / write-zeroes only; reads and writes use the iovec total
  const iovec* iov = nullptr;
  int iovcnt = 0;
};

class BlockCompletion {
 public:
  // 0 on success, negative errno on failure.
  virtual void OnBlockComplete(int result) = 0;

 protected:
  ~BlockCompletion() = default;
};

enum class DiscardMode { kIgnore, kUnmap };
enum class DetectZeroes { kOff, kOn, kUnmap };
enum class ErrorPolicy { kReport, kStop };

struct BlockOpCounters;     // below
struct BlockLayerCounters;  // below

struct BlockDeviceOptions {
  uint32_t logical_block_size = 512;  // 512 or 4096: the guest-visible sector size
  bool read_only = false;
  DiscardMode discard = DiscardMode::kIgnore;
  DetectZeroes detect_zeroes = DetectZeroes::kOff;
  ErrorPolicy error_policy = ErrorPolicy::kReport;
  // kStop only: called on the loop thread when the device stops on an I/O error (once per stop).
  std::function<void(int error)> on_error_stop;
  // Optional storage for the per-operation counters: an array of kBlockOpCount (indexed by
  // BlockOp) that outlives the device, e.g. in a shared-memory stats segment so that counters
  // survive a crash of the worker (worker/metrics/stats_segment.h). The device adds to whatever
  // it holds; null: the device keeps its own, starting at zero.
  BlockOpCounters* counters = nullptr;
  // Optional storage for the block layer's own counters (skipped flushes, read-modify-writes, ...),
  // with the same rules as `counters`; null: the device keeps its own.
  BlockLayerCounters* layer_counters = nullptr;
};

inline constexpr int kLatencyBuckets = 26;
// Bucket i counts requests with latency < LatencyBucketUpperBoundNs(i) (and >= bound(i-1));
// bounds double from 1 us to 2^24 us (16.8 s), so the Prometheus histogram resolves 10 us to
// 10 s; the last bucket is unbounded.
uint64_t LatencyBucketUpperBoundNs(int bucket);
int LatencyBucketIndex(uint64_t latency_ns);

// Per-operation counters as the block layer keeps them: one writer (the loop thread), any reader,
// relaxed atomics (no lock, no read-modify-write instruction on the hot path). Standard layout and
// lock-free, so they may live in memory shared with other processes.
struct BlockCounter {
  std::atomic<uint64_t> value{0};
  void Add(uint64_t n) {
    value.store(value.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }
  void Set(uint64_t n) { value.store(n, std::memory_order_relaxed); }
  uint64_t Get() const { return value.load(std::memory_order_relaxed); }
};
struct BlockOpCounters {
  BlockCounter bytes, ops, total_time_ns, failed, invalid;
  std::array<BlockCounter, kLatencyBuckets> histogram;
};
// The block layer's own work, the counters of BlockDeviceStats' fields of the same names; the
// same rules as BlockOpCounters.
struct BlockLayerCounters {
  BlockCounter flushes_skipped, rmw, bounced, split, serialising_waits, zero_writes_detected;
  BlockCounter write_zeroes_fallbacks, error_stops;
};
static_assert(std::atomic<uint64_t>::is_always_lock_free);
static_assert(std::is_standard_layout_v<BlockOpCounters>);
static_assert(std::is_standard_layout_v<BlockLayerCounters>);
static_assert(sizeof(BlockOpCounters) == (5 + kLatencyBuckets) * sizeof(uint64_t));

struct BlockOpStats {
  uint64_t bytes = 0;
  uint64_t ops = 0;  // completed successfully (failed and invalid are counted apart)
  uint64_t total_time_ns = 0;
  uint64_t failed = 0;
  uint64_t invalid = 0;
  std::array<uint64_t, kLatencyBuckets> latency_histogram{};
};

struct BlockDeviceStats {
  std::array<BlockOpStats, kBlockOpCount> ops;  // indexed by BlockOp
  uint64_t in_flight = 0;                       // admitted, not completed
  uint64_t queued = 0;                          // waiting for Resume()/ResumeAfterError()
  uint64_t parked = 0;                          // failed under kStop, retried on resume
  uint64_t highest_written_offset = 0;          // end of the highest successful write
  uint64_t idle_ns = 0;                         // since the last completion; 0 while busy
  uint64_t flushes_skipped = 0;                 // nothing written since the last flush
  uint64_t rmw = 0;                             // requests padded with read-modify-write
  uint64_t bounced = 0;                         // requests through a bounce buffer
  uint64_t split = 0;                           // requests split into several backend ops
  uint64_t serialising_waits = 0;               // requests that waited for an overlapping RMW
  uint64_t zero_writes_detected = 0;            // writes turned into write-zeroes
  uint64_t write_zeroes_fallbacks = 0;          // write-zeroes done by writing zero buffers
  uint64_t discard_withdrawn = 0;               // backend said EOPNOTSUPP (1 once withdrawn)
  uint64_t write_zeroes_withdrawn = 0;
  uint64_t error_stops = 0;  // times the device stopped on an error
  bool stopped_on_error = false;
  bool quiesced = false;
  int last_error = 0;
};

// What a frontend advertises to the guest.
struct BlockDeviceInfo {
  uint64_t capacity = 0;  // bytes, multiple of logical_block_size
  uint32_t logical_block_size = 512;
  uint32_t physical_block_size = 4096;
  bool read_only = false;
  bool discard = false;      // discard=unmap and the backend can discard
  bool write_zeroes = true;  // always accepted (falls back to writing zeroes)
  uint32_t discard_granularity = 0;
};

class BlockDevice {
 public:
  // Fails with InvalidArgument for a logical block size other than 512/4096 or a backend whose
  // capacity is smaller than one block.
  static absl::StatusOr<std::unique_ptr<BlockDevice>> Create(common::EventLoop* loop,
                                                             std::unique_ptr<Backend> backend,
                                                             BlockDeviceOptions options);
  ~BlockDevice();
  BlockDevice(const BlockDevice&) = delete;
  BlockDevice& operator=(const BlockDevice&) = delete;

  // Starts `request`; `done` runs exactly once, on a later loop pass. No allocation once the
  // request pool has grown to the peak queue depth (except for bounce buffers above 1 MiB).
  void Submit(const BlockRequest& request, BlockCompletion* done);

  // Quiesces the device: requests submitted from now on queue; `drained` runs (on a later pass)
  // once every admitted request has completed and a backend flush has made them durable, with the
  // flush result (0 or -errno). Nested: each Drain() needs one Resume().
  void Drain(std::function<void(int result)> drained);
  // Ends one Drain(). When the last one ends, queued requests are admitted in submission order.
  // FailedPrecondition if the device is not drained.
  absl::Status Resume();
  // kStop policy: leaves the error stop and retries the parked requests (in their original order,
  // before queued ones). FailedPrecondition if the device is not stopped.
  absl::Status ResumeAfterError();
  // Sets the device size to `new_size` bytes (a multiple of the logical block size). Growing grows
  // the backend; shrinking only lowers the bound (the caller has truncated the backing store after
  // checking that no data lies beyond it). The frontend tells the guest.
  absl::Status Resize(uint64_t new_size);

  // Optional, for frontends with long-lived guest memory (vhost-user memory regions, persistent
  // grants): lets the backend pre-register it (io_uring fixed buffers), so aligned I/O into it
  // skips per-request page pinning. Unimplemented for backends that cannot. Call
  // UnregisterGuestMemory() before unmapping the region. Loop thread.
  absl::Status RegisterGuestMemory(iovec region) { return backend_->RegisterMemory(region); }
  void UnregisterGuestMemory(iovec region) { backend_->UnregisterMemory(region); }

  BlockDeviceInfo Info() const;
  uint64_t capacity() const { return capacity_; }
  // Thread-safe snapshot (each counter is read atomically; the set is not one transaction).
  BlockDeviceStats Stats() const;
  Backend* backend() { return backend_.get(); }

 private:
  struct Tracked;
  using RelaxedCounter = BlockCounter;
  using OpCounters = BlockOpCounters;
  class DrainFlush final : public BackendCompletion {
   public:
    explicit DrainFlush(BlockDevice* device) : device_(device) {}
    void OnBackendComplete(int result) override { device_->OnDrainFlushDone(result); }

   private:
    BlockDevice* device_;
  };
  class DrainCheck final : public common::CompletionHandler {
   public:
    explicit DrainCheck(BlockDevice* device) : device_(device) {}
    void OnCompletion(int32_t, uint32_t) override {
      device_->drain_check_scheduled_ = false;
      device_->CheckDrained();
    }

   private:
    BlockDevice* device_;
  };

  BlockDevice(common::EventLoop* loop, std::unique_ptr<Backend> backend,
              BlockDeviceOptions options);

  int Validate(const Tracked* t) const;
  void Admit(Tracked* t);
  Tracked* FindConflict(const Tracked* t) const;
  void Dispatch(Tracked* t);
  void DispatchRead(Tracked* t);
  void DispatchWrite(Tracked* t);
  void DispatchFlush(Tracked* t);
  void StartFlush(Tracked* t);
  void DispatchDiscard(Tracked* t);
  void DispatchWriteZeroes(Tracked* t);
  void IssueZeroesMiddle(Tracked* t);
  bool IssueRw(Tracked* t, bool write, uint64_t offset, const iovec* iov, int iovcnt,
               uint32_t backend_flags);
  void IssueBuffer(Tracked* t, bool write, uint64_t offset, uint8_t* buffer, uint64_t length,
                   uint32_t backend_flags);
  bool BuildChunks(Tracked* t, uint64_t offset, const iovec* iov, int iovcnt);
  void OnPartDone(Tracked* t, int result);
  void OnPhaseDone(Tracked* t);
  void CompleteLater(Tracked* t, int result);
  void Finish(Tracked* t, int result);
  void Untrack(Tracked* t);
  void WakeWaiters();
  void ReleaseQueue();
  void CheckDrained();
  void ScheduleDrainCheck();
  void OnDrainFlushDone(int result);
  void Account(const Tracked* t, int result, int64_t now);
  uint8_t* AllocBounce(size_t size, int* size_class);
  void FreeBounce(uint8_t* buffer, int size_class);
  const uint8_t* ZeroBuffer();

  common::EventLoop* loop_;
  std::unique_ptr<Backend> backend_;
  BlockDeviceOptions options_;
  uint64_t capacity_ = 0;
  uint32_t align_ = 1;         // backend request alignment
  uint32_t buffer_align_ = 1;  // backend buffer alignment
  uint64_t max_transfer_ = 0;
  uint32_t max_segments_ = 1;
  bool may_pad_ = false;  // align_ > logical block size: requests may need read-modify-write

  ObjectPool<Tracked> pool_;
  uint64_t next_seq_ = 1;
  Tracked* tracked_head_ = nullptr;  // admitted requests, ordered by seq
  Tracked* tracked_tail_ = nullptr;
  uint64_t serialising_count_ = 0;
  std::vector<Tracked*> waiting_;  // admitted, waiting for an overlapping request
  std::vector<Tracked*> ready_scratch_;
  Tracked* queue_head_ = nullptr;  // submitted while quiesced or stopped, FIFO
  Tracked* queue_tail_ = nullptr;
  std::vector<Tracked*> parked_;  // failed under kStop, in seq order
  uint64_t in_flight_ = 0;
  uint64_t queued_ = 0;

  // Flush serialisation and skipping (bdrv_co_flush).
  // Starts one ahead of flushed_gen_: writes of an earlier process on the same backing store (a
  // worker generation killed before it flushed) may still sit in the host's cache, so the first
  // flush (or drain) always reaches the backend.
  uint64_t write_gen_ = 1;
  uint64_t flushed_gen_ = 0;
  bool flush_active_ = false;
  Tracked* flush_queue_head_ = nullptr;
  Tracked* flush_queue_tail_ = nullptr;

  // Drain.
  int quiesce_ = 0;
  std::vector<std::function<void(int)>> drain_callbacks_;
  bool drain_flush_active_ = false;
  uint64_t drain_flush_gen_ = 0;
  DrainFlush drain_flush_{this};
  DrainCheck drain_check_{this};
  bool drain_check_scheduled_ = false;

  bool stopped_ = false;
  bool discard_withdrawn_ = false;
  bool write_zeroes_withdrawn_ = false;

  // Bounce buffers by power-of-two size class (4 KiB << class).
  std::vector<std::vector<uint8_t*>> bounce_free_;
  uint8_t* zero_buffer_ = nullptr;

  // Stats (single writer: the loop thread; any reader).
  std::array<OpCounters, kBlockOpCount> own_op_counters_;
  OpCounters* op_counters_;  // own_op_counters_ or BlockDeviceOptions::counters
  BlockLayerCounters own_layer_counters_;
  BlockLayerCounters* layer_;  // own_layer_counters_ or BlockDeviceOptions::layer_counters
  RelaxedCounter in_flight_gauge_, queued_gauge_, parked_gauge_, highest_written_;
  RelaxedCounter last_completion_ns_;
  RelaxedCounter discard_withdrawn_stat_, write_zeroes_withdrawn_stat_;
  std::atomic<bool> stopped_stat_{false};
  std::atomic<bool> quiesced_stat_{false};
  std::atomic<int> last_error_{0};
};

}  // namespace blockplane::worker
