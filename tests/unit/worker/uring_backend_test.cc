#include "worker/backend/uring_backend.h"

#include <sys/stat.h>

#include <vector>

#include "tests/unit/worker/test_util.h"

namespace blockplane::worker {
namespace {

using testing::AlignedBuffer;
using testing::MakeLoop;
using testing::RunToCompletion;
using testing::TempFile;
using testing::Waiter;

class UringBackendTest : public ::testing::TestWithParam<CacheMode> {};

TEST_P(UringBackendTest, WriteThenReadBackVectored) {
  auto loop = MakeLoop();
  TempFile file(1 << 20);
  UringBackend::Options options;
  options.cache = GetParam();
  auto backend = UringBackend::Open(loop.get(), file.path(), options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_EQ((*backend)->Capacity(), 1u << 20);
  const BackendLimits& limits = (*backend)->Limits();
  if (GetParam() == CacheMode::kNone) {
    EXPECT_GE(limits.request_alignment, 512u);
  } else {
    EXPECT_EQ(limits.request_alignment, 1u);
  }
  AlignedBuffer a(8192), b(4096);
  for (size_t i = 0; i < a.size(); ++i) a.data()[i] = static_cast<uint8_t>(i * 7 + 1);
  for (size_t i = 0; i < b.size(); ++i) b.data()[i] = static_cast<uint8_t>(i * 3 + 2);
  iovec out[2] = {a.iov(), b.iov()};
  Waiter w;
  (*backend)->Write(65536, out, 2, kBackendWriteFua, &w);
  EXPECT_FALSE(w.done);  // never completes inside the call
  ASSERT_EQ(RunToCompletion(loop.get(), &w), 0);

  AlignedBuffer c(12288);
  iovec in = c.iov();
  Waiter r;
  (*backend)->Read(65536, &in, 1, &r);
  ASSERT_EQ(RunToCompletion(loop.get(), &r), 0);
  EXPECT_EQ(std::memcmp(c.data(), a.data(), 8192), 0);
  EXPECT_EQ(std::memcmp(c.data() + 8192, b.data(), 4096), 0);

  Waiter f;
  (*backend)->Flush(&f);
  EXPECT_EQ(RunToCompletion(loop.get(), &f), 0);
}

INSTANTIATE_TEST_SUITE_P(CacheModes, UringBackendTest,
                         ::testing::Values(CacheMode::kNone, CacheMode::kWriteback,
                                           CacheMode::kWritethrough));

TEST(UringBackendShortTransferTest, CappedSubmissionsAreResubmittedForTheRest) {
  auto loop = MakeLoop();
  TempFile file(1 << 20);
  UringBackend::Options options;
  options.cache = CacheMode::kNone;
  options.max_bytes_per_sqe_for_testing = 4096;
  auto backend = UringBackend::Open(loop.get(), file.path(), options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  AlignedBuffer a(16384), b(8192);
  for (size_t i = 0; i < a.size(); ++i) a.data()[i] = static_cast<uint8_t>(i ^ 0x5a);
  for (size_t i = 0; i < b.size(); ++i) b.data()[i] = static_cast<uint8_t>(i ^ 0xa5);
  iovec out[2] = {a.iov(), b.iov()};
  Waiter w;
  (*backend)->Write(4096, out, 2, 0, &w);
  ASSERT_EQ(RunToCompletion(loop.get(), &w), 0);
  AlignedBuffer c(24576);
  iovec in = c.iov();
  Waiter r;
  (*backend)->Read(4096, &in, 1, &r);
  ASSERT_EQ(RunToCompletion(loop.get(), &r), 0);
  EXPECT_EQ(std::memcmp(c.data(), a.data(), 16384), 0);
  EXPECT_EQ(std::memcmp(c.data() + 16384, b.data(), 8192), 0);
  // 24 KiB in 4 KiB SQEs: five resubmissions per direction.
  EXPECT_EQ((*backend)->Counters().resubmissions, 10u);
}

TEST(UringBackendShortTransferTest, ReadPastEndOfFileIsZeroFilled) {
  auto loop = MakeLoop();
  TempFile file(8192);
  auto backend = UringBackend::Open(loop.get(), file.path(), {.cache = CacheMode::kWriteback});
  ASSERT_TRUE(backend.ok());
  // Shrink the file behind the backend's back: the second half of the read hits EOF.
  ASSERT_EQ(truncate(file.path().c_str(), 4096), 0);
  AlignedBuffer c(8192);
  std::memset(c.data(), 0xff, c.size());
  iovec in = c.iov();
  Waiter r;
  (*backend)->Read(0, &in, 1, &r);
  ASSERT_EQ(RunToCompletion(loop.get(), &r), 0);
  for (size_t i = 0; i < c.size(); ++i) ASSERT_EQ(c.data()[i], 0) << i;
}

TEST(UringBackendTest, DiscardAndWriteZeroesReadBackZeroes) {
  auto loop = MakeLoop();
  TempFile file(1 << 20);
  auto backend = UringBackend::Open(loop.get(), file.path(), {.cache = CacheMode::kNone});
  ASSERT_TRUE(backend.ok());
  AlignedBuffer a(65536);
  std::memset(a.data(), 0xab, a.size());
  iovec out = a.iov();
  Waiter w;
  (*backend)->Write(0, &out, 1, 0, &w);
  ASSERT_EQ(RunToCompletion(loop.get(), &w), 0);
  ASSERT_TRUE((*backend)->SupportsDiscard());
  ASSERT_TRUE((*backend)->SupportsWriteZeroes());
  Waiter d, z, zu;
  (*backend)->Discard(0, 16384, &d);
  (*backend)->WriteZeroes(16384, 16384, 0, &z);
  (*backend)->WriteZeroes(32768, 16384, kBackendZeroesMayUnmap, &zu);
  EXPECT_EQ(RunToCompletion(loop.get(), &d), 0);
  EXPECT_EQ(RunToCompletion(loop.get(), &z), 0);
  EXPECT_EQ(RunToCompletion(loop.get(), &zu), 0);
  AlignedBuffer c(65536);
  iovec in = c.iov();
  Waiter r;
  (*backend)->Read(0, &in, 1, &r);
  ASSERT_EQ(RunToCompletion(loop.get(), &r), 0);
  for (size_t i = 0; i < 49152; ++i) ASSERT_EQ(c.data()[i], 0) << i;
  for (size_t i = 49152; i < 65536; ++i) ASSERT_EQ(c.data()[i], 0xab) << i;
  EXPECT_EQ((*backend)->Counters().discard_withdrawn, 0u);
}

TEST(UringBackendTest, GrowExtendsFileAndRefusesShrink) {
  auto loop = MakeLoop();
  TempFile file(1 << 20);
  auto backend = UringBackend::Open(loop.get(), file.path(), {.cache = CacheMode::kNone});
  ASSERT_TRUE(backend.ok());
  EXPECT_TRUE((*backend)->Grow(2 << 20).ok());
  EXPECT_EQ((*backend)->Capacity(), 2u << 20);
  struct stat st;
  ASSERT_EQ(stat(file.path().c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 2 << 20);
  EXPECT_FALSE((*backend)->Grow(1 << 20).ok());
}

TEST(UringBackendTest, IoInsideRegisteredMemoryUsesFixedBuffers) {
  auto loop = MakeLoop();
  TempFile file(1 << 20);
  auto backend = UringBackend::Open(loop.get(), file.path(), {.cache = CacheMode::kNone});
  ASSERT_TRUE(backend.ok());
  AlignedBuffer region(65536);
  absl::Status registered = (*backend)->RegisterMemory(region.iov());
  if (absl::IsUnavailable(registered)) GTEST_SKIP() << registered;
  ASSERT_TRUE(registered.ok()) << registered;
  EXPECT_EQ((*backend)->RegisterMemory({region.data() + 4096, 4096}).code(),
            absl::StatusCode::kAlreadyExists);
  for (size_t i = 0; i < 8192; ++i) region.data()[i] = static_cast<uint8_t>(i * 5 + 3);
  iovec out = {region.data(), 8192};
  Waiter w;
  (*backend)->Write(8192, &out, 1, 0, &w);
  ASSERT_EQ(RunToCompletion(loop.get(), &w), 0);
  iovec in = {region.data() + 32768, 8192};
  Waiter r;
  (*backend)->Read(8192, &in, 1, &r);
  ASSERT_EQ(RunToCompletion(loop.get(), &r), 0);
  EXPECT_EQ(std::memcmp(region.data() + 32768, region.data(), 8192), 0);
  EXPECT_EQ((*backend)->Counters().fixed_buffer_ops, 2u);
  // A buffer outside the region, and I/O after unregistering, take the normal path.
  AlignedBuffer other(4096);
  iovec outside = other.iov();
  Waiter o;
  (*backend)->Read(0, &outside, 1, &o);
  ASSERT_EQ(RunToCompletion(loop.get(), &o), 0);
  (*backend)->UnregisterMemory(region.iov());
  Waiter again;
  (*backend)->Read(8192, &in, 1, &again);
  ASSERT_EQ(RunToCompletion(loop.get(), &again), 0);
  EXPECT_EQ(std::memcmp(region.data() + 32768, region.data(), 8192), 0);
  EXPECT_EQ((*backend)->Counters().fixed_buffer_ops, 2u);
}

// tmpfs implements fallocate PUNCH_HOLE but not ZERO_RANGE: a real EOPNOTSUPP from the kernel.
TEST(UringBackendTest, EopnotsuppFromTheKernelWithdrawsWriteZeroes) {
  char name[] = "/dev/shm/blockplane-test-XXXXXX";
  int fd = mkstemp(name);
  if (fd < 0) GTEST_SKIP() << "no /dev/shm";
  ASSERT_EQ(ftruncate(fd, 1 << 20), 0);
  close(fd);
  auto loop = MakeLoop();
  auto backend = UringBackend::Open(loop.get(), name, {.cache = CacheMode::kWriteback});
  ASSERT_TRUE(backend.ok()) << backend.status();
  Waiter z;
  (*backend)->WriteZeroes(0, 4096, 0, &z);  // ZERO_RANGE
  int result = RunToCompletion(loop.get(), &z);
  if (result == 0) {
    unlink(name);
    GTEST_SKIP() << "this kernel's tmpfs supports ZERO_RANGE";
  }
  EXPECT_EQ(result, -EOPNOTSUPP);
  EXPECT_FALSE((*backend)->SupportsWriteZeroes());
  EXPECT_EQ((*backend)->Counters().write_zeroes_withdrawn, 1u);
  Waiter again;
  (*backend)->WriteZeroes(0, 4096, 0, &again);  // refused without a syscall
  EXPECT_EQ(RunToCompletion(loop.get(), &again), -EOPNOTSUPP);
  EXPECT_EQ((*backend)->Counters().unsupported_ops, 2u);
  // Discard (PUNCH_HOLE) still works on tmpfs.
  Waiter d;
  (*backend)->Discard(0, 4096, &d);
  EXPECT_EQ(RunToCompletion(loop.get(), &d), 0);
  EXPECT_TRUE((*backend)->SupportsDiscard());
  unlink(name);
}

TEST(UringBackendTest, DeviceIoIsSubmittedEveryIoSubmitBatchSqes) {
  common::EventLoop::Options options;
  options.io_submit_batch = 2;
  auto created = common::EventLoop::Create(options);
  ASSERT_TRUE(created.ok());
  auto loop = std::move(created).value();
  TempFile file(1 << 20);
  auto backend = UringBackend::Open(loop.get(), file.path(), {.cache = CacheMode::kNone});
  ASSERT_TRUE(backend.ok());
  AlignedBuffer buf(5 * 4096);
  std::vector<iovec> iovs(5);
  std::vector<Waiter> waiters(5);
  const uint64_t before = loop->counters().sqes_submitted;
  for (int i = 0; i < 5; ++i) {
    iovs[i] = {buf.data() + 4096 * i, 4096};
    (*backend)->Read(uint64_t(i) * 4096, &iovs[i], 1, &waiters[i]);
  }
  // Two batches of two went to the kernel at once; the fifth waits for the end of the pass.
  EXPECT_EQ(loop->counters().early_io_submits, 2u);
  EXPECT_EQ(loop->counters().sqes_submitted - before, 4u);
  loop->RunUntil([&] {
    for (auto& w : waiters) {
      if (!w.done) return false;
    }
    return true;
  });
  for (auto& w : waiters) EXPECT_EQ(w.result, 0);
}

TEST(UringBackendTest, OpenMissingFileFails) {
  auto loop = MakeLoop();
  auto backend = UringBackend::Open(loop.get(), "/tmp/blockplane-does-not-exist", {});
  EXPECT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kNotFound);
}

TEST(UringBackendTest, ManyConcurrentReadsBeyondQueueDepthAllComplete) {
  auto loop = MakeLoop();  // SQ of 256
  TempFile file(4 << 20);
  auto backend = UringBackend::Open(loop.get(), file.path(), {.cache = CacheMode::kNone});
  ASSERT_TRUE(backend.ok());
  constexpr int kOps = 1000;
  AlignedBuffer buf(4096 * kOps);
  std::vector<iovec> iovs(kOps);
  std::vector<Waiter> waiters(kOps);
  for (int i = 0; i < kOps; ++i) {
    iovs[i] = {buf.data() + 4096 * i, 4096};
    (*backend)->Read(uint64_t{4096} * i, &iovs[i], 1, &waiters[i]);
  }
  loop->RunUntil([&] {
    for (auto& w : waiters) {
      if (!w.done) return false;
    }
    return true;
  });
  for (auto& w : waiters) EXPECT_EQ(w.result, 0);
}

}  // namespace
}  // namespace blockplane::worker
