#include "worker/xen/blkif_journal.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/unique_fd.h"
#include "worker/xen/blkif_abi.h"

namespace blockplane::worker::xen {
namespace {

static_assert(LayoutOf(Protocol::kNative).request_size <= kJournalRequestBytes);
static_assert(LayoutOf(Protocol::kX86_32).request_size <= kJournalRequestBytes);
static_assert(LayoutOf(Protocol::kX86_64).request_size <= kJournalRequestBytes);

absl::Status Errno(const char* what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

// a - b as a signed distance between ring indexes.
int32_t Distance(uint32_t a, uint32_t b) { return static_cast<int32_t>(a - b); }

void InitHeader(JournalLayout* layout) {
  layout->header.version = kBlkifJournalVersion;
  layout->header.header_size = sizeof(JournalHeader);
  layout->header.total_size = sizeof(JournalLayout);
  layout->header.connected.store(0, std::memory_order_relaxed);
  std::atomic_ref<uint64_t>(layout->header.magic)
      .store(kBlkifJournalMagic, std::memory_order_release);
}

}  // namespace

RecoveryAction DecideRecovery(uint64_t state, uint32_t req_idx, uint32_t req_cons,
                              uint32_t rsp_prod) {
  const auto kind = static_cast<JournalState>(state >> 32);
  const uint32_t rsp_idx = static_cast<uint32_t>(state);
  switch (kind) {
    case JournalState::kFree:
      return RecoveryAction::kNone;
    case JournalState::kTaken:
      // Not committed (req_cons not advanced past it): the ring hands it out again.
      return Distance(req_idx, req_cons) >= 0 ? RecoveryAction::kDiscard : RecoveryAction::kReplay;
    case JournalState::kAnswered:
      if (Distance(req_idx, req_cons) >= 0) return RecoveryAction::kDiscard;  // cannot happen
      // Published responses are before rsp_prod: the guest has this one.
      return Distance(rsp_idx, rsp_prod) < 0 ? RecoveryAction::kDiscard : RecoveryAction::kReplay;
  }
  return RecoveryAction::kDiscard;  // not a state this code writes
}

QueueRecoveryPlan PlanQueueRecovery(std::span<const JournalEntry> entries, uint32_t ring_size,
                                    uint32_t req_cons, uint32_t rsp_prod) {
  QueueRecoveryPlan plan;
  for (uint32_t i = 0; i < entries.size() && i < ring_size; ++i) {
    const JournalEntry& e = entries[i];
    const uint32_t req_idx = e.req_idx.load(std::memory_order_relaxed);
    switch (DecideRecovery(e.state.load(std::memory_order_acquire), req_idx, req_cons, rsp_prod)) {
      case RecoveryAction::kNone:
        break;
      case RecoveryAction::kDiscard:
        plan.discard.push_back(i);
        break;
      case RecoveryAction::kReplay:
        plan.replay.push_back(i);
        break;
    }
  }
  std::sort(plan.replay.begin(), plan.replay.end(), [&](uint32_t a, uint32_t b) {
    // Taken order: distance back from req_cons (all replayed entries are before it).
    return Distance(req_cons, entries[a].req_idx.load(std::memory_order_relaxed)) >
           Distance(req_cons, entries[b].req_idx.load(std::memory_order_relaxed));
  });
  const uint32_t unanswered = req_cons - rsp_prod;
  plan.consistent = unanswered <= ring_size && plan.replay.size() == unanswered;
  return plan;
}

std::string BlkifJournalPath(const std::string& state_dir, const std::string& device_id) {
  return absl::StrCat(state_dir, "/stats/", device_id, ".journal");
}

absl::Status PrepareBlkifJournal(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create the folder of ", path, ": ", ec.message()));
  }
  common::UniqueFd fd(open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!fd) return Errno("cannot create", path);
  struct stat st {};
  if (fstat(fd.get(), &st) != 0) return Errno("cannot stat", path);
  if (static_cast<uint64_t>(st.st_size) == sizeof(JournalLayout)) return absl::OkStatus();
  // Another size is another layout: start empty (zeroes are "no connection recorded").
  if (ftruncate(fd.get(), 0) != 0 || ftruncate(fd.get(), sizeof(JournalLayout)) != 0) {
    return Errno("cannot size", path);
  }
  return absl::OkStatus();
}

void RemoveBlkifJournal(const std::string& path) { unlink(path.c_str()); }

absl::StatusOr<std::unique_ptr<BlkifJournal>> BlkifJournal::Open(const std::string& path) {
  common::UniqueFd fd(open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd) return Errno("cannot open request journal", path);
  struct stat st {};
  if (fstat(fd.get(), &st) != 0) return Errno("cannot stat request journal", path);
  if (static_cast<uint64_t>(st.st_size) != sizeof(JournalLayout)) {
    return absl::FailedPreconditionError(absl::StrCat("request journal ", path, " has size ",
                                                      st.st_size, ", not ", sizeof(JournalLayout)));
  }
  void* p = mmap(nullptr, sizeof(JournalLayout), PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return Errno("cannot map request journal", path);
  auto* layout = static_cast<JournalLayout*>(p);
  if (std::atomic_ref<uint64_t>(layout->header.magic).load(std::memory_order_acquire) !=
          kBlkifJournalMagic ||
      layout->header.version != kBlkifJournalVersion ||
      layout->header.header_size != sizeof(JournalHeader) ||
      layout->header.total_size != sizeof(JournalLayout)) {
    std::memset(p, 0, sizeof(JournalLayout));
    InitHeader(layout);
  }
  return std::unique_ptr<BlkifJournal>(new BlkifJournal(layout));
}

std::unique_ptr<BlkifJournal> BlkifJournal::InMemory() {
  void* p = mmap(nullptr, sizeof(JournalLayout), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) std::abort();  // 1 MiB at start-up
  auto* layout = static_cast<JournalLayout*>(p);
  InitHeader(layout);
  return std::unique_ptr<BlkifJournal>(new BlkifJournal(layout));
}

BlkifJournal::~BlkifJournal() { munmap(layout_, sizeof(JournalLayout)); }

bool BlkifJournal::Recorded(const JournalIdentity& identity) const {
  return layout_->header.connected.load(std::memory_order_acquire) == 1 &&
         layout_->header.identity == identity;
}

std::optional<JournalIdentity> BlkifJournal::RecordedIdentity() const {
  if (layout_->header.connected.load(std::memory_order_acquire) != 1) return std::nullopt;
  return layout_->header.identity;
}

void BlkifJournal::Begin(const JournalIdentity& identity, std::span<const uint32_t> start) {
  // A crash in the middle leaves "not connected": the next generation starts fresh, which is
  // right, as nothing of this connection was taken yet.
  layout_->header.connected.store(0, std::memory_order_release);
  for (uint32_t q = 0; q < start.size() && q < kJournalMaxQueues; ++q) ResetQueue(q, start[q]);
  layout_->header.identity = identity;
  layout_->header.connected.store(1, std::memory_order_release);
}

void BlkifJournal::End() { layout_->header.connected.store(0, std::memory_order_release); }

void BlkifJournal::ResetQueue(uint32_t index, uint32_t start) {
  JournalQueue& q = layout_->queues[index];
  for (JournalEntry& e : q.entries) {
    if (e.state.load(std::memory_order_relaxed) != 0) {
      Clear(q, static_cast<uint32_t>(&e - q.entries));
    }
  }
  q.req_cons.store(start, std::memory_order_release);
}

}  // namespace blockplane::worker::xen
