#include "worker/block/block_device.h"

#include <errno.h>

#include <vector>

#include "tests/unit/worker/test_util.h"
#include "worker/backend/faulty_backend.h"
#include "worker/backend/ram_backend.h"

namespace blockplane::worker {
namespace {

using testing::AlignedBuffer;
using testing::BlockResult;
using testing::MakeLoop;

constexpr uint64_t kCapacity = 1 << 20;

class BlockDeviceTest : public ::testing::Test {
 protected:
  // RAM backend behind a FaultyBackend; the device owns the FaultyBackend.
  void Make(BlockDeviceOptions options = {}, RamBackend::Options ram_options = {}) {
    loop_ = MakeLoop();
    if (ram_options.limits.request_alignment == 1) {
      ram_options.limits.request_alignment = 4096;
      ram_options.limits.buffer_alignment = 512;
      ram_options.limits.discard_granularity = 4096;
    }
    ram_options.capacity = kCapacity;
    ram_ = std::make_unique<RamBackend>(loop_.get(), ram_options);
    auto faulty = std::make_unique<FaultyBackend>(loop_.get(), ram_.get());
    faulty_ = faulty.get();
    auto device = BlockDevice::Create(loop_.get(), std::move(faulty), std::move(options));
    ASSERT_TRUE(device.ok()) << device.status();
    device_ = std::move(device).value();
  }

  void Wait(BlockResult* r) {
    loop_->RunUntil([&] { return r->done; });
  }
  void WaitAll(std::vector<BlockResult>& results) {
    loop_->RunUntil([&] {
      for (auto& r : results) {
        if (!r.done) return false;
      }
      return true;
    });
  }
  int Do(BlockRequest request) {
    BlockResult r;
    device_->Submit(request, &r);
    EXPECT_FALSE(r.done) << "completed inside Submit";
    Wait(&r);
    return r.result;
  }
  int Write(uint64_t offset, uint8_t* data, size_t length, uint32_t flags = 0) {
    iovec v = {data, length};
    return Do({.op = BlockOp::kWrite, .flags = flags, .offset = offset, .iov = &v, .iovcnt = 1});
  }
  int Read(uint64_t offset, uint8_t* data, size_t length) {
    iovec v = {data, length};
    return Do({.op = BlockOp::kRead, .offset = offset, .iov = &v, .iovcnt = 1});
  }
  int Flush() { return Do({.op = BlockOp::kFlush}); }

  std::unique_ptr<common::EventLoop> loop_;
  std::unique_ptr<RamBackend> ram_;
  FaultyBackend* faulty_ = nullptr;
  std::unique_ptr<BlockDevice> device_;
};

void Fill(uint8_t* data, size_t length, uint8_t seed) {
  for (size_t i = 0; i < length; ++i) data[i] = static_cast<uint8_t>(seed + i * 13);
}

TEST_F(BlockDeviceTest, AlignedWriteAndReadBack) {
  Make();
  AlignedBuffer out(8192), in(8192);
  Fill(out.data(), 8192, 1);
  ASSERT_EQ(Write(8192, out.data(), 8192), 0);
  ASSERT_EQ(Read(8192, in.data(), 8192), 0);
  EXPECT_EQ(std::memcmp(in.data(), out.data(), 8192), 0);
  EXPECT_EQ(std::memcmp(ram_->data().data() + 8192, out.data(), 8192), 0);
  BlockDeviceStats stats = device_->Stats();
  EXPECT_EQ(stats.ops[int(BlockOp::kWrite)].ops, 1u);
  EXPECT_EQ(stats.ops[int(BlockOp::kWrite)].bytes, 8192u);
  EXPECT_EQ(stats.ops[int(BlockOp::kRead)].ops, 1u);
  EXPECT_EQ(stats.highest_written_offset, 16384u);
  EXPECT_EQ(stats.in_flight, 0u);
  EXPECT_EQ(stats.rmw, 0u);
  EXPECT_EQ(stats.bounced, 0u);
  uint64_t histogram_total = 0;
  for (uint64_t n : stats.ops[int(BlockOp::kRead)].latency_histogram) histogram_total += n;
  EXPECT_EQ(histogram_total, 1u);
  EXPECT_EQ(ram_->stats().misaligned, 0u);
}

TEST_F(BlockDeviceTest, UnalignedWriteIsReadModifyWrite) {
  Make();
  std::vector<uint8_t> before(kCapacity);
  Fill(ram_->data().data(), kCapacity, 7);
  std::memcpy(before.data(), ram_->data().data(), kCapacity);
  AlignedBuffer out(1024, 512);
  Fill(out.data(), 1024, 99);
  ASSERT_EQ(Write(4096 + 3584, out.data(), 1024), 0);  // straddles two 4 KiB blocks
  std::memcpy(before.data() + 4096 + 3584, out.data(), 1024);
  EXPECT_EQ(std::memcmp(ram_->data().data(), before.data(), kCapacity), 0);
  AlignedBuffer in(1536, 512);
  ASSERT_EQ(Read(4096 + 3072, in.data(), 1536), 0);
  EXPECT_EQ(std::memcmp(in.data(), before.data() + 4096 + 3072, 1536), 0);
  BlockDeviceStats stats = device_->Stats();
  EXPECT_EQ(stats.rmw, 1u);
  EXPECT_EQ(stats.bounced, 2u);
  EXPECT_EQ(ram_->stats().misaligned, 0u);
}

TEST_F(BlockDeviceTest, ConcurrentUnalignedWritesToOneBlockLoseNothing) {
  RamBackend::Options ram;
  ram.reorder_seed = 42;
  Make({}, ram);
  // Eight 512-byte writes into the same 4 KiB block, all in flight together: without
  // serialisation each RMW would overwrite the others' sectors.
  std::vector<AlignedBuffer> buffers;
  for (int i = 0; i < 8; ++i) buffers.emplace_back(512, 512);
  std::vector<iovec> iovs(8);
  std::vector<BlockResult> results(8);
  for (int i = 0; i < 8; ++i) {
    std::memset(buffers[i].data(), 0x10 + i, 512);
    iovs[i] = buffers[i].iov();
    device_->Submit(
        {.op = BlockOp::kWrite, .offset = uint64_t(i) * 512, .iov = &iovs[i], .iovcnt = 1},
        &results[i]);
  }
  WaitAll(results);
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(results[i].result, 0);
    for (int b = 0; b < 512; ++b) ASSERT_EQ(ram_->data()[i * 512 + b], 0x10 + i) << i;
  }
  EXPECT_EQ(device_->Stats().serialising_waits, 7u);
}

TEST_F(BlockDeviceTest, InvalidRequestsAreCountedAndRefused) {
  Make();
  AlignedBuffer buf(4096);
  EXPECT_EQ(Write(kCapacity, buf.data(), 4096), -EINVAL);       // beyond the end
  EXPECT_EQ(Read(kCapacity - 512, buf.data(), 1024), -EINVAL);  // crosses the end
  EXPECT_EQ(Read(100, buf.data(), 512), -EINVAL);               // not sector-aligned
  EXPECT_EQ(Do({.op = BlockOp::kDiscard, .offset = 0, .length = 100}), -EINVAL);
  BlockDeviceStats stats = device_->Stats();
  EXPECT_EQ(stats.ops[int(BlockOp::kWrite)].invalid, 1u);
  EXPECT_EQ(stats.ops[int(BlockOp::kRead)].invalid, 2u);
  EXPECT_EQ(stats.ops[int(BlockOp::kDiscard)].invalid, 1u);
  EXPECT_EQ(stats.ops[int(BlockOp::kRead)].ops, 0u);
  EXPECT_EQ(faulty_->ops_seen(FaultOp::kRead) + faulty_->ops_seen(FaultOp::kWrite), 0u);
}

TEST_F(BlockDeviceTest, ReadOnlyRefusesWrites) {
  Make({.read_only = true});
  AlignedBuffer buf(4096);
  EXPECT_EQ(Write(0, buf.data(), 4096), -EROFS);
  EXPECT_EQ(Do({.op = BlockOp::kWriteZeroes, .offset = 0, .length = 4096}), -EROFS);
  EXPECT_EQ(Read(0, buf.data(), 4096), 0);
  EXPECT_EQ(device_->Stats().ops[int(BlockOp::kWrite)].invalid, 1u);
  EXPECT_TRUE(device_->Info().read_only);
}

TEST_F(BlockDeviceTest, LargeRequestsAreSplitAtMaxTransfer) {
  RamBackend::Options ram;
  ram.limits.request_alignment = 4096;
  ram.limits.buffer_alignment = 512;
  ram.limits.max_transfer = 8192;
  ram.limits.max_segments = 4;
  Make({}, ram);
  AlignedBuffer out(65536), in(65536);
  Fill(out.data(), 65536, 3);
  // Sixteen 4 KiB iovecs: split both by bytes and by segments.
  std::vector<iovec> iovs;
  for (int i = 0; i < 16; ++i) iovs.push_back({out.data() + i * 4096, 4096});
  ASSERT_EQ(Do({.op = BlockOp::kWrite, .offset = 0, .iov = iovs.data(), .iovcnt = 16}), 0);
  ASSERT_EQ(Read(0, in.data(), 65536), 0);
  EXPECT_EQ(std::memcmp(in.data(), out.data(), 65536), 0);
  EXPECT_EQ(ram_->stats().writes, 8u);
  EXPECT_EQ(ram_->stats().reads, 8u);
  EXPECT_EQ(ram_->stats().misaligned, 0u);
  EXPECT_EQ(device_->Stats().split, 2u);
}

TEST_F(BlockDeviceTest, FlushIsSkippedWhenNothingWasWrittenSinceTheLastOne) {
  Make();
  // A new device's first flush reaches the backend: it cannot know what an earlier process (a
  // worker killed before it flushed) left in the host's cache.
  ASSERT_EQ(Flush(), 0);
  EXPECT_EQ(ram_->stats().flushes, 1u);
  ASSERT_EQ(Flush(), 0);
  EXPECT_EQ(ram_->stats().flushes, 1u);
  AlignedBuffer buf(4096);
  ASSERT_EQ(Write(0, buf.data(), 4096), 0);
  ASSERT_EQ(Flush(), 0);
  EXPECT_EQ(ram_->stats().flushes, 2u);
  ASSERT_EQ(Flush(), 0);
  EXPECT_EQ(ram_->stats().flushes, 2u);
  BlockDeviceStats stats = device_->Stats();
  EXPECT_EQ(stats.flushes_skipped, 2u);
  EXPECT_EQ(stats.ops[int(BlockOp::kFlush)].ops, 4u);
}

TEST_F(BlockDeviceTest, ConcurrentFlushesAreSerialised) {
  FaultRule slow;
  Make();
  AlignedBuffer buf(4096);
  ASSERT_EQ(Write(0, buf.data(), 4096), 0);
  std::vector<BlockResult> results(3);
  for (auto& r : results) device_->Submit({.op = BlockOp::kFlush}, &r);
  WaitAll(results);
  for (auto& r : results) EXPECT_EQ(r.result, 0);
  // The first flush covers the write; the two queued behind it find nothing new.
  EXPECT_EQ(ram_->stats().flushes, 1u);
  EXPECT_EQ(ram_->stats().max_in_flight, 1u);
}

TEST_F(BlockDeviceTest, FuaWithoutNativeSupportFlushesAfterTheWrite) {
  Make();
  ASSERT_FALSE(ram_->SupportsFua());
  AlignedBuffer buf(4096);
  ASSERT_EQ(Write(0, buf.data(), 4096, kBlockFua), 0);
  EXPECT_EQ(ram_->stats().flushes, 1u);
}

TEST_F(BlockDeviceTest, DetectZeroesTurnsZeroWritesIntoWriteZeroes) {
  Make({.discard = DiscardMode::kUnmap, .detect_zeroes = DetectZeroes::kUnmap});
  Fill(ram_->data().data(), 16384, 5);
  AlignedBuffer zeroes(8192);
  std::memset(zeroes.data(), 0, 8192);
  ASSERT_EQ(Write(4096, zeroes.data(), 8192), 0);
  EXPECT_EQ(ram_->stats().writes, 0u);
  EXPECT_EQ(ram_->stats().write_zeroes, 1u);
  for (int i = 4096; i < 12288; ++i) ASSERT_EQ(ram_->data()[i], 0);
  EXPECT_NE(ram_->data()[12288], 0);
  BlockDeviceStats stats = device_->Stats();
  EXPECT_EQ(stats.zero_writes_detected, 1u);
  EXPECT_EQ(stats.ops[int(BlockOp::kWrite)].ops, 1u);  // still accounted as a write
  // A non-zero write is left alone.
  Fill(zeroes.data(), 4096, 1);
  ASSERT_EQ(Write(0, zeroes.data(), 4096), 0);
  EXPECT_EQ(ram_->stats().writes, 1u);
}

TEST_F(BlockDeviceTest, DiscardIgnoreNeverReachesTheBackend) {
  Make({.discard = DiscardMode::kIgnore});
  ASSERT_EQ(Do({.op = BlockOp::kDiscard, .offset = 0, .length = 65536}), 0);
  EXPECT_EQ(faulty_->ops_seen(FaultOp::kDiscard), 0u);
  EXPECT_EQ(device_->Stats().ops[int(BlockOp::kDiscard)].ops, 1u);
}

TEST_F(BlockDeviceTest, DiscardIsTrimmedToGranularityAndSplit) {
  RamBackend::Options ram;
  ram.limits.request_alignment = 4096;
  ram.limits.buffer_alignment = 512;
  ram.limits.discard_granularity = 8192;
  ram.limits.max_discard = 16384;
  Make({.discard = DiscardMode::kUnmap}, ram);
  Fill(ram_->data().data(), kCapacity, 9);
  // [512, 65536 + 1024) -> aligned part [8192, 65536) -> 4 pieces of at most 16 KiB.
  ASSERT_EQ(Do({.op = BlockOp::kDiscard, .offset = 512, .length = 65536 + 512}), 0);
  EXPECT_EQ(ram_->stats().discards, 4u);
  EXPECT_EQ(ram_->stats().misaligned, 0u);
  EXPECT_NE(ram_->data()[8191], 0);
  for (int i = 8192; i < 65536; ++i) ASSERT_EQ(ram_->data()[i], 0) << i;
  EXPECT_NE(ram_->data()[65536 + 100], 0);
}

TEST_F(BlockDeviceTest, UnalignedWriteZeroesPadsHeadAndTail) {
  Make();
  Fill(ram_->data().data(), kCapacity, 11);
  std::vector<uint8_t> expect(ram_->data().begin(), ram_->data().end());
  // [3584, 3584 + 9216) = head partial block, one full block, tail partial block.
  ASSERT_EQ(Do({.op = BlockOp::kWriteZeroes, .offset = 3584, .length = 9216}), 0);
  std::fill(expect.begin() + 3584, expect.begin() + 3584 + 9216, 0);
  EXPECT_EQ(std::memcmp(ram_->data().data(), expect.data(), kCapacity), 0);
  EXPECT_EQ(ram_->stats().write_zeroes, 1u);
  EXPECT_EQ(ram_->stats().misaligned, 0u);
  // Inside one block.
  ASSERT_EQ(Do({.op = BlockOp::kWriteZeroes, .offset = 20480 + 512, .length = 1024}), 0);
  std::fill(expect.begin() + 20480 + 512, expect.begin() + 20480 + 1536, 0);
  EXPECT_EQ(std::memcmp(ram_->data().data(), expect.data(), kCapacity), 0);
}

TEST_F(BlockDeviceTest, WriteZeroesFallsBackToWritingZeroes) {
  RamBackend::Options ram;
  ram.supports_write_zeroes = false;
  Make({}, ram);
  Fill(ram_->data().data(), kCapacity, 1);
  ASSERT_EQ(Do({.op = BlockOp::kWriteZeroes, .offset = 0, .length = 3 << 20 >> 2}), 0);
  for (uint64_t i = 0; i < (3 << 20 >> 2); ++i) ASSERT_EQ(ram_->data()[i], 0);
  EXPECT_EQ(device_->Stats().write_zeroes_fallbacks, 1u);
  EXPECT_EQ(ram_->stats().write_zeroes, 0u);
  EXPECT_EQ(
      Do({.op = BlockOp::kWriteZeroes, .flags = kBlockNoFallback, .offset = 0, .length = 4096}),
      -EOPNOTSUPP);
}

TEST_F(BlockDeviceTest, EopnotsuppWithdrawsDiscardAndWriteZeroes) {
  Make({.discard = DiscardMode::kUnmap});
  faulty_->AddRule({.ops = static_cast<uint32_t>(FaultOp::kDiscard) | FaultOp::kWriteZeroes,
                    .error = EOPNOTSUPP});
  Fill(ram_->data().data(), kCapacity, 1);
  ASSERT_EQ(Do({.op = BlockOp::kDiscard, .offset = 0, .length = 8192}), 0);
  ASSERT_EQ(Do({.op = BlockOp::kDiscard, .offset = 0, .length = 8192}), 0);
  EXPECT_EQ(faulty_->ops_seen(FaultOp::kDiscard), 1u);  // withdrawn after the first
  ASSERT_EQ(Do({.op = BlockOp::kWriteZeroes, .offset = 8192, .length = 8192}), 0);
  for (int i = 8192; i < 16384; ++i) ASSERT_EQ(ram_->data()[i], 0);  // via the fallback
  ASSERT_EQ(Do({.op = BlockOp::kWriteZeroes, .offset = 16384, .length = 4096}), 0);
  EXPECT_EQ(faulty_->ops_seen(FaultOp::kWriteZeroes), 1u);
  BlockDeviceStats stats = device_->Stats();
  EXPECT_EQ(stats.discard_withdrawn, 1u);
  EXPECT_EQ(stats.write_zeroes_withdrawn, 1u);
  EXPECT_EQ(stats.write_zeroes_fallbacks, 2u);
  EXPECT_FALSE(device_->Info().discard);
}

TEST_F(BlockDeviceTest, MisalignedGuestBuffersAreBounced) {
  Make();
  std::vector<uint8_t> raw(8192 + 1);
  uint8_t* odd = raw.data() + 1;  // not 512-aligned
  Fill(odd, 4096, 77);
  ASSERT_EQ(Write(4096, odd, 4096), 0);
  EXPECT_EQ(std::memcmp(ram_->data().data() + 4096, odd, 4096), 0);
  std::vector<uint8_t> back(4096 + 3);
  ASSERT_EQ(Read(4096, back.data() + 3, 4096), 0);
  EXPECT_EQ(std::memcmp(back.data() + 3, odd, 4096), 0);
  EXPECT_EQ(device_->Stats().bounced, 2u);
  EXPECT_EQ(device_->Stats().rmw, 0u);
  EXPECT_EQ(ram_->stats().misaligned, 0u);
}

TEST_F(BlockDeviceTest, ErrorsAreReportedAndCounted) {
  Make();
  faulty_->AddRule({.ops = static_cast<uint32_t>(FaultOp::kWrite),
                    .range_start = 8192,
                    .range_end = 12288,
                    .error = EIO});
  AlignedBuffer buf(4096);
  EXPECT_EQ(Write(8192, buf.data(), 4096), -EIO);
  EXPECT_EQ(Write(0, buf.data(), 4096), 0);
  faulty_->AddRule(
      {.ops = static_cast<uint32_t>(FaultOp::kRead), .error = ENOSPC, .max_failures = 1});
  EXPECT_EQ(Read(0, buf.data(), 4096), -ENOSPC);
  EXPECT_EQ(Read(0, buf.data(), 4096), 0);
  BlockDeviceStats stats = device_->Stats();
  EXPECT_EQ(stats.ops[int(BlockOp::kWrite)].failed, 1u);
  EXPECT_EQ(stats.ops[int(BlockOp::kWrite)].ops, 1u);
  EXPECT_EQ(stats.ops[int(BlockOp::kRead)].failed, 1u);
  EXPECT_EQ(stats.last_error, -ENOSPC);
  EXPECT_FALSE(stats.stopped_on_error);
}

TEST_F(BlockDeviceTest, StopPolicyParksFailedRequestsAndResumeRetriesInOrder) {
  int stop_events = 0;
  int stop_error = 0;
  Make({.error_policy = ErrorPolicy::kStop, .on_error_stop = [&](int error) {
          ++stop_events;
          stop_error = error;
        }});
  faulty_->AddRule({.ops = static_cast<uint32_t>(FaultOp::kWrite),
                    .range_start = 0,
                    .range_end = 4096,
                    .error = ENOSPC});
  std::vector<AlignedBuffer> buffers;
  for (int i = 0; i < 4; ++i) buffers.emplace_back(4096);
  std::vector<iovec> iovs(4);
  std::vector<int> order;
  std::vector<BlockResult> results;
  for (int i = 0; i < 4; ++i) results.emplace_back(&order, i);
  for (int i = 0; i < 4; ++i) {
    std::memset(buffers[i].data(), 0x40 + i, 4096);
    iovs[i] = buffers[i].iov();
  }
  // Request 0 fails (ENOSPC on [0, 4096)); 1 succeeds; the device stops; 2 and 3 are queued.
  device_->Submit({.op = BlockOp::kWrite, .offset = 0, .iov = &iovs[0], .iovcnt = 1}, &results[0]);
  device_->Submit({.op = BlockOp::kWrite, .offset = 4096, .iov = &iovs[1], .iovcnt = 1},
                  &results[1]);
  loop_->RunUntil([&] { return stop_events == 1 && results[1].done; });
  EXPECT_EQ(stop_error, -ENOSPC);
  device_->Submit({.op = BlockOp::kWrite, .offset = 8192, .iov = &iovs[2], .iovcnt = 1},
                  &results[2]);
  device_->Submit({.op = BlockOp::kWrite, .offset = 0, .iov = &iovs[3], .iovcnt = 1}, &results[3]);
  for (int i = 0; i < 10; ++i) loop_->RunOnce(false);
  EXPECT_FALSE(results[0].done);
  EXPECT_FALSE(results[2].done);
  EXPECT_FALSE(results[3].done);
  BlockDeviceStats stats = device_->Stats();
  EXPECT_TRUE(stats.stopped_on_error);
  EXPECT_EQ(stats.parked, 1u);
  EXPECT_EQ(stats.queued, 2u);
  EXPECT_EQ(stats.ops[int(BlockOp::kWrite)].failed, 0u);  // not reported to the guest
  EXPECT_FALSE(device_->Resume().ok());                   // not drained

  // The operator frees space, then resumes.
  faulty_->ClearRules();
  ASSERT_TRUE(device_->ResumeAfterError().ok());
  loop_->RunUntil([&] { return order.size() == 4; });
  for (auto& r : results) EXPECT_EQ(r.result, 0);
  // Request 3 overwrote request 0's block after it: retried requests keep their order.
  EXPECT_EQ(ram_->data()[0], 0x43);
  EXPECT_EQ(ram_->data()[4096], 0x41);
  EXPECT_EQ(ram_->data()[8192], 0x42);
  EXPECT_EQ(stop_events, 1);
  stats = device_->Stats();
  EXPECT_FALSE(stats.stopped_on_error);
  EXPECT_EQ(stats.error_stops, 1u);
  EXPECT_EQ(stats.ops[int(BlockOp::kWrite)].ops, 4u);
  EXPECT_FALSE(device_->ResumeAfterError().ok());
}

TEST_F(BlockDeviceTest, TornWriteThenEnospcUnderStopIsRetriedWhole) {
  int stops = 0;
  Make({.error_policy = ErrorPolicy::kStop, .on_error_stop = [&](int) { ++stops; }});
  Fill(ram_->data().data(), kCapacity, 1);
  std::vector<uint8_t> old(ram_->data().begin(), ram_->data().begin() + 65536);
  // The first write lands partly (a random aligned prefix), then fails with ENOSPC.
  faulty_->AddRule({.ops = static_cast<uint32_t>(FaultOp::kWrite),
                    .error = ENOSPC,
                    .max_failures = 1,
                    .short_transfer = true});
  AlignedBuffer buf(65536);
  std::memset(buf.data(), 0xee, buf.size());
  iovec v = buf.iov();
  BlockResult r;
  device_->Submit({.op = BlockOp::kWrite, .offset = 0, .iov = &v, .iovcnt = 1}, &r);
  loop_->RunUntil([&] { return stops == 1 && device_->Stats().in_flight == 0; });
  EXPECT_FALSE(r.done);
  EXPECT_EQ(faulty_->stats().short_transfers, 1u);
  // Torn: the first block is new, the last block is still old.
  EXPECT_EQ(ram_->data()[0], 0xee);
  EXPECT_EQ(ram_->data()[65535], old[65535]);
  ASSERT_TRUE(device_->ResumeAfterError().ok());
  loop_->RunUntil([&] { return r.done; });
  EXPECT_EQ(r.result, 0);
  for (int i = 0; i < 65536; ++i) ASSERT_EQ(ram_->data()[i], 0xee) << i;
}

TEST_F(BlockDeviceTest, TornReadsAndWritesStillComplete) {
  Make();
  faulty_->AddRule({.ops = static_cast<uint32_t>(FaultOp::kRead) | FaultOp::kWrite,
                    .error = 0,
                    .short_transfer = true});
  AlignedBuffer out(32768), in(32768);
  Fill(out.data(), out.size(), 42);
  ASSERT_EQ(Write(4096, out.data(), out.size()), 0);
  ASSERT_EQ(Read(4096, in.data(), in.size()), 0);
  EXPECT_EQ(std::memcmp(in.data(), out.data(), out.size()), 0);
  EXPECT_EQ(faulty_->stats().short_transfers, 2u);
}

TEST_F(BlockDeviceTest, DrainWaitsForInFlightQueuesNewAndResumesInOrder) {
  Make();
  faulty_->AddRule({.error = 0, .delay = std::chrono::milliseconds(2)});  // keep them in flight
  std::vector<AlignedBuffer> buffers;
  for (int i = 0; i < 6; ++i) buffers.emplace_back(4096);
  std::vector<iovec> iovs(6);
  std::vector<int> order;
  std::vector<BlockResult> results;
  for (int i = 0; i < 6; ++i) results.emplace_back(&order, i);
  for (int i = 0; i < 6; ++i) {
    std::memset(buffers[i].data(), i + 1, 4096);
    iovs[i] = buffers[i].iov();
  }
  for (int i = 0; i < 3; ++i) {
    device_->Submit(
        {.op = BlockOp::kWrite, .offset = uint64_t(i) * 4096, .iov = &iovs[i], .iovcnt = 1},
        &results[i]);
  }
  int drained = 0;
  int drained_result = 1;
  uint64_t in_flight_at_drain = 99;
  uint64_t flushes_at_drain = 0;
  device_->Drain([&](int result) {
    ++drained;
    drained_result = result;
    in_flight_at_drain = device_->Stats().in_flight;
    flushes_at_drain = ram_->stats().flushes;
  });
  // Submitted while draining: must not reach the backend.
  for (int i = 3; i < 6; ++i) {
    device_->Submit(
        {.op = BlockOp::kWrite, .offset = uint64_t(i) * 4096, .iov = &iovs[i], .iovcnt = 1},
        &results[i]);
  }
  loop_->RunUntil([&] { return drained == 1; });
  EXPECT_EQ(drained_result, 0);
  EXPECT_EQ(in_flight_at_drain, 0u);
  EXPECT_EQ(flushes_at_drain, 1u);  // made durable before reporting drained
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(faulty_->ops_seen(FaultOp::kWrite), 3u);
  EXPECT_EQ(device_->Stats().queued, 3u);
  EXPECT_TRUE(device_->Stats().quiesced);

  // Nested drain: completes at once (nothing in flight), needs a second Resume().
  device_->Drain([&](int) { ++drained; });
  loop_->RunUntil([&] { return drained == 2; });
  ASSERT_TRUE(device_->Resume().ok());
  for (int i = 0; i < 5; ++i) loop_->RunOnce(false);
  EXPECT_EQ(faulty_->ops_seen(FaultOp::kWrite), 3u);
  ASSERT_TRUE(device_->Resume().ok());
  EXPECT_FALSE(device_->Resume().ok());
  loop_->RunUntil([&] { return order.size() == 6; });
  EXPECT_EQ(faulty_->ops_seen(FaultOp::kWrite), 6u);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(ram_->data()[i * 4096], i + 1);
  EXPECT_FALSE(device_->Stats().quiesced);
}

TEST_F(BlockDeviceTest, DrainReportsFlushFailure) {
  Make();
  AlignedBuffer buf(4096);
  ASSERT_EQ(Write(0, buf.data(), 4096), 0);
  faulty_->AddRule({.ops = static_cast<uint32_t>(FaultOp::kFlush), .error = EIO});
  int drained_result = 1;
  device_->Drain([&](int result) { drained_result = result; });
  loop_->RunUntil([&] { return drained_result != 1; });
  EXPECT_EQ(drained_result, -EIO);
  ASSERT_TRUE(device_->Resume().ok());
}

TEST_F(BlockDeviceTest, ResizeShrinksTheBoundAndGrowsTheBackend) {
  Make();
  EXPECT_FALSE(device_->Resize(kCapacity + 100).ok());
  // Shrink: the caller already truncated the store; I/O past the new end is out of range.
  ASSERT_TRUE(device_->Resize(kCapacity - 4096).ok());
  EXPECT_EQ(device_->Info().capacity, kCapacity - 4096);
  AlignedBuffer past(4096);
  EXPECT_NE(Write(kCapacity - 4096, past.data(), 4096), 0);
  EXPECT_EQ(device_->Stats().ops[static_cast<int>(BlockOp::kWrite)].invalid, 1u);
  ASSERT_TRUE(device_->Resize(2 * kCapacity).ok());
  EXPECT_EQ(device_->Info().capacity, 2 * kCapacity);
  AlignedBuffer buf(4096);
  Fill(buf.data(), 4096, 3);
  EXPECT_EQ(Write(2 * kCapacity - 4096, buf.data(), 4096), 0);
  EXPECT_EQ(std::memcmp(ram_->data().data() + 2 * kCapacity - 4096, buf.data(), 4096), 0);
}

TEST_F(BlockDeviceTest, ZeroLengthRequestsSucceed) {
  Make();
  EXPECT_EQ(Do({.op = BlockOp::kRead, .offset = 0, .iov = nullptr, .iovcnt = 0}), 0);
  EXPECT_EQ(Do({.op = BlockOp::kDiscard, .offset = 0, .length = 0}), 0);
  EXPECT_EQ(device_->Stats().in_flight, 0u);
}

TEST(LatencyHistogramTest, BucketsMatchTheirBounds) {
  EXPECT_EQ(LatencyBucketIndex(0), 0);
  for (int i = 0; i < kLatencyBuckets - 1; ++i) {
    const uint64_t bound = LatencyBucketUpperBoundNs(i);
    EXPECT_EQ(LatencyBucketIndex(bound - 1), i) << i;
    EXPECT_EQ(LatencyBucketIndex(bound), i + 1) << i;
  }
  EXPECT_EQ(LatencyBucketIndex(UINT64_MAX), kLatencyBuckets - 1);
}

TEST(BlockDeviceCreateTest, RejectsBadLogicalBlockSize) {
  auto loop = MakeLoop();
  auto ram = std::make_unique<RamBackend>(loop.get(), RamBackend::Options{});
  auto device = BlockDevice::Create(loop.get(), std::move(ram), {.logical_block_size = 1024});
  EXPECT_FALSE(device.ok());
}

}  // namespace
}  // namespace blockplane::worker
