#pragma once

// The per-device stats segment: counters that outlive worker generations.
//
// The controller creates one file per device (<state-dir>/stats/<device-id>.stats) before it
// spawns each worker generation and removes it when the device is detached. Every generation maps
// it MAP_SHARED and points the block layer's per-operation counters (BlockOpCounters) and its own
// counters (BlockLayerCounters) at it, so a worker killed with SIGKILL loses no count and the
// next generation continues from the same values: Prometheus counters stay monotonic across
// crashes. Gauges (in-flight, idle) are not in
// the segment; each generation starts them afresh.
//
// Layout: a fixed, versioned layout (StatsSegmentLayout) starting with a magic/version header.
// Counters are lock-free std::atomic<uint64_t>, written by one worker at a time (relaxed), read
// by anyone. A file whose header does not match (another version, another device, wrong size) is
// replaced by a zeroed one when the controller prepares it; the worker refuses to map it.
//
// Threads: Create/Remove are called by the controller (any thread); Open by the worker at start.

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/block/block_device.h"

namespace blockplane::worker {

inline constexpr uint64_t kStatsSegmentMagic = 0x5354415453504231ull;  // "1BPSTATS" little endian
// 2: the transport area has a queue dimension. 3: the block layer's own counters.
inline constexpr uint32_t kStatsSegmentVersion = 3;
inline constexpr size_t kStatsSegmentDeviceIdSize = 256;  // with its NUL
// Ring and transport counters of the frontend, one area per queue (Xen blkif: up to 16 queues,
// XenFrontend.max_queues); zero until a frontend uses them.
inline constexpr int kStatsSegmentQueues = 16;
inline constexpr int kStatsSegmentTransportCounters = 64;  // per queue
using StatsSegmentQueueCounters = std::array<BlockCounter, kStatsSegmentTransportCounters>;

struct StatsSegmentHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t header_size;  // sizeof(StatsSegmentHeader)
  uint64_t total_size;   // sizeof(StatsSegmentLayout)
  char device_id[kStatsSegmentDeviceIdSize];
  std::atomic<uint64_t> generation;  // the last worker generation that mapped the segment
  std::atomic<uint64_t> mappings;    // how many generations mapped it (1 + restarts)
};

struct StatsSegmentLayout {
  StatsSegmentHeader header;
  std::array<BlockOpCounters, kBlockOpCount> block_ops;                  // indexed by BlockOp
  std::array<StatsSegmentQueueCounters, kStatsSegmentQueues> transport;  // by queue index
  BlockLayerCounters block_layer;  // skipped flushes, read-modify-writes, ...
};
static_assert(std::is_standard_layout_v<StatsSegmentLayout>);
static_assert(std::atomic<uint64_t>::is_always_lock_free);

// <state_dir>/stats/<device_id>.stats
std::string StatsSegmentPath(const std::string& state_dir, const std::string& device_id);

// Controller: makes sure `path` holds a valid segment for `device_id`. An existing valid one is
// kept (its counters continue); a missing or mismatching one is replaced atomically (written to a
// temporary file, then renamed), so a worker never maps a half-initialised file.
absl::Status PrepareStatsSegment(const std::string& path, const std::string& device_id);
// Controller: removes the segment (detach). Missing is fine.
void RemoveStatsSegment(const std::string& path);

// A mapped segment. Worker: Open() then point BlockDeviceOptions::counters at block_ops() and
// BlockDeviceOptions::layer_counters at block_layer().
class StatsSegment {
 public:
  // Maps `path` read-write and checks its header against `device_id`; records `generation`.
  static absl::StatusOr<std::unique_ptr<StatsSegment>> Open(const std::string& path,
                                                            const std::string& device_id,
                                                            uint64_t generation);
  ~StatsSegment();
  StatsSegment(const StatsSegment&) = delete;
  StatsSegment& operator=(const StatsSegment&) = delete;

  BlockOpCounters* block_ops() { return layout_->block_ops.data(); }
  BlockLayerCounters* block_layer() { return &layout_->block_layer; }
  // Queue `queue`'s transport area (0 <= queue < kStatsSegmentQueues) as the frontend's
  // per-queue counter struct (e.g. xen::BlkifCounters).
  template <typename T>
  T* transport(int queue) {
    static_assert(std::is_standard_layout_v<T>);
    static_assert(sizeof(T) <= sizeof(StatsSegmentQueueCounters));
    static_assert(alignof(T) <= alignof(BlockCounter));
    return reinterpret_cast<T*>(layout_->transport.at(static_cast<size_t>(queue)).data());
  }
  const StatsSegmentLayout& layout() const { return *layout_; }

 private:
  explicit StatsSegment(StatsSegmentLayout* layout) : layout_(layout) {}
  StatsSegmentLayout* layout_;
};

}  // namespace blockplane::worker
