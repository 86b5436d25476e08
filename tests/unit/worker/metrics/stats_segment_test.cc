#include "worker/metrics/stats_segment.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <stdexcept>

#include "gtest/gtest.h"
#include "worker/backend/ram_backend.h"
#include "worker/diagnostics/self_test_io.h"

namespace blockplane::worker {
namespace {

class StatsSegmentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char name[] = "/tmp/blockplane-segment-XXXXXX";
    ASSERT_NE(mkdtemp(name), nullptr);
    dir_ = name;
    path_ = StatsSegmentPath(dir_, "dev0");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Runs `ops` writes of 4 KiB through a BlockDevice whose counters live in `segment`.
  void RunWrites(StatsSegment* segment, uint32_t ops) {
    auto loop = common::EventLoop::Create();
    ASSERT_TRUE(loop.ok());
    BlockDeviceOptions options;
    options.counters = segment->block_ops();
    auto device = BlockDevice::Create(
        loop->get(), std::make_unique<RamBackend>(loop->get(), RamBackend::Options{}), options);
    ASSERT_TRUE(device.ok()) << device.status();
    internal::SelfTestIoRequest request;
    request.set_ops(ops);
    request.set_bytes(4096);
    request.set_write(true);
    bool done = false;
    auto io = SelfTestIo::Start(device->get(), request, [&](const SelfTestIo::Result& r) {
      EXPECT_EQ(r.completed, ops);
      EXPECT_EQ(r.failed, 0u);
      done = true;
    });
    ASSERT_TRUE(io.ok()) << io.status();
    (*loop)->RunUntil([&] { return done; });
  }

  // Submits two flushes through a BlockDevice whose counters live in `segment`, one after the
  // other. The first reaches the backend (a new device does not know what an earlier worker left
  // unflushed); nothing is written before the second, so the block layer skips it.
  void RunTwoFlushes(StatsSegment* segment) {
    auto loop = common::EventLoop::Create();
    ASSERT_TRUE(loop.ok());
    BlockDeviceOptions options;
    options.counters = segment->block_ops();
    options.layer_counters = segment->block_layer();
    auto device = BlockDevice::Create(
        loop->get(), std::make_unique<RamBackend>(loop->get(), RamBackend::Options{}), options);
    ASSERT_TRUE(device.ok()) << device.status();
    for (int i = 0; i < 2; ++i) {
      struct Done final : BlockCompletion {
        int result = 1;
        void OnBlockComplete(int r) override { result = r; }
      } done;
      (*device)->Submit(BlockRequest{.op = BlockOp::kFlush}, &done);
      (*loop)->RunUntil([&] { return done.result != 1; });
      EXPECT_EQ(done.result, 0);
    }
  }

  std::string dir_, path_;
};

TEST_F(StatsSegmentTest, CountersPersistAcrossMappings) {
  ASSERT_TRUE(PrepareStatsSegment(path_, "dev0").ok());
  EXPECT_EQ(std::filesystem::file_size(path_), sizeof(StatsSegmentLayout));
  {
    auto segment = StatsSegment::Open(path_, "dev0", 1);
    ASSERT_TRUE(segment.ok()) << segment.status();
    RunWrites(segment->get(), 5);
    EXPECT_EQ((*segment)->layout().block_ops[int(BlockOp::kWrite)].bytes.Get(), 5u * 4096);
  }
  // The controller prepares the next generation: a valid segment is kept as it is.
  ASSERT_TRUE(PrepareStatsSegment(path_, "dev0").ok());
  auto segment = StatsSegment::Open(path_, "dev0", 2);
  ASSERT_TRUE(segment.ok()) << segment.status();
  RunWrites(segment->get(), 3);
  const StatsSegmentLayout& layout = (*segment)->layout();
  EXPECT_EQ(layout.block_ops[int(BlockOp::kWrite)].ops.Get(), 8u);
  EXPECT_EQ(layout.block_ops[int(BlockOp::kWrite)].bytes.Get(), 8u * 4096);
  EXPECT_EQ(layout.block_ops[int(BlockOp::kRead)].ops.Get(), 0u);
  uint64_t histogram = 0;
  for (const BlockCounter& b : layout.block_ops[int(BlockOp::kWrite)].histogram) {
    histogram += b.Get();
  }
  EXPECT_EQ(histogram, 8u);
  EXPECT_EQ(layout.header.generation.load(), 2u);
  EXPECT_EQ(layout.header.mappings.load(), 2u);
}

TEST_F(StatsSegmentTest, BlockLayerCountersPersistAcrossMappings) {
  ASSERT_TRUE(PrepareStatsSegment(path_, "dev0").ok());
  {
    auto segment = StatsSegment::Open(path_, "dev0", 1);
    ASSERT_TRUE(segment.ok()) << segment.status();
    RunTwoFlushes(segment->get());
    EXPECT_EQ((*segment)->layout().block_layer.flushes_skipped.Get(), 1u);
  }
  ASSERT_TRUE(PrepareStatsSegment(path_, "dev0").ok());
  auto segment = StatsSegment::Open(path_, "dev0", 2);
  ASSERT_TRUE(segment.ok()) << segment.status();
  RunTwoFlushes(segment->get());
  const StatsSegmentLayout& layout = (*segment)->layout();
  EXPECT_EQ(layout.block_layer.flushes_skipped.Get(), 2u);
  EXPECT_EQ(layout.block_layer.rmw.Get(), 0u);
  // Skipped flushes are still flushes to the per-operation counters.
  EXPECT_EQ(layout.block_ops[int(BlockOp::kFlush)].ops.Get(), 4u);
}

TEST_F(StatsSegmentTest, WorkerRefusesASegmentOfAnotherDevice) {
  ASSERT_TRUE(PrepareStatsSegment(path_, "dev0").ok());
  auto segment = StatsSegment::Open(path_, "dev1", 1);
  EXPECT_EQ(segment.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(StatsSegment::Open(dir_ + "/missing.stats", "dev0", 1).ok());
}

TEST_F(StatsSegmentTest, MismatchingSegmentIsReplacedWithZeroes) {
  ASSERT_TRUE(PrepareStatsSegment(path_, "dev0").ok());
  {
    auto segment = StatsSegment::Open(path_, "dev0", 1);
    ASSERT_TRUE(segment.ok());
    (*segment)->block_ops()[0].bytes.Add(42);
  }
  // Another layout version on disk (an older or newer blockplane).
  {
    int fd = open(path_.c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    uint32_t version = kStatsSegmentVersion + 1;
    ASSERT_EQ(pwrite(fd, &version, sizeof(version), offsetof(StatsSegmentHeader, version)),
              static_cast<ssize_t>(sizeof(version)));
    close(fd);
  }
  EXPECT_EQ(StatsSegment::Open(path_, "dev0", 2).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(PrepareStatsSegment(path_, "dev0").ok());
  auto segment = StatsSegment::Open(path_, "dev0", 2);
  ASSERT_TRUE(segment.ok()) << segment.status();
  EXPECT_EQ((*segment)->layout().block_ops[0].bytes.Get(), 0u);

  // A truncated file is not mapped either.
  ASSERT_EQ(truncate(path_.c_str(), 100), 0);
  EXPECT_FALSE(StatsSegment::Open(path_, "dev0", 3).ok());
}

// Counters shaped like a frontend's per-queue struct (xen::BlkifCounters).
struct QueueCounters {
  BlockCounter requests, responses;
  std::array<BlockCounter, 10> invalid;
};

TEST_F(StatsSegmentTest, EachQueueHasItsOwnTransportAreaThatPersists) {
  ASSERT_TRUE(PrepareStatsSegment(path_, "dev0").ok());
  {
    auto segment = StatsSegment::Open(path_, "dev0", 1);
    ASSERT_TRUE(segment.ok()) << segment.status();
    for (int q = 0; q < kStatsSegmentQueues; ++q) {
      QueueCounters* c = (*segment)->transport<QueueCounters>(q);
      c->requests.Add(100 + q);
      c->invalid[9].Add(q);
    }
  }
  ASSERT_TRUE(PrepareStatsSegment(path_, "dev0").ok());  // kept
  auto segment = StatsSegment::Open(path_, "dev0", 2);
  ASSERT_TRUE(segment.ok()) << segment.status();
  for (int q = 0; q < kStatsSegmentQueues; ++q) {
    const QueueCounters* c = (*segment)->transport<QueueCounters>(q);
    EXPECT_EQ(c->requests.Get(), 100u + q) << q;
    EXPECT_EQ(c->responses.Get(), 0u) << q;
    EXPECT_EQ(c->invalid[9].Get(), static_cast<uint64_t>(q)) << q;
    // The areas do not overlap and stay inside the layout.
    const auto* area = reinterpret_cast<const std::byte*>(c);
    const auto* base = reinterpret_cast<const std::byte*>(&(*segment)->layout());
    EXPECT_GE(area, base + offsetof(StatsSegmentLayout, transport) +
                        size_t(q) * sizeof(StatsSegmentQueueCounters));
    EXPECT_LE(area + sizeof(QueueCounters), base + sizeof(StatsSegmentLayout));
  }
  EXPECT_EQ((*segment)->block_ops()[0].bytes.Get(), 0u);  // no overlap with the block layer's
  EXPECT_THROW((*segment)->transport<QueueCounters>(kStatsSegmentQueues), std::out_of_range);
}

// A segment of layout version 1 (one transport area of 64 counters for every queue together),
// as a worker before per-queue counters left it: the controller replaces it with a zeroed one
// of the current layout, which the worker maps.
TEST_F(StatsSegmentTest, VersionOneSegmentIsReplaced) {
  const size_t v1_size = offsetof(StatsSegmentLayout, transport) + 64 * sizeof(BlockCounter);
  ASSERT_LT(v1_size, sizeof(StatsSegmentLayout));
  {
    std::filesystem::create_directories(std::filesystem::path(path_).parent_path());
    int fd = open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, static_cast<off_t>(v1_size)), 0);
    StatsSegmentHeader h;
    memset(static_cast<void*>(&h), 0, offsetof(StatsSegmentHeader, generation));
    h.magic = kStatsSegmentMagic;
    h.version = 1;
    h.header_size = sizeof(StatsSegmentHeader);
    h.total_size = v1_size;
    strcpy(h.device_id, "dev0");
    ASSERT_EQ(pwrite(fd, &h, offsetof(StatsSegmentHeader, generation), 0),
              static_cast<ssize_t>(offsetof(StatsSegmentHeader, generation)));
    const uint64_t requests = 77;  // transport[0] of version 1
    ASSERT_EQ(pwrite(fd, &requests, sizeof(requests), offsetof(StatsSegmentLayout, transport)),
              static_cast<ssize_t>(sizeof(requests)));
    close(fd);
  }
  EXPECT_EQ(StatsSegment::Open(path_, "dev0", 1).status().code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(PrepareStatsSegment(path_, "dev0").ok());
  EXPECT_EQ(std::filesystem::file_size(path_), sizeof(StatsSegmentLayout));
  auto segment = StatsSegment::Open(path_, "dev0", 2);
  ASSERT_TRUE(segment.ok()) << segment.status();
  EXPECT_EQ((*segment)->layout().header.version, kStatsSegmentVersion);
  EXPECT_EQ((*segment)->transport<QueueCounters>(0)->requests.Get(), 0u);
}

TEST_F(StatsSegmentTest, RemoveDeletesTheFile) {
  ASSERT_TRUE(PrepareStatsSegment(path_, "dev0").ok());
  RemoveStatsSegment(path_);
  EXPECT_FALSE(std::filesystem::exists(path_));
  EXPECT_FALSE(PrepareStatsSegment(path_, std::string(kStatsSegmentDeviceIdSize, 'x')).ok());
}

}  // namespace
}  // namespace blockplane::worker
