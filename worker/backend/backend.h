#pragma once

// The storage backend interface of the worker: executes aligned, bounded requests.
//
// Contract for every implementation:
// - Thread: all calls and all completions happen on the owning EventLoop's thread.
// - Completion is never invoked from inside the submitting call (always on a later loop pass),
//   so callers may submit while holding state they would not want re-entered.
// - Requests must respect Limits(): offset, length and every iovec's base and length aligned to
//   request_alignment / buffer_alignment, at most max_transfer bytes and max_segments iovecs.
//   The block layer (worker/block) guarantees this; violating it fails the request with -EINVAL.
// - The caller keeps the iovec array, the buffers and the completion object alive until the
//   completion runs. Backends do not take ownership of any of them.
// - result: 0 when the whole request succeeded, -errno otherwise. Short transfers are retried
//   inside the backend; a read past the end of the underlying file returns zeroes.
// - A full submission queue or EAGAIN is back-pressure: the backend queues and retries, it does
//   not fail the request.

#include <sys/uio.h>

#include <cstdint>

#include "absl/status/status.h"
#include "common/event_loop.h"

namespace blockplane::worker {

// Also a loop completion handler: a backend whose request completes as one loop event (an
// io_uring NOP, a deferred completion) hands the caller's object to the loop itself, with no
// per-request object of its own in between. The event's result becomes the request's: negative
// stays, anything else is 0.
class BackendCompletion : public common::CompletionHandler {
 public:
  virtual void OnBackendComplete(int result) = 0;
  void OnCompletion(int32_t result, uint32_t) final { OnBackendComplete(result < 0 ? result : 0); }

 protected:
  ~BackendCompletion() = default;
};

struct BackendLimits {
  uint32_t request_alignment = 1;    // offset and length granularity of read/write
  uint32_t buffer_alignment = 1;     // memory alignment of iovec bases and lengths
  uint64_t max_transfer = 1 << 20;   // bytes per read/write, multiple of request_alignment
  uint32_t max_segments = 1024;      // iovecs per read/write
  uint32_t discard_granularity = 0;  // 0: discard not supported
  uint64_t max_discard = 0;          // bytes per discard, 0 = unlimited
  uint64_t max_write_zeroes = 0;     // bytes per write-zeroes, 0 = unlimited
  uint32_t physical_block_size = 4096;
};

// Write flags.
inline constexpr uint32_t kBackendWriteFua = 1u << 0;  // durable when the completion runs
// Write-zeroes flags.
inline constexpr uint32_t kBackendZeroesMayUnmap = 1u << 0;  // may deallocate (punch hole)

struct BackendCounters {
  uint64_t discard_withdrawn = 0;       // 1 once discard was withdrawn after EOPNOTSUPP
  uint64_t write_zeroes_withdrawn = 0;  // 1 once write-zeroes was withdrawn after EOPNOTSUPP
  uint64_t unsupported_ops = 0;         // EOPNOTSUPP results seen (counted, never retried)
  uint64_t resubmissions = 0;           // short transfers and EAGAIN resubmitted
  uint64_t queued_for_sqe = 0;          // operations that waited for SQ space
  uint64_t fixed_buffer_ops = 0;        // reads/writes that used a registered buffer
};

class Backend {
 public:
  virtual ~Backend() = default;

  // Capacity in bytes (multiple of request_alignment for devices; may be any size for files).
  virtual uint64_t Capacity() const = 0;
  virtual const BackendLimits& Limits() const = 0;
  // Features may be withdrawn at run time (EOPNOTSUPP); check before each use.
  virtual bool SupportsDiscard() const = 0;
  virtual bool SupportsWriteZeroes() const = 0;
  // True when kBackendWriteFua is honoured natively (otherwise the caller flushes).
  virtual bool SupportsFua() const = 0;

  virtual void Read(uint64_t offset, const iovec* iov, int iovcnt, BackendCompletion* done) = 0;
  virtual void Write(uint64_t offset, const iovec* iov, int iovcnt, uint32_t flags,
                     BackendCompletion* done) = 0;
  // Makes completed writes durable (fdatasync semantics).
  virtual void Flush(BackendCompletion* done) = 0;
  // Advisory; data in the range becomes unspecified (zeroes for files). -EOPNOTSUPP when not
  // supported; the feature is then withdrawn.
  virtual void Discard(uint64_t offset, uint64_t length, BackendCompletion* done) = 0;
  // The range reads as zeroes afterwards. -EOPNOTSUPP when the backend cannot do it natively
  // (the caller falls back to writing zeroes).
  virtual void WriteZeroes(uint64_t offset, uint64_t length, uint32_t flags,
                           BackendCompletion* done) = 0;
  // Grows the backing store to `new_capacity` bytes. Synchronous; loop thread.
  virtual absl::Status Grow(uint64_t new_capacity) = 0;

  // Optional: long-lived memory (guest RAM regions, persistent grants) that I/O buffers will
  // often lie in. A backend may pre-register it with the kernel (io_uring fixed buffers). The
  // region must stay mapped until UnregisterMemory(). Unimplemented when not supported.
  virtual absl::Status RegisterMemory(iovec region) {
    return absl::UnimplementedError("backend does not register memory");
  }
  virtual void UnregisterMemory(iovec region) {}

  virtual BackendCounters Counters() const { return {}; }
};

}  // namespace blockplane::worker
