#include "worker/diagnostics/self_test_io.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace blockplane::worker {

absl::StatusOr<std::unique_ptr<SelfTestIo>> SelfTestIo::Start(
    BlockDevice* device, const internal::SelfTestIoRequest& request,
    std::function<void(const Result&)> done) {
  const uint32_t block = device->Info().logical_block_size;
  if (request.ops() == 0 || request.ops() > kMaxOps) {
    return absl::InvalidArgumentError(absl::StrCat("ops: must be 1..", kMaxOps));
  }
  if (request.bytes() == 0 || request.bytes() > kMaxBytes || request.bytes() % block != 0 ||
      request.bytes() > device->capacity()) {
    return absl::InvalidArgumentError(absl::StrCat("bytes: must be a multiple of ", block,
                                                   " up to ", kMaxBytes, " and the device size"));
  }
  if (request.offset() % block != 0 || request.offset() >= device->capacity()) {
    return absl::InvalidArgumentError(
        absl::StrCat("offset: must be a multiple of ", block, " inside the device"));
  }
  if (request.queue_depth() > kMaxQueueDepth) {
    return absl::InvalidArgumentError(absl::StrCat("queue_depth: at most ", kMaxQueueDepth));
  }
  std::unique_ptr<SelfTestIo> io(new SelfTestIo(device, request, std::move(done)));
  const uint32_t depth =
      std::min<uint32_t>(request.queue_depth() == 0 ? 8 : request.queue_depth(), request.ops());
  for (uint32_t i = 0; i < depth; ++i) {
    auto slot = std::make_unique<Slot>();
    slot->owner = io.get();
    // 4 KiB alignment satisfies O_DIRECT on any logical block size.
    slot->buffer =
        static_cast<uint8_t*>(std::aligned_alloc(4096, (request.bytes() + 4095) & ~4095u));
    if (!slot->buffer) return absl::ResourceExhaustedError("bytes: cannot allocate the buffers");
    memset(slot->buffer, 0xa5, request.bytes());
    io->slots_.push_back(std::move(slot));
  }
  for (auto& slot : io->slots_) io->SubmitNext(slot.get());
  return io;
}

SelfTestIo::SelfTestIo(BlockDevice* device, const internal::SelfTestIoRequest& request,
                       std::function<void(const Result&)> done)
    : device_(device),
      write_(request.write()),
      bytes_(request.bytes()),
      total_(request.ops()),
      next_offset_(request.offset()),
      done_(std::move(done)) {}

SelfTestIo::~SelfTestIo() {
  for (auto& slot : slots_) std::free(slot->buffer);
}

void SelfTestIo::SubmitNext(Slot* slot) {
  if (next_offset_ + bytes_ > device_->capacity()) next_offset_ = 0;
  slot->iov = {slot->buffer, bytes_};
  BlockRequest request;
  request.op = write_ ? BlockOp::kWrite : BlockOp::kRead;
  request.offset = next_offset_;
  request.iov = &slot->iov;
  request.iovcnt = 1;
  next_offset_ += bytes_;
  ++submitted_;
  device_->Submit(request, slot);
}

void SelfTestIo::OnComplete(Slot* slot, int result) {
  ++result_.completed;
  if (result != 0) {
    ++result_.failed;
    if (result_.first_error == 0) result_.first_error = result;
  }
  if (submitted_ < total_) {
    SubmitNext(slot);
  } else if (result_.completed == total_) {
    done_(result_);  // the owner keeps this object alive at least until done_ returns
  }
}

}  // namespace blockplane::worker
