#include "tests/harness/xen/blkfront.h"

#include <poll.h>
#include <time.h>

#include <charconv>
#include <cstring>

#include "common/logging.h"

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
  for (const absl::Status& status : {order.status(), persistent.status(), flush.status(),
                                     discard.status(), max_queues.status()}) {
    if (!status.ok()) return status;
  }
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
  const uint32_t num_queues = std::max(1u, std::min(options_.num_queues, backend_info_.max_queues));
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
  return absl::OkStatus();
}

absl::Status Blkfront::PublishRing() {
  XenStore& store = platform_->xenstore();
  const std::string& fe = paths_.frontend;
  return store.RunTransaction([&](TransactionId tx) -> absl::Status {
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
    keys.emplace_back(fe + "/protocol", options_.protocol);
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
  // Wait for the backend to publish its features (InitWait), as blkfront's backend_changed().
  auto backend_state = WaitForXenbusState(
      store, paths_.backend + "/state", "blkfront-backend",
      [](XenbusState s) { return s == XenbusState::kInitWait || s == XenbusState::kConnected; },
      [](XenbusState s) { return s == XenbusState::kClosing || s == XenbusState::kClosed; },
      options_.timeout_ms);
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
  if (!all_revoked) {
    // Linux leaks such pages rather than reuse them; report it so tests catch a backend that
    // keeps the ring mapped after Closed.
    return absl::FailedPreconditionError("backend still maps the ring after Closed");
  }
  queues_.clear();
  return absl::OkStatus();
}

}  // namespace blockplane::harness
