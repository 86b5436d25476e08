#include "tests/harness/xen/blkfront.h"

#include <poll.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstring>

#include "absl/strings/match.h"
#include "common/logging.h"
#include "worker/xen/blkif_ring.h"

// ring.h leaves the memory barriers to the includer.
#ifndef xen_mb
#define xen_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define xen_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define xen_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#endif
#include <xen/io/blkif.h>
#include <xen/io/ring.h>

namespace blockplane::harness {
namespace {

using common::xen::kNoTransaction;
using common::xen::TransactionId;
using common::xen::XenStore;
using common::xen::XenStorePermission;

constexpr uint32_t kMaxRingPageOrder = 4;  // XENBUS_MAX_RING_GRANT_ORDER in Linux
constexpr uint32_t kMaxQueues = 64;        // WaitForEvent() polls them from a fixed array

int64_t NowMs() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return int64_t{now.tv_sec} * 1000 + now.tv_nsec / 1000000;
}

template <typename T>
std::optional<T> ParseNumber(std::string_view text) {
  T value{};
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) return std::nullopt;
  return value;
}

// Reads an optional numeric key: NotFound gives `fallback`, garbage is an error (the backend is
// not trusted either).
template <typename T>
absl::StatusOr<T> ReadNumber(XenStore& store, const std::string& path, std::optional<T> fallback) {
  auto text = store.Read(path, kNoTransaction);
  if (!text.ok()) {
    if (absl::IsNotFound(text.status()) && fallback) return *fallback;
    return text.status();
  }
  std::optional<T> value = ParseNumber<T>(*text);
  if (!value) return absl::InvalidArgumentError(path + ": not a number: '" + *text + "'");
  return *value;
}

}  // namespace

VbdPaths VbdPathsFor(common::xen::DomainId frontend_domid, common::xen::DomainId backend_domid,
                     uint32_t devid) {
  VbdPaths paths;
  paths.frontend =
      "/local/domain/" + std::to_string(frontend_domid) + "/device/vbd/" + std::to_string(devid);
  paths.backend = "/local/domain/" + std::to_string(backend_domid) + "/backend/vbd/" +
                  std::to_string(frontend_domid) + "/" + std::to_string(devid);
  return paths;
}

absl::Status WriteVbdToolstackEntries(XenStore& dom0_store, common::xen::DomainId frontend_domid,
                                      common::xen::DomainId backend_domid, uint32_t devid) {
  VbdPaths paths = VbdPathsFor(frontend_domid, backend_domid, devid);
  std::vector<XenStorePermission> frontend_perms = {
      {frontend_domid, XenStorePermission::Access::kNone},
      {backend_domid, XenStorePermission::Access::kRead}};
  std::vector<XenStorePermission> backend_perms = {
      {backend_domid, XenStorePermission::Access::kNone},
      {frontend_domid, XenStorePermission::Access::kRead}};
  return dom0_store.RunTransaction([&](TransactionId tx) -> absl::Status {
    struct Key {
      std::string path;
      std::string value;
    };
    std::vector<Key> frontend_keys = {
        {paths.frontend, ""},
        {paths.frontend + "/backend", paths.backend},
        {paths.frontend + "/backend-id", std::to_string(backend_domid)},
        {paths.frontend + "/state", "1"},
        {paths.frontend + "/virtual-device", std::to_string(devid)},
        {paths.frontend + "/device-type", "disk"},
    };
    std::vector<Key> backend_keys = {
        {paths.backend, ""},
        {paths.backend + "/frontend", paths.frontend},
        {paths.backend + "/frontend-id", std::to_string(frontend_domid)},
        {paths.backend + "/online", "1"},
        {paths.backend + "/state", "1"},
        {paths.backend + "/dev", "xvda"},
        {paths.backend + "/type", "phy"},
        {paths.backend + "/mode", "w"},
    };
    for (const Key& key : frontend_keys) {
      if (absl::Status status = dom0_store.Write(key.path, key.value, tx); !status.ok()) {
        return status;
      }
      if (absl::Status status = dom0_store.SetPermissions(key.path, frontend_perms, tx);
          !status.ok()) {
        return status;
      }
    }
    for (const Key& key : backend_keys) {
      if (absl::Status status = dom0_store.Write(key.path, key.value, tx); !status.ok()) {
        return status;
      }
      if (absl::Status status = dom0_store.SetPermissions(key.path, backend_perms, tx);
          !status.ok()) {
        return status;
      }
    }
    return absl::OkStatus();
  });
}

absl::Status RemoveVbdToolstackEntries(XenStore& dom0_store, common::xen::DomainId frontend_domid,
                                       common::xen::DomainId backend_domid, uint32_t devid) {
  VbdPaths paths = VbdPathsFor(frontend_domid, backend_domid, devid);
  return dom0_store.RunTransaction([&](TransactionId tx) -> absl::Status {
    if (absl::Status status = dom0_store.Remove(paths.frontend, tx); !status.ok()) return status;
    return dom0_store.Remove(paths.backend, tx);
  });
}

absl::StatusOr<XenbusState> ReadXenbusState(XenStore& store, const std::string& path) {
  auto value = ReadNumber<int>(store, path, 0);
  if (!value.ok()) return value.status();
  if (*value < 0 || *value > 8) {
    return absl::InvalidArgumentError(path + ": bad XenbusState " + std::to_string(*value));
  }
  return static_cast<XenbusState>(*value);
}

absl::StatusOr<XenbusState> WaitForXenbusState(XenStore& store, const std::string& path,
                                               const std::string& token,
                                               bool (*accept)(XenbusState),
                                               bool (*fail)(XenbusState), int timeout_ms) {
  if (absl::Status status = store.Watch(path, token); !status.ok()) return status;
  const int64_t deadline = NowMs() + timeout_ms;
  absl::StatusOr<XenbusState> result = absl::DeadlineExceededError(
      "timed out after " + std::to_string(timeout_ms) + " ms waiting on " + path);
  while (true) {
    // The registration event guarantees at least one pass; re-read the state on every event.
    auto state = ReadXenbusState(store, path);
    if (!state.ok()) {
      result = state.status();
      break;
    }
    if (accept(*state)) {
      result = *state;
      break;
    }
    if (fail && fail(*state)) {
      result = absl::FailedPreconditionError(path + " went to state " +
                                             std::to_string(static_cast<int>(*state)));
      break;
    }
    int64_t left = deadline - NowMs();
    if (left <= 0) break;
    pollfd pfd{store.WatchFd(), POLLIN, 0};
    if (poll(&pfd, 1, static_cast<int>(left)) < 0 && errno != EINTR) {
      result = absl::InternalError("poll on the xenstore watch fd failed");
      break;
    }
    if (auto events = store.ReadWatchEvents(); !events.ok()) {
      result = events.status();
      break;
    }
  }
  (void)store.Unwatch(path, token);
  return result;
}

Blkfront::Blkfront(common::xen::XenPlatform* platform, GuestDomain* guest, BlkfrontOptions options)
    : platform_(platform), guest_(guest), options_(std::move(options)) {
  paths_.frontend = "/local/domain/" + std::to_string(platform_->domid()) + "/device/vbd/" +
                    std::to_string(options_.devid);
}

Blkfront::~Blkfront() {
  for (const BlkfrontQueue& queue : queues_) {
    for (common::xen::GrantRef ref : queue.ring_refs) guest_->EndAccess(ref);
  }
  for (common::xen::GrantRef ref : slot_refs_) guest_->EndAccess(ref);
}

absl::Status Blkfront::SwitchState(XenbusState state) {
  return platform_->xenstore().Write(paths_.frontend + "/state",
                                     std::to_string(static_cast<int>(state)), kNoTransaction);
}

absl::Status Blkfront::ReadBackendPath() {
  XenStore& store = platform_->xenstore();
  auto backend = store.Read(paths_.frontend + "/backend", kNoTransaction);
  if (!backend.ok()) return backend.status();
  auto backend_id = ReadNumber<uint16_t>(store, paths_.frontend + "/backend-id", std::nullopt);
  if (!backend_id.ok()) return backend_id.status();
  paths_.backend = *backend;
  backend_domid_ = *backend_id;
  return absl::OkStatus();
}

absl::Status Blkfront::ReadBackendFeatures() {
  XenStore& store = platform_->xenstore();
  const std::string& be = paths_.backend;
  auto order = ReadNumber<uint32_t>(store, be + "/max-ring-page-order", 0u);
  auto persistent = ReadNumber<uint32_t>(store, be + "/feature-persistent", 0u);
  auto flush = ReadNumber<uint32_t>(store, be + "/feature-flush-cache", 0u);
  auto discard = ReadNumber<uint32_t>(store, be + "/feature-discard", 0u);
  auto max_queues = ReadNumber<uint32_t>(store, be + "/multi-queue-max-queues", 1u);
  auto barrier = ReadNumber<uint32_t>(store, be + "/feature-barrier", 0u);
  auto secure = ReadNumber<uint32_t>(store, be + "/discard-secure", 0u);
  auto granularity = ReadNumber<uint32_t>(store, be + "/discard-granularity", 0u);
  auto indirect = ReadNumber<uint32_t>(store, be + "/feature-max-indirect-segments", 0u);
  for (const absl::Status& status :
       {order.status(), persistent.status(), flush.status(), discard.status(), max_queues.status(),
        barrier.status(), secure.status(), granularity.status(), indirect.status()}) {
    if (!status.ok()) return status;
  }
  // "native" writes no protocol key (as frontends did before the key existed): the backend then
  // uses its own ABI.
  std::optional<worker::xen::Protocol> protocol =
      options_.protocol == "native" ? std::optional(worker::xen::Protocol::kNative)
                                    : worker::xen::ParseProtocolName(options_.protocol);
  if (!protocol) return absl::InvalidArgumentError("unknown protocol " + options_.protocol);
  protocol_ = *protocol;
  backend_info_.feature_barrier = *barrier != 0;
  backend_info_.discard_secure = *secure != 0;
  backend_info_.discard_granularity = *granularity;
  backend_info_.max_indirect_segments = *indirect;
  persistent_ = options_.persistent_grants && *persistent != 0;
  indirect_segments_ = std::min(
      {options_.max_indirect_segments, *indirect, worker::xen::kMaxIndirectSegmentsProtocol});
  // Fewer than a direct request carries is no use (Linux blkfront ignores such values too).
  if (indirect_segments_ <= BLKIF_MAX_SEGMENTS_PER_REQUEST) indirect_segments_ = 0;
  backend_info_.max_queues = std::max(*max_queues, 1u);
  backend_info_.max_ring_page_order = *order;
  backend_info_.feature_persistent = *persistent != 0;
  backend_info_.feature_flush_cache = *flush != 0;
  backend_info_.feature_discard = *discard != 0;
  ring_page_order_ = std::min({options_.ring_page_order, *order, kMaxRingPageOrder});
  return absl::OkStatus();
}

absl::Status Blkfront::SetUpRings() {
  const uint32_t pages = 1u << ring_page_order_;
  const uint32_t num_queues =
      std::clamp(std::min(options_.num_queues, backend_info_.max_queues), 1u, kMaxQueues);
  const uint64_t total = uint64_t{pages} * num_queues;
  if (options_.first_ring_frame + total > guest_->pages()) {
    return absl::InvalidArgumentError("ring frames beyond guest memory");
  }
  if (options_.first_ring_ref + total > guest_->grant_entries()) {
    return absl::InvalidArgumentError("ring grant refs beyond the grant table");
  }
  queues_.clear();
  for (uint32_t q = 0; q < num_queues; ++q) {
    BlkfrontQueue queue;
    const uint32_t first_frame = options_.first_ring_frame + q * pages;
    queue.ring = guest_->Page(first_frame).data();
    std::memset(queue.ring, 0, size_t{pages} * common::xen::kXenPageSize);
    auto* sring = reinterpret_cast<blkif_sring*>(queue.ring);
    SHARED_RING_INIT(sring);
    for (uint32_t i = 0; i < pages; ++i) {
      common::xen::GrantRef ref = options_.first_ring_ref + q * pages + i;
      if (absl::Status status = guest_->GrantAccess(ref, backend_domid_, first_frame + i, false);
          !status.ok()) {
        return status;
      }
      queue.ring_refs.push_back(ref);
    }
    auto channel = platform_->AllocUnbound(backend_domid_);
    if (!channel.ok()) return channel.status();
    queue.event_channel = std::move(*channel);
    queues_.push_back(std::move(queue));
  }
  return SetUpSlots();
}

absl::Status Blkfront::PublishRing() {
  XenStore& store = platform_->xenstore();
  const std::string& fe = paths_.frontend;
  return store.RunTransaction([&](TransactionId tx) -> absl::Status {
    // Keys of an earlier connection (another queue count, ring size or protocol) would be read
    // as this one's: a backend that finds multi-queue-num-queues=2 from before binds the stale
    // queue-0/event-channel. The frontend owns its directory, so it starts clean.
    absl::StatusOr<std::vector<std::string>> existing = store.Directory(fe, tx);
    if (!existing.ok()) return existing.status();
    for (const std::string& name : *existing) {
      if (name == "multi-queue-num-queues" || name == "ring-page-order" || name == "protocol" ||
          name == "event-channel" || absl::StartsWith(name, "ring-ref") ||
          absl::StartsWith(name, "queue-")) {
        if (absl::Status status = store.Remove(fe + "/" + name, tx); !status.ok()) return status;
      }
    }
    std::vector<std::pair<std::string, std::string>> keys;
    if (ring_page_order_ != 0) {
      keys.emplace_back(fe + "/ring-page-order", std::to_string(ring_page_order_));
    }
    // One queue: its keys at the top; several: multi-queue-num-queues and queue-<n>/ keys
    // (blkif.h "Multiple Queues").
    const bool multi = queues_.size() > 1;
    if (multi) keys.emplace_back(fe + "/multi-queue-num-queues", std::to_string(queues_.size()));
    for (size_t q = 0; q < queues_.size(); ++q) {
      const std::string dir = multi ? fe + "/queue-" + std::to_string(q) : fe;
      const BlkfrontQueue& queue = queues_[q];
      if (ring_page_order_ == 0) {
        keys.emplace_back(dir + "/ring-ref", std::to_string(queue.ring_refs[0]));
      } else {
        for (size_t i = 0; i < queue.ring_refs.size(); ++i) {
          keys.emplace_back(dir + "/ring-ref" + std::to_string(i),
                            std::to_string(queue.ring_refs[i]));
        }
      }
      keys.emplace_back(dir + "/event-channel", std::to_string(queue.event_channel->local_port()));
    }
    if (options_.protocol != "native") keys.emplace_back(fe + "/protocol", options_.protocol);
    keys.emplace_back(fe + "/feature-persistent", options_.persistent_grants ? "1" : "0");
    for (const auto& [path, value] : keys) {
      if (absl::Status status = store.Write(path, value, tx); !status.ok()) return status;
    }
    return absl::OkStatus();
  });
}

absl::Status Blkfront::ReadConnectedInfo() {
  XenStore& store = platform_->xenstore();
  const std::string& be = paths_.backend;
  auto sectors = ReadNumber<uint64_t>(store, be + "/sectors", std::nullopt);
  auto info = ReadNumber<uint32_t>(store, be + "/info", 0u);
  auto sector_size = ReadNumber<uint32_t>(store, be + "/sector-size", std::nullopt);
  auto physical = ReadNumber<uint32_t>(store, be + "/physical-sector-size", 0u);
  for (const absl::Status& status :
       {sectors.status(), info.status(), sector_size.status(), physical.status()}) {
    if (!status.ok()) return status;
  }
  if (*sector_size == 0 || (*sector_size & (*sector_size - 1)) != 0 || *sector_size < 512) {
    return absl::InvalidArgumentError("backend sector-size " + std::to_string(*sector_size));
  }
  backend_info_.sectors = *sectors;
  backend_info_.info = *info;
  backend_info_.sector_size = *sector_size;
  backend_info_.physical_sector_size = *physical ? *physical : *sector_size;
  return absl::OkStatus();
}

absl::Status Blkfront::Connect() {
  XenStore& store = platform_->xenstore();
  if (absl::Status status = ReadBackendPath(); !status.ok()) return status;
  // Initialising, as xenbus does when the frontend device appears: a backend left Closed by an
  // earlier frontend goes back to InitWait on it (blkback's frontend_changed()).
  if (absl::Status status = SwitchState(XenbusState::kInitialising); !status.ok()) return status;
  // Wait for the backend to publish its features (InitWait), as blkfront's backend_changed().
  // Closed is not final here (see above); Closing is.
  auto backend_state = WaitForXenbusState(
      store, paths_.backend + "/state", "blkfront-backend",
      [](XenbusState s) { return s == XenbusState::kInitWait || s == XenbusState::kConnected; },
      [](XenbusState s) { return s == XenbusState::kClosing; }, options_.timeout_ms);
  if (!backend_state.ok()) return backend_state.status();
  if (absl::Status status = ReadBackendFeatures(); !status.ok()) return status;
  if (absl::Status status = SetUpRings(); !status.ok()) return status;
  if (absl::Status status = PublishRing(); !status.ok()) return status;
  if (absl::Status status = SwitchState(XenbusState::kInitialised); !status.ok()) return status;

  backend_state = WaitForXenbusState(
      store, paths_.backend + "/state", "blkfront-backend",
      [](XenbusState s) { return s == XenbusState::kConnected; },
      [](XenbusState s) { return s == XenbusState::kClosing || s == XenbusState::kClosed; },
      options_.timeout_ms);
  if (!backend_state.ok()) return backend_state.status();
  if (absl::Status status = ReadConnectedInfo(); !status.ok()) return status;
  BP_LOG(Info) << "blkfront " << paths_.frontend << " connected: sectors=" << backend_info_.sectors
               << " ring-page-order=" << ring_page_order_;
  return SwitchState(XenbusState::kConnected);
}

absl::Status Blkfront::Disconnect() {
  // As Linux blkfront/blkback: the frontend says Closing, the backend answers Closing; the
  // frontend goes Closed, and the backend unmaps the ring and goes Closed. Only then can the guest
  // revoke the ring grants.
  XenStore& store = platform_->xenstore();
  if (absl::Status status = SwitchState(XenbusState::kClosing); !status.ok()) return status;
  auto backend_state = WaitForXenbusState(
      store, paths_.backend + "/state", "blkfront-backend",
      [](XenbusState s) { return s == XenbusState::kClosing || s == XenbusState::kClosed; },
      nullptr, options_.timeout_ms);
  if (!backend_state.ok()) return backend_state.status();
  if (absl::Status status = SwitchState(XenbusState::kClosed); !status.ok()) return status;
  backend_state = WaitForXenbusState(
      store, paths_.backend + "/state", "blkfront-backend",
      [](XenbusState s) { return s == XenbusState::kClosed; }, nullptr, options_.timeout_ms);
  if (!backend_state.ok()) return backend_state.status();
  bool all_revoked = true;
  for (BlkfrontQueue& queue : queues_) {
    queue.event_channel.reset();
    for (common::xen::GrantRef ref : queue.ring_refs) all_revoked &= guest_->EndAccess(ref);
  }
  // Persistent grants, and any per-request grant the backend held on to.
  for (common::xen::GrantRef ref : slot_refs_) all_revoked &= guest_->EndAccess(ref);
  if (!all_revoked) {
    // Linux leaks such pages rather than reuse them; report it so tests catch a backend that
    // keeps the ring mapped after Closed.
    return absl::FailedPreconditionError("backend still maps a ring or data grant after Closed");
  }
  queues_.clear();
  slot_refs_.clear();
  return absl::OkStatus();
}

const char* BlkfrontOpName(BlkfrontOp op) {
  switch (op) {
    case BlkfrontOp::kRead:
      return "read";
    case BlkfrontOp::kWrite:
      return "write";
    case BlkfrontOp::kFlush:
      return "flush";
    case BlkfrontOp::kBarrier:
      return "barrier";
    case BlkfrontOp::kDiscard:
      return "discard";
  }
  return "unknown";
}

namespace {

using worker::xen::LayoutOf;
using worker::xen::Protocol;

uint64_t NowNs() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return uint64_t(now.tv_sec) * 1000000000u + uint64_t(now.tv_nsec);
}

// Encodes `request` in one ABI's layouts into `entry` (the ring slot, entry_size bytes), with one
// memcpy of the whole request, so the backend never sees a half-written field order issue.
template <typename Rw, typename Discard, typename Indirect>
void EncodeAs(const RawBlkifRequest& request, uint64_t id, std::byte* entry) {
  switch (request.operation) {
    case BLKIF_OP_DISCARD: {
      Discard d{};
      d.operation = request.operation;
      d.flag = request.discard_flag;
      d.handle = 0;
      d.id = id;
      d.sector_number = request.sector_number;
      d.nr_sectors = request.discard_nr_sectors;
      std::memcpy(entry, &d, sizeof(d));
      break;
    }
    case BLKIF_OP_INDIRECT: {
      Indirect d{};
      d.operation = request.operation;
      d.indirect_op = request.indirect_op;
      d.nr_segments = request.indirect_nr_segments;
      d.id = id;
      d.sector_number = request.sector_number;
      d.handle = 0;
      std::copy(request.indirect_grefs.begin(), request.indirect_grefs.end(),
                std::begin(d.indirect_grefs));
      std::memcpy(entry, &d, sizeof(d));
      break;
    }
    default: {
      Rw d{};
      d.operation = request.operation;
      d.nr_segments = request.nr_segments;
      d.handle = 0;
      d.id = id;
      d.sector_number = request.sector_number;
      std::copy(request.seg.begin(), request.seg.end(), std::begin(d.seg));
      std::memcpy(entry, &d, sizeof(d));
      break;
    }
  }
}

template <typename Response>
void DecodeResponse(const std::byte* entry, uint64_t* id, uint8_t* operation, int16_t* status) {
  Response r;
  std::memcpy(&r, entry, sizeof(r));  // copy out once: the backend is not trusted either
  *id = r.id;
  *operation = r.operation;
  *status = r.status;
}

std::atomic_ref<uint32_t> SharedWord(std::byte* ring, size_t offset) {
  return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(ring + offset));
}

constexpr size_t kReqProd = offsetof(blkif_sring, req_prod);
constexpr size_t kReqEvent = offsetof(blkif_sring, req_event);
constexpr size_t kRspProd = offsetof(blkif_sring, rsp_prod);
constexpr size_t kRspEvent = offsetof(blkif_sring, rsp_event);

}  // namespace

absl::Status Blkfront::SetUpSlots() {
  const uint32_t pages = 1u << ring_page_order_;
  ring_size_ = worker::xen::RingEntries(protocol_, size_t{pages} * common::xen::kXenPageSize);
  if (ring_size_ == 0) return absl::InternalError("ring holds no entry");
  const uint64_t data_pages =
      (uint64_t{std::max(options_.max_request_bytes, 1u)} + common::xen::kXenPageSize - 1) /
      common::xen::kXenPageSize;
  const uint64_t max_data_pages =
      indirect_segments_ ? indirect_segments_ : BLKIF_MAX_SEGMENTS_PER_REQUEST;
  if (data_pages > max_data_pages) {
    return absl::InvalidArgumentError(
        "max_request_bytes " + std::to_string(options_.max_request_bytes) + " needs " +
        std::to_string(data_pages) + " segments; the negotiated maximum is " +
        std::to_string(max_data_pages) +
        " (indirect segments: " + std::to_string(indirect_segments_) + ")");
  }
  data_pages_per_slot_ = static_cast<uint32_t>(data_pages);
  indirect_pages_per_slot_ =
      indirect_segments_ == 0 ? 0
                              : (data_pages_per_slot_ + worker::xen::kSegmentsPerIndirectPage - 1) /
                                    worker::xen::kSegmentsPerIndirectPage;
  const uint64_t per_slot = uint64_t{data_pages_per_slot_} + indirect_pages_per_slot_;
  const uint64_t ring_pages = uint64_t{pages} * queues_.size();
  first_data_frame_ = options_.first_data_frame.value_or(
      static_cast<uint32_t>(options_.first_ring_frame + ring_pages));
  first_data_ref_ = options_.first_data_ref.value_or(
      static_cast<common::xen::GrantRef>(options_.first_ring_ref + ring_pages));
  if (options_.slots_per_queue == 0) {
    // As many as fit in what is left of guest memory and the grant table, up to the ring size.
    const uint64_t frames_left =
        guest_->pages() > first_data_frame_ ? guest_->pages() - first_data_frame_ : 0;
    const uint64_t refs_left =
        guest_->grant_entries() > first_data_ref_ ? guest_->grant_entries() - first_data_ref_ : 0;
    const uint64_t fit = std::min(frames_left, refs_left) / (per_slot * queues_.size());
    slots_per_queue_ = static_cast<uint32_t>(std::min<uint64_t>(fit, ring_size_));
  } else {
    slots_per_queue_ = std::min(options_.slots_per_queue, ring_size_);
  }
  const uint64_t total = per_slot * slots_per_queue_ * queues_.size();
  if (first_data_frame_ + total > guest_->pages()) {
    return absl::InvalidArgumentError(
        "request slots need " + std::to_string(total) + " guest pages from frame " +
        std::to_string(first_data_frame_) + "; the guest has " + std::to_string(guest_->pages()));
  }
  if (first_data_ref_ + total > guest_->grant_entries()) {
    return absl::InvalidArgumentError("request slots need " + std::to_string(total) +
                                      " grant refs from " + std::to_string(first_data_ref_) +
                                      "; the table has " + std::to_string(guest_->grant_entries()));
  }
  slot_refs_.resize(total);
  for (uint64_t i = 0; i < total; ++i) {
    slot_refs_[i] = static_cast<common::xen::GrantRef>(first_data_ref_ + i);
  }
  for (BlkfrontQueue& queue : queues_) {
    queue.slots.assign(slots_per_queue_, BlkfrontQueue::Slot{});
    queue.free_slots.clear();
    queue.free_slots.reserve(slots_per_queue_);
    queue.unpushed.clear();
    queue.unpushed.reserve(slots_per_queue_);
    queue.revoke_pending_slots.clear();
    queue.revoke_pending_slots.reserve(slots_per_queue_);
    for (uint32_t s = slots_per_queue_; s-- > 0;) queue.free_slots.push_back(s);
  }
  if (persistent_) {
    // The persistent pool: every slot page granted read-write once (blkfront grants persistent
    // pages writable whatever the first use).
    for (uint64_t i = 0; i < total; ++i) {
      if (absl::Status status = guest_->GrantAccess(slot_refs_[i], backend_domid_,
                                                    static_cast<uint32_t>(first_data_frame_ + i),
                                                    /*readonly=*/false);
          !status.ok()) {
        return status;
      }
    }
  }
  return absl::OkStatus();
}

uint32_t Blkfront::SlotFirstFrame(uint32_t queue, uint32_t slot) const {
  const uint32_t per_slot = data_pages_per_slot_ + indirect_pages_per_slot_;
  return first_data_frame_ + (queue * slots_per_queue_ + slot) * per_slot;
}

common::xen::GrantRef Blkfront::SlotFirstRef(uint32_t queue, uint32_t slot) const {
  const uint32_t per_slot = data_pages_per_slot_ + indirect_pages_per_slot_;
  return first_data_ref_ + (queue * slots_per_queue_ + slot) * per_slot;
}

uint32_t Blkfront::max_request_sectors() const {
  return data_pages_per_slot_ * worker::xen::kSectorsPerPage;
}

SlotView Blkfront::Slot(uint32_t queue, uint32_t slot) const {
  if (queue >= queues_.size() || slot >= slots_per_queue_) return {};
  const uint32_t frame = SlotFirstFrame(queue, slot);
  const size_t ref_index = SlotFirstRef(queue, slot) - first_data_ref_;
  std::byte* base = guest_->Page(frame).data();
  SlotView view;
  view.data = {base, size_t{data_pages_per_slot_} * common::xen::kXenPageSize};
  view.data_refs =
      std::span<const common::xen::GrantRef>(slot_refs_).subspan(ref_index, data_pages_per_slot_);
  view.indirect = {base + view.data.size(),
                   size_t{indirect_pages_per_slot_} * common::xen::kXenPageSize};
  view.indirect_refs = std::span<const common::xen::GrantRef>(slot_refs_)
                           .subspan(ref_index + data_pages_per_slot_, indirect_pages_per_slot_);
  return view;
}

std::optional<uint32_t> Blkfront::AcquireSlot(uint32_t queue) {
  if (queue >= queues_.size()) return std::nullopt;
  BlkfrontQueue& q = queues_[queue];
  if (q.broken) return std::nullopt;
  if (q.free_slots.empty() && !q.revoke_pending_slots.empty()) {
    // Slots whose pages the backend still mapped at their response: retry revoking them (Linux
    // defers such pages the same way, gnttab_end_foreign_access with a deferred free).
    size_t kept = 0;
    for (uint32_t slot : q.revoke_pending_slots) {
      EndSlotGrants(queue, slot);
      if (q.slots[slot].revoke_pending) {
        q.revoke_pending_slots[kept++] = slot;
      } else {
        q.free_slots.push_back(slot);
      }
    }
    q.revoke_pending_slots.resize(kept);
  }
  if (q.free_slots.empty()) return std::nullopt;
  const uint32_t slot = q.free_slots.back();
  q.free_slots.pop_back();
  q.slots[slot].acquired = true;
  return slot;
}

void Blkfront::ReleaseSlot(uint32_t queue, uint32_t slot) {
  if (queue >= queues_.size() || slot >= slots_per_queue_) return;
  BlkfrontQueue& q = queues_[queue];
  BlkfrontQueue::Slot& s = q.slots[slot];
  if (!s.acquired || s.in_flight) return;
  s.acquired = false;
  if (s.revoke_pending) {
    q.revoke_pending_slots.push_back(slot);
  } else {
    q.free_slots.push_back(slot);
  }
}

std::byte* Blkfront::RingEntry(const BlkfrontQueue& queue, uint32_t index) const {
  const size_t entry = LayoutOf(protocol_).entry_size;
  return queue.ring + worker::xen::kSringHeaderSize + size_t{index & (ring_size_ - 1)} * entry;
}

absl::Status Blkfront::CheckSlotForEnqueue(uint32_t queue, uint32_t slot) const {
  if (queue >= queues_.size() || slot >= slots_per_queue_) {
    return absl::InvalidArgumentError("no such queue or slot");
  }
  const BlkfrontQueue& q = queues_[queue];
  if (q.broken) return absl::FailedPreconditionError("queue is broken");
  if (!q.slots[slot].acquired || q.slots[slot].in_flight) {
    return absl::FailedPreconditionError("slot not acquired or already in flight");
  }
  // Free ring entries: produced minus consumed responses. Slots <= ring size keeps this true.
  if (q.req_prod_pvt - q.rsp_cons >= ring_size_) {
    return absl::ResourceExhaustedError("ring full");
  }
  return absl::OkStatus();
}

void Blkfront::EndSlotGrants(uint32_t queue, uint32_t slot) {
  BlkfrontQueue::Slot& s = queues_[queue].slots[slot];
  if (persistent_) {
    s.revoke_pending = false;
    return;
  }
  const SlotView view = Slot(queue, slot);
  bool all = true;
  for (uint32_t i = 0; i < s.granted_data; ++i) all &= guest_->EndAccess(view.data_refs[i]);
  for (uint32_t i = 0; i < s.granted_indirect; ++i) {
    all &= guest_->EndAccess(view.indirect_refs[i]);
  }
  s.revoke_pending = !all;
  if (all) {
    s.granted_data = 0;
    s.granted_indirect = 0;
  }
}

void Blkfront::Produce(uint32_t queue, uint32_t slot, const RawBlkifRequest& request,
                       uint8_t echo) {
  BlkfrontQueue& q = queues_[queue];
  BlkfrontQueue::Slot& s = q.slots[slot];
  const uint64_t id = (uint64_t{++q.serial} << 16) | slot;
  std::byte* entry = RingEntry(q, q.req_prod_pvt);
  switch (protocol_) {
    case Protocol::kX86_32:
      EncodeAs<worker::xen::blkif_x86_32_request, worker::xen::blkif_x86_32_request_discard,
               worker::xen::blkif_x86_32_request_indirect>(request, id, entry);
      break;
    case Protocol::kX86_64:
      EncodeAs<worker::xen::blkif_x86_64_request, worker::xen::blkif_x86_64_request_discard,
               worker::xen::blkif_x86_64_request_indirect>(request, id, entry);
      break;
    case Protocol::kNative:
    default:
      EncodeAs<blkif_request, blkif_request_discard, blkif_request_indirect>(request, id, entry);
      break;
  }
  ++q.req_prod_pvt;
  ++q.in_flight;
  ++counters_.requests;
  if (request.operation == BLKIF_OP_INDIRECT) ++counters_.indirect_requests;
  s.in_flight = true;
  s.id = id;
  s.operation = echo;
  q.unpushed.push_back(slot);
}

absl::Status Blkfront::Enqueue(uint32_t queue, uint32_t slot, const BlkfrontRequest& request) {
  if (absl::Status status = CheckSlotForEnqueue(queue, slot); !status.ok()) return status;
  RawBlkifRequest raw;
  raw.sector_number = request.sector;
  const SlotView view = Slot(queue, slot);
  BlkfrontQueue::Slot& s = queues_[queue].slots[slot];
  uint8_t data_op = 0;
  switch (request.op) {
    case BlkfrontOp::kFlush:
      raw.operation = BLKIF_OP_FLUSH_DISKCACHE;
      raw.nr_segments = 0;
      Produce(queue, slot, raw, raw.operation);
      return absl::OkStatus();
    case BlkfrontOp::kDiscard:
      if (request.nr_sectors == 0) return absl::InvalidArgumentError("discard of 0 sectors");
      raw.operation = BLKIF_OP_DISCARD;
      raw.discard_flag = request.secure ? BLKIF_DISCARD_SECURE : 0;
      raw.discard_nr_sectors = request.nr_sectors;
      Produce(queue, slot, raw, raw.operation);
      return absl::OkStatus();
    case BlkfrontOp::kRead:
      data_op = BLKIF_OP_READ;
      break;
    case BlkfrontOp::kWrite:
      data_op = BLKIF_OP_WRITE;
      break;
    case BlkfrontOp::kBarrier:
      data_op = BLKIF_OP_WRITE_BARRIER;
      break;
  }
  constexpr uint32_t kPerPage = worker::xen::kSectorsPerPage;
  if (request.nr_sectors == 0) return absl::InvalidArgumentError("data request of 0 sectors");
  if (request.buffer_sector_offset >= kPerPage) {
    return absl::InvalidArgumentError("buffer_sector_offset must be 0..7");
  }
  const uint64_t end_sector = uint64_t{request.buffer_sector_offset} + request.nr_sectors;
  const uint64_t segments = (end_sector + kPerPage - 1) / kPerPage;
  if (segments > data_pages_per_slot_) {
    return absl::InvalidArgumentError("request larger than the slot buffer");
  }
  const bool indirect = segments > BLKIF_MAX_SEGMENTS_PER_REQUEST;
  if (indirect && (indirect_segments_ == 0 || data_op == BLKIF_OP_WRITE_BARRIER)) {
    return absl::InvalidArgumentError("request needs indirect segments, which are not available");
  }
  // Grants: pages the disk reads from (writes) are read-only to the backend.
  const bool readonly = data_op != BLKIF_OP_READ;
  if (!persistent_) {
    for (uint32_t i = 0; i < segments; ++i) {
      if (absl::Status status = guest_->GrantAccess(view.data_refs[i], backend_domid_,
                                                    SlotFirstFrame(queue, slot) + i, readonly);
          !status.ok()) {
        EndSlotGrants(queue, slot);
        return status;
      }
      s.granted_data = i + 1;
    }
  }
  auto segment_at = [&](uint32_t i) {
    blkif_request_segment seg{};
    seg.gref = view.data_refs[i];
    seg.first_sect = static_cast<uint8_t>(i == 0 ? request.buffer_sector_offset : 0);
    seg.last_sect =
        static_cast<uint8_t>(i + 1 == segments ? (end_sector - 1) % kPerPage : kPerPage - 1);
    return seg;
  };
  if (!indirect) {
    raw.operation = data_op;
    raw.nr_segments = static_cast<uint8_t>(segments);
    for (uint32_t i = 0; i < segments; ++i) raw.seg[i] = segment_at(i);
    Produce(queue, slot, raw, data_op);
    return absl::OkStatus();
  }
  // Indirect: descriptors in the slot's indirect pages, which the backend only reads.
  const uint32_t indirect_pages =
      static_cast<uint32_t>((segments + worker::xen::kSegmentsPerIndirectPage - 1) /
                            worker::xen::kSegmentsPerIndirectPage);
  for (uint32_t i = 0; i < segments; ++i) {
    blkif_request_segment seg = segment_at(i);
    std::memcpy(view.indirect.data() + size_t{i} * sizeof(seg), &seg, sizeof(seg));
  }
  if (!persistent_) {
    const uint32_t first_indirect_frame = SlotFirstFrame(queue, slot) + data_pages_per_slot_;
    for (uint32_t i = 0; i < indirect_pages; ++i) {
      if (absl::Status status = guest_->GrantAccess(view.indirect_refs[i], backend_domid_,
                                                    first_indirect_frame + i, /*readonly=*/true);
          !status.ok()) {
        EndSlotGrants(queue, slot);
        return status;
      }
      s.granted_indirect = i + 1;
    }
  }
  raw.operation = BLKIF_OP_INDIRECT;
  raw.indirect_op = data_op;
  raw.indirect_nr_segments = static_cast<uint16_t>(segments);
  for (uint32_t i = 0; i < indirect_pages; ++i) raw.indirect_grefs[i] = view.indirect_refs[i];
  Produce(queue, slot, raw, data_op);
  return absl::OkStatus();
}

absl::Status Blkfront::EnqueueRaw(uint32_t queue, uint32_t slot, const RawBlkifRequest& request) {
  if (absl::Status status = CheckSlotForEnqueue(queue, slot); !status.ok()) return status;
  if (!persistent_) {
    BlkfrontQueue::Slot& s = queues_[queue].slots[slot];
    const uint32_t first = SlotFirstFrame(queue, slot);
    const SlotView view = Slot(queue, slot);
    for (uint32_t i = 0; i < data_pages_per_slot_; ++i) {
      if (absl::Status st = guest_->GrantAccess(view.data_refs[i], backend_domid_, first + i,
                                                /*readonly=*/false);
          !st.ok()) {
        EndSlotGrants(queue, slot);
        return st;
      }
      s.granted_data = i + 1;
    }
    for (uint32_t i = 0; i < indirect_pages_per_slot_; ++i) {
      if (absl::Status st = guest_->GrantAccess(view.indirect_refs[i], backend_domid_,
                                                first + data_pages_per_slot_ + i,
                                                /*readonly=*/true);
          !st.ok()) {
        EndSlotGrants(queue, slot);
        return st;
      }
      s.granted_indirect = i + 1;
    }
  }
  const uint8_t echo =
      request.operation == BLKIF_OP_INDIRECT ? request.indirect_op : request.operation;
  Produce(queue, slot, request, echo);
  return absl::OkStatus();
}

absl::StatusOr<bool> Blkfront::Push(uint32_t queue) {
  if (queue >= queues_.size()) return absl::InvalidArgumentError("no such queue");
  BlkfrontQueue& q = queues_[queue];
  if (q.broken) return absl::FailedPreconditionError("queue is broken");
  // RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish (release: the entries before the index), full
  // fence, then read req_event; kick if the backend asked for an index inside the pushed batch.
  const uint32_t old_prod = q.req_prod_pushed;
  const uint32_t new_prod = q.req_prod_pvt;
  if (old_prod == new_prod) return false;
  // One clock read per push: every request of the batch becomes visible to the backend here.
  const uint64_t now = NowNs();
  for (uint32_t slot : q.unpushed) q.slots[slot].submit_ns = now;
  q.unpushed.clear();
  SharedWord(q.ring, kReqProd).store(new_prod, std::memory_order_release);
  q.req_prod_pushed = new_prod;
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const uint32_t req_event = SharedWord(q.ring, kReqEvent).load(std::memory_order_relaxed);
  ++counters_.pushes;
  const bool notify = uint32_t(new_prod - req_event) < uint32_t(new_prod - old_prod);
  if (!notify) return false;
  if (absl::Status status = q.event_channel->Notify(); !status.ok()) return status;
  ++counters_.notifications_sent;
  return true;
}

size_t Blkfront::Reap(uint32_t queue, std::span<BlkfrontCompletion> out, bool want_event) {
  if (queue >= queues_.size() || out.empty()) return 0;
  BlkfrontQueue& q = queues_[queue];
  std::atomic_ref<uint32_t> rsp_prod = SharedWord(q.ring, kRspProd);
  size_t done = 0;
  // One clock read for every response of this call: the latency of each is measured up to the
  // moment the frontend looked (the clock costs as much as the rest of a completion).
  const uint64_t now = NowNs();
  while (true) {
    const uint32_t prod = rsp_prod.load(std::memory_order_acquire);
    // A backend that claims more responses than requests pushed is broken; never read past
    // what was pushed (entries beyond hold requests not yet published).
    const uint32_t available =
        std::min(uint32_t(prod - q.rsp_cons), uint32_t(q.req_prod_pushed - q.rsp_cons));
    // As many requests will follow these responses, into the entries from req_prod_pvt on (the
    // same entries when the ring is full). Fetch those lines exclusive now (PREFETCHW): the
    // backend's CPU wrote them last, and the write that follows then does not wait for them.
    for (uint32_t i = 0; i < available && i < out.size(); ++i) {
#if defined(__x86_64__)
      __asm__ __volatile__("prefetchw %0" : : "m"(*RingEntry(q, q.req_prod_pvt + i)));
#endif
    }
    for (uint32_t i = 0; i < available && done < out.size(); ++i) {
      const std::byte* entry = RingEntry(q, q.rsp_cons);
      ++q.rsp_cons;
      uint64_t id = 0;
      uint8_t operation = 0;
      int16_t status = 0;
      switch (protocol_) {
        case Protocol::kX86_32:
          DecodeResponse<worker::xen::blkif_x86_32_response>(entry, &id, &operation, &status);
          break;
        case Protocol::kX86_64:
          DecodeResponse<worker::xen::blkif_x86_64_response>(entry, &id, &operation, &status);
          break;
        case Protocol::kNative:
        default:
          DecodeResponse<blkif_response>(entry, &id, &operation, &status);
          break;
      }
      ++counters_.responses;
      const uint32_t slot = static_cast<uint32_t>(id & 0xffff);
      if (slot >= slots_per_queue_ || !q.slots[slot].in_flight || q.slots[slot].id != id) {
        ++counters_.bogus_responses;
        continue;
      }
      BlkfrontQueue::Slot& s = q.slots[slot];
      s.in_flight = false;
      --q.in_flight;
      EndSlotGrants(queue, slot);
      if (s.revoke_pending) ++counters_.grants_still_mapped;
      out[done++] = BlkfrontCompletion{queue, slot, operation, status, now - s.submit_ns};
    }
    if (done == out.size()) return done;  // the caller comes back for the rest
    if (!want_event) return done;         // polling: the caller looks again by itself
    // RING_FINAL_CHECK_FOR_RESPONSES: ask for a kick on the next response, then look again.
    SharedWord(q.ring, kRspEvent).store(q.rsp_cons + 1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (rsp_prod.load(std::memory_order_acquire) == q.rsp_cons) return done;
    if (q.req_prod_pushed == q.rsp_cons) return done;  // nothing outstanding; ignore the excess
  }
}

absl::StatusOr<bool> Blkfront::WaitForEvent(int timeout_ms) {
  std::array<pollfd, kMaxQueues> fds{};
  const size_t n = std::min(queues_.size(), fds.size());
  for (size_t i = 0; i < n; ++i) fds[i] = {queues_[i].event_channel->ReadinessFd(), POLLIN, 0};
  int ready = poll(fds.data(), n, timeout_ms);
  if (ready < 0) {
    if (errno == EINTR) return false;
    return absl::InternalError("poll on event channels failed");
  }
  if (ready == 0) return false;
  for (size_t i = 0; i < n; ++i) {
    if (fds[i].revents == 0) continue;
    auto acked = queues_[i].event_channel->Ack();
    if (!acked.ok()) return acked.status();
    if (*acked) ++counters_.events_received;
  }
  return true;
}

std::optional<common::xen::GrantRef> Blkfront::UnusedGrantRef() const {
  const uint64_t ring_refs = uint64_t{1u << ring_page_order_} * queues_.size();
  auto in = [](uint64_t ref, uint64_t first, uint64_t count) {
    return ref >= first && ref < first + count;
  };
  for (uint64_t ref = guest_->grant_entries(); ref-- > 0;) {
    if (in(ref, options_.first_ring_ref, ring_refs)) continue;
    if (in(ref, first_data_ref_, slot_refs_.size())) continue;
    return static_cast<common::xen::GrantRef>(ref);
  }
  return std::nullopt;
}

absl::Status Blkfront::BreakRing(uint32_t queue, uint32_t ahead) {
  if (queue >= queues_.size()) return absl::InvalidArgumentError("no such queue");
  BlkfrontQueue& q = queues_[queue];
  q.broken = true;
  SharedWord(q.ring, kReqProd).store(q.req_prod_pvt + ahead, std::memory_order_release);
  return q.event_channel->Notify();
}

}  // namespace blockplane::harness
