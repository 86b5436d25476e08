// UringBackend and BlockDevice on a real block device: a loop device with 4096-byte logical
// blocks over a temp file (a 4K-native disk). Needs root and /dev/loop-control; skips otherwise.
// The loop device is attached with LO_FLAGS_AUTOCLEAR and detached in the destructor, so a
// crashed test leaves nothing behind once its fds are closed.

#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "tests/unit/worker/test_util.h"
#include "worker/backend/uring_backend.h"
#include "worker/block/block_device.h"

namespace blockplane::worker {
namespace {

using testing::AlignedBuffer;
using testing::BlockResult;
using testing::MakeLoop;
using testing::RunToCompletion;
using testing::TempFile;
using testing::Waiter;

constexpr uint64_t kSize = 64 << 20;

class LoopDevice {
 public:
  // Returns an empty path (and a reason) when loop devices cannot be used here.
  explicit LoopDevice(const std::string& backing) {
    int control = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    if (control < 0) {
      reason_ = "no /dev/loop-control (needs root)";
      return;
    }
    int number = ioctl(control, LOOP_CTL_GET_FREE);
    close(control);
    if (number < 0) {
      reason_ = "LOOP_CTL_GET_FREE failed";
      return;
    }
    std::string path = "/dev/loop" + std::to_string(number);
    fd_ = open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd_ < 0) {
      reason_ = path + " cannot be opened (no device node in this container?)";
      return;
    }
    int backing_fd = open(backing.c_str(), O_RDWR | O_CLOEXEC);
    loop_config config = {};
    config.fd = static_cast<uint32_t>(backing_fd);
    config.block_size = 4096;
    config.info.lo_flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO;
    int r = ioctl(fd_, LOOP_CONFIGURE, &config);
    close(backing_fd);
    if (r != 0) {
      reason_ = std::string("LOOP_CONFIGURE: ") + strerror(errno);
      close(fd_);
      fd_ = -1;
      return;
    }
    path_ = path;
  }
  ~LoopDevice() {
    if (fd_ >= 0) {
      ioctl(fd_, LOOP_CLR_FD, 0);
      close(fd_);
    }
  }
  const std::string& path() const { return path_; }
  const std::string& reason() const { return reason_; }

 private:
  int fd_ = -1;
  std::string path_;
  std::string reason_;
};

class UringBlockdevTest : public ::testing::Test {
 protected:
  void SetUp() override {
    file_ = std::make_unique<TempFile>(kSize);
    device_ = std::make_unique<LoopDevice>(file_->path());
    if (device_->path().empty()) GTEST_SKIP() << device_->reason();
    loop_ = MakeLoop();
  }
  std::unique_ptr<TempFile> file_;
  std::unique_ptr<LoopDevice> device_;
  std::unique_ptr<common::EventLoop> loop_;
};

TEST_F(UringBlockdevTest, ReportsBlockDeviceLimits) {
  auto backend = UringBackend::Open(loop_.get(), device_->path(), {.cache = CacheMode::kNone});
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_TRUE((*backend)->is_block_device());
  EXPECT_EQ((*backend)->Capacity(), kSize);
  EXPECT_EQ((*backend)->Limits().request_alignment, 4096u);  // 4K logical blocks, O_DIRECT
  EXPECT_GT((*backend)->Limits().max_transfer, 0u);
  auto grown = (*backend)->Grow(2 * kSize);
  EXPECT_EQ(grown.code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(UringBlockdevTest, WriteDiscardAndZeroesOnTheDevice) {
  auto backend = UringBackend::Open(loop_.get(), device_->path(), {.cache = CacheMode::kNone});
  ASSERT_TRUE(backend.ok()) << backend.status();
  AlignedBuffer out(65536);
  std::memset(out.data(), 0x5c, out.size());
  iovec v = out.iov();
  Waiter w;
  (*backend)->Write(0, &v, 1, kBackendWriteFua, &w);
  ASSERT_EQ(RunToCompletion(loop_.get(), &w), 0);
  // Write-zeroes goes through fallocate on the device (blkdev_issue_zeroout).
  Waiter z;
  (*backend)->WriteZeroes(16384, 16384, 0, &z);
  ASSERT_EQ(RunToCompletion(loop_.get(), &z), 0);
  // Loop devices discard by punching holes in the backing file, so the range reads as zeroes.
  ASSERT_TRUE((*backend)->SupportsDiscard());
  // BLKDISCARD on the helper thread, completed back on the loop.
  Waiter d;
  (*backend)->Discard(32768, 16384, &d);
  ASSERT_EQ(RunToCompletion(loop_.get(), &d), 0);
  AlignedBuffer in(65536);
  iovec r = in.iov();
  Waiter rd;
  (*backend)->Read(0, &r, 1, &rd);
  ASSERT_EQ(RunToCompletion(loop_.get(), &rd), 0);
  for (size_t i = 0; i < 16384; ++i) ASSERT_EQ(in.data()[i], 0x5c) << i;
  for (size_t i = 16384; i < 49152; ++i) ASSERT_EQ(in.data()[i], 0) << i;
  for (size_t i = 49152; i < 65536; ++i) ASSERT_EQ(in.data()[i], 0x5c) << i;
}

TEST_F(UringBlockdevTest, SmallSectorsOverA4kDeviceUseReadModifyWrite) {
  auto backend = UringBackend::Open(loop_.get(), device_->path(), {.cache = CacheMode::kNone});
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto device =
      BlockDevice::Create(loop_.get(), std::move(backend).value(), {.logical_block_size = 512});
  ASSERT_TRUE(device.ok()) << device.status();
  std::vector<AlignedBuffer> buffers;
  std::vector<iovec> iovs(8);
  std::vector<BlockResult> results(8);
  for (int i = 0; i < 8; ++i) {
    buffers.emplace_back(512, 512);
    std::memset(buffers[i].data(), 0x30 + i, 512);
    iovs[i] = buffers[i].iov();
    (*device)->Submit(
        {.op = BlockOp::kWrite, .offset = 8192 + uint64_t(i) * 512, .iov = &iovs[i], .iovcnt = 1},
        &results[i]);
  }
  loop_->RunUntil([&] {
    for (auto& r : results) {
      if (!r.done) return false;
    }
    return true;
  });
  for (auto& r : results) EXPECT_EQ(r.result, 0);
  AlignedBuffer in(4096);
  iovec v = in.iov();
  BlockResult rd;
  (*device)->Submit({.op = BlockOp::kRead, .offset = 8192, .iov = &v, .iovcnt = 1}, &rd);
  loop_->RunUntil([&] { return rd.done; });
  ASSERT_EQ(rd.result, 0);
  for (int i = 0; i < 8; ++i) {
    for (int b = 0; b < 512; ++b) ASSERT_EQ(in.data()[i * 512 + b], 0x30 + i) << i;
  }
  EXPECT_EQ((*device)->Stats().rmw, 8u);
}

}  // namespace
}  // namespace blockplane::worker
