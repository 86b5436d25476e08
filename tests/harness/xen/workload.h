#pragma once

// Workloads for the userspace blkfront: the load generator of bp-blkfront and of the Xen
// end-to-end tests and benchmarks.
//
//  - RunWorkload(): random or sequential reads, writes or a mix, fixed block size, a queue depth
//    spread round-robin over the negotiated queues, for a number of ops or a duration, with
//    optional flushes and discards every N data ops. Each pass fills every free slot up to the
//    queue depth, pushes each touched queue once (one notify at most, as the ring asks), then
//    reaps every queue; it sleeps on the event channels only when nothing completed (or spins,
//    with `poll`). Nothing is allocated per request.
//  - Verify mode: every written 512-byte sector carries a header (magic, LBA, generation) and a
//    pattern derived from both, covered by a checksum. Every read is checked against what this
//    frontend last wrote there (or zeroes with `assume_zeroed`, nothing for sectors never written
//    or whose contents are unknown after a discard or a failed write). Requests that overlap an
//    in-flight write are held back until it completes, so each check has one right answer.
//  - RunHostile(): malformed requests of every kind a backend must refuse, each one between good
//    requests whose data is checked, then (with at least two queues) a "broken frontend" that
//    moves req_prod far ahead on the last queue, followed by good requests on the first.
//
// Failures of the backend under test (error responses to good requests, verify mismatches, a
// malformed request answered OKAY) are results, not errors: they are counted in the result. The
// returned status is an error only when the run could not go on (no progress within timeout_ms,
// a frontend bug).

#include <stdint.h>

#include <array>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "tests/harness/xen/blkfront.h"

namespace blockplane::harness {

struct WorkloadOptions {
  bool random = true;
  uint32_t read_percent = 100;  // 0..100
  uint32_t block_bytes = 4096;  // multiple of 512
  uint32_t iodepth = 1;         // requests in flight across all queues
  uint64_t ops = 0;             // data ops to complete (0: run for runtime_ms)
  uint64_t runtime_ms = 0;      // used when ops == 0
  uint32_t flush_every = 0;     // a FLUSH_DISKCACHE after every N data ops (0: none)
  uint32_t discard_every = 0;   // a block_bytes DISCARD after every N data ops (0: none)
  uint32_t barrier_every = 0;   // every Nth write goes out as WRITE_BARRIER (0: none; only
                                // blocks of up to 11 pages: barriers cannot be indirect)
  bool verify = false;
  bool assume_zeroed = false;  // verify: never-written sectors must read as zeroes
  // After the ops or the runtime: read the whole region back sequentially (with verify, every
  // sector written is checked once more). Counted in the result like any read.
  bool read_back = false;
  uint64_t first_sector = 0;  // region used: [first_sector, first_sector + sectors)
  uint64_t sectors = 0;       // 0: to the end of the disk
  uint64_t seed = 1;
  bool poll = false;       // spin on the rings instead of sleeping on event channels
  int timeout_ms = 10000;  // no completion for this long with requests in flight: error
};

// Log-linear latency histogram (nanoseconds), 1/16 relative precision, no allocation.
class LatencyHistogram {
 public:
  void Record(uint64_t ns);
  // Upper bound of the bucket holding the q-quantile (0 < q <= 1); 0 if empty.
  uint64_t Quantile(double q) const;
  uint64_t count() const { return count_; }
  uint64_t max() const { return max_; }

 private:
  static constexpr int kSubBits = 4;
  static constexpr int kBuckets = 64 << kSubBits;
  static int BucketOf(uint64_t ns);
  static uint64_t BucketUpper(int bucket);
  std::array<uint64_t, kBuckets> buckets_{};
  uint64_t count_ = 0;
  uint64_t max_ = 0;
};

struct VerifyMismatch {
  uint64_t sector = 0;
  uint32_t expected_generation = 0;  // 0: never written (expected zeroes)
  uint32_t found_generation = 0;
  std::string reason;  // "checksum", "wrong_lba", "stale_generation", "not_zero", "bad_magic"
};

struct HostileCheck {
  std::string kind;      // e.g. "unknown_operation", "nr_segments_12"
  std::string expected;  // "error", "eopnotsupp", "any_error", "queue_stopped"
  int status = 0;        // the response's status (BLKIF_RSP_*)
  bool passed = false;
  bool skipped = false;  // not applicable to this device (e.g. write to a writable device)
  std::string detail;
};

struct WorkloadResult {
  uint64_t reads = 0;
  uint64_t writes = 0;
  uint64_t flushes = 0;
  uint64_t discards = 0;
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t elapsed_ns = 0;
  uint32_t iodepth = 0;      // effective: capped by the slots of all queues
  LatencyHistogram latency;  // data ops, flushes and discards
  // Error responses to well-formed requests, by kind: "read_error", "write_error",
  // "flush_eopnotsupp", ... plus "bogus_response", "grants_still_mapped".
  std::map<std::string, uint64_t> errors;
  // Flushes, discards or barriers asked for but not sent: the backend does not advertise them.
  std::vector<std::string> not_advertised;
  uint64_t sectors_verified = 0;
  uint64_t verify_failures = 0;
  std::vector<VerifyMismatch> mismatches;  // the first few
  std::vector<HostileCheck> hostile;
  uint64_t invalid_checks_passed = 0;
  uint64_t invalid_checks_failed = 0;

  uint64_t ops() const { return reads + writes + flushes + discards; }
  uint64_t total_errors() const;
  // No verify mismatch and no failed hostile check.
  bool ok() const { return verify_failures == 0 && invalid_checks_failed == 0; }
  // One JSON object (see tests/harness/xen/README.md, "Driving I/O").
  std::string ToJson(const Blkfront& front) const;
};

absl::StatusOr<WorkloadResult> RunWorkload(Blkfront& front, const WorkloadOptions& options);
// Same, adding to `result`, which keeps what was done when the run fails halfway.
absl::Status RunWorkload(Blkfront& front, const WorkloadOptions& options, WorkloadResult& result);

struct HostileOptions {
  uint64_t good_sector = 0;  // where the interleaved good requests write and read (8 sectors)
  int timeout_ms = 10000;
  bool break_ring = true;  // the final broken-frontend step (needs two or more queues)
};

// Appends to `result` (hostile, invalid_checks_*, and the good requests' counters).
absl::Status RunHostile(Blkfront& front, const HostileOptions& options, WorkloadResult& result);

// The verify format, for tests that look at sectors directly.
void FillVerifySector(std::byte* sector, uint64_t lba, uint32_t generation);
struct VerifyCheck {
  // Empty if the sector holds (lba, generation) intact; else "checksum", "wrong_lba",
  // "stale_generation", "bad_magic", "pattern" or "not_zero" (generation 0: zeroes expected).
  std::string_view reason;
  uint32_t found_generation = 0;  // what the sector's header says (0 without the magic)
  bool ok() const { return reason.empty(); }
};
VerifyCheck CheckVerifySector(const std::byte* sector, uint64_t lba, uint32_t generation);

}  // namespace blockplane::harness
