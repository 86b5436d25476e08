#pragma once

// ScriptedBlkback: a small blkif backend on its own thread, serving a vbd from a RAM image, for
// testing the userspace blkfront without the worker. It is test code, not the product backend
// (worker/xen/blkif_backend): one thread, one grant map per segment, no BlockDevice. What it
// shares with the product is the pure code of blockplane_blkif (BlkifBackRing for the ring
// protocol, ParseRequest / ParseIndirectSegments for validation), so a hostile frontend gets the
// same answers from both.
//
// Lifecycle: Start() publishes the features and goes InitWait, then a thread waits for the
// frontend's Initialised, maps the rings, binds the event channels, goes Connected and serves
// requests until the frontend goes Closing (unmap everything, Closing), then Closed (Closed).
// Stop() ends the thread early (tests that fail halfway). report() is valid after Join().
//
// Fault injection: `corrupt_read_sector` flips one byte of that sector in the data of every read
// that covers it (the image itself stays correct); `unmap_late` keeps grants mapped past the
// response.

#include <stdint.h>

#include <array>
#include <cstddef>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "common/unique_fd.h"
#include "common/xen/xen_platform.h"
#include "tests/harness/xen/blkfront.h"
#include "worker/xen/blkif_request.h"

namespace blockplane::harness {

struct ScriptedBlkbackOptions {
  common::xen::XenPlatform* dom0 = nullptr;  // acts as the backend domain; must outlive this
  common::xen::DomainId frontend_domid = 0;
  VbdPaths paths;
  uint64_t sectors = 2048;
  bool read_only = false;
  uint32_t max_ring_page_order = 0;
  uint32_t max_queues = 1;
  bool persistent_grants = true;
  uint32_t max_indirect_segments = 0;
  bool flush = true;
  bool barrier = true;
  bool discard = true;
  std::optional<uint64_t> corrupt_read_sector;
  // Without persistent grants: keep a request's data pages mapped until the next request of the
  // queue arrives, i.e. after its response (a backend that unmaps late).
  bool unmap_late = false;
  int timeout_ms = 10000;
};

struct ScriptedBlkbackReport {
  absl::Status status;  // first error of the backend itself (not of the guest's requests)
  std::string protocol;
  uint32_t queues = 0;
  uint32_t ring_page_order = 0;
  bool frontend_persistent = false;
  std::array<uint64_t, 256> ops{};  // requests accepted, by operation (INDIRECT by indirect_op)
  uint64_t indirect_requests = 0;
  std::vector<uint64_t> requests_per_queue;
  uint32_t max_segments_seen = 0;
  std::array<uint64_t, worker::xen::kInvalidReasonCount> invalid{};
  uint64_t invalid_total = 0;
  uint64_t grant_map_failures = 0;
  uint64_t secure_discards_refused = 0;
  uint64_t broken_queues = 0;
  uint64_t notifications_sent = 0;
  uint64_t grant_maps = 0;
  std::set<common::xen::GrantRef> persistent_refs;  // distinct refs kept mapped
  uint64_t corrupted_reads = 0;
  bool connected = false;
  bool closed = false;
};

class ScriptedBlkback {
 public:
  explicit ScriptedBlkback(ScriptedBlkbackOptions options);
  ~ScriptedBlkback();  // Stop() + Join()
  ScriptedBlkback(const ScriptedBlkback&) = delete;
  ScriptedBlkback& operator=(const ScriptedBlkback&) = delete;

  // Writes the features and InitWait (on the caller's thread), then starts the thread.
  absl::Status Start();
  void Stop();
  void Join();
  const ScriptedBlkbackReport& report() const { return report_; }
  // The disk, 512 * sectors bytes. Only while the thread is not running (before Start or after
  // Join), or for the test to preload before Start.
  std::vector<std::byte>& image() { return image_; }

 private:
  struct Queue;
  void Run();
  absl::Status Connect();
  absl::Status Serve();
  void ProcessQueue(Queue& queue);
  int16_t Execute(Queue& queue, const worker::xen::BlkifRequest& request);
  int16_t Transfer(Queue& queue, uint8_t op, uint64_t sector,
                   std::span<const worker::xen::BlkifSegment> segments);
  void Shutdown();
  absl::Status CloseSequence();
  worker::xen::DeviceGeometry Geometry() const;

  ScriptedBlkbackOptions options_;
  ScriptedBlkbackReport report_;
  std::vector<std::byte> image_;
  std::vector<std::unique_ptr<Queue>> queues_;
  worker::xen::Protocol protocol_ = worker::xen::Protocol::kNative;
  common::UniqueFd stop_fd_;
  std::thread thread_;
};

}  // namespace blockplane::harness
