// BlockDevice over a real UringBackend on temp files: the worker's configuration.

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <vector>

#include "tests/unit/worker/test_util.h"
#include "worker/backend/faulty_backend.h"
#include "worker/backend/uring_backend.h"
#include "worker/block/open_block_device.h"

namespace blockplane::worker {
namespace {

using testing::AlignedBuffer;
using testing::BlockResult;
using testing::MakeLoop;
using testing::TempFile;

std::vector<uint8_t> ReadFile(const std::string& path, uint64_t offset, size_t length) {
  std::vector<uint8_t> data(length);
  int fd = open(path.c_str(), O_RDONLY);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(pread(fd, data.data(), length, static_cast<off_t>(offset)),
            static_cast<ssize_t>(length));
  close(fd);
  return data;
}

int Execute(common::EventLoop* loop, BlockDevice* device, BlockRequest request) {
  BlockResult r;
  device->Submit(request, &r);
  loop->RunUntil([&] { return r.done; });
  return r.result;
}

TEST(OpenBlockDeviceTest, ServesAFileWithUnalignedSectorsAndGrows) {
  auto loop = MakeLoop();
  TempFile file(1 << 20);
  auto device =
      OpenBlockDevice(loop.get(), file.path(),
                      {.cache = CacheMode::kNone,
                       .device = {.logical_block_size = 512, .discard = DiscardMode::kUnmap}});
  ASSERT_TRUE(device.ok()) << device.status();
  BlockDevice* d = device->get();
  EXPECT_EQ(d->Info().capacity, 1u << 20);
  EXPECT_TRUE(d->Info().discard);
  AlignedBuffer out(1536, 512);
  for (size_t i = 0; i < out.size(); ++i) out.data()[i] = static_cast<uint8_t>(i * 31 + 7);
  iovec v = out.iov();
  ASSERT_EQ(Execute(loop.get(), d, {.op = BlockOp::kWrite, .offset = 3584, .iov = &v, .iovcnt = 1}),
            0);
  ASSERT_EQ(Execute(loop.get(), d, {.op = BlockOp::kFlush}), 0);
  EXPECT_EQ(ReadFile(file.path(), 3584, 1536), std::vector<uint8_t>(out.data(), out.data() + 1536));
  ASSERT_TRUE(d->Resize(2 << 20).ok());
  struct stat st;
  ASSERT_EQ(stat(file.path().c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 2 << 20);
  ASSERT_EQ(Execute(loop.get(), d,
                    {.op = BlockOp::kWrite, .offset = (2 << 20) - 1536, .iov = &v, .iovcnt = 1}),
            0);
  EXPECT_EQ(ReadFile(file.path(), (2 << 20) - 1536, 1536),
            std::vector<uint8_t>(out.data(), out.data() + 1536));
  BlockDeviceStats stats = d->Stats();
  EXPECT_EQ(stats.highest_written_offset, 2u << 20);
  EXPECT_EQ(stats.ops[int(BlockOp::kWrite)].ops, 2u);
  EXPECT_EQ(stats.ops[int(BlockOp::kWrite)].bytes, 3072u);
}

TEST(OpenBlockDeviceTest, ReadOnlyOpensReadOnlyAndRefusesWrites) {
  auto loop = MakeLoop();
  TempFile file(1 << 20);
  chmod(file.path().c_str(), 0444);  // only a read-only open can succeed for non-root users
  auto device = OpenBlockDevice(loop.get(), file.path(),
                                {.cache = CacheMode::kWriteback, .device = {.read_only = true}});
  ASSERT_TRUE(device.ok()) << device.status();
  auto* backend = static_cast<UringBackend*>((*device)->backend());
  EXPECT_EQ(fcntl(backend->fd(), F_GETFL) & O_ACCMODE, O_RDONLY);
  AlignedBuffer buf(4096);
  iovec v = buf.iov();
  EXPECT_EQ(Execute(loop.get(), device->get(), {.op = BlockOp::kWrite, .iov = &v, .iovcnt = 1}),
            -EROFS);
  EXPECT_EQ(Execute(loop.get(), device->get(), {.op = BlockOp::kRead, .iov = &v, .iovcnt = 1}), 0);
}

TEST(OpenBlockDeviceTest, GuestMemoryRegistrationReachesTheBackend) {
  auto loop = MakeLoop();
  TempFile file(1 << 20);
  auto device = OpenBlockDevice(loop.get(), file.path(), {.cache = CacheMode::kNone});
  ASSERT_TRUE(device.ok());
  AlignedBuffer guest(1 << 20);  // stands in for a vhost-user memory region
  absl::Status registered = (*device)->RegisterGuestMemory(guest.iov());
  if (absl::IsUnavailable(registered)) GTEST_SKIP() << registered;
  ASSERT_TRUE(registered.ok()) << registered;
  std::memset(guest.data(), 0x77, 4096);
  iovec v = {guest.data(), 4096};
  ASSERT_EQ(Execute(loop.get(), device->get(),
                    {.op = BlockOp::kWrite, .offset = 4096, .iov = &v, .iovcnt = 1}),
            0);
  EXPECT_EQ(ReadFile(file.path(), 4096, 4096), std::vector<uint8_t>(4096, 0x77));
  EXPECT_EQ((*device)->backend()->Counters().fixed_buffer_ops, 1u);
  (*device)->UnregisterGuestMemory(guest.iov());
}

// A real EOPNOTSUPP (tmpfs has no ZERO_RANGE): write-zeroes is withdrawn for the device and
// later requests fall back to writing zeroes, which the guest never notices.
TEST(OpenBlockDeviceTest, WriteZeroesWithdrawnOnEopnotsuppFallsBackToWrites) {
  char name[] = "/dev/shm/blockplane-test-XXXXXX";
  int fd = mkstemp(name);
  if (fd < 0) GTEST_SKIP() << "no /dev/shm";
  std::vector<uint8_t> ones(1 << 20, 0x11);
  ASSERT_EQ(write(fd, ones.data(), ones.size()), static_cast<ssize_t>(ones.size()));
  close(fd);
  auto loop = MakeLoop();
  auto device = OpenBlockDevice(loop.get(), name, {.cache = CacheMode::kWriteback});
  ASSERT_TRUE(device.ok()) << device.status();
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(
        Execute(loop.get(), device->get(),
                {.op = BlockOp::kWriteZeroes, .offset = uint64_t(i) * 65536, .length = 65536}),
        0);
  }
  EXPECT_EQ(ReadFile(name, 0, 131072), std::vector<uint8_t>(131072, 0));
  EXPECT_EQ(ReadFile(name, 131072, 4096), std::vector<uint8_t>(4096, 0x11));
  BlockDeviceStats stats = (*device)->Stats();
  unlink(name);
  if (stats.write_zeroes_withdrawn == 0) GTEST_SKIP() << "this kernel's tmpfs has ZERO_RANGE";
  EXPECT_EQ(stats.write_zeroes_fallbacks, 2u);
  EXPECT_EQ(stats.ops[int(BlockOp::kWriteZeroes)].ops, 2u);
  EXPECT_EQ(stats.ops[int(BlockOp::kWriteZeroes)].failed, 0u);
  EXPECT_EQ((*device)->backend()->Counters().write_zeroes_withdrawn, 1u);
}

TEST(OpenBlockDeviceTest, MissingFileIsNotFound) {
  auto loop = MakeLoop();
  auto device = OpenBlockDevice(loop.get(), "/tmp/blockplane-no-such-disk", {});
  ASSERT_FALSE(device.ok());
  EXPECT_EQ(device.status().code(), absl::StatusCode::kNotFound);
}

TEST(UringBlockDeviceTest, DrainWaitsForRealInFlightIo) {
  auto loop = MakeLoop();
  TempFile file(4 << 20);
  auto device = OpenBlockDevice(loop.get(), file.path(), {.cache = CacheMode::kNone});
  ASSERT_TRUE(device.ok());
  constexpr int kRequests = 64;
  AlignedBuffer buf(4096 * kRequests);
  std::memset(buf.data(), 0x6b, buf.size());
  std::vector<iovec> iovs(kRequests);
  std::vector<BlockResult> results(kRequests);
  for (int i = 0; i < kRequests; ++i) {
    iovs[i] = {buf.data() + 4096 * i, 4096};
    (*device)->Submit(
        {.op = BlockOp::kWrite, .offset = uint64_t(i) * 8192, .iov = &iovs[i], .iovcnt = 1},
        &results[i]);
  }
  int completed_at_drain = -1;
  int drain_result = 1;
  (*device)->Drain([&](int result) {
    drain_result = result;
    completed_at_drain = 0;
    for (auto& r : results) completed_at_drain += r.done ? 1 : 0;
  });
  loop->RunUntil([&] { return drain_result != 1; });
  EXPECT_EQ(drain_result, 0);
  EXPECT_EQ(completed_at_drain, kRequests);
  for (auto& r : results) EXPECT_EQ(r.result, 0);
  ASSERT_TRUE((*device)->Resume().ok());
  EXPECT_EQ(ReadFile(file.path(), 63 * 8192, 4096), std::vector<uint8_t>(4096, 0x6b));
}

TEST(UringBlockDeviceTest, StopOnEnospcThenResumeLosesNothing) {
  auto loop = MakeLoop();
  TempFile file(1 << 20);
  // A 4K-native disk under 512-byte sectors, so the unaligned writes below are RMW (serialising).
  auto uring = UringBackend::Open(loop.get(), file.path(),
                                  {.cache = CacheMode::kNone, .request_alignment = 4096});
  ASSERT_TRUE(uring.ok());
  std::unique_ptr<UringBackend> inner = std::move(uring).value();
  auto faulty = std::make_unique<FaultyBackend>(loop.get(), inner.get());
  FaultyBackend* faults = faulty.get();
  // Every write fails until the "operator" frees space.
  faults->AddRule({.ops = static_cast<uint32_t>(FaultOp::kWrite), .error = ENOSPC});
  int stops = 0;
  auto device = BlockDevice::Create(
      loop.get(), std::move(faulty),
      {.error_policy = ErrorPolicy::kStop, .on_error_stop = [&](int) { ++stops; }});
  ASSERT_TRUE(device.ok());
  constexpr int kRequests = 16;
  std::vector<AlignedBuffer> buffers;
  std::vector<iovec> iovs(kRequests);
  std::vector<BlockResult> results(kRequests);
  for (int i = 0; i < kRequests; ++i) {
    buffers.emplace_back(4096);
    std::memset(buffers[i].data(), 0x20 + i, 4096);
    iovs[i] = buffers[i].iov();
  }
  // Every third write is unaligned (RMW) and overlaps its neighbours, so the outcome depends on
  // the order (aligned writes never overlap each other: their relative order is unspecified).
  auto offset_of = [](int i) { return uint64_t(i) * 4096 + (i % 3 == 0 ? 512 : 0); };
  for (int i = 0; i < kRequests; ++i) {
    uint64_t offset = offset_of(i);
    (*device)->Submit({.op = BlockOp::kWrite, .offset = offset, .iov = &iovs[i], .iovcnt = 1},
                      &results[i]);
  }
  loop->RunUntil([&] { return stops == 1 && (*device)->Stats().in_flight == 0; });
  for (auto& r : results) EXPECT_FALSE(r.done);
  EXPECT_GT((*device)->Stats().parked, 0u);
  faults->ClearRules();
  ASSERT_TRUE((*device)->ResumeAfterError().ok());
  loop->RunUntil([&] {
    for (auto& r : results) {
      if (!r.done) return false;
    }
    return true;
  });
  for (auto& r : results) EXPECT_EQ(r.result, 0);
  // Replay the writes in submission order on a model.
  std::vector<uint8_t> model((kRequests + 1) * 4096, 0);
  for (int i = 0; i < kRequests; ++i) {
    std::memset(model.data() + offset_of(i), 0x20 + i, 4096);
  }
  std::vector<uint8_t> actual = ReadFile(file.path(), 0, model.size());
  for (size_t b = 0; b < model.size(); b += 512) {
    ASSERT_EQ(actual[b], model[b]) << "sector at byte " << b;
  }
  EXPECT_EQ((*device)->Stats().ops[int(BlockOp::kWrite)].failed, 0u);
  EXPECT_GT((*device)->Stats().rmw, 0u);
  EXPECT_EQ(stops, 1);
}

}  // namespace
}  // namespace blockplane::worker
