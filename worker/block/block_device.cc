#include "worker/block/block_device.h"

#include <errno.h>
#include <stdlib.h>

#include <algorithm>
#include <bit>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace blockplane::worker {
namespace {

constexpr size_t kMinBounce = 4096;
constexpr int kPooledBounceClasses = 9;  // 4 KiB .. 1 MiB
constexpr size_t kZeroBufferSize = size_t{1} << 20;

// `align` is a power of two everywhere in this file (checked in Create()).
uint64_t AlignDown(uint64_t value, uint64_t align) { return value & ~(align - 1); }
uint64_t AlignUp(uint64_t value, uint64_t align) { return AlignDown(value + align - 1, align); }

bool IsZero(const iovec* iov, int iovcnt) {
  for (int i = 0; i < iovcnt; ++i) {
    const uint8_t* p = static_cast<const uint8_t*>(iov[i].iov_base);
    size_t n = iov[i].iov_len;
    if (n == 0) continue;
    if (p[0] != 0) return false;
    if (n > 1 && std::memcmp(p, p + 1, n - 1) != 0) return false;
  }
  return true;
}

// Copies `length` bytes between a contiguous buffer and an iovec array.
void CopyToIov(const iovec* iov, int iovcnt, const uint8_t* src, uint64_t length) {
  for (int i = 0; i < iovcnt && length > 0; ++i) {
    size_t n = std::min<uint64_t>(iov[i].iov_len, length);
    std::memcpy(iov[i].iov_base, src, n);
    src += n;
    length -= n;
  }
}
void CopyFromIov(uint8_t* dst, const iovec* iov, int iovcnt, uint64_t length) {
  for (int i = 0; i < iovcnt && length > 0; ++i) {
    size_t n = std::min<uint64_t>(iov[i].iov_len, length);
    std::memcpy(dst, iov[i].iov_base, n);
    dst += n;
    length -= n;
  }
}

}  // namespace

const char* BlockOpName(BlockOp op) {
  switch (op) {
    case BlockOp::kRead:
      return "read";
    case BlockOp::kWrite:
      return "write";
    case BlockOp::kFlush:
      return "flush";
    case BlockOp::kDiscard:
      return "discard";
    case BlockOp::kWriteZeroes:
      return "write_zeroes";
  }
  return "unknown";
}

uint64_t LatencyBucketUpperBoundNs(int bucket) {
  if (bucket >= kLatencyBuckets - 1) return UINT64_MAX;
  return uint64_t{1000} << bucket;
}

// ns in [1000 << (i - 1), 1000 << i) -> i, i.e. the bit width of ns / 1000.
int LatencyBucketIndex(uint64_t ns) {
  return std::min(kLatencyBuckets - 1, static_cast<int>(std::bit_width(ns / 1000)));
}

// Per-request state, pooled. It is the completion object for every backend operation the
// request issues (a phase counts its outstanding parts); `finish_later` finishes it on a later
// pass (CompleteLater).
struct BlockDevice::Tracked final : public BackendCompletion {
  explicit Tracked(BlockDevice* device) : device(device), finish_later(this) {}
  void OnBackendComplete(int result) override { device->OnPartDone(this, result); }
  struct FinishLater final : public common::CompletionHandler {
    explicit FinishLater(Tracked* t) : t(t) {}
    void OnCompletion(int32_t result, uint32_t) override { t->device->Finish(t, result); }
    Tracked* t;
  };

  enum class Phase : uint8_t { kNone, kRmwRead, kMain, kZeroFallback, kFuaFlush };
  struct Chunk {
    uint64_t offset;
    uint32_t first;
    uint32_t count;
  };

  BlockDevice* device;
  FinishLater finish_later;
  BlockRequest req;
  BlockCompletion* done = nullptr;
  BlockOp op = BlockOp::kRead;       // what is executed (detect-zeroes may change a write)
  BlockOp acct_op = BlockOp::kRead;  // what is accounted
  uint64_t length = 0;
  uint64_t seq = 0;
  int64_t start_ns = 0;
  bool invalid = false;
  bool admitted = false;

  // Overlap tracking (BdrvTrackedRequest).
  uint64_t overlap_start = 0;
  uint64_t overlap_end = 0;
  bool serialising = false;
  bool in_list = false;
  Tracked* prev = nullptr;
  Tracked* next = nullptr;
  Tracked* waiting_for = nullptr;
  Tracked* queue_next = nullptr;

  // Progress.
  Phase phase = Phase::kNone;
  int pending = 0;
  int error = 0;
  bool zeroes_unsupported = false;
  bool touched_backend = false;
  uint64_t flush_gen = 0;

  // Bounce buffer covering [bounce_start, bounce_start + bounce_len).
  uint8_t* bounce = nullptr;
  int bounce_class = -1;
  uint64_t bounce_start = 0;
  uint64_t bounce_len = 0;
  std::vector<iovec> scratch;  // iovecs handed to the backend; reserved per phase
  std::vector<Chunk> chunks;
};

absl::StatusOr<std::unique_ptr<BlockDevice>> BlockDevice::Create(common::EventLoop* loop,
                                                                 std::unique_ptr<Backend> backend,
                                                                 BlockDeviceOptions options) {
  if (options.logical_block_size != 512 && options.logical_block_size != 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("logical_block_size must be 512 or 4096, not ", options.logical_block_size));
  }
  if (backend == nullptr) return absl::InvalidArgumentError("no backend");
  const BackendLimits& limits = backend->Limits();
  if (limits.request_alignment == 0 || !std::has_single_bit(limits.request_alignment)) {
    return absl::InvalidArgumentError("backend request alignment must be a power of two");
  }
  if (backend->Capacity() < options.logical_block_size) {
    return absl::InvalidArgumentError("backend is smaller than one logical block");
  }
  return std::unique_ptr<BlockDevice>(new BlockDevice(loop, std::move(backend), options));
}

BlockDevice::BlockDevice(common::EventLoop* loop, std::unique_ptr<Backend> backend,
                         BlockDeviceOptions options)
    : loop_(loop),
      backend_(std::move(backend)),
      options_(std::move(options)),
      op_counters_(options_.counters ? options_.counters : own_op_counters_.data()),
      layer_(options_.layer_counters ? options_.layer_counters : &own_layer_counters_) {
  const BackendLimits& limits = backend_->Limits();
  align_ = limits.request_alignment;
  buffer_align_ = std::bit_ceil(std::max<uint32_t>(limits.buffer_alignment, 1));
  max_transfer_ = AlignDown(std::max<uint64_t>(limits.max_transfer, align_), align_);
  max_segments_ = std::max<uint32_t>(limits.max_segments, 1);
  capacity_ = AlignDown(backend_->Capacity(), options_.logical_block_size);
  may_pad_ = align_ > options_.logical_block_size;
  bounce_free_.resize(kPooledBounceClasses);
  last_completion_ns_.Set(static_cast<uint64_t>(common::MonotonicNanos()));
}

BlockDevice::~BlockDevice() {
  for (auto& list : bounce_free_) {
    for (uint8_t* buffer : list) free(buffer);
  }
  free(zero_buffer_);
}

BlockDeviceInfo BlockDevice::Info() const {
  BlockDeviceInfo info;
  info.capacity = capacity_;
  info.logical_block_size = options_.logical_block_size;
  info.physical_block_size =
      std::max<uint32_t>(backend_->Limits().physical_block_size, options_.logical_block_size);
  info.read_only = options_.read_only;
  info.discard =
      options_.discard == DiscardMode::kUnmap && backend_->SupportsDiscard() && !discard_withdrawn_;
  info.discard_granularity =
      std::max<uint32_t>(backend_->Limits().discard_granularity, options_.logical_block_size);
  return info;
}

// ---- Submission and admission ----

int BlockDevice::Validate(const Tracked* t) const {
  const BlockRequest& r = t->req;
  const uint64_t lbs = options_.logical_block_size;
  switch (r.op) {
    case BlockOp::kFlush:
      return 0;
    case BlockOp::kRead:
    case BlockOp::kWrite:
      if (r.iovcnt < 0 || (r.iovcnt > 0 && r.iov == nullptr)) return -EINVAL;
      break;
    case BlockOp::kDiscard:
    case BlockOp::kWriteZeroes:
      break;
    default:
      return -EINVAL;
  }
  if (r.op != BlockOp::kRead && options_.read_only) return -EROFS;
  if (((r.offset | t->length) & (lbs - 1)) != 0) return -EINVAL;
  if (r.offset > capacity_ || t->length > capacity_ - r.offset) return -EINVAL;
  return 0;
}

void BlockDevice::Submit(const BlockRequest& request, BlockCompletion* done) {
  Tracked* t = pool_.Get(this);
  // Field by field: the caller usually built `request` with one store per field just before,
  // and a struct copy's 16-byte loads would each wait for several of those stores to retire
  // (a store-forwarding stall).
  t->req.op = request.op;
  t->req.flags = request.flags;
  t->req.offset = request.offset;
  t->req.length = request.length;
  t->req.iov = request.iov;
  t->req.iovcnt = request.iovcnt;
  t->done = done;
  t->op = t->acct_op = request.op;
  t->start_ns = loop_->now_ns();
  t->invalid = false;
  t->admitted = false;
  t->queue_next = nullptr;
  if (request.op == BlockOp::kRead || request.op == BlockOp::kWrite) {
    uint64_t total = 0;
    for (int i = 0; i < request.iovcnt && request.iov != nullptr; ++i) {
      total += request.iov[i].iov_len;
    }
    t->length = total;
  } else if (request.op == BlockOp::kFlush) {
    t->length = 0;
  } else {
    t->length = request.length;
  }
  int error = Validate(t);
  if (error != 0) {
    t->invalid = true;
    CompleteLater(t, error);
    return;
  }
  if (t->op == BlockOp::kWrite && options_.detect_zeroes != DetectZeroes::kOff && t->length > 0 &&
      IsZero(request.iov, request.iovcnt)) {
    // bdrv_aligned_pwritev: an all-zero payload becomes a write-zeroes request.
    t->op = BlockOp::kWriteZeroes;
    t->req.flags &= kBlockFua;
    if (options_.detect_zeroes == DetectZeroes::kUnmap && options_.discard == DiscardMode::kUnmap) {
      t->req.flags |= kBlockMayUnmap;
    }
    layer_->zero_writes_detected.Add(1);
  }
  if (quiesce_ > 0 || stopped_ || queue_head_ != nullptr) {
    if (queue_tail_ != nullptr) {
      queue_tail_->queue_next = t;
    } else {
      queue_head_ = t;
    }
    queue_tail_ = t;
    ++queued_;
    queued_gauge_.Set(queued_);
    return;
  }
  Admit(t);
}

void BlockDevice::Admit(Tracked* t) {
  t->admitted = true;
  t->seq = next_seq_++;
  t->phase = Tracked::Phase::kNone;
  t->pending = 0;
  t->error = 0;
  t->zeroes_unsupported = false;
  t->touched_backend = false;
  t->waiting_for = nullptr;
  t->serialising = false;
  t->in_list = false;
  ++in_flight_;
  in_flight_gauge_.Set(in_flight_);

  if (t->op == BlockOp::kFlush) {
    t->flush_gen = write_gen_;  // bdrv_co_flush: the generation this flush covers
  } else if (t->length > 0) {
    const uint64_t start = t->req.offset;
    const uint64_t end = start + t->length;
    t->overlap_start = AlignDown(start, align_);
    t->overlap_end = AlignUp(end, align_);
    // Only a padded (read-modify-write) request can conflict with another, and none can be
    // padded when the backend's alignment is at most the logical block size (Validate() holds
    // every request to that): the overlap list would never be searched, so it is not kept.
    if (!may_pad_) return Dispatch(t);
    const bool padded = t->overlap_start != start || t->overlap_end != end;
    // Writes that read-modify-write must not interleave with any overlapping request
    // (bdrv_make_request_serialising).
    t->serialising = padded && (t->op == BlockOp::kWrite || t->op == BlockOp::kWriteZeroes);
    t->in_list = true;
    t->next = nullptr;
    t->prev = tracked_tail_;
    if (tracked_tail_ != nullptr) {
      tracked_tail_->next = t;
    } else {
      tracked_head_ = t;
    }
    tracked_tail_ = t;
    if (t->serialising) ++serialising_count_;
    if (serialising_count_ > 0) {
      Tracked* conflict = FindConflict(t);
      if (conflict != nullptr) {
        t->waiting_for = conflict;
        waiting_.push_back(t);
        layer_->serialising_waits.Add(1);
        return;
      }
    }
  }
  Dispatch(t);
}

// An older overlapping request that `t` must wait for (bdrv_find_conflicting_request): one of
// the two is serialising. Only older requests count, so waits never form a cycle.
BlockDevice::Tracked* BlockDevice::FindConflict(const Tracked* t) const {
  for (Tracked* o = tracked_head_; o != nullptr && o != t; o = o->next) {
    if (!o->serialising && !t->serialising) continue;
    if (o->overlap_start < t->overlap_end && t->overlap_start < o->overlap_end) return o;
  }
  return nullptr;
}

void BlockDevice::Untrack(Tracked* t) {
  if (!t->in_list) return;
  if (t->prev != nullptr) {
    t->prev->next = t->next;
  } else {
    tracked_head_ = t->next;
  }
  if (t->next != nullptr) {
    t->next->prev = t->prev;
  } else {
    tracked_tail_ = t->prev;
  }
  t->in_list = false;
  if (t->serialising) --serialising_count_;
}

void BlockDevice::WakeWaiters() {
  if (waiting_.empty()) return;
  ready_scratch_.clear();
  size_t keep = 0;
  for (Tracked* w : waiting_) {
    Tracked* conflict = FindConflict(w);
    if (conflict == nullptr) {
      ready_scratch_.push_back(w);
    } else {
      w->waiting_for = conflict;
      waiting_[keep++] = w;
    }
  }
  waiting_.resize(keep);
  for (Tracked* w : ready_scratch_) {
    w->waiting_for = nullptr;
    Dispatch(w);
  }
}

// ---- Dispatch ----

void BlockDevice::Dispatch(Tracked* t) {
  switch (t->op) {
    case BlockOp::kRead:
      return DispatchRead(t);
    case BlockOp::kWrite:
      return DispatchWrite(t);
    case BlockOp::kFlush:
      return DispatchFlush(t);
    case BlockOp::kDiscard:
      return DispatchDiscard(t);
    case BlockOp::kWriteZeroes:
      return DispatchWriteZeroes(t);
  }
}

bool BlockDevice::BuildChunks(Tracked* t, uint64_t offset, const iovec* iov, int iovcnt) {
  // Splits [offset, offset + total) at multiples of max_transfer_ from `offset`; the iovecs are
  // appended to t->scratch, whose capacity the caller reserved (pointers must stay valid).
  const uint32_t max_segments = max_segments_;
  const size_t first_chunk = t->chunks.size();
  uint64_t chunk_bytes = 0;
  t->chunks.push_back({offset, static_cast<uint32_t>(t->scratch.size()), 0});
  for (int i = 0; i < iovcnt; ++i) {
    uint8_t* base = static_cast<uint8_t*>(iov[i].iov_base);
    uint64_t left = iov[i].iov_len;
    while (left > 0) {
      if (chunk_bytes == max_transfer_) {
        offset += chunk_bytes;
        chunk_bytes = 0;
        t->chunks.push_back({offset, static_cast<uint32_t>(t->scratch.size()), 0});
      }
      uint64_t take = std::min(left, max_transfer_ - chunk_bytes);
      if (t->scratch.size() == t->scratch.capacity()) return false;  // caller under-reserved
      t->scratch.push_back({base, take});
      ++t->chunks.back().count;
      chunk_bytes += take;
      base += take;
      left -= take;
    }
  }
  for (size_t c = first_chunk; c < t->chunks.size(); ++c) {
    if (t->chunks[c].count > max_segments) return false;
  }
  return true;
}

bool BlockDevice::IssueRw(Tracked* t, bool write, uint64_t offset, const iovec* iov, int iovcnt,
                          uint32_t backend_flags) {
  const size_t first_chunk = t->chunks.size();
  const size_t first_iov = t->scratch.size();
  if (!BuildChunks(t, offset, iov, iovcnt)) {
    t->chunks.resize(first_chunk);
    t->scratch.resize(first_iov);
    return false;
  }
  if (t->chunks.size() - first_chunk > 1) layer_->split.Add(1);
  t->touched_backend = true;
  t->pending += static_cast<int>(t->chunks.size() - first_chunk);
  for (size_t c = first_chunk; c < t->chunks.size(); ++c) {
    const Tracked::Chunk& chunk = t->chunks[c];
    const iovec* chunk_iov = t->scratch.data() + chunk.first;
    if (write) {
      backend_->Write(chunk.offset, chunk_iov, static_cast<int>(chunk.count), backend_flags, t);
    } else {
      backend_->Read(chunk.offset, chunk_iov, static_cast<int>(chunk.count), t);
    }
  }
  return true;
}

// For a single contiguous bounce or zero buffer: chunking cannot fail once reserved.
void BlockDevice::IssueBuffer(Tracked* t, bool write, uint64_t offset, uint8_t* buffer,
                              uint64_t length, uint32_t backend_flags) {
  iovec whole = {buffer, length};
  if (!IssueRw(t, write, offset, &whole, 1, backend_flags) && t->error == 0) t->error = -EINVAL;
}

static bool BuffersAligned(const iovec* iov, int iovcnt, uint32_t alignment) {
  if (alignment <= 1) return true;
  for (int i = 0; i < iovcnt; ++i) {
    if (((reinterpret_cast<uintptr_t>(iov[i].iov_base) | iov[i].iov_len) & (alignment - 1)) != 0) {
      return false;
    }
  }
  return true;
}

void BlockDevice::DispatchRead(Tracked* t) {
  if (t->length == 0) return CompleteLater(t, 0);
  const uint64_t start = t->req.offset;
  const uint64_t end = start + t->length;
  t->phase = Tracked::Phase::kMain;
  t->chunks.clear();
  t->scratch.clear();
  if (t->overlap_start == start && t->overlap_end == end &&
      BuffersAligned(t->req.iov, t->req.iovcnt, buffer_align_) &&
      t->req.iovcnt <= static_cast<int>(max_segments_)) {
    if (t->length <= max_transfer_) {
      // Fast path: one backend request straight from the guest's iovec array (which the caller
      // keeps alive until completion).
      t->touched_backend = true;
      t->pending = 1;
      backend_->Read(start, t->req.iov, t->req.iovcnt, t);
      return;
    }
    t->scratch.reserve(t->req.iovcnt + t->length / max_transfer_ + 2);
    if (IssueRw(t, /*write=*/false, start, t->req.iov, t->req.iovcnt, 0)) return;
  }
  // Padded or misaligned buffers: read the aligned range into a bounce buffer.
  layer_->bounced.Add(1);
  t->bounce_start = t->overlap_start;
  t->bounce_len = t->overlap_end - t->overlap_start;
  t->bounce = AllocBounce(t->bounce_len, &t->bounce_class);
  t->scratch.reserve(t->bounce_len / max_transfer_ + 2);
  IssueBuffer(t, /*write=*/false, t->bounce_start, t->bounce, t->bounce_len, 0);
}

void BlockDevice::DispatchWrite(Tracked* t) {
  if (t->length == 0) return CompleteLater(t, 0);
  const uint64_t start = t->req.offset;
  const uint64_t end = start + t->length;
  const uint32_t fua = (t->req.flags & kBlockFua) && backend_->SupportsFua() ? kBackendWriteFua : 0;
  t->chunks.clear();
  t->scratch.clear();
  if (!t->serialising && BuffersAligned(t->req.iov, t->req.iovcnt, buffer_align_) &&
      t->req.iovcnt <= static_cast<int>(max_segments_)) {
    t->phase = Tracked::Phase::kMain;
    if (t->length <= max_transfer_) {
      t->touched_backend = true;
      t->pending = 1;
      backend_->Write(start, t->req.iov, t->req.iovcnt, fua, t);
      return;
    }
    t->scratch.reserve(t->req.iovcnt + t->length / max_transfer_ + 2);
    if (IssueRw(t, /*write=*/true, start, t->req.iov, t->req.iovcnt, fua)) return;
  }
  layer_->bounced.Add(1);
  t->bounce_start = t->overlap_start;
  t->bounce_len = t->overlap_end - t->overlap_start;
  t->bounce = AllocBounce(t->bounce_len, &t->bounce_class);
  t->scratch.reserve(t->bounce_len / max_transfer_ + 4);
  if (!t->serialising) {
    // Aligned range, misaligned guest buffers: copy, then write.
    CopyFromIov(t->bounce, t->req.iov, t->req.iovcnt, t->length);
    t->phase = Tracked::Phase::kMain;
    IssueBuffer(t, /*write=*/true, t->bounce_start, t->bounce, t->bounce_len, fua);
    return;
  }
  // Read-modify-write: read the partial head and tail blocks first (bdrv_padding_rmw_read).
  layer_->rmw.Add(1);
  t->phase = Tracked::Phase::kRmwRead;
  if (start != t->overlap_start) {
    IssueBuffer(t, /*write=*/false, t->overlap_start, t->bounce, align_, 0);
  }
  if (end != t->overlap_end &&
      (start == t->overlap_start || t->overlap_end - align_ != t->overlap_start)) {
    IssueBuffer(t, /*write=*/false, t->overlap_end - align_, t->bounce + t->bounce_len - align_,
                align_, 0);
  }
}

void BlockDevice::DispatchFlush(Tracked* t) {
  if (flush_active_) {
    if (flush_queue_tail_ != nullptr) {
      flush_queue_tail_->queue_next = t;
    } else {
      flush_queue_head_ = t;
    }
    flush_queue_tail_ = t;
    t->queue_next = nullptr;
    return;
  }
  StartFlush(t);
}

void BlockDevice::StartFlush(Tracked* t) {
  flush_active_ = true;
  t->phase = Tracked::Phase::kMain;
  if (flushed_gen_ == t->flush_gen) {
    // Nothing was written since the last successful flush.
    layer_->flushes_skipped.Add(1);
    return CompleteLater(t, 0);
  }
  t->touched_backend = true;
  t->pending = 1;
  backend_->Flush(t);
}

void BlockDevice::DispatchDiscard(Tracked* t) {
  if (t->length == 0 || options_.discard == DiscardMode::kIgnore || discard_withdrawn_ ||
      !backend_->SupportsDiscard()) {
    return CompleteLater(t, 0);  // discard is advisory
  }
  const BackendLimits& limits = backend_->Limits();
  const uint64_t granularity = std::max<uint64_t>(limits.discard_granularity, align_);
  const uint64_t start = AlignUp(t->req.offset, granularity);
  const uint64_t end = AlignDown(t->req.offset + t->length, granularity);
  if (start >= end) return CompleteLater(t, 0);
  uint64_t max = limits.max_discard == 0 ? end - start : AlignDown(limits.max_discard, granularity);
  if (max == 0) max = granularity;
  t->phase = Tracked::Phase::kMain;
  t->touched_backend = true;
  int parts = static_cast<int>((end - start + max - 1) / max);
  if (parts > 1) layer_->split.Add(1);
  t->pending += parts;
  for (uint64_t pos = start; pos < end; pos += max) {
    backend_->Discard(pos, std::min(max, end - pos), t);
  }
}

void BlockDevice::DispatchWriteZeroes(Tracked* t) {
  if (t->length == 0) return CompleteLater(t, 0);
  const uint64_t start = t->req.offset;
  const uint64_t end = start + t->length;
  t->chunks.clear();
  t->scratch.clear();
  // Head/tail blocks, middle zero chunks (fallback), with room to spare.
  const uint64_t fallback_chunk = std::min<uint64_t>(max_transfer_, kZeroBufferSize);
  t->scratch.reserve(4 + t->length / fallback_chunk + 2);
  if (!t->serialising) {
    t->phase = Tracked::Phase::kMain;
    IssueZeroesMiddle(t);
    if (t->pending == 0) CompleteLater(t, t->error);
    return;
  }
  // Partial head/tail blocks: read, zero the covered part, write back (bdrv_co_do_zero_pwritev).
  layer_->rmw.Add(1);
  layer_->bounced.Add(1);
  t->bounce_start = t->overlap_start;
  t->bounce_len = 2 * uint64_t{align_};
  t->bounce = AllocBounce(t->bounce_len, &t->bounce_class);
  t->phase = Tracked::Phase::kRmwRead;
  const uint64_t head_block = AlignDown(start, align_);
  const uint64_t tail_block = AlignDown(end, align_);
  if (start % align_ != 0) {
    IssueBuffer(t, /*write=*/false, head_block, t->bounce, align_, 0);
  }
  if (end % align_ != 0 && !(start % align_ != 0 && tail_block == head_block)) {
    IssueBuffer(t, /*write=*/false, tail_block, t->bounce + align_, align_, 0);
  }
}

// The aligned middle of a write-zeroes request: native write-zeroes split by the backend limit, or
// (when the backend cannot, and the request allows it) writes of a shared zero buffer.
void BlockDevice::IssueZeroesMiddle(Tracked* t) {
  const uint64_t start = AlignUp(t->req.offset, align_);
  const uint64_t end = AlignDown(t->req.offset + t->length, align_);
  if (start >= end) return;
  const bool native = backend_->SupportsWriteZeroes() && !write_zeroes_withdrawn_ &&
                      t->phase != Tracked::Phase::kZeroFallback;
  t->touched_backend = true;
  if (native) {
    const uint64_t limit = backend_->Limits().max_write_zeroes;
    uint64_t max = limit == 0 ? end - start : std::max<uint64_t>(AlignDown(limit, align_), align_);
    const uint32_t flags =
        (t->req.flags & kBlockMayUnmap) && options_.discard == DiscardMode::kUnmap
            ? kBackendZeroesMayUnmap
            : 0;
    int parts = static_cast<int>((end - start + max - 1) / max);
    if (parts > 1) layer_->split.Add(1);
    t->pending += parts;
    for (uint64_t pos = start; pos < end; pos += max) {
      backend_->WriteZeroes(pos, std::min(max, end - pos), flags, t);
    }
    return;
  }
  if (t->req.flags & kBlockNoFallback) {
    if (t->error == 0) t->error = -EOPNOTSUPP;
    return;
  }
  layer_->write_zeroes_fallbacks.Add(1);
  const uint64_t chunk = std::min<uint64_t>(max_transfer_, kZeroBufferSize);
  uint8_t* zeroes = const_cast<uint8_t*>(ZeroBuffer());
  for (uint64_t pos = start; pos < end; pos += chunk) {
    IssueBuffer(t, /*write=*/true, pos, zeroes, std::min(chunk, end - pos), 0);
  }
}

// ---- Completion ----

void BlockDevice::OnPartDone(Tracked* t, int result) {
  if (result == -EOPNOTSUPP && t->op == BlockOp::kDiscard) {
    // Withdraw discard for the device; the request itself succeeds (discard is advisory).
    if (!discard_withdrawn_) {
      discard_withdrawn_ = true;
      discard_withdrawn_stat_.Set(1);
    }
  } else if (result == -EOPNOTSUPP && t->op == BlockOp::kWriteZeroes &&
             t->phase == Tracked::Phase::kMain) {
    if (!write_zeroes_withdrawn_) {
      write_zeroes_withdrawn_ = true;
      write_zeroes_withdrawn_stat_.Set(1);
    }
    t->zeroes_unsupported = true;
  } else if (result < 0 && t->error == 0) {
    t->error = result;
  }
  if (--t->pending == 0) OnPhaseDone(t);
}

void BlockDevice::OnPhaseDone(Tracked* t) {
  if (t->error != 0) return Finish(t, t->error);
  switch (t->op) {
    case BlockOp::kRead:
      if (t->bounce != nullptr) {
        CopyToIov(t->req.iov, t->req.iovcnt, t->bounce + (t->req.offset - t->bounce_start),
                  t->length);
      }
      return Finish(t, 0);
    case BlockOp::kWrite: {
      if (t->phase == Tracked::Phase::kRmwRead) {
        CopyFromIov(t->bounce + (t->req.offset - t->bounce_start), t->req.iov, t->req.iovcnt,
                    t->length);
        const uint32_t fua =
            (t->req.flags & kBlockFua) && backend_->SupportsFua() ? kBackendWriteFua : 0;
        t->phase = Tracked::Phase::kMain;
        t->chunks.clear();  // every part of the previous phase has completed
        t->scratch.clear();
        IssueBuffer(t, /*write=*/true, t->bounce_start, t->bounce, t->bounce_len, fua);
        if (t->pending == 0) Finish(t, t->error);
        return;
      }
      if (t->phase == Tracked::Phase::kMain && (t->req.flags & kBlockFua) &&
          !backend_->SupportsFua()) {
        t->phase = Tracked::Phase::kFuaFlush;
        t->pending = 1;
        backend_->Flush(t);
        return;
      }
      return Finish(t, 0);
    }
    case BlockOp::kFlush:
      if (flushed_gen_ < t->flush_gen) flushed_gen_ = t->flush_gen;
      return Finish(t, 0);
    case BlockOp::kDiscard:
      return Finish(t, 0);
    case BlockOp::kWriteZeroes: {
      if (t->phase == Tracked::Phase::kRmwRead) {
        const uint64_t start = t->req.offset;
        const uint64_t end = start + t->length;
        const uint64_t head_block = AlignDown(start, align_);
        const uint64_t tail_block = AlignDown(end, align_);
        t->phase = Tracked::Phase::kMain;
        t->chunks.clear();
        t->scratch.clear();
        if (start % align_ != 0) {
          const uint64_t zero_end = std::min(end, head_block + align_);
          std::memset(t->bounce + (start - head_block), 0, zero_end - start);
          IssueBuffer(t, /*write=*/true, head_block, t->bounce, align_, 0);
        }
        if (end % align_ != 0 && !(start % align_ != 0 && tail_block == head_block)) {
          std::memset(t->bounce + align_, 0, end - tail_block);
          IssueBuffer(t, /*write=*/true, tail_block, t->bounce + align_, align_, 0);
        }
        IssueZeroesMiddle(t);
        if (t->pending == 0) Finish(t, t->error);
        return;
      }
      if (t->phase == Tracked::Phase::kMain && t->zeroes_unsupported) {
        t->phase = Tracked::Phase::kZeroFallback;
        t->chunks.clear();
        t->scratch.clear();
        IssueZeroesMiddle(t);
        if (t->pending == 0) Finish(t, t->error);
        return;
      }
      return Finish(t, 0);
    }
  }
}

void BlockDevice::CompleteLater(Tracked* t, int result) { loop_->Defer(&t->finish_later, result); }

void BlockDevice::Account(const Tracked* t, int result, int64_t now) {
  OpCounters& c = op_counters_[static_cast<int>(t->acct_op)];
  const uint64_t latency = static_cast<uint64_t>(std::max<int64_t>(0, now - t->start_ns));
  if (result < 0) {
    c.failed.Add(1);
  } else {
    c.ops.Add(1);
    c.bytes.Add(t->length);
  }
  // Like QEMU's default account_failed=on: failed requests count in time and latency too.
  c.total_time_ns.Add(latency);
  c.histogram[LatencyBucketIndex(latency)].Add(1);
}

void BlockDevice::Finish(Tracked* t, int result) {
  if (t->invalid) {
    op_counters_[static_cast<int>(t->acct_op)].invalid.Add(1);
    BlockCompletion* done = t->done;
    pool_.Put(t);
    done->OnBlockComplete(result);
    return;
  }
  const int64_t now = loop_->now_ns();
  if (t->op == BlockOp::kFlush) {
    flush_active_ = false;
    if (flush_queue_head_ != nullptr) {
      Tracked* next = flush_queue_head_;
      flush_queue_head_ = next->queue_next;
      if (flush_queue_head_ == nullptr) flush_queue_tail_ = nullptr;
      StartFlush(next);
    }
  }
  const bool writes = t->op == BlockOp::kWrite || t->op == BlockOp::kWriteZeroes ||
                      (t->op == BlockOp::kDiscard && t->touched_backend);
  if (writes) ++write_gen_;  // bdrv_co_write_req_finish
  if (t->bounce != nullptr) {
    FreeBounce(t->bounce, t->bounce_class);
    t->bounce = nullptr;
  }
  Untrack(t);
  --in_flight_;
  in_flight_gauge_.Set(in_flight_);
  last_completion_ns_.Set(static_cast<uint64_t>(now));

  if (result < 0 && options_.error_policy == ErrorPolicy::kStop) {
    // Park the request (in seq order) and stop admitting; ResumeAfterError() retries it.
    auto pos = std::upper_bound(parked_.begin(), parked_.end(), t,
                                [](const Tracked* a, const Tracked* b) { return a->seq < b->seq; });
    parked_.insert(pos, t);
    parked_gauge_.Set(parked_.size());
    last_error_.store(result, std::memory_order_relaxed);
    const bool newly_stopped = !stopped_;
    stopped_ = true;
    stopped_stat_.store(true, std::memory_order_relaxed);
    if (newly_stopped) layer_->error_stops.Add(1);
    WakeWaiters();
    if (newly_stopped && options_.on_error_stop) options_.on_error_stop(result);
    CheckDrained();
    return;
  }
  if (result < 0) last_error_.store(result, std::memory_order_relaxed);
  Account(t, result, now);
  if (result == 0 && t->length > 0 &&
      (t->acct_op == BlockOp::kWrite || t->acct_op == BlockOp::kWriteZeroes)) {
    const uint64_t end = t->req.offset + t->length;
    if (end > highest_written_.Get()) highest_written_.Set(end);
  }
  BlockCompletion* done = t->done;
  pool_.Put(t);
  if (!waiting_.empty()) WakeWaiters();
  done->OnBlockComplete(result);
  if (!drain_callbacks_.empty()) CheckDrained();
}

// ---- Drain, resume, error stop ----

void BlockDevice::Drain(std::function<void(int result)> drained) {
  ++quiesce_;
  quiesced_stat_.store(true, std::memory_order_relaxed);
  drain_callbacks_.push_back(std::move(drained));
  ScheduleDrainCheck();
}

void BlockDevice::ScheduleDrainCheck() {
  if (drain_check_scheduled_) return;
  drain_check_scheduled_ = true;
  loop_->Defer(&drain_check_, 0);
}

void BlockDevice::CheckDrained() {
  if (drain_callbacks_.empty() || in_flight_ > 0 || drain_flush_active_) return;
  if (write_gen_ != flushed_gen_) {
    drain_flush_active_ = true;
    drain_flush_gen_ = write_gen_;
    backend_->Flush(&drain_flush_);
    return;
  }
  std::vector<std::function<void(int)>> callbacks;
  callbacks.swap(drain_callbacks_);
  for (auto& callback : callbacks) callback(0);
}

void BlockDevice::OnDrainFlushDone(int result) {
  drain_flush_active_ = false;
  if (result == 0 && flushed_gen_ < drain_flush_gen_) flushed_gen_ = drain_flush_gen_;
  if (result < 0) last_error_.store(result, std::memory_order_relaxed);
  std::vector<std::function<void(int)>> callbacks;
  callbacks.swap(drain_callbacks_);
  for (auto& callback : callbacks) callback(result);
  CheckDrained();  // callbacks may have drained again
}

absl::Status BlockDevice::Resume() {
  if (quiesce_ == 0) return absl::FailedPreconditionError("device is not drained");
  if (--quiesce_ == 0) {
    quiesced_stat_.store(false, std::memory_order_relaxed);
    ReleaseQueue();
  }
  return absl::OkStatus();
}

absl::Status BlockDevice::ResumeAfterError() {
  if (!stopped_) return absl::FailedPreconditionError("device is not stopped on an error");
  stopped_ = false;
  stopped_stat_.store(false, std::memory_order_relaxed);
  ReleaseQueue();
  return absl::OkStatus();
}

void BlockDevice::ReleaseQueue() {
  if (quiesce_ > 0 || stopped_) return;
  std::vector<Tracked*> retry;
  retry.swap(parked_);
  parked_gauge_.Set(0);
  for (Tracked* t : retry) Admit(t);
  while (queue_head_ != nullptr && quiesce_ == 0 && !stopped_) {
    Tracked* t = queue_head_;
    queue_head_ = t->queue_next;
    if (queue_head_ == nullptr) queue_tail_ = nullptr;
    t->queue_next = nullptr;
    --queued_;
    Admit(t);
  }
  queued_gauge_.Set(queued_);
}

absl::Status BlockDevice::Resize(uint64_t new_size) {
  if (new_size % options_.logical_block_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("size must be a multiple of ", options_.logical_block_size));
  }
  if (new_size == capacity_) return absl::OkStatus();
  if (new_size < capacity_) {
    // The controller checked that nothing was ever written past new_size and truncated the file;
    // requests beyond the new end now fail as out of range.
    capacity_ = new_size;
    return absl::OkStatus();
  }
  absl::Status status = backend_->Grow(new_size);
  if (!status.ok()) return status;
  capacity_ = new_size;
  return absl::OkStatus();
}

BlockDeviceStats BlockDevice::Stats() const {
  BlockDeviceStats s;
  for (int i = 0; i < kBlockOpCount; ++i) {
    const OpCounters& c = op_counters_[i];
    BlockOpStats& o = s.ops[i];
    o.bytes = c.bytes.Get();
    o.ops = c.ops.Get();
    o.total_time_ns = c.total_time_ns.Get();
    o.failed = c.failed.Get();
    o.invalid = c.invalid.Get();
    for (int b = 0; b < kLatencyBuckets; ++b) o.latency_histogram[b] = c.histogram[b].Get();
  }
  s.in_flight = in_flight_gauge_.Get();
  s.queued = queued_gauge_.Get();
  s.parked = parked_gauge_.Get();
  s.highest_written_offset = highest_written_.Get();
  const uint64_t now = static_cast<uint64_t>(common::MonotonicNanos());
  const uint64_t last = last_completion_ns_.Get();
  s.idle_ns = s.in_flight > 0 || now < last ? 0 : now - last;
  s.flushes_skipped = layer_->flushes_skipped.Get();
  s.rmw = layer_->rmw.Get();
  s.bounced = layer_->bounced.Get();
  s.split = layer_->split.Get();
  s.serialising_waits = layer_->serialising_waits.Get();
  s.zero_writes_detected = layer_->zero_writes_detected.Get();
  s.write_zeroes_fallbacks = layer_->write_zeroes_fallbacks.Get();
  s.discard_withdrawn = discard_withdrawn_stat_.Get();
  s.write_zeroes_withdrawn = write_zeroes_withdrawn_stat_.Get();
  s.error_stops = layer_->error_stops.Get();
  s.stopped_on_error = stopped_stat_.load(std::memory_order_relaxed);
  s.quiesced = quiesced_stat_.load(std::memory_order_relaxed);
  s.last_error = last_error_.load(std::memory_order_relaxed);
  return s;
}

// ---- Buffers ----

uint8_t* BlockDevice::AllocBounce(size_t size, int* size_class) {
  const size_t alignment = std::max<size_t>(buffer_align_, kMinBounce);
  size_t rounded = std::max(std::bit_ceil(size), kMinBounce);
  int cls = std::countr_zero(rounded) - std::countr_zero(kMinBounce);
  if (cls < kPooledBounceClasses) {
    *size_class = cls;
    if (!bounce_free_[cls].empty()) {
      uint8_t* buffer = bounce_free_[cls].back();
      bounce_free_[cls].pop_back();
      return buffer;
    }
    return static_cast<uint8_t*>(aligned_alloc(alignment, rounded));
  }
  *size_class = -1;
  return static_cast<uint8_t*>(aligned_alloc(alignment, AlignUp(size, alignment)));
}

void BlockDevice::FreeBounce(uint8_t* buffer, int size_class) {
  if (size_class >= 0 && bounce_free_[size_class].size() < 64) {
    bounce_free_[size_class].push_back(buffer);
    return;
  }
  free(buffer);
}

const uint8_t* BlockDevice::ZeroBuffer() {
  if (zero_buffer_ == nullptr) {
    const size_t alignment = std::max<size_t>(buffer_align_, kMinBounce);
    zero_buffer_ = static_cast<uint8_t*>(aligned_alloc(alignment, kZeroBufferSize));
    std::memset(zero_buffer_, 0, kZeroBufferSize);
  }
  return zero_buffer_;
}

}  // namespace blockplane::worker
