// Model-based randomized test of BlockDevice: thousands of mixed requests (unaligned reads and
// writes of random sizes and iovec layouts, concurrent overlapping writes, discards, zeroes,
// flushes) with a 512-byte logical block size over a 4096-aligned backend, checked byte for byte
// against an in-memory model. Requests run in concurrent batches; where concurrent requests
// overlap, the model accepts any of the values they could leave (old data, or any writer's
// data), then a full read-back pins the model to what the device chose. The seed is printed on
// failure (SCOPED_TRACE) so a failing run can be replayed.

#include <errno.h>

#include <random>
#include <vector>

#include "tests/unit/worker/test_util.h"
#include "worker/backend/faulty_backend.h"
#include "worker/backend/ram_backend.h"
#include "worker/backend/uring_backend.h"
#include "worker/block/block_device.h"

namespace blockplane::worker {
namespace {

using testing::AlignedBuffer;
using testing::BlockResult;
using testing::MakeLoop;
using testing::TempFile;

constexpr uint64_t kCapacity = 256 * 1024;

// Sanitizer builds (Debug, instrumented) are ~20x slower; they run a quarter of the requests per
// seed (still thousands in total), the normal build the full count.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr int kRequestDivisor = 4;
#else
constexpr int kRequestDivisor = 1;
#endif
constexpr uint64_t kSector = 512;

enum class BackendKind {
  kRamReordering,
  kRamNoWriteZeroes,
  kUringDirect4k,
  kUringWriteback,
  kRamTorn,  // reordering RAM behind a FaultyBackend that tears 30% of reads and writes
};

struct ModelParam {
  BackendKind backend;
  uint64_t seed;
  int requests;
};

void PrintTo(const ModelParam& p, std::ostream* os) {
  *os << "backend=" << static_cast<int>(p.backend) << " seed=" << p.seed
      << " requests=" << p.requests;
}

std::string ParamName(const ::testing::TestParamInfo<ModelParam>& info) {
  const char* names[] = {"RamReordering", "RamNoWriteZeroes", "UringDirect4k", "UringWriteback",
                         "RamTorn"};
  return std::string(names[static_cast<int>(info.param.backend)]) + "_seed" +
         std::to_string(info.param.seed);
}

// One request of a batch, with the storage its iovecs point into.
struct Op {
  BlockOp op;
  uint64_t offset;
  uint64_t length;
  uint32_t flags = 0;
  std::vector<uint8_t> storage;  // guest memory (read destination or write source)
  size_t skew = 0;               // storage offset of the data (to misalign guest memory)
  std::vector<iovec> iov;
  BlockResult result;
  const uint8_t* data() const { return storage.data() + skew; }
};

class BlockDeviceModelTest : public ::testing::TestWithParam<ModelParam> {
 protected:
  void SetUp() override {
    loop_ = MakeLoop();
    std::unique_ptr<Backend> backend;
    const ModelParam& p = GetParam();
    if (p.backend == BackendKind::kRamReordering || p.backend == BackendKind::kRamNoWriteZeroes ||
        p.backend == BackendKind::kRamTorn) {
      RamBackend::Options options;
      options.capacity = kCapacity;
      options.limits.request_alignment = 4096;
      options.limits.buffer_alignment = 512;
      options.limits.max_transfer = 16384;
      options.limits.max_segments = 8;
      options.limits.discard_granularity = 8192;
      options.limits.max_write_zeroes = 32768;
      options.supports_write_zeroes = p.backend != BackendKind::kRamNoWriteZeroes;
      options.reorder_seed = p.seed;
      backend = std::make_unique<RamBackend>(loop_.get(), options);
      if (p.backend == BackendKind::kRamTorn) {
        ram_ = std::move(backend);
        auto faulty = std::make_unique<FaultyBackend>(loop_.get(), ram_.get(), p.seed);
        faulty->AddRule({.ops = static_cast<uint32_t>(FaultOp::kRead) | FaultOp::kWrite,
                         .error = 0,
                         .probability = 0.3,
                         .short_transfer = true});
        backend = std::move(faulty);
      }
    } else {
      file_ = std::make_unique<TempFile>(kCapacity);
      UringBackend::Options options;
      options.cache =
          p.backend == BackendKind::kUringDirect4k ? CacheMode::kNone : CacheMode::kWriteback;
      options.request_alignment = 4096;  // emulate a 4K-native disk under 512-byte sectors
      auto uring = UringBackend::Open(loop_.get(), file_->path(), options);
      ASSERT_TRUE(uring.ok()) << uring.status();
      backend = std::move(uring).value();
    }
    auto device = BlockDevice::Create(loop_.get(), std::move(backend),
                                      {.logical_block_size = 512,
                                       .discard = DiscardMode::kUnmap,
                                       .detect_zeroes = DetectZeroes::kUnmap});
    ASSERT_TRUE(device.ok()) << device.status();
    device_ = std::move(device).value();
    model_.assign(kCapacity, 0);
  }

  // Splits `length` bytes of op->storage into 1..4 iovecs; sometimes misaligns guest memory.
  void MakeIov(Op* op, std::mt19937_64& rng) {
    op->skew = rng() % 10 == 0 ? 1 + rng() % 7 : 0;
    op->storage.assign(op->length + op->skew, 0);
    int pieces = 1 + static_cast<int>(rng() % 4);
    uint64_t left = op->length;
    uint8_t* p = op->storage.data() + op->skew;
    for (int i = 0; i < pieces && left > 0; ++i) {
      uint64_t n =
          i == pieces - 1 || left < kSector ? left : kSector * (1 + rng() % (left / kSector));
      if (rng() % 8 == 0 && n > 1 && i != pieces - 1) n -= 1 + rng() % 100;  // odd-sized iovec
      n = std::min(n, left);
      op->iov.push_back({p, n});
      p += n;
      left -= n;
    }
  }

  // Submits the batch; when `drain_at` is within the batch, drains the device before that
  // request and checks that the requests submitted while drained stay queued until Resume().
  void RunBatch(std::vector<std::unique_ptr<Op>>& batch, size_t drain_at) {
    bool drained = false;
    for (size_t i = 0; i < batch.size(); ++i) {
      if (i == drain_at)
        device_->Drain([&](int result) {
          EXPECT_EQ(result, 0);
          drained = true;
        });
      Op* op = batch[i].get();
      BlockRequest request{.op = op->op, .flags = op->flags, .offset = op->offset};
      if (op->op == BlockOp::kRead || op->op == BlockOp::kWrite) {
        request.iov = op->iov.data();
        request.iovcnt = static_cast<int>(op->iov.size());
      } else {
        request.length = op->length;
      }
      device_->Submit(request, &op->result);
    }
    if (drain_at < batch.size()) {
      loop_->RunUntil([&] { return drained; });
      ++drains_;
      EXPECT_EQ(device_->Stats().in_flight, 0u);
      EXPECT_EQ(device_->Stats().queued, batch.size() - drain_at);
      for (size_t i = 0; i < batch.size(); ++i) {
        ASSERT_EQ(batch[i]->result.done, i < drain_at) << "request " << i << " of the batch";
      }
      ASSERT_TRUE(device_->Resume().ok());
    }
    loop_->RunUntil([&] {
      for (auto& op : batch) {
        if (!op->result.done) return false;
      }
      return true;
    });
  }

  // The value byte `b` has after `op`, or -1 when `op` may leave it unchanged (discard).
  static int ValueAfter(const Op& op, uint64_t b) {
    switch (op.op) {
      case BlockOp::kWrite:
        return op.data()[b - op.offset];
      case BlockOp::kWriteZeroes:
        return 0;
      default:
        return -1;
    }
  }
  static bool Writes(const Op& op) {
    return op.op == BlockOp::kWrite || op.op == BlockOp::kWriteZeroes || op.op == BlockOp::kDiscard;
  }
  static bool Covers(const Op& op, uint64_t b) {
    return b >= op.offset && b < op.offset + op.length;
  }

  // Whether `value` at byte `b` is a possible outcome: old data, or a concurrent writer's data
  // (for a discard: zero).
  bool Possible(const std::vector<std::unique_ptr<Op>>& batch, uint64_t b, uint8_t value,
                bool old_allowed) const {
    if (old_allowed && value == model_[b]) return true;
    for (const auto& op : batch) {
      if (!Writes(*op) || !Covers(*op, b)) continue;
      int v = ValueAfter(*op, b);
      if (v == value || (v == -1 && (value == 0 || value == model_[b]))) return true;
    }
    return false;
  }

  std::unique_ptr<common::EventLoop> loop_;
  std::unique_ptr<Backend> ram_;  // kRamTorn: the RAM backend behind the FaultyBackend
  std::unique_ptr<TempFile> file_;
  std::unique_ptr<BlockDevice> device_;
  std::vector<uint8_t> model_;
  int drains_ = 0;
};

TEST_P(BlockDeviceModelTest, RandomRequestsMatchTheModel) {
  const ModelParam& p = GetParam();
  SCOPED_TRACE(::testing::Message() << "seed=" << p.seed << " (replay with this seed)");
  std::mt19937_64 rng(p.seed);
  int submitted = 0;
  int batches = 0;
  AlignedBuffer whole(kCapacity);
  uint64_t uncertain_bytes = 0;
  while (submitted < p.requests / kRequestDivisor) {
    std::vector<std::unique_ptr<Op>> batch;
    int size = 1 + static_cast<int>(rng() % 16);
    for (int i = 0; i < size; ++i) {
      auto op = std::make_unique<Op>();
      uint64_t dice = rng() % 100;
      // Mostly small requests near a few hot spots, so concurrent requests overlap often.
      uint64_t sectors = rng() % 10 == 0 ? 1 + rng() % 96 : 1 + rng() % 12;
      uint64_t max_start = kCapacity / kSector - sectors;
      uint64_t start = rng() % 3 == 0
                           ? rng() % (max_start + 1)
                           : std::min<uint64_t>(max_start, (rng() % 4) * 24 + rng() % 20);
      op->offset = start * kSector;
      op->length = sectors * kSector;
      if (dice < 40) {
        op->op = BlockOp::kRead;
        MakeIov(op.get(), rng);
      } else if (dice < 75) {
        op->op = BlockOp::kWrite;
        MakeIov(op.get(), rng);
        uint8_t* d = op->storage.data() + op->skew;
        if (rng() % 8 == 0) {
          std::memset(d, 0, op->length);  // exercises detect-zeroes
        } else {
          for (uint64_t k = 0; k < op->length; ++k) d[k] = static_cast<uint8_t>(rng());
        }
        if (rng() % 10 == 0) op->flags = kBlockFua;
      } else if (dice < 87) {
        op->op = BlockOp::kWriteZeroes;
        if (rng() % 2) op->flags = kBlockMayUnmap;
      } else if (dice < 95) {
        op->op = BlockOp::kDiscard;
      } else {
        op->op = BlockOp::kFlush;
        op->offset = op->length = 0;
      }
      batch.push_back(std::move(op));
    }
    submitted += size;
    ++batches;
    RunBatch(batch, rng() % 8 == 0 ? rng() % batch.size() : batch.size());

    // 1. Every request succeeded; reads returned possible data.
    for (const auto& op : batch) {
      ASSERT_EQ(op->result.result, 0) << BlockOpName(op->op) << " at " << op->offset << "+"
                                      << op->length << " in batch " << batches;
      if (op->op != BlockOp::kRead) continue;
      std::vector<uint8_t> got(op->length);
      uint64_t pos = 0;
      for (const iovec& v : op->iov) {
        std::memcpy(got.data() + pos, v.iov_base, v.iov_len);
        pos += v.iov_len;
      }
      // Fast path: the read saw exactly the model (no concurrent writer changed it).
      if (std::memcmp(got.data(), model_.data() + op->offset, op->length) == 0) continue;
      for (uint64_t k = 0; k < op->length; ++k) {
        uint64_t b = op->offset + k;
        if (got[k] == model_[b] || Possible(batch, b, got[k], /*old_allowed=*/true)) continue;
        FAIL() << "read at " << op->offset << "+" << op->length << " byte " << b << " got "
               << int(got[k]) << " model " << int(model_[b]) << " batch " << batches;
      }
    }

    // 2. Full read-back: bytes written by exactly one request are exact; others are possible.
    iovec v = whole.iov();
    BlockResult r;
    device_->Submit({.op = BlockOp::kRead, .offset = 0, .iov = &v, .iovcnt = 1}, &r);
    loop_->RunUntil([&] { return r.done; });
    ASSERT_EQ(r.result, 0);
    std::vector<uint8_t> writers(kCapacity, 0);
    for (const auto& op : batch) {
      if (!Writes(*op)) continue;
      for (uint64_t b = op->offset; b < op->offset + op->length; ++b) {
        if (writers[b] < 255) ++writers[b];
      }
    }
    for (uint64_t b = 0; b < kCapacity;) {
      if (writers[b] == 0) {
        // A run of bytes no request of the batch wrote: must be exactly the model.
        uint64_t end = b;
        while (end < kCapacity && writers[end] == 0) ++end;
        if (std::memcmp(whole.data() + b, model_.data() + b, end - b) != 0) {
          for (uint64_t k = b; k < end; ++k) {
            if (whole.data()[k] != model_[k]) {
              FAIL() << "untouched byte " << k << " changed from " << int(model_[k]) << " to "
                     << int(whole.data()[k]) << ", batch " << batches;
            }
          }
        }
        b = end;
        continue;
      }
      // Written bytes: never the old value unless a discard (or a writer) could leave it.
      const uint8_t got = whole.data()[b];
      if (!Possible(batch, b, got, /*old_allowed=*/false)) {
        FAIL() << "byte " << b << " got " << int(got) << " model " << int(model_[b]) << " writers "
               << int(writers[b]) << " batch " << batches;
      }
      if (writers[b] > 1) ++uncertain_bytes;
      model_[b] = got;
      ++b;
    }
  }
  // 3. Stats are consistent with what was submitted.
  BlockDeviceStats stats = device_->Stats();
  uint64_t ops = 0, invalid = 0, failed = 0;
  for (const BlockOpStats& s : stats.ops) {
    ops += s.ops;
    invalid += s.invalid;
    failed += s.failed;
  }
  EXPECT_EQ(ops, static_cast<uint64_t>(submitted + batches));  // + one read-back per batch
  EXPECT_EQ(invalid, 0u);
  EXPECT_EQ(failed, 0u);
  EXPECT_EQ(stats.in_flight, 0u);
  EXPECT_GT(stats.rmw, 0u);
  EXPECT_GT(stats.serialising_waits, 0u);
  EXPECT_GT(stats.bounced, 0u);
  EXPECT_GT(drains_, 0);
  RecordProperty("uncertain_bytes", std::to_string(uncertain_bytes));
}

INSTANTIATE_TEST_SUITE_P(Seeds, BlockDeviceModelTest,
                         ::testing::Values(ModelParam{BackendKind::kRamReordering, 1, 3000},
                                           ModelParam{BackendKind::kRamReordering, 2, 3000},
                                           ModelParam{BackendKind::kRamReordering, 3, 3000},
                                           ModelParam{BackendKind::kRamNoWriteZeroes, 4, 2000},
                                           ModelParam{BackendKind::kUringDirect4k, 5, 3000},
                                           ModelParam{BackendKind::kUringWriteback, 6, 1500},
                                           ModelParam{BackendKind::kRamTorn, 7, 3000}),
                         ParamName);

}  // namespace
}  // namespace blockplane::worker
