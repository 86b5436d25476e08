#pragma once

// BlkifJournal: the requests a blkif backend has taken from its rings and not yet answered, kept
// in a file that outlives the worker process, so that the next worker generation answers every
// one of them exactly once after a crash (kill -9) while the guest stays connected.
//
// Why a journal: the backend consumes requests privately (req_cons is not in the shared ring)
// and answers them out of order; a response goes into the slot at rsp_prod_pvt, not into the
// slot of its request. After a crash the ring alone cannot tell which requests were taken and
// not answered: their slots may already hold other responses. The journal keeps a copy of each
// taken request until its response is published.
//
// Per queue: `req_cons` (how many requests were taken, durably) and one entry per request taken
// and not yet known to be answered. An entry is
//   kFree
//   kTaken(req_idx)              the request (bytes of its ring slot) is recorded, no response
//   kAnswered(req_idx, rsp_idx)  its response is (being) written into ring slot rsp_idx
// The data path, for each request, in this order (each a store with release ordering; a kill -9
// stops the worker at a point of program order, and every store before it is in the file):
//   1. copy the ring slot into a free entry, state = kTaken(req_idx)       (then parse the copy)
//   2. queue.req_cons = req_idx + 1                                        (the commit of "taken")
//   3. before writing the response: state = kAnswered(req_idx, rsp_idx = rsp_prod_pvt)
//   4. write the response into the ring; later publish rsp_prod (the ring's push)
//   5. after the push: state = kFree
// Recovery (the next generation, same connection): rsp_prod is read from the shared ring.
//   kTaken with req_idx >= req_cons: crashed between 1 and 2; the request is still in its slot
//     (slots at or after req_cons are never overwritten by responses) and is taken again from
//     the ring: discard the entry.                                          -> no duplicate
//   kTaken with req_idx < req_cons: taken, no response: replay it.           -> not lost
//   kAnswered with rsp_idx >= rsp_prod: crashed between 3 and the push: the guest never saw the
//     response; replay it (its old response slot is rewritten from rsp_prod). -> not lost
//   kAnswered with rsp_idx < rsp_prod: the guest has its response (crashed between the push and
//     5): discard.                                                           -> no duplicate
// Which connection: the journal resumes only the rings it was written for (JournalIdentity). Grant
// refs and event-channel ports alone do not tell: a frontend that starts over while no worker runs
// may get the same ones back (Xen hands out the lowest free port; guests reuse freed refs), and
// its fresh rings (rsp_prod 0) would pass the consistency check below if the dead worker had not
// published a response yet. So at connect the backend writes a random mark into each ring's
// header (ring_mark: 8 bytes of the sring's __pad, which the frontend's SHARED_RING_INIT zeroes
// and nothing else writes) and records it; rings that no longer carry it are new.
// The next generation resumes with rsp_prod_pvt = rsp_prod and req_cons = queue.req_cons; the
// entries to replay must then number exactly req_cons - rsp_prod (every taken request has one
// entry until its response is published), which recovery checks. Replayed kAnswered entries go
// back to kTaken before anything new is published, so that a crash during recovery recovers the
// same way. A replayed read or write is idempotent for a request that has no response, and its
// grants are still valid (the guest revokes them only after the response).
//
// Cost per request on the data path: one copy of the request slot (which is the parser's single
// fetch of guest memory) and six word stores to the mapping; no syscall, no lock.
//
// The controller creates the file (PrepareBlkifJournal) before each worker generation and removes
// it when the device is detached. Threads: a queue's entries are written by the loop thread of
// that queue only; Open/Begin/End by the backend's loop thread.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace blockplane::worker::xen {

inline constexpr uint64_t kBlkifJournalMagic = 0x314c4e524a425042ull;  // "BPBJRNL1"
inline constexpr uint32_t kBlkifJournalVersion = 2;  // 2: JournalIdentity::ring_mark
inline constexpr uint32_t kJournalMaxQueues = 16;    // multi-queue-max-queues limit
inline constexpr uint32_t kJournalMaxEntries = 512;  // a 16-page ring of any ABI
inline constexpr size_t kJournalRequestBytes = 112;  // the largest request of the three ABIs

enum class JournalState : uint32_t { kFree = 0, kTaken = 1, kAnswered = 2 };

struct JournalEntry {
  // JournalState in the upper 32 bits, rsp_idx (kAnswered) in the lower 32.
  std::atomic<uint64_t> state;
  std::atomic<uint32_t> req_idx;  // the ring index the request was taken at
  uint32_t request_size;
  uint8_t request[kJournalRequestBytes];  // the ring slot as taken
};
static_assert(sizeof(JournalEntry) == 128);

struct alignas(64) JournalQueue {
  std::atomic<uint32_t> req_cons;  // requests taken (committed)
  JournalEntry entries[kJournalMaxEntries];
};

// What identifies a connection: a journal only resumes the connection it was written for.
struct JournalIdentity {
  uint32_t frontend_domid = 0;
  uint32_t devid = 0;
  uint32_t protocol = 0;
  uint32_t ring_page_order = 0;
  uint32_t num_queues = 0;
  uint32_t ring_refs[kJournalMaxQueues] = {};  // first ring page of each queue
  uint32_t event_channels[kJournalMaxQueues] = {};
  // The mark written into every queue's ring header at connect (blkif_ring.h, WriteRingMark);
  // never 0 once recorded.
  uint64_t ring_mark = 0;
  bool operator==(const JournalIdentity&) const = default;
};

struct JournalHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t header_size;
  uint64_t total_size;
  std::atomic<uint32_t> connected;  // 1 while `identity`'s requests are recorded
  JournalIdentity identity;
};

struct JournalLayout {
  JournalHeader header;
  JournalQueue queues[kJournalMaxQueues];
};
static_assert(std::is_standard_layout_v<JournalLayout>);
static_assert(std::atomic<uint64_t>::is_always_lock_free);

inline constexpr uint64_t JournalStateWord(JournalState state, uint32_t rsp_idx = 0) {
  return uint64_t{static_cast<uint32_t>(state)} << 32 | rsp_idx;
}

// --- Recovery decisions (pure) ---------------------------------------------------------------

enum class RecoveryAction { kNone, kDiscard, kReplay };

// What the next generation does with one entry, given the queue's committed req_cons and the
// ring's published rsp_prod (index comparisons modulo 2^32, as RING_IDX).
RecoveryAction DecideRecovery(uint64_t state, uint32_t req_idx, uint32_t req_cons,
                              uint32_t rsp_prod);

struct QueueRecoveryPlan {
  bool consistent = false;       // the entries to replay number exactly req_cons - rsp_prod
  std::vector<uint32_t> replay;  // entry indexes, in the order the requests were taken
  std::vector<uint32_t> discard;
};
// `entries` are the first ring-size entries of a queue.
QueueRecoveryPlan PlanQueueRecovery(std::span<const JournalEntry> entries, uint32_t ring_size,
                                    uint32_t req_cons, uint32_t rsp_prod);

// --- The file ----------------------------------------------------------------------------------

// <state_dir>/stats/<device_id>.journal, next to the stats segment.
std::string BlkifJournalPath(const std::string& state_dir, const std::string& device_id);
// Controller: makes sure `path` exists with the journal's size (an existing one of that size is
// kept: it is what the next generation recovers from). Worker generations initialise it.
absl::Status PrepareBlkifJournal(const std::string& path);
// Controller: removes it (detach). Missing is fine.
void RemoveBlkifJournal(const std::string& path);

class BlkifJournal {
 public:
  // Maps `path` (created by PrepareBlkifJournal) read-write; a file that does not hold a journal
  // of this version is initialised empty.
  static absl::StatusOr<std::unique_ptr<BlkifJournal>> Open(const std::string& path);
  // Private memory: the same code path without a file (nothing survives the process).
  static std::unique_ptr<BlkifJournal> InMemory();
  ~BlkifJournal();
  BlkifJournal(const BlkifJournal&) = delete;
  BlkifJournal& operator=(const BlkifJournal&) = delete;

  // True if the journal records a live connection with this identity (a worker of it crashed).
  bool Recorded(const JournalIdentity& identity) const;
  // The identity of the live connection recorded, if any.
  std::optional<JournalIdentity> RecordedIdentity() const;
  // Starts recording a fresh connection: every queue empty, req_cons = `start[q]`.
  void Begin(const JournalIdentity& identity, std::span<const uint32_t> start);
  // The connection was closed cleanly: nothing to recover.
  void End();
  // Empties one queue (entries free, req_cons = `start`) of the recorded connection.
  void ResetQueue(uint32_t queue, uint32_t start);

  JournalQueue& queue(uint32_t index) { return layout_->queues[index]; }

  // Data path (see the header comment for the order).
  void Record(JournalQueue& queue, uint32_t entry, uint32_t req_idx,
              std::span<const uint8_t> slot) {
    JournalEntry& e = queue.entries[entry];
    e.request_size = static_cast<uint32_t>(slot.size());
    std::memcpy(e.request, slot.data(), slot.size());
    e.req_idx.store(req_idx, std::memory_order_relaxed);
    e.state.store(JournalStateWord(JournalState::kTaken), std::memory_order_release);
    queue.req_cons.store(req_idx + 1, std::memory_order_release);
  }
  static void MarkAnswered(JournalQueue& queue, uint32_t entry, uint32_t rsp_idx) {
    queue.entries[entry].state.store(JournalStateWord(JournalState::kAnswered, rsp_idx),
                                     std::memory_order_release);
  }
  static void MarkTaken(JournalQueue& queue, uint32_t entry) {
    queue.entries[entry].state.store(JournalStateWord(JournalState::kTaken),
                                     std::memory_order_release);
  }
  static void Clear(JournalQueue& queue, uint32_t entry) {
    queue.entries[entry].state.store(JournalStateWord(JournalState::kFree),
                                     std::memory_order_release);
  }

 private:
  explicit BlkifJournal(JournalLayout* layout) : layout_(layout) {}

  JournalLayout* layout_;
};

}  // namespace blockplane::worker::xen
