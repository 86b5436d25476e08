#include "tests/harness/xen/workload.h"

#include <time.h>

#include <algorithm>
#include <bit>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>

namespace blockplane::harness {
namespace {

constexpr uint32_t kSector = 512;
constexpr uint64_t kMagic = 0x4250564552494659ull;  // "BPVERIFY"
constexpr uint32_t kUnknownGeneration = UINT32_MAX;
constexpr size_t kMaxMismatchesKept = 16;
constexpr size_t kReapBatch = 64;

uint64_t NowNs() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return uint64_t(now.tv_sec) * 1000000000u + uint64_t(now.tv_nsec);
}

uint64_t Mix(uint64_t x) {  // splitmix64 finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() { return Mix(state_++); }
  uint64_t Below(uint64_t n) { return n == 0 ? 0 : Next() % n; }

 private:
  uint64_t state_;
};

// Words of a verify sector: magic, lba, generation, checksum, then 60 pattern words.
constexpr size_t kWords = kSector / 8;
constexpr size_t kChecksumWord = 3;

uint64_t Checksum(const uint64_t* w) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t i = 0; i < kWords; ++i) {
    if (i == kChecksumWord) continue;
    h = (h ^ w[i]) * 0x100000001b3ull;
    h ^= h >> 29;
  }
  return h;
}

std::string StatusName(int status) {
  switch (status) {
    case BLKIF_RSP_OKAY:
      return "okay";
    case BLKIF_RSP_ERROR:
      return "error";
    case BLKIF_RSP_EOPNOTSUPP:
      return "eopnotsupp";
    default:
      return "status_" + std::to_string(status);
  }
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string JsonDouble(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.3f", v);
  return buf;
}

// What a slot in flight was asked to do, to account for and check its completion.
struct InFlight {
  BlkfrontOp op = BlkfrontOp::kRead;
  uint64_t sector = 0;
  uint32_t nr_sectors = 0;
  uint32_t generation = 0;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Latency histogram: bucket = (exponent, top kSubBits bits of the mantissa).

int LatencyHistogram::BucketOf(uint64_t ns) {
  if (ns < (1u << kSubBits)) return static_cast<int>(ns);
  const int exponent = 63 - std::countl_zero(ns);  // >= kSubBits
  const int shift = exponent - kSubBits;
  const int sub = static_cast<int>((ns >> shift) & ((1u << kSubBits) - 1));
  return ((exponent - kSubBits + 1) << kSubBits) + sub;
}

uint64_t LatencyHistogram::BucketUpper(int bucket) {
  if (bucket < (1 << kSubBits)) return static_cast<uint64_t>(bucket);
  const int exponent = (bucket >> kSubBits) + kSubBits - 1;
  const uint64_t sub = static_cast<uint64_t>(bucket & ((1 << kSubBits) - 1));
  const int shift = exponent - kSubBits;
  const uint64_t low = ((uint64_t{1} << kSubBits) | sub) << shift;
  return low + ((uint64_t{1} << shift) - 1);
}

void LatencyHistogram::Record(uint64_t ns) {
  ++buckets_[std::min(BucketOf(ns), kBuckets - 1)];
  ++count_;
  max_ = std::max(max_, ns);
}

uint64_t LatencyHistogram::Quantile(double q) const {
  if (count_ == 0) return 0;
  const double wanted = q * static_cast<double>(count_);
  uint64_t rank = static_cast<uint64_t>(wanted);
  if (static_cast<double>(rank) < wanted) ++rank;
  rank = std::clamp<uint64_t>(rank, 1, count_);
  uint64_t seen = 0;
  for (int b = 0; b < kBuckets; ++b) {
    seen += buckets_[b];
    if (seen >= rank) return std::min(BucketUpper(b), max_);
  }
  return max_;
}

// ---------------------------------------------------------------------------------------------
// Verify format.

void FillVerifySector(std::byte* sector, uint64_t lba, uint32_t generation) {
  uint64_t w[kWords];
  w[0] = kMagic;
  w[1] = lba;
  w[2] = generation;
  const uint64_t seed = Mix(lba ^ (uint64_t{generation} << 40));
  for (size_t i = 4; i < kWords; ++i) w[i] = Mix(seed + i);
  w[kChecksumWord] = Checksum(w);
  std::memcpy(sector, w, kSector);
}

VerifyCheck CheckVerifySector(const std::byte* sector, uint64_t lba, uint32_t generation) {
  uint64_t w[kWords];
  std::memcpy(w, sector, kSector);
  VerifyCheck check;
  check.found_generation = w[0] == kMagic ? static_cast<uint32_t>(w[2]) : 0;
  auto fail = [&check](std::string_view reason) {
    check.reason = reason;
    return check;
  };
  if (generation == 0) {
    for (uint64_t word : w) {
      if (word != 0) return fail("not_zero");
    }
    return check;
  }
  if (w[0] != kMagic) return fail("bad_magic");
  if (Checksum(w) != w[kChecksumWord]) return fail("checksum");
  if (w[1] != lba) return fail("wrong_lba");
  if (w[2] != generation) return fail("stale_generation");
  // The checksum covers the pattern, but a sector rewritten whole with another valid pattern
  // would pass it: compare with the expected bytes too.
  std::byte expected[kSector];
  FillVerifySector(expected, lba, generation);
  if (std::memcmp(expected, sector, kSector) != 0) return fail("pattern");
  return check;
}

uint64_t WorkloadResult::total_errors() const {
  uint64_t total = 0;
  for (const auto& [kind, count] : errors) total += count;
  return total;
}

std::string WorkloadResult::ToJson(const Blkfront& front) const {
  const double seconds = static_cast<double>(elapsed_ns) / 1e9;
  const double iops = seconds > 0 ? static_cast<double>(ops()) / seconds : 0;
  auto us = [](uint64_t ns) { return JsonDouble(static_cast<double>(ns) / 1000.0); };
  std::string j = "{";
  j += "\"protocol\":" + JsonString(std::string(worker::xen::ProtocolName(front.protocol())));
  j += ",\"queues\":" + std::to_string(front.num_queues());
  j += ",\"ring_page_order\":" + std::to_string(front.ring_page_order());
  j += ",\"persistent_grants\":" + std::string(front.persistent_grants() ? "true" : "false");
  j += ",\"indirect_segments\":" + std::to_string(front.indirect_segments());
  j += ",\"sectors\":" + std::to_string(front.backend_info().sectors);
  j += ",\"ops\":" + std::to_string(ops());
  j += ",\"reads\":" + std::to_string(reads);
  j += ",\"writes\":" + std::to_string(writes);
  j += ",\"flushes\":" + std::to_string(flushes);
  j += ",\"discards\":" + std::to_string(discards);
  j += ",\"bytes\":{\"read\":" + std::to_string(bytes_read) +
       ",\"write\":" + std::to_string(bytes_written) + "}";
  j += ",\"iodepth\":" + std::to_string(iodepth);
  j += ",\"elapsed_s\":" + JsonDouble(seconds);
  j += ",\"iops\":" + JsonDouble(iops);
  j += ",\"latency_us\":{\"p50\":" + us(latency.Quantile(0.5)) +
       ",\"p99\":" + us(latency.Quantile(0.99)) + ",\"p99.9\":" + us(latency.Quantile(0.999)) +
       ",\"max\":" + us(latency.max()) + "}";
  j += ",\"errors\":{\"total\":" + std::to_string(total_errors()) + ",\"by_kind\":{";
  bool first = true;
  for (const auto& [kind, count] : errors) {
    j += (first ? "" : ",") + JsonString(kind) + ":" + std::to_string(count);
    first = false;
  }
  j += "}}";
  j += ",\"not_advertised\":[";
  first = true;
  for (const std::string& op : not_advertised) {
    j += (first ? "" : ",") + JsonString(op);
    first = false;
  }
  j += "]";
  j += ",\"verify\":{\"sectors_checked\":" + std::to_string(sectors_verified) +
       ",\"failures\":" + std::to_string(verify_failures) + ",\"mismatches\":[";
  first = true;
  for (const VerifyMismatch& m : mismatches) {
    j += std::string(first ? "" : ",") + "{\"sector\":" + std::to_string(m.sector) +
         ",\"expected_generation\":" + std::to_string(m.expected_generation) +
         ",\"found_generation\":" + std::to_string(m.found_generation) +
         ",\"reason\":" + JsonString(m.reason) + "}";
    first = false;
  }
  j += "]}";
  j += ",\"invalid_requests\":{\"passed\":" + std::to_string(invalid_checks_passed) +
       ",\"failed\":" + std::to_string(invalid_checks_failed) + ",\"checks\":[";
  first = true;
  for (const HostileCheck& c : hostile) {
    j += std::string(first ? "" : ",") + "{\"kind\":" + JsonString(c.kind) +
         ",\"expected\":" + JsonString(c.expected) +
         ",\"status\":" + JsonString(StatusName(c.status)) +
         ",\"passed\":" + (c.passed ? "true" : "false") +
         ",\"skipped\":" + (c.skipped ? "true" : "false");
    if (!c.detail.empty()) j += ",\"detail\":" + JsonString(c.detail);
    j += "}";
    first = false;
  }
  j += "]}";
  const BlkfrontCounters& c = front.counters();
  j += ",\"ring\":{\"requests\":" + std::to_string(c.requests) +
       ",\"responses\":" + std::to_string(c.responses) +
       ",\"indirect_requests\":" + std::to_string(c.indirect_requests) +
       ",\"pushes\":" + std::to_string(c.pushes) +
       ",\"notifications_sent\":" + std::to_string(c.notifications_sent) +
       ",\"events_received\":" + std::to_string(c.events_received) + "}";
  j += ",\"ok\":" + std::string(ok() ? "true" : "false");
  return j + "}";
}

// ---------------------------------------------------------------------------------------------
// The workload loop.

namespace {

class WorkloadRunner {
 public:
  WorkloadRunner(Blkfront& front, const WorkloadOptions& options, WorkloadResult& result)
      : front_(front), options_(options), result_(result), rng_(options.seed) {}

  absl::Status Run();

 private:
  absl::Status Loop();
  struct NextOp {
    BlkfrontOp op = BlkfrontOp::kRead;
    uint64_t sector = 0;
    uint32_t nr_sectors = 0;
  };
  NextOp PickOp();
  bool Conflicts(const NextOp& op) const;
  void Lock(const InFlight& op, int delta);
  absl::Status Submit(const NextOp& op, uint32_t queue, uint32_t slot);
  void Complete(const BlkfrontCompletion& completion);
  void CheckRead(const InFlight& op, const SlotView& view);
  void CountError(BlkfrontOp op, int16_t status);

  Blkfront& front_;
  const WorkloadOptions& options_;
  WorkloadResult& result_;
  Rng rng_;
  // Per phase (the read-back phase changes them).
  bool random_ = true;
  uint32_t read_percent_ = 100;
  uint64_t ops_limit_ = 0;
  uint64_t deadline_ns_ = 0;
  uint32_t flush_every_ = 0;
  uint32_t discard_every_ = 0;
  uint32_t barrier_every_ = 0;
  uint32_t iodepth_ = 1;
  uint64_t region_first_ = 0;
  uint64_t region_sectors_ = 0;
  uint32_t block_sectors_ = 0;
  uint64_t sequential_next_ = 0;
  uint64_t data_ops_issued_ = 0;
  uint64_t pending_flushes_ = 0;
  uint64_t pending_discards_ = 0;
  uint32_t generation_ = 0;
  std::vector<InFlight> in_flight_;  // [queue * slots + slot]
  // Verify state, indexed by sector - region_first_.
  std::vector<uint32_t> generations_;
  std::vector<uint8_t> writing_;
  std::vector<uint32_t> reading_;
  uint64_t writes_issued_ = 0;
};

WorkloadRunner::NextOp WorkloadRunner::PickOp() {
  if (pending_flushes_ > 0) return {BlkfrontOp::kFlush, 0, 0};
  const uint64_t blocks = region_sectors_ / block_sectors_;
  auto next_sector = [&] {
    uint64_t block = 0;
    if (random_) {
      block = rng_.Below(blocks);
    } else {
      block = sequential_next_++ % blocks;
    }
    return region_first_ + block * block_sectors_;
  };
  if (pending_discards_ > 0) return {BlkfrontOp::kDiscard, next_sector(), block_sectors_};
  const bool read = rng_.Below(100) < read_percent_;
  return {read ? BlkfrontOp::kRead : BlkfrontOp::kWrite, next_sector(), block_sectors_};
}

bool WorkloadRunner::Conflicts(const NextOp& op) const {
  if (!options_.verify || op.op == BlkfrontOp::kFlush) return false;
  const uint64_t first = op.sector - region_first_;
  for (uint64_t i = first; i < first + op.nr_sectors; ++i) {
    if (writing_[i]) return true;
    if (op.op != BlkfrontOp::kRead && reading_[i]) return true;
  }
  return false;
}

void WorkloadRunner::Lock(const InFlight& op, int delta) {
  if (!options_.verify || op.op == BlkfrontOp::kFlush) return;
  const uint64_t first = op.sector - region_first_;
  for (uint64_t i = first; i < first + op.nr_sectors; ++i) {
    if (op.op == BlkfrontOp::kRead) {
      reading_[i] = static_cast<uint32_t>(reading_[i] + delta);
    } else {
      writing_[i] = static_cast<uint8_t>(writing_[i] + delta);
    }
  }
}

absl::Status WorkloadRunner::Submit(const NextOp& op, uint32_t queue, uint32_t slot) {
  InFlight& record = in_flight_[size_t{queue} * front_.slots_per_queue() + slot];
  record = InFlight{op.op, op.sector, op.nr_sectors, 0};
  // Barriers carry their data directly (indirect_op is READ or WRITE only): larger blocks stay
  // plain writes.
  if (op.op == BlkfrontOp::kWrite && barrier_every_ && ++writes_issued_ % barrier_every_ == 0 &&
      op.nr_sectors <= BLKIF_MAX_SEGMENTS_PER_REQUEST * worker::xen::kSectorsPerPage) {
    record.op = BlkfrontOp::kBarrier;
  }
  if ((record.op == BlkfrontOp::kWrite || record.op == BlkfrontOp::kBarrier) && options_.verify) {
    record.generation = ++generation_;
    if (generation_ == kUnknownGeneration) generation_ = 1;  // wrapped: 0 and ~0 are reserved
    std::byte* data = front_.Slot(queue, slot).data.data();
    for (uint32_t i = 0; i < op.nr_sectors; ++i) {
      FillVerifySector(data + size_t{i} * kSector, op.sector + i, record.generation);
    }
  }
  BlkfrontRequest request;
  request.op = record.op;
  request.sector = op.sector;
  request.nr_sectors = op.nr_sectors;
  if (absl::Status status = front_.Enqueue(queue, slot, request); !status.ok()) return status;
  Lock(record, +1);
  return absl::OkStatus();
}

void WorkloadRunner::CountError(BlkfrontOp op, int16_t status) {
  ++result_.errors[std::string(BlkfrontOpName(op)) + "_" + StatusName(status)];
}

void WorkloadRunner::CheckRead(const InFlight& op, const SlotView& view) {
  const uint64_t first = op.sector - region_first_;
  for (uint32_t i = 0; i < op.nr_sectors; ++i) {
    const uint32_t expected = generations_[first + i];
    if (expected == kUnknownGeneration || (expected == 0 && !options_.assume_zeroed)) continue;
    const VerifyCheck check =
        CheckVerifySector(view.data.data() + size_t{i} * kSector, op.sector + i, expected);
    ++result_.sectors_verified;
    if (check.ok()) continue;
    ++result_.verify_failures;
    if (result_.mismatches.size() < kMaxMismatchesKept) {
      result_.mismatches.push_back(
          {op.sector + i, expected, check.found_generation, std::string(check.reason)});
    }
  }
}

void WorkloadRunner::Complete(const BlkfrontCompletion& completion) {
  const InFlight& op =
      in_flight_[size_t{completion.queue} * front_.slots_per_queue() + completion.slot];
  result_.latency.Record(completion.latency_ns);
  Lock(op, -1);
  const bool ok = completion.status == BLKIF_RSP_OKAY;
  if (!ok) CountError(op.op, completion.status);
  const uint64_t bytes = uint64_t{op.nr_sectors} * kSector;
  switch (op.op) {
    case BlkfrontOp::kRead:
      ++result_.reads;
      if (ok) {
        result_.bytes_read += bytes;
        if (options_.verify) CheckRead(op, front_.Slot(completion.queue, completion.slot));
      }
      break;
    case BlkfrontOp::kWrite:
    case BlkfrontOp::kBarrier:
      ++result_.writes;
      if (ok) result_.bytes_written += bytes;
      if (options_.verify) {
        const uint64_t first = op.sector - region_first_;
        std::fill_n(generations_.begin() + static_cast<ptrdiff_t>(first), op.nr_sectors,
                    ok ? op.generation : kUnknownGeneration);
      }
      break;
    case BlkfrontOp::kDiscard:
      ++result_.discards;
      if (options_.verify) {  // contents after a discard are the backend's choice
        const uint64_t first = op.sector - region_first_;
        std::fill_n(generations_.begin() + static_cast<ptrdiff_t>(first), op.nr_sectors,
                    kUnknownGeneration);
      }
      break;
    case BlkfrontOp::kFlush:
      ++result_.flushes;
      break;
  }
  front_.ReleaseSlot(completion.queue, completion.slot);
}

absl::Status WorkloadRunner::Run() {
  const uint64_t disk = front_.backend_info().sectors;
  if (options_.block_bytes == 0 || options_.block_bytes % kSector != 0) {
    return absl::InvalidArgumentError("block size must be a positive multiple of 512");
  }
  block_sectors_ = options_.block_bytes / kSector;
  if (block_sectors_ > front_.max_request_sectors()) {
    return absl::InvalidArgumentError("block size " + std::to_string(options_.block_bytes) +
                                      " exceeds the slot buffer of " +
                                      std::to_string(front_.max_request_sectors() * kSector));
  }
  if (front_.slots_per_queue() == 0) {
    return absl::FailedPreconditionError("no request slots (guest memory or grant table full)");
  }
  region_first_ = options_.first_sector;
  region_sectors_ =
      options_.sectors ? options_.sectors : (disk > region_first_ ? disk - region_first_ : 0);
  if (region_first_ + region_sectors_ > disk || region_sectors_ < block_sectors_) {
    return absl::InvalidArgumentError("workload region outside the disk or smaller than a block");
  }
  // Verify keeps 9 bytes per sector of the region (generation, in-flight readers and writer).
  constexpr uint64_t kMaxVerifySectors = uint64_t{1} << 26;  // 32 GiB of disk, ~600 MB here
  if (options_.verify && region_sectors_ > kMaxVerifySectors) {
    return absl::InvalidArgumentError("verify region of " + std::to_string(region_sectors_) +
                                      " sectors is above " + std::to_string(kMaxVerifySectors) +
                                      ": narrow it with sectors (--size-sectors)");
  }
  if (options_.ops == 0 && options_.runtime_ms == 0) {
    return absl::InvalidArgumentError("give a number of ops or a runtime");
  }
  if (options_.read_percent > 100) return absl::InvalidArgumentError("read percent above 100");
  const uint32_t queues = front_.num_queues();
  const uint32_t slots = front_.slots_per_queue();
  iodepth_ = std::clamp<uint32_t>(options_.iodepth, 1, queues * slots);
  result_.iodepth = iodepth_;
  in_flight_.assign(size_t{queues} * slots, InFlight{});
  if (options_.verify) {
    generations_.assign(region_sectors_, 0);
    writing_.assign(region_sectors_, 0);
    reading_.assign(region_sectors_, 0);
  }
  const uint64_t start = NowNs();
  random_ = options_.random;
  read_percent_ = options_.read_percent;
  ops_limit_ = options_.ops;
  deadline_ns_ = start + options_.runtime_ms * 1000000ull;
  // Like a real blkfront, do not send what the backend did not advertise (hostile mode does).
  const BlkbackInfo& info = front_.backend_info();
  flush_every_ = info.feature_flush_cache ? options_.flush_every : 0;
  discard_every_ = info.feature_discard ? options_.discard_every : 0;
  barrier_every_ = info.feature_barrier ? options_.barrier_every : 0;
  if (options_.flush_every && !flush_every_) result_.not_advertised.push_back("flush");
  if (options_.discard_every && !discard_every_) result_.not_advertised.push_back("discard");
  if (options_.barrier_every && !barrier_every_) result_.not_advertised.push_back("barrier");
  absl::Status status = Loop();
  if (status.ok() && options_.read_back) {
    random_ = false;
    read_percent_ = 100;
    sequential_next_ = 0;
    ops_limit_ = data_ops_issued_ + region_sectors_ / block_sectors_;
    flush_every_ = 0;
    discard_every_ = 0;
    pending_flushes_ = 0;
    pending_discards_ = 0;
    status = Loop();
  }
  result_.elapsed_ns += NowNs() - start;
  const BlkfrontCounters& c = front_.counters();
  if (c.bogus_responses) result_.errors["bogus_response"] = c.bogus_responses;
  if (c.grants_still_mapped) result_.errors["grants_still_mapped"] = c.grants_still_mapped;
  return status;
}

absl::Status WorkloadRunner::Loop() {
  const uint32_t queues = front_.num_queues();
  const uint32_t iodepth = iodepth_;
  std::vector<uint8_t> touched(queues, 0);
  std::array<BlkfrontCompletion, kReapBatch> completions{};
  const uint64_t start = NowNs();
  uint32_t in_flight = 0;
  uint32_t next_queue = 0;
  std::optional<NextOp> held;  // picked but waiting for an overlapping write to finish
  uint64_t last_progress = start;
  while (true) {
    const uint64_t now = NowNs();
    const bool stop = ops_limit_ ? data_ops_issued_ >= ops_limit_ && pending_flushes_ == 0 &&
                                       pending_discards_ == 0
                                 : now >= deadline_ns_;
    // Submit: fill up to the queue depth, round-robin over the queues.
    while (!stop && in_flight < iodepth) {
      if (ops_limit_ && data_ops_issued_ >= ops_limit_ && !held && pending_flushes_ == 0 &&
          pending_discards_ == 0) {
        break;
      }
      NextOp op = held ? *held : PickOp();
      held.reset();
      if (Conflicts(op)) {
        held = op;
        break;
      }
      std::optional<uint32_t> slot;
      uint32_t queue = 0;
      for (uint32_t tries = 0; tries < queues && !slot; ++tries) {
        queue = next_queue;
        next_queue = (next_queue + 1) % queues;
        slot = front_.AcquireSlot(queue);
      }
      if (!slot) {
        held = op;
        break;
      }
      if (absl::Status status = Submit(op, queue, *slot); !status.ok()) return status;
      touched[queue] = 1;
      ++in_flight;
      if (op.op == BlkfrontOp::kFlush) {
        --pending_flushes_;
      } else if (op.op == BlkfrontOp::kDiscard) {
        --pending_discards_;
      } else {
        ++data_ops_issued_;
        if (flush_every_ && data_ops_issued_ % flush_every_ == 0) {
          ++pending_flushes_;
        }
        if (discard_every_ && data_ops_issued_ % discard_every_ == 0) {
          ++pending_discards_;
        }
      }
    }
    // One push (and at most one kick) per queue per pass.
    for (uint32_t q = 0; q < queues; ++q) {
      if (!touched[q]) continue;
      touched[q] = 0;
      if (auto pushed = front_.Push(q); !pushed.ok()) return pushed.status();
    }
    if (in_flight == 0) {
      if (stop) break;
      if (held) {
        // Nothing in flight, yet the op cannot go: every queue is broken.
        return absl::FailedPreconditionError("no queue accepts requests");
      }
      continue;
    }
    size_t reaped = 0;
    for (uint32_t q = 0; q < queues; ++q) {
      size_t n;
      while ((n = front_.Reap(q, completions, /*want_event=*/!options_.poll)) > 0) {
        for (size_t i = 0; i < n; ++i) Complete(completions[i]);
        reaped += n;
        in_flight -= static_cast<uint32_t>(n);
      }
    }
    // `now` is from the top of this pass: one clock read per pass, also while spinning.
    if (reaped > 0) {
      last_progress = now;
      continue;
    }
    if (now - last_progress > uint64_t(options_.timeout_ms) * 1000000ull) {
      return absl::DeadlineExceededError("no response for " + std::to_string(options_.timeout_ms) +
                                         " ms with " + std::to_string(in_flight) +
                                         " requests in flight");
    }
    if (!options_.poll) {
      auto woke = front_.WaitForEvent(options_.timeout_ms);
      if (!woke.ok()) return woke.status();
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunWorkload(Blkfront& front, const WorkloadOptions& options, WorkloadResult& result) {
  WorkloadRunner runner(front, options, result);
  return runner.Run();
}

absl::StatusOr<WorkloadResult> RunWorkload(Blkfront& front, const WorkloadOptions& options) {
  WorkloadResult result;
  if (absl::Status status = RunWorkload(front, options, result); !status.ok()) return status;
  return result;
}

// ---------------------------------------------------------------------------------------------
// Hostile mode.

namespace {

enum class Expect { kError, kEopnotsupp, kAnyError };

const char* ExpectName(Expect e) {
  switch (e) {
    case Expect::kError:
      return "error";
    case Expect::kEopnotsupp:
      return "eopnotsupp";
    case Expect::kAnyError:
      return "any_error";
  }
  return "?";
}

bool Matches(Expect e, int16_t status) {
  switch (e) {
    case Expect::kError:
      return status == BLKIF_RSP_ERROR;
    case Expect::kEopnotsupp:
      return status == BLKIF_RSP_EOPNOTSUPP;
    case Expect::kAnyError:
      return status == BLKIF_RSP_ERROR || status == BLKIF_RSP_EOPNOTSUPP;
  }
  return false;
}

class HostileRunner {
 public:
  HostileRunner(Blkfront& front, const HostileOptions& options, WorkloadResult& result)
      : front_(front), options_(options), result_(result) {}
  absl::Status Run();

 private:
  // Waits for the responses of `slots` on `queue`; statuses in the same order.
  absl::Status Await(uint32_t queue, std::span<const uint32_t> slots, std::span<int16_t> statuses);
  // A good write (if the device is writable) then, after the bad request's batch, a good read of
  // the same sectors; records a failure in `check` if either is wrong.
  absl::Status Probe(uint32_t queue, const std::function<RawBlkifRequest(const SlotView&)>& bad,
                     HostileCheck& check, Expect expect);
  absl::Status GoodRoundTrip(uint32_t queue, std::string* failure);
  void Record(HostileCheck check);

  Blkfront& front_;
  const HostileOptions& options_;
  WorkloadResult& result_;
  uint32_t generation_ = 0x40000000;
  std::array<BlkfrontCompletion, kReapBatch> completions_{};
};

void HostileRunner::Record(HostileCheck check) {
  if (!check.skipped) {
    if (check.passed) {
      ++result_.invalid_checks_passed;
    } else {
      ++result_.invalid_checks_failed;
    }
  }
  result_.hostile.push_back(std::move(check));
}

absl::Status HostileRunner::Await(uint32_t queue, std::span<const uint32_t> slots,
                                  std::span<int16_t> statuses) {
  std::vector<bool> done(slots.size(), false);
  size_t left = slots.size();
  uint64_t last_progress = NowNs();
  while (left > 0) {
    const size_t n = front_.Reap(queue, completions_);
    for (size_t i = 0; i < n; ++i) {
      result_.latency.Record(completions_[i].latency_ns);
      for (size_t k = 0; k < slots.size(); ++k) {
        if (!done[k] && slots[k] == completions_[i].slot) {
          done[k] = true;
          statuses[k] = completions_[i].status;
          --left;
        }
      }
    }
    if (n > 0) {
      last_progress = NowNs();
      continue;
    }
    if (NowNs() - last_progress > uint64_t(options_.timeout_ms) * 1000000ull) {
      return absl::DeadlineExceededError("no response within " +
                                         std::to_string(options_.timeout_ms) + " ms");
    }
    auto woke = front_.WaitForEvent(options_.timeout_ms);
    if (!woke.ok()) return woke.status();
  }
  return absl::OkStatus();
}

absl::Status HostileRunner::GoodRoundTrip(uint32_t queue, std::string* failure) {
  const bool writable = (front_.backend_info().info & VDISK_READONLY) == 0;
  const uint64_t sector = options_.good_sector;
  constexpr uint32_t kSectors = 8;
  uint32_t generation = 0;
  if (writable) {
    auto slot = front_.AcquireSlot(queue);
    if (!slot) return absl::ResourceExhaustedError("no free slot for a good request");
    generation = ++generation_;
    std::byte* data = front_.Slot(queue, *slot).data.data();
    for (uint32_t i = 0; i < kSectors; ++i) {
      FillVerifySector(data + i * kSector, sector + i, generation);
    }
    BlkfrontRequest write{BlkfrontOp::kWrite, sector, kSectors, 0, false};
    if (absl::Status s = front_.Enqueue(queue, *slot, write); !s.ok()) return s;
    if (auto pushed = front_.Push(queue); !pushed.ok()) return pushed.status();
    const uint32_t slots[] = {*slot};
    int16_t statuses[] = {0};
    absl::Status s = Await(queue, slots, statuses);
    if (!s.ok()) return s;
    front_.ReleaseSlot(queue, *slot);
    ++result_.writes;
    if (statuses[0] != BLKIF_RSP_OKAY) {
      *failure = "good write answered " + StatusName(statuses[0]);
      ++result_.errors["write_" + StatusName(statuses[0])];
      return absl::OkStatus();
    }
    result_.bytes_written += kSectors * kSector;
  }
  auto slot = front_.AcquireSlot(queue);
  if (!slot) return absl::ResourceExhaustedError("no free slot for a good request");
  std::memset(front_.Slot(queue, *slot).data.data(), 0xee, kSectors * kSector);
  BlkfrontRequest read{BlkfrontOp::kRead, sector, kSectors, 0, false};
  if (absl::Status s = front_.Enqueue(queue, *slot, read); !s.ok()) return s;
  if (auto pushed = front_.Push(queue); !pushed.ok()) return pushed.status();
  const uint32_t slots[] = {*slot};
  int16_t statuses[] = {0};
  if (absl::Status s = Await(queue, slots, statuses); !s.ok()) return s;
  ++result_.reads;
  if (statuses[0] != BLKIF_RSP_OKAY) {
    *failure = "good read answered " + StatusName(statuses[0]);
    ++result_.errors["read_" + StatusName(statuses[0])];
  } else {
    result_.bytes_read += kSectors * kSector;
    if (writable) {
      for (uint32_t i = 0; i < kSectors; ++i) {
        const VerifyCheck check = CheckVerifySector(
            front_.Slot(queue, *slot).data.data() + i * kSector, sector + i, generation);
        ++result_.sectors_verified;
        if (!check.ok()) {
          ++result_.verify_failures;
          *failure = "good read back: " + std::string(check.reason) + " at sector " +
                     std::to_string(sector + i);
          break;
        }
      }
    }
  }
  front_.ReleaseSlot(queue, *slot);
  return absl::OkStatus();
}

absl::Status HostileRunner::Probe(uint32_t queue,
                                  const std::function<RawBlkifRequest(const SlotView&)>& bad,
                                  HostileCheck& check, Expect expect) {
  check.expected = ExpectName(expect);
  std::string failure;
  if (absl::Status s = GoodRoundTrip(queue, &failure); !s.ok()) return s;
  auto slot = front_.AcquireSlot(queue);
  if (!slot) return absl::ResourceExhaustedError("no free slot for a malformed request");
  if (absl::Status s = front_.EnqueueRaw(queue, *slot, bad(front_.Slot(queue, *slot))); !s.ok()) {
    return s;
  }
  if (auto pushed = front_.Push(queue); !pushed.ok()) return pushed.status();
  const uint32_t slots[] = {*slot};
  int16_t statuses[] = {0};
  absl::Status waited = Await(queue, slots, statuses);
  if (!waited.ok()) {
    check.detail = "no response: " + std::string(waited.message());
    return waited;
  }
  front_.ReleaseSlot(queue, *slot);
  check.status = statuses[0];
  const bool answered_right = Matches(expect, statuses[0]);
  if (!answered_right) check.detail = "answered " + StatusName(statuses[0]);
  if (absl::Status s = GoodRoundTrip(queue, &failure); !s.ok()) return s;
  if (!failure.empty()) {
    check.detail += (check.detail.empty() ? "" : "; ") + failure;
  }
  check.passed = answered_right && failure.empty();
  return absl::OkStatus();
}

absl::Status HostileRunner::Run() {
  const BlkbackInfo& info = front_.backend_info();
  const uint64_t sectors = info.sectors;
  const bool read_only = (info.info & VDISK_READONLY) != 0;
  if (sectors < options_.good_sector + 8) {
    return absl::InvalidArgumentError("disk too small for the hostile probes");
  }
  if (front_.slots_per_queue() < 2) {
    return absl::FailedPreconditionError("hostile mode needs two request slots per queue");
  }
  auto segment = [](grant_ref_t gref, uint8_t first, uint8_t last) {
    blkif_request_segment seg{};
    seg.gref = gref;
    seg.first_sect = first;
    seg.last_sect = last;
    return seg;
  };
  // A read of one good page at `sector`: the base most kinds bend one field of.
  auto read_one = [&](const SlotView& v, uint64_t sector) {
    RawBlkifRequest r;
    r.operation = BLKIF_OP_READ;
    r.nr_segments = 1;
    r.sector_number = sector;
    r.seg[0] = segment(v.data_refs[0], 0, 7);
    return r;
  };
  // Pages for the indirect descriptors: the slot's indirect pages, or (indirect not negotiated,
  // so the backend must refuse anyway) its second data page or its first.
  auto indirect_page = [&](const SlotView& v) -> std::pair<grant_ref_t, std::byte*> {
    if (!v.indirect_refs.empty()) return {v.indirect_refs[0], v.indirect.data()};
    const size_t i = v.data_refs.size() > 1 ? 1 : 0;
    return {v.data_refs[i], v.data.data() + i * common::xen::kXenPageSize};
  };
  auto indirect_read = [&](const SlotView& v, uint16_t nr_segments, uint8_t last_sect) {
    auto [gref, page] = indirect_page(v);
    const uint32_t descriptors = std::min<uint32_t>(nr_segments, 512);
    for (uint32_t i = 0; i < descriptors; ++i) {
      blkif_request_segment seg = segment(v.data_refs[0], 0, last_sect);
      std::memcpy(page + i * sizeof(seg), &seg, sizeof(seg));
    }
    RawBlkifRequest r;
    r.operation = BLKIF_OP_INDIRECT;
    r.indirect_op = BLKIF_OP_READ;
    r.indirect_nr_segments = nr_segments;
    r.sector_number = 0;
    r.indirect_grefs[0] = gref;
    return r;
  };
  const uint32_t max_indirect = front_.backend_info().max_indirect_segments;
  const common::xen::GrantRef out_of_table = 0x7fffff00u;

  struct Kind {
    std::string name;
    Expect expect;
    std::function<RawBlkifRequest(const SlotView&)> build;
    bool skip = false;
    std::string skip_reason;
  };
  std::vector<Kind> kinds;
  auto add = [&kinds](std::string name, Expect expect,
                      std::function<RawBlkifRequest(const SlotView&)> build, bool skip = false,
                      std::string skip_reason = "") {
    kinds.push_back(Kind{std::move(name), expect, std::move(build), skip, std::move(skip_reason)});
  };
  add("unknown_operation", Expect::kEopnotsupp, [&](const SlotView& v) {
    RawBlkifRequest r = read_one(v, 0);
    r.operation = 99;
    return r;
  });
  add("nr_segments_0", Expect::kError, [&](const SlotView& v) {
    RawBlkifRequest r = read_one(v, 0);
    r.nr_segments = 0;
    return r;
  });
  add("nr_segments_12", Expect::kError, [&](const SlotView& v) {
    RawBlkifRequest r = read_one(v, 0);
    r.nr_segments = 12;
    for (auto& s : r.seg) s = segment(v.data_refs[0], 0, 7);
    return r;
  });
  add("first_sect_after_last_sect", Expect::kError, [&](const SlotView& v) {
    RawBlkifRequest r = read_one(v, 0);
    r.seg[0] = segment(v.data_refs[0], 5, 2);
    return r;
  });
  add("last_sect_8", Expect::kError, [&](const SlotView& v) {
    RawBlkifRequest r = read_one(v, 0);
    r.seg[0] = segment(v.data_refs[0], 0, 8);
    return r;
  });
  add("sector_range_past_end", Expect::kError,
      [&](const SlotView& v) { return read_one(v, sectors - 4); });
  add("sector_range_overflow", Expect::kError,
      [&](const SlotView& v) { return read_one(v, UINT64_MAX - 3); });
  add(
      "write_to_read_only_device", Expect::kError,
      [&](const SlotView& v) {
        RawBlkifRequest r = read_one(v, 0);
        r.operation = BLKIF_OP_WRITE;
        return r;
      },
      !read_only, "device is writable");
  add("indirect_too_many_segments", Expect::kError, [&](const SlotView& v) {
    return indirect_read(v,
                         static_cast<uint16_t>(std::min<uint32_t>(
                             std::max<uint32_t>(max_indirect, 11) + 1, UINT16_MAX)),
                         7);
  });
  add("indirect_zero_segments", Expect::kError,
      [&](const SlotView& v) { return indirect_read(v, 0, 7); });
  add("indirect_bad_operation", Expect::kError, [&](const SlotView& v) {
    RawBlkifRequest r = indirect_read(v, 1, 7);
    r.indirect_op = BLKIF_OP_FLUSH_DISKCACHE;
    return r;
  });
  add("indirect_bad_page_ref", Expect::kError, [&](const SlotView& v) {
    RawBlkifRequest r = indirect_read(v, 1, 7);
    r.indirect_grefs[0] = out_of_table;
    return r;
  });
  add("indirect_bad_page_count", Expect::kError, [&](const SlotView& v) {
    // Descriptors that claim 513 segments with a second indirect page that is
    // not granted: the backend must not read past the first page.
    RawBlkifRequest r = indirect_read(v, 513, 7);
    r.indirect_grefs[1] = out_of_table;
    return r;
  });
  add("indirect_bad_descriptor", Expect::kError,
      [&](const SlotView& v) { return indirect_read(v, 1, 8); });
  add("discard_out_of_range", info.feature_discard ? Expect::kError : Expect::kAnyError,
      [&](const SlotView&) {
        RawBlkifRequest r;
        r.operation = BLKIF_OP_DISCARD;
        r.sector_number = sectors - 4;
        r.discard_nr_sectors = 16;
        return r;
      });
  add("bad_grant_ref_out_of_table", Expect::kError, [&](const SlotView& v) {
    RawBlkifRequest r = read_one(v, 0);
    r.seg[0].gref = out_of_table;
    return r;
  });
  const std::optional<common::xen::GrantRef> unused = front_.UnusedGrantRef();
  add(
      "bad_grant_ref_not_granted", Expect::kError,
      [&](const SlotView& v) {
        RawBlkifRequest r = read_one(v, 0);
        r.seg[0].gref = unused.value_or(out_of_table);
        return r;
      },
      !unused, "every grant ref is in use");

  for (const Kind& kind : kinds) {
    HostileCheck check;
    check.kind = kind.name;
    if (kind.skip) {
      check.expected = ExpectName(kind.expect);
      check.skipped = true;
      check.detail = kind.skip_reason;
      Record(std::move(check));
      continue;
    }
    absl::Status s = Probe(0, kind.build, check, kind.expect);
    Record(check);
    if (!s.ok()) return s;
  }

  if (options_.break_ring) {
    HostileCheck check;
    check.kind = "req_prod_far_ahead";
    check.expected = "queue_stopped";
    if (front_.num_queues() < 2) {
      check.skipped = true;
      check.detail = "needs two or more queues";
      Record(std::move(check));
      return absl::OkStatus();
    }
    const uint32_t victim = front_.num_queues() - 1;
    if (absl::Status s = front_.BreakRing(victim, front_.ring_size() * 16 + 5); !s.ok()) return s;
    std::string failure;
    absl::Status s = GoodRoundTrip(0, &failure);
    check.passed = s.ok() && failure.empty();
    check.detail = s.ok() ? failure : std::string(s.message());
    Record(std::move(check));
    return s;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunHostile(Blkfront& front, const HostileOptions& options, WorkloadResult& result) {
  const uint64_t start = NowNs();
  HostileRunner runner(front, options, result);
  absl::Status status = runner.Run();
  result.elapsed_ns += NowNs() - start;
  return status;
}

}  // namespace blockplane::harness
