#include "worker/backend/uring_backend.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"

namespace blockplane::worker {
namespace {

constexpr uint64_t kFileMaxTransfer = uint64_t{64} << 20;

uint64_t ReadSysfsU64(unsigned major_num, unsigned minor_num, const char* attribute,
                      uint64_t fallback) {
  char path[128];
  snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/queue/%s", major_num, minor_num, attribute);
  std::ifstream in(path);
  uint64_t value = 0;
  if (in >> value) return value;
  return fallback;
}

}  // namespace

UringBackend::UringBackend(common::EventLoop* loop, Options options)
    : loop_(loop), options_(options) {}

absl::StatusOr<std::unique_ptr<UringBackend>> UringBackend::Open(common::EventLoop* loop,
                                                                 const std::string& path,
                                                                 Options options) {
  std::unique_ptr<UringBackend> backend(new UringBackend(loop, options));
  int flags = (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  if (options.cache == CacheMode::kNone) flags |= O_DIRECT;
  if (options.cache == CacheMode::kWritethrough) flags |= O_DSYNC;
  backend->fd_ = open(path.c_str(), flags);
  if (backend->fd_ < 0) {
    return absl::Status(absl::ErrnoToStatusCode(errno),
                        absl::StrCat("open ", path, ": ", strerror(errno)));
  }
  struct stat st;
  if (fstat(backend->fd_, &st) != 0) {
    return absl::Status(absl::ErrnoToStatusCode(errno), absl::StrCat("fstat: ", strerror(errno)));
  }
  BackendLimits& limits = backend->limits_;
  const bool direct = options.cache == CacheMode::kNone;
  if (S_ISBLK(st.st_mode)) {
    backend->is_block_device_ = true;
    uint64_t size = 0;
    int logical = 512;
    int physical = 4096;
    if (ioctl(backend->fd_, BLKGETSIZE64, &size) != 0) {
      return absl::InternalError(absl::StrCat("BLKGETSIZE64: ", strerror(errno)));
    }
    ioctl(backend->fd_, BLKSSZGET, &logical);
    ioctl(backend->fd_, BLKPBSZGET, &physical);
    backend->capacity_ = size;
    unsigned maj = major(st.st_rdev), min = minor(st.st_rdev);
    limits.request_alignment = direct ? static_cast<uint32_t>(logical) : 1;
    limits.buffer_alignment = direct ? static_cast<uint32_t>(logical) : 1;
    limits.physical_block_size = static_cast<uint32_t>(physical);
    limits.max_transfer = ReadSysfsU64(maj, min, "max_sectors_kb", 1024) * 1024;
    limits.max_segments = std::min<uint64_t>(1024, ReadSysfsU64(maj, min, "max_segments", 1024));
    limits.discard_granularity =
        static_cast<uint32_t>(ReadSysfsU64(maj, min, "discard_granularity", 0));
    limits.max_discard = ReadSysfsU64(maj, min, "discard_max_bytes", 0);
    backend->discard_supported_ = limits.discard_granularity != 0 && limits.max_discard != 0;
  } else if (S_ISREG(st.st_mode)) {
    backend->capacity_ = static_cast<uint64_t>(st.st_size);
    uint32_t offset_align = 4096, mem_align = 4096;
#ifdef STATX_DIOALIGN
    struct statx stx;
    if (direct && statx(backend->fd_, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
        (stx.stx_mask & STATX_DIOALIGN)) {
      if (stx.stx_dio_offset_align == 0) {
        return absl::FailedPreconditionError(
            absl::StrCat(path, ": file system does not support O_DIRECT (cache=none)"));
      }
      offset_align = stx.stx_dio_offset_align;
      mem_align = std::max<uint32_t>(stx.stx_dio_mem_align, 1);
    }
#endif
    limits.request_alignment = direct ? offset_align : 1;
    limits.buffer_alignment = direct ? mem_align : 1;
    limits.physical_block_size = static_cast<uint32_t>(st.st_blksize);
    limits.max_transfer = kFileMaxTransfer;
    limits.max_segments = 1024;  // UIO_MAXIOV
    limits.discard_granularity = static_cast<uint32_t>(st.st_blksize);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file or block device"));
  }
  if (options.request_alignment > limits.request_alignment) {
    limits.request_alignment = options.request_alignment;
  }
  limits.max_transfer -= limits.max_transfer % limits.request_alignment;
  if (limits.discard_granularity != 0 &&
      limits.discard_granularity % limits.request_alignment != 0) {
    limits.discard_granularity = std::max(limits.discard_granularity, limits.request_alignment);
  }
  if (options.register_file) {
    absl::StatusOr<int> slot = loop->RegisterFile(backend->fd_);
    if (slot.ok()) backend->file_slot_ = *slot;
  }
  return backend;
}

UringBackend::~UringBackend() {
  if (helper_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(helper_mu_);
      helper_stop_ = true;
    }
    helper_cv_.notify_all();
    helper_.join();
  }
  for (const Region& r : regions_) loop_->UnregisterBuffer(r.slot);
  if (file_slot_ >= 0) loop_->UnregisterFile(file_slot_);
  if (fd_ >= 0) close(fd_);
}

UringBackend::Op* UringBackend::NewOp(Kind kind, uint64_t offset, uint64_t length,
                                      BackendCompletion* done) {
  Op* op = ops_.Get(this);
  op->kind = kind;
  op->offset = offset;
  op->length = length;
  op->flags = 0;
  op->refused = false;
  op->iov = nullptr;
  op->iovcnt = 0;
  op->iov_storage.clear();
  op->done = done;
  return op;
}

static uint64_t IovLength(const iovec* iov, int iovcnt) {
  uint64_t total = 0;
  for (int i = 0; i < iovcnt; ++i) total += iov[i].iov_len;
  return total;
}

void UringBackend::Read(uint64_t offset, const iovec* iov, int iovcnt, BackendCompletion* done) {
  Op* op = NewOp(Kind::kRead, offset, IovLength(iov, iovcnt), done);
  op->iov = iov;
  op->iovcnt = iovcnt;
  Submit(op);
}

void UringBackend::Write(uint64_t offset, const iovec* iov, int iovcnt, uint32_t flags,
                         BackendCompletion* done) {
  Op* op = NewOp(Kind::kWrite, offset, IovLength(iov, iovcnt), done);
  op->iov = iov;
  op->iovcnt = iovcnt;
  op->flags = flags;
  Submit(op);
}

void UringBackend::Flush(BackendCompletion* done) { Submit(NewOp(Kind::kFlush, 0, 0, done)); }

void UringBackend::Discard(uint64_t offset, uint64_t length, BackendCompletion* done) {
  Op* op = NewOp(is_block_device_ ? Kind::kBlkDiscard : Kind::kDiscard, offset, length, done);
  if (!discard_supported_) {
    ++counters_.unsupported_ops;
    op->refused = true;
    loop_->Defer(op, -EOPNOTSUPP);
    return;
  }
  if (op->kind == Kind::kBlkDiscard) {
    RunBlkDiscard(op);
    return;
  }
  Submit(op);
}

void UringBackend::WriteZeroes(uint64_t offset, uint64_t length, uint32_t flags,
                               BackendCompletion* done) {
  Kind kind = (flags & kBackendZeroesMayUnmap) ? Kind::kPunchHole : Kind::kZeroRange;
  Op* op = NewOp(kind, offset, length, done);
  if (!write_zeroes_supported_) {
    ++counters_.unsupported_ops;
    op->refused = true;
    loop_->Defer(op, -EOPNOTSUPP);
    return;
  }
  Submit(op);
}

void UringBackend::Submit(Op* op) {
  io_uring_sqe* sqe = loop_->GetSqe();
  if (sqe == nullptr) {
    ++counters_.queued_for_sqe;
    waiting_for_sqe_.push_back(op);
    if (!sqe_waiter_armed_) {
      sqe_waiter_armed_ = true;
      loop_->AddSqeWaiter([this] { SubmitQueued(); });
    }
    return;
  }
  const int fd = file_slot_ >= 0 ? file_slot_ : fd_;
  switch (op->kind) {
    case Kind::kRead:
    case Kind::kWrite: {
      const iovec* iov = op->iov;
      int iovcnt = op->iovcnt;
      uint32_t cap = options_.max_bytes_per_sqe_for_testing;
      if (cap != 0 && op->length > cap) {
        // Submit a truncated copy so the kernel transfers at most `cap` bytes.
        op->capped_iov.clear();
        uint64_t left = cap;
        for (int i = 0; i < op->iovcnt && left > 0; ++i) {
          size_t n = std::min<uint64_t>(op->iov[i].iov_len, left);
          op->capped_iov.push_back({op->iov[i].iov_base, n});
          left -= n;
        }
        iov = op->capped_iov.data();
        iovcnt = static_cast<int>(op->capped_iov.size());
      }
      const bool read = op->kind == Kind::kRead;
      const Region* region =
          iovcnt == 1 && !regions_.empty() ? FindRegion(iov[0].iov_base, iov[0].iov_len) : nullptr;
      if (region != nullptr) {
        ++counters_.fixed_buffer_ops;
        if (read) {
          io_uring_prep_read_fixed(sqe, fd, iov[0].iov_base, iov[0].iov_len, op->offset,
                                   region->slot);
        } else {
          io_uring_prep_write_fixed(sqe, fd, iov[0].iov_base, iov[0].iov_len, op->offset,
                                    region->slot);
        }
      } else if (iovcnt == 1) {
        if (read) {
          io_uring_prep_read(sqe, fd, iov[0].iov_base, iov[0].iov_len, op->offset);
        } else {
          io_uring_prep_write(sqe, fd, iov[0].iov_base, iov[0].iov_len, op->offset);
        }
      } else if (read) {
        io_uring_prep_readv(sqe, fd, iov, iovcnt, op->offset);
      } else {
        io_uring_prep_writev(sqe, fd, iov, iovcnt, op->offset);
      }
      if (!read && (op->flags & kBackendWriteFua)) sqe->rw_flags = RWF_DSYNC;
      break;
    }
    case Kind::kFlush:
      io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
      break;
    case Kind::kDiscard:
    case Kind::kPunchHole:
      io_uring_prep_fallocate(sqe, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, op->offset,
                              op->length);
      break;
    case Kind::kZeroRange:
      io_uring_prep_fallocate(sqe, fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, op->offset,
                              op->length);
      break;
    case Kind::kBlkDiscard:
      break;  // never submitted to the ring
  }
  if (file_slot_ >= 0) sqe->flags |= IOSQE_FIXED_FILE;
  loop_->CommitIoSqe(sqe, op);
}

void UringBackend::SubmitQueued() {
  sqe_waiter_armed_ = false;
  while (!waiting_for_sqe_.empty()) {
    Op* op = waiting_for_sqe_.front();
    waiting_for_sqe_.pop_front();
    size_t before = waiting_for_sqe_.size();
    Submit(op);
    if (waiting_for_sqe_.size() > before) {
      // Still full: Submit() re-queued it at the back; restore FIFO order and wait again.
      waiting_for_sqe_.pop_back();
      waiting_for_sqe_.push_front(op);
      return;
    }
  }
}

void UringBackend::Op::OnCompletion(int32_t result, uint32_t) { backend->OnResult(this, result); }

void UringBackend::Advance(Op* op, uint64_t bytes) {
  // Keep only the iovecs still to transfer, trimmed at the front. Allocates, but only on the
  // (rare) short-transfer path.
  std::vector<iovec> rest;
  for (int i = 0; i < op->iovcnt; ++i) {
    const iovec& v = op->iov[i];
    if (bytes >= v.iov_len) {
      bytes -= v.iov_len;
      continue;
    }
    rest.push_back({static_cast<uint8_t*>(v.iov_base) + bytes, v.iov_len - bytes});
    bytes = 0;
  }
  op->iov_storage = std::move(rest);
  op->iov = op->iov_storage.data();
  op->iovcnt = static_cast<int>(op->iov_storage.size());
}

void UringBackend::OnResult(Op* op, int result) {
  if (op->refused) return Finish(op, result);
  if (result == -EAGAIN || result == -EINTR) {
    ++counters_.resubmissions;
    if (op->kind == Kind::kBlkDiscard) {
      RunBlkDiscard(op);
    } else {
      Submit(op);
    }
    return;
  }
  switch (op->kind) {
    case Kind::kRead:
    case Kind::kWrite: {
      if (result < 0) return Finish(op, result);
      uint64_t done_bytes = static_cast<uint64_t>(result);
      if (done_bytes >= op->length) return Finish(op, 0);
      if (done_bytes == 0) {
        if (op->kind == Kind::kWrite) return Finish(op, -ENOSPC);
        // End of file: the rest reads as zeroes.
        for (int i = 0; i < op->iovcnt; ++i) {
          std::memset(op->iov[i].iov_base, 0, op->iov[i].iov_len);
        }
        return Finish(op, 0);
      }
      ++counters_.resubmissions;
      Advance(op, done_bytes);
      op->offset += done_bytes;
      op->length -= done_bytes;
      Submit(op);
      return;
    }
    case Kind::kFlush:
      return Finish(op, result);
    case Kind::kDiscard:
    case Kind::kBlkDiscard:
      if (result == -EOPNOTSUPP || result == -ENOTTY) {
        ++counters_.unsupported_ops;
        if (discard_supported_) {
          discard_supported_ = false;
          counters_.discard_withdrawn = 1;
        }
        result = -EOPNOTSUPP;
      }
      return Finish(op, result);
    case Kind::kPunchHole:
      if (result == -EOPNOTSUPP) {
        // Deallocating is optional for write-zeroes: retry without unmapping.
        op->kind = Kind::kZeroRange;
        Submit(op);
        return;
      }
      return Finish(op, result);
    case Kind::kZeroRange:
      if (result == -EOPNOTSUPP) {
        ++counters_.unsupported_ops;
        if (write_zeroes_supported_) {
          write_zeroes_supported_ = false;
          counters_.write_zeroes_withdrawn = 1;
        }
      }
      return Finish(op, result);
  }
}

void UringBackend::Finish(Op* op, int result) {
  BackendCompletion* done = op->done;
  ops_.Put(op);
  done->OnBackendComplete(result < 0 ? result : 0);
}

void UringBackend::RunBlkDiscard(Op* op) {
  {
    std::lock_guard<std::mutex> lock(helper_mu_);
    helper_queue_.push_back(op);
  }
  if (!helper_.joinable()) {
    helper_ = std::thread([this] {
      std::unique_lock<std::mutex> lock(helper_mu_);
      while (true) {
        helper_cv_.wait(lock, [this] { return helper_stop_ || !helper_queue_.empty(); });
        if (helper_stop_) return;
        Op* next = helper_queue_.front();
        helper_queue_.pop_front();
        lock.unlock();
        uint64_t range[2] = {next->offset, next->length};
        int result = ioctl(fd_, BLKDISCARD, range) == 0 ? 0 : -errno;
        loop_->Post([next, result] { next->OnCompletion(result, 0); });
        lock.lock();
      }
    });
  }
  helper_cv_.notify_one();
}

absl::Status UringBackend::RegisterMemory(iovec region) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(region.iov_base);
  const uintptr_t end = start + region.iov_len;
  if (region.iov_len == 0) return absl::InvalidArgumentError("empty region");
  for (const Region& r : regions_) {
    if (start < r.end && r.start < end) {
      return absl::AlreadyExistsError("region overlaps a registered region");
    }
  }
  absl::StatusOr<int> slot = loop_->RegisterBuffer(region);
  if (!slot.ok()) return slot.status();
  Region added{start, end, *slot};
  regions_.insert(
      std::upper_bound(regions_.begin(), regions_.end(), added,
                       [](const Region& a, const Region& b) { return a.start < b.start; }),
      added);
  return absl::OkStatus();
}

void UringBackend::UnregisterMemory(iovec region) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(region.iov_base);
  for (auto it = regions_.begin(); it != regions_.end(); ++it) {
    if (it->start == start && it->end == start + region.iov_len) {
      loop_->UnregisterBuffer(it->slot);
      regions_.erase(it);
      return;
    }
  }
}

const UringBackend::Region* UringBackend::FindRegion(const void* base, size_t length) const {
  const uintptr_t start = reinterpret_cast<uintptr_t>(base);
  // The last region starting at or before `start`.
  auto it = std::upper_bound(regions_.begin(), regions_.end(), start,
                             [](uintptr_t value, const Region& r) { return value < r.start; });
  if (it == regions_.begin()) return nullptr;
  --it;
  return start + length <= it->end ? &*it : nullptr;
}

absl::Status UringBackend::Grow(uint64_t new_capacity) {
  if (new_capacity < capacity_) return absl::InvalidArgumentError("cannot shrink a backend");
  if (is_block_device_) {
    uint64_t size = 0;
    if (ioctl(fd_, BLKGETSIZE64, &size) != 0) {
      return absl::InternalError(absl::StrCat("BLKGETSIZE64: ", strerror(errno)));
    }
    if (size < new_capacity) {
      return absl::FailedPreconditionError(
          absl::StrCat("block device is ", size, " bytes; grow the device first"));
    }
    capacity_ = new_capacity;
    return absl::OkStatus();
  }
  if (options_.read_only) return absl::FailedPreconditionError("backend is read-only");
  if (ftruncate(fd_, static_cast<off_t>(new_capacity)) != 0) {
    return absl::Status(absl::ErrnoToStatusCode(errno),
                        absl::StrCat("ftruncate: ", strerror(errno)));
  }
  capacity_ = new_capacity;
  return absl::OkStatus();
}

}  // namespace blockplane::worker
