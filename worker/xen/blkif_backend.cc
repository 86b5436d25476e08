#include "worker/xen/blkif_backend.h"

#include <errno.h>
#include <poll.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <list>
#include <optional>
#include <random>
#include <span>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "worker/xen/grant_ref_map.h"

namespace blockplane::worker::xen {
namespace {

using common::xen::GrantCopySegment;
using common::xen::GrantMapping;
using common::xen::GrantRef;
using common::xen::kNoTransaction;
using common::xen::TransactionId;
using common::xen::XenStore;

constexpr uint32_t kMaxQueuesLimit = kBlkifMaxQueues;
constexpr uint32_t kMaxRingPageOrderLimit = 4;  // XENBUS_MAX_RING_GRANT_ORDER

// A random, non-zero ring mark (blkif_ring.h: WriteRingMark).
uint64_t NewRingMark() {
  std::random_device device;
  uint64_t mark = 0;
  while (mark == 0) mark = uint64_t{device()} << 32 | device();
  return mark;
}

// Reads a decimal key. NotFound gives `fallback` when there is one; anything that is not a number
// is InvalidArgument (the frontend's directory is guest-writable).
absl::StatusOr<uint64_t> ReadNumber(XenStore& store, const std::string& path,
                                    std::optional<uint64_t> fallback) {
  absl::StatusOr<std::string> text = store.Read(path, kNoTransaction);
  if (!text.ok()) {
    if (absl::IsNotFound(text.status()) && fallback) return *fallback;
    return text.status();
  }
  uint64_t value = 0;
  if (text->empty() || text->size() > 20 ||
      !std::all_of(text->begin(), text->end(), [](char c) { return c >= '0' && c <= '9'; }) ||
      !absl::SimpleAtoi(*text, &value)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a number"));
  }
  return value;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Per-queue state.

// A batch of grants mapped together and kept as persistent grants: unmapped when the last of its
// pages leaves the cache.
struct BlkifBackend::GrantGroup {
  std::unique_ptr<GrantMapping> mapping;
};

struct BlkifBackend::PersistentGrant {
  GrantRef ref = 0;
  std::byte* page = nullptr;
  std::shared_ptr<GrantGroup> group;
  uint32_t users = 0;  // in-flight requests using the page
  std::list<GrantRef>::iterator lru;
  // Queue::lru_clock when last used, and when last put at the front of Queue::lru. A hit only
  // stamps `used`; the list is reordered when room is needed (MakeRoomForPersistent).
  uint64_t used = 0;
  uint64_t listed = 0;
};

// Runs PushResponses or ProcessQueue for one queue on a later pass (EventLoop::Defer).
class BlkifBackend::QueueKick final : public common::CompletionHandler {
 public:
  QueueKick(BlkifBackend* backend, Queue* queue, bool push)
      : backend_(backend), queue_(queue), push_(push) {}
  void OnCompletion(int32_t, uint32_t) override;

 private:
  BlkifBackend* backend_;
  Queue* queue_;
  bool push_;
};

// One request being served: its grants, its iovecs and the block-layer steps left.
struct BlkifBackend::Pending final : public BlockCompletion {
  enum class Step : uint8_t { kFlush, kRead, kWrite, kWriteFua, kDiscard };

  BlkifBackend* backend = nullptr;
  Queue* queue = nullptr;
  uint32_t journal_entry = 0;
  uint64_t id = 0;
  uint8_t echo_operation = 0;
  uint8_t data_operation = 0;
  uint64_t sector = 0;
  uint64_t discard_sectors = 0;
  uint32_t nr_segments = 0;
  uint64_t transfer_bytes = 0;
  std::vector<BlkifSegment> segments;  // sized for the largest request
  std::vector<iovec> iov;
  std::vector<std::byte*> pages;  // guest page of each segment
  std::vector<GrantRef> misses;
  std::vector<PersistentGrant*> persistent_used;
  std::unique_ptr<GrantMapping> mapping;  // per-request data mapping
  std::vector<GrantCopySegment> copy_segments;
  std::byte* bounce = nullptr;  // grant-copy mode
  size_t bounce_size = 0;
  std::array<Step, 2> steps{};
  uint8_t step_count = 0;
  uint8_t step_index = 0;

  ~Pending() { std::free(bounce); }
  void OnBlockComplete(int result) override { backend->OnStepDone(*this, result); }
};

struct BlkifBackend::Queue {
  Queue(BlkifBackend* backend, uint32_t index)
      : index(index),
        counters(*backend->counters_[index]),
        push_kick(backend, this, true),
        process_kick(backend, this, false) {}

  uint32_t index;
  BlkifCounters& counters;  // this queue's, in the stats segment
  std::optional<BlkifBackRing> ring;
  std::unique_ptr<common::xen::EventChannel> channel;
  common::EventLoop::FdWatch channel_watch = common::EventLoop::kInvalidFdWatch;
  bool stopped = false;  // broken frontend: no more requests taken
  uint32_t in_flight = 0;
  std::optional<BlkifRequest> held_barrier;  // waits for in-flight requests to finish
  uint32_t held_barrier_entry = 0;
  // Where each request is parsed into (ValidateRequestInto), reused: not built per request.
  BlkifRequest parsed;
  // Geometry() as of the start of the current ProcessQueue pass (it changes only between passes:
  // resize, discard withdrawn on a completion), instead of asking the device per request.
  DeviceGeometry geometry;
  // The request journal of this queue: free entries, entries whose response is written but not
  // yet pushed, and entries a crashed worker left to replay (replay_next onwards).
  JournalQueue* journal = nullptr;
  std::vector<uint32_t> journal_free;
  std::vector<uint32_t> answered;
  std::vector<uint32_t> replay;
  size_t replay_next = 0;
  QueueKick push_kick;
  QueueKick process_kick;
  bool push_scheduled = false;
  bool process_scheduled = false;
  int64_t last_request_ns = 0;  // loop time of the last poll that found requests (polling)
  // The frontend grants indirect pages read-only: they are not kept as persistent grants.
  bool indirect_read_only = false;
  std::vector<std::unique_ptr<Pending>> pool;
  std::vector<Pending*> free;
  GrantRefMap<PersistentGrant> persistent;
  // Front: most recently put there (a new grant, or one given a second chance on eviction).
  std::list<GrantRef> lru;
  uint64_t lru_clock = 0;  // stamps PersistentGrant::used / listed
};

void BlkifBackend::QueueKick::OnCompletion(int32_t, uint32_t) {
  if (push_) {
    queue_->push_scheduled = false;
    backend_->PushResponses(*queue_);
  } else {
    queue_->process_scheduled = false;
    backend_->ProcessQueue(*queue_);
  }
  if (backend_->disconnecting_) backend_->MaybeFinishDisconnect();
}

// ---------------------------------------------------------------------------------------------

BlkifBackend::BlkifBackend(common::EventLoop* loop, common::xen::XenPlatform* platform,
                           BlockDevice* device, BlkifBackendOptions options, Callbacks callbacks)
    : loop_(loop),
      platform_(platform),
      device_(device),
      options_(std::move(options)),
      callbacks_(std::move(callbacks)) {
  watch_token_ = absl::StrCat("blkback-", options_.frontend_domid, "-", options_.devid);
  for (uint32_t q = 0; q < kBlkifMaxQueues; ++q) {
    counters_[q] = options_.counters[q] ? options_.counters[q] : &own_counters_[q];
  }
  journal_ = options_.journal;
  if (journal_ == nullptr) {
    own_journal_ = BlkifJournal::InMemory();
    journal_ = own_journal_.get();
  }
}

BlkifBackend::~BlkifBackend() {
  if (xenstore_watch_) loop_->RemoveFd(xenstore_watch_);
  if (watching_) (void)platform_->xenstore().Unwatch(frontend_path_ + "/state", watch_token_);
  // Normally empty (Detach ran). When the process exits without detaching, the mappings are
  // released with it; I/O still owed a completion is not waited for.
  for (auto& queue : queues_) {
    if (queue->channel_watch) loop_->RemoveFd(queue->channel_watch);
  }
}

DeviceGeometry BlkifBackend::Geometry() const {
  BlockDeviceInfo info = device_->Info();
  DeviceGeometry g;
  g.sectors = info.capacity / kSectorSize;
  g.read_only = info.read_only;
  g.max_indirect_segments = max_indirect_segments_;
  g.discard_enabled = info.discard;
  g.flush_enabled = true;
  g.barrier_enabled = true;
  g.logical_block_size = info.logical_block_size;
  return g;
}

absl::Status BlkifBackend::SwitchState(XenbusState state) {
  if (state == backend_state_) return absl::OkStatus();
  absl::Status status = platform_->xenstore().Write(
      options_.backend_path + "/state", std::to_string(static_cast<int>(state)), kNoTransaction);
  if (!status.ok()) {
    BP_LOG(Error) << "blkback " << options_.backend_path << ": cannot switch to "
                  << XenbusStateName(state) << ": " << status.message();
    return status;
  }
  BP_LOG(Info) << "blkback " << options_.backend_path << ": " << XenbusStateName(backend_state_)
               << " -> " << XenbusStateName(state);
  const bool was_connected = backend_state_ == XenbusState::kConnected;
  backend_state_ = state;
  const bool connected = state == XenbusState::kConnected;
  if (was_connected != connected && callbacks_.on_connection_changed) {
    callbacks_.on_connection_changed(connected);
  }
  return absl::OkStatus();
}

absl::Status BlkifBackend::PublishFeatures() {
  const BlockDeviceInfo info = device_->Info();
  max_indirect_segments_ = std::min(options_.max_indirect_segments, kMaxIndirectSegmentsProtocol);
  const bool persistent = options_.grant_mode == GrantMode::kMap && options_.persistent_grants;
  uint32_t vdisk_info = 0;
  if (info.read_only) vdisk_info |= VDISK_READONLY;
  if (options_.cdrom) vdisk_info |= VDISK_CDROM;
  std::vector<std::pair<std::string, std::string>> keys = {
      {"feature-flush-cache", "1"},
      {"feature-barrier", "1"},
      {"feature-discard", info.discard ? "1" : "0"},
      {"feature-persistent", persistent ? "1" : "0"},
      {"feature-max-indirect-segments", std::to_string(max_indirect_segments_)},
      {"max-ring-page-order",
       std::to_string(std::min(options_.max_ring_page_order, kMaxRingPageOrderLimit))},
      {"multi-queue-max-queues",
       std::to_string(std::clamp(options_.max_queues, 1u, kMaxQueuesLimit))},
      {"sector-size", std::to_string(info.logical_block_size)},
      {"physical-sector-size", std::to_string(info.physical_block_size)},
      {"sectors", std::to_string(info.capacity / kSectorSize)},
      {"info", std::to_string(vdisk_info)},
  };
  if (info.discard) {
    const uint32_t granularity =
        info.discard_granularity ? info.discard_granularity : info.logical_block_size;
    keys.emplace_back("discard-granularity", std::to_string(granularity));
    keys.emplace_back("discard-alignment", "0");
    keys.emplace_back("discard-secure", "0");
  }
  XenStore& store = platform_->xenstore();
  return store.RunTransaction([&](TransactionId tx) -> absl::Status {
    for (const auto& [key, value] : keys) {
      if (absl::Status s = store.Write(options_.backend_path + "/" + key, value, tx); !s.ok()) {
        return s;
      }
    }
    return absl::OkStatus();
  });
}

absl::Status BlkifBackend::Start() {
  XenStore& store = platform_->xenstore();
  absl::StatusOr<std::string> frontend =
      store.Read(options_.backend_path + "/frontend", kNoTransaction);
  if (!frontend.ok()) {
    return absl::Status(
        frontend.status().code(),
        absl::StrCat("reading ", options_.backend_path,
                     "/frontend (written by the toolstack): ", frontend.status().message()));
  }
  frontend_path_ = *frontend;
  if (absl::StatusOr<XenbusState> s = [&]() -> absl::StatusOr<XenbusState> {
        auto v = ReadNumber(store, options_.backend_path + "/state", 0);
        if (!v.ok()) return v.status();
        return static_cast<XenbusState>(*v <= 8 ? *v : 0);
      }();
      s.ok()) {
    backend_state_ = *s;
  }
  if (absl::Status s = PublishFeatures(); !s.ok()) return s;
  // A frontend still Closed (or Closing) from an earlier connection, e.g. before this worker was
  // restarted, must re-initialise first: advertising InitWait now and bouncing to Closed on the
  // first watch event would close the backend under a frontend that starts connecting meanwhile.
  absl::StatusOr<uint64_t> frontend_state = ReadNumber(store, frontend_path_ + "/state", 0);
  bool frontend_closed =
      frontend_state.ok() && (*frontend_state == static_cast<uint64_t>(XenbusState::kClosing) ||
                              *frontend_state == static_cast<uint64_t>(XenbusState::kClosed));
  if (absl::Status s = SwitchState(frontend_closed ? XenbusState::kClosed : XenbusState::kInitWait);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = store.Watch(frontend_path_ + "/state", watch_token_); !s.ok()) return s;
  watching_ = true;
  xenstore_watch_ = loop_->AddFd(store.WatchFd(), POLLIN, [this](uint32_t) { OnXenstoreWatch(); });
  return absl::OkStatus();
}

void BlkifBackend::OnXenstoreWatch() {
  absl::StatusOr<std::vector<common::xen::XenStoreWatchEvent>> events =
      platform_->xenstore().ReadWatchEvents();
  if (!events.ok()) {
    BP_LOG(Error) << "blkback " << options_.backend_path
                  << ": reading xenstore watch events: " << events.status().message();
    return;
  }
  if (events->empty() || detaching_) return;
  OnFrontendStateChanged();
}

void BlkifBackend::OnFrontendStateChanged() {
  if (detaching_ || disconnecting_) return;  // re-evaluated when the disconnect finishes
  absl::StatusOr<uint64_t> value = ReadNumber(platform_->xenstore(), frontend_path_ + "/state", 0);
  XenbusState fe = XenbusState::kUnknown;
  if (value.ok() && *value <= 8) fe = static_cast<XenbusState>(*value);
  if (fe == frontend_state_ && fe != XenbusState::kInitialised && fe != XenbusState::kConnected) {
    return;
  }
  if (fe != frontend_state_) {
    BP_LOG(Info) << "blkback " << options_.backend_path << ": frontend "
                 << XenbusStateName(frontend_state_) << " -> " << XenbusStateName(fe);
  }
  frontend_state_ = fe;
  auto reevaluate = [this] { OnFrontendStateChanged(); };
  switch (fe) {
    case XenbusState::kInitialising:
    case XenbusState::kInitWait:
      // A frontend that reconnects after Closed (blkback frontend_changed()).
      if (backend_state_ == XenbusState::kClosed) (void)SwitchState(XenbusState::kInitWait);
      return;
    case XenbusState::kInitialised:
    case XenbusState::kConnected:
      if (backend_state_ != XenbusState::kInitWait && backend_state_ != XenbusState::kClosed) {
        return;  // connected already, or closing
      }
      if (absl::Status s = ConnectRings(); !s.ok()) {
        BP_LOG(Error) << "blkback " << options_.backend_path
                      << ": cannot connect the frontend's rings: " << s.message();
        ReleaseQueues();
        (void)platform_->xenstore().Write(options_.backend_path + "/error",
                                          std::string(s.message()), kNoTransaction);
        (void)SwitchState(XenbusState::kClosing);
        return;
      }
      if (absl::Status s = WriteConnectedInfo(); !s.ok()) {
        BP_LOG(Error) << "blkback " << options_.backend_path << ": " << s.message();
      }
      (void)SwitchState(XenbusState::kConnected);
      // Requests the frontend queued before we watched its event channel.
      for (auto& queue : queues_) ProcessQueue(*queue);
      return;
    case XenbusState::kClosing:
      if (backend_state_ == XenbusState::kClosing || backend_state_ == XenbusState::kClosed) return;
      Disconnect([this, reevaluate] {
        (void)SwitchState(XenbusState::kClosing);
        frontend_state_ = XenbusState::kUnknown;  // force a fresh look
        reevaluate();
      });
      return;
    case XenbusState::kClosed:
    case XenbusState::kUnknown:
    default:
      if (backend_state_ == XenbusState::kClosed) return;
      Disconnect([this, reevaluate] {
        (void)SwitchState(XenbusState::kClosed);
        frontend_state_ = XenbusState::kUnknown;
        reevaluate();
      });
      return;
  }
}

absl::Status BlkifBackend::ConnectRings() {
  XenStore& store = platform_->xenstore();
  const std::string& fe = frontend_path_;
  absl::StatusOr<std::string> protocol_name = store.Read(fe + "/protocol", kNoTransaction);
  std::optional<Protocol> protocol = Protocol::kNative;
  if (protocol_name.ok()) {
    protocol = ParseProtocolName(*protocol_name);
    if (!protocol) return absl::InvalidArgumentError("unsupported protocol " + *protocol_name);
  } else if (!absl::IsNotFound(protocol_name.status())) {
    return protocol_name.status();
  }
  absl::StatusOr<uint64_t> order = ReadNumber(store, fe + "/ring-page-order", 0);
  if (!order.ok()) return order.status();
  if (*order > std::min(options_.max_ring_page_order, kMaxRingPageOrderLimit)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ring-page-order ", *order, " above ", options_.max_ring_page_order));
  }
  absl::StatusOr<uint64_t> num_queues = ReadNumber(store, fe + "/multi-queue-num-queues", 1);
  if (!num_queues.ok()) return num_queues.status();
  if (*num_queues == 0 || *num_queues > std::clamp(options_.max_queues, 1u, kMaxQueuesLimit)) {
    return absl::InvalidArgumentError(
        absl::StrCat("multi-queue-num-queues ", *num_queues, " outside 1..", options_.max_queues));
  }
  bool persistent = false;
  if (options_.grant_mode == GrantMode::kMap && options_.persistent_grants) {
    absl::StatusOr<uint64_t> p = ReadNumber(store, fe + "/feature-persistent", 0);
    if (!p.ok()) return p.status();
    persistent = *p != 0;
  }

  const uint32_t pages = 1u << *order;
  const uint32_t queues = static_cast<uint32_t>(*num_queues);
  std::vector<GrantRef> refs;
  std::vector<uint32_t> ports;
  for (uint32_t q = 0; q < queues; ++q) {
    const std::string dir = queues > 1 ? absl::StrCat(fe, "/queue-", q) : fe;
    for (uint32_t i = 0; i < pages; ++i) {
      absl::StatusOr<uint64_t> ref = ReadNumber(
          store, *order == 0 ? dir + "/ring-ref" : absl::StrCat(dir, "/ring-ref", i), std::nullopt);
      if (!ref.ok()) return ref.status();
      if (*ref > UINT32_MAX) return absl::InvalidArgumentError("ring-ref out of range");
      refs.push_back(static_cast<GrantRef>(*ref));
    }
    absl::StatusOr<uint64_t> port = ReadNumber(store, dir + "/event-channel", std::nullopt);
    if (!port.ok()) return port.status();
    if (*port > UINT32_MAX) return absl::InvalidArgumentError("event-channel out of range");
    ports.push_back(static_cast<uint32_t>(*port));
  }

  // Every ring page of every queue in one batched map.
  absl::StatusOr<std::unique_ptr<GrantMapping>> mapping =
      platform_->grant_table().Map(options_.frontend_domid, refs, /*writable=*/true);
  if (!mapping.ok()) {
    counters_[0]->grant_map_failures.Add();
    return mapping.status();
  }
  for (uint32_t q = 0; q < queues; ++q) counters_[q]->grant_maps.Add(pages);
  mapped_pages_ += refs.size();
  std::shared_ptr<GrantMapping> rings(std::move(*mapping));
  ring_mapping_ = rings;  // released by ReleaseQueues(), also when the rest fails

  protocol_ = *protocol;
  ring_page_order_ = static_cast<uint32_t>(*order);
  use_persistent_ = persistent;
  queues_.clear();
  JournalIdentity identity;
  identity.frontend_domid = options_.frontend_domid;
  identity.devid = options_.devid;
  identity.protocol = static_cast<uint32_t>(protocol_);
  identity.ring_page_order = ring_page_order_;
  identity.num_queues = queues;
  for (uint32_t q = 0; q < queues && q < kJournalMaxQueues; ++q) {
    identity.ring_refs[q] = refs[size_t{q} * pages];
    identity.event_channels[q] = ports[q];
  }
  // Each queue's ring pages.
  auto ring_bytes = [&](uint32_t q) {
    return rings->bytes().subspan(size_t{q} * pages * kXenPageSize, size_t{pages} * kXenPageSize);
  };
  auto as_u8 = [](std::span<std::byte> bytes) {
    return std::span<uint8_t>(reinterpret_cast<uint8_t*>(bytes.data()), bytes.size());
  };
  // The mark every queue's ring carries (0 if they differ or carry none): the rings a crashed
  // worker of this connection served still carry the one it recorded (blkif_journal.h).
  identity.ring_mark = ReadRingMark(as_u8(ring_bytes(0)));
  for (uint32_t q = 1; q < queues; ++q) {
    if (ReadRingMark(as_u8(ring_bytes(q))) != identity.ring_mark) identity.ring_mark = 0;
  }
  // The frontend is still connected to the rings a crashed worker of this device served.
  const bool resume = identity.ring_mark != 0 && journal_->Recorded(identity);
  if (!resume) {
    if (std::optional<JournalIdentity> recorded = journal_->RecordedIdentity()) {
      JournalIdentity same_rings = identity;
      same_rings.ring_mark = recorded->ring_mark;
      if (same_rings == *recorded) {
        BP_LOG(Warning) << "blkback " << options_.backend_path
                        << ": the frontend started its rings over on the same grant refs and "
                           "event channels (the backend's mark is gone): the request journal of "
                           "the previous rings is not applied";
      }
    }
    identity.ring_mark = NewRingMark();
    for (uint32_t q = 0; q < queues; ++q) WriteRingMark(as_u8(ring_bytes(q)), identity.ring_mark);
  }
  std::vector<uint32_t> starts;
  const uint32_t max_segments =
      std::max<uint32_t>(BLKIF_MAX_SEGMENTS_PER_REQUEST, max_indirect_segments_);
  for (uint32_t q = 0; q < queues; ++q) {
    auto queue = std::make_unique<Queue>(this, q);
    if (absl::Status s = AttachQueue(*queue, ring_bytes(q), resume); !s.ok()) return s;
    starts.push_back(queue->ring->rsp_prod_pvt());
    absl::StatusOr<std::unique_ptr<common::xen::EventChannel>> channel =
        platform_->BindInterdomain(options_.frontend_domid, ports[q]);
    if (!channel.ok()) return channel.status();
    queue->channel = std::move(*channel);
    const uint32_t entries = queue->ring->size();
    queue->pool.reserve(entries);
    for (uint32_t i = 0; i < entries; ++i) {
      auto pending = std::make_unique<Pending>();
      pending->backend = this;
      pending->queue = queue.get();
      pending->segments.resize(max_segments);
      pending->iov.reserve(max_segments);
      pending->pages.resize(max_segments);
      queue->free.push_back(pending.get());
      queue->pool.push_back(std::move(pending));
    }
    Queue* raw = queue.get();
    queue->channel_watch =
        loop_->AddFd(queue->channel->ReadinessFd(), POLLIN, [this, raw](uint32_t) {
          (void)raw->channel->Ack();
          raw->counters.notifications_received.Add();
          ProcessQueue(*raw);
        });
    queues_.push_back(std::move(queue));
  }
  if (!resume) journal_->Begin(identity, starts);
  journal_recording_ = true;
  BP_LOG(Info) << "blkback " << options_.backend_path << ": " << queues << " queue(s), " << pages
               << " ring page(s) each, protocol " << ProtocolName(protocol_)
               << (use_persistent_ ? ", persistent grants" : "")
               << (options_.grant_mode == GrantMode::kCopy ? ", grant copy" : "");
  return absl::OkStatus();
}

absl::Status BlkifBackend::AttachQueue(Queue& queue, std::span<std::byte> bytes, bool resume) {
  // Resume after the last published response (BACK_RING_ATTACH): 0 on a fresh ring, and where a
  // previous worker of this device stopped if it crashed while the frontend stayed connected.
  // Read once; a bogus value (the page is guest-writable) at worst makes the journal look
  // inconsistent (this queue then starts afresh) or the ring look overflowed (it stops).
  const RingIdx rsp_prod =
      std::atomic_ref<uint32_t>(
          *reinterpret_cast<uint32_t*>(bytes.data() + offsetof(blkif_sring, rsp_prod)))
          .load(std::memory_order_acquire);
  const std::span<uint8_t> shared(reinterpret_cast<uint8_t*>(bytes.data()), bytes.size());
  const uint32_t size = RingEntries(protocol_, bytes.size());
  if (size == 0 || size > kJournalMaxEntries) {
    return absl::InvalidArgumentError(absl::StrCat("ring of ", size, " entries"));
  }
  queue.journal = &journal_->queue(queue.index);
  queue.journal_free.clear();
  queue.journal_free.reserve(size);
  queue.answered.clear();
  queue.answered.reserve(size);
  queue.replay.clear();
  queue.replay_next = 0;
  uint32_t taken = 0;
  if (resume) {
    JournalQueue& jq = *queue.journal;
    const RingIdx req_cons = jq.req_cons.load(std::memory_order_acquire);
    QueueRecoveryPlan plan = PlanQueueRecovery(std::span<const JournalEntry>(jq.entries, size),
                                               size, req_cons, rsp_prod);
    if (plan.consistent) {
      // Before anything is published: replayed entries are "taken, no response" again.
      for (uint32_t entry : plan.replay) BlkifJournal::MarkTaken(jq, entry);
      for (uint32_t entry : plan.discard) BlkifJournal::Clear(jq, entry);
      queue.replay = std::move(plan.replay);
      queue.counters.requests_replayed.Add(queue.replay.size());
      taken = req_cons - rsp_prod;
      BP_LOG(Info) << "blkback " << options_.backend_path << ": queue " << queue.index
                   << " resumed at rsp_prod " << rsp_prod << ", req_cons " << req_cons << ": "
                   << queue.replay.size() << " request(s) to answer again, " << plan.discard.size()
                   << " journal entr(ies) already answered or not taken";
    } else {
      BP_LOG(Error) << "blkback " << options_.backend_path << ": queue " << queue.index
                    << ": request journal does not match the ring (req_cons " << req_cons
                    << ", rsp_prod " << rsp_prod << ", " << plan.replay.size()
                    << " unanswered); starting it afresh";
      journal_->ResetQueue(queue.index, rsp_prod);
    }
  }
  absl::StatusOr<BlkifBackRing> ring = BlkifBackRing::Attach(protocol_, shared, rsp_prod, taken);
  if (!ring.ok()) return ring.status();
  queue.ring.emplace(std::move(*ring));
  std::vector<bool> in_use(size, false);
  for (uint32_t entry : queue.replay) in_use[entry] = true;
  for (uint32_t entry = size; entry-- > 0;) {
    if (!in_use[entry]) queue.journal_free.push_back(entry);
  }
  return absl::OkStatus();
}

absl::Status BlkifBackend::WriteConnectedInfo() {
  const BlockDeviceInfo info = device_->Info();
  uint32_t vdisk_info = 0;
  if (info.read_only) vdisk_info |= VDISK_READONLY;
  if (options_.cdrom) vdisk_info |= VDISK_CDROM;
  XenStore& store = platform_->xenstore();
  const std::string& be = options_.backend_path;
  return store.RunTransaction([&](TransactionId tx) -> absl::Status {
    for (const auto& [key, value] : std::vector<std::pair<std::string, std::string>>{
             {"sectors", std::to_string(info.capacity / kSectorSize)},
             {"info", std::to_string(vdisk_info)},
             {"sector-size", std::to_string(info.logical_block_size)},
             {"physical-sector-size", std::to_string(info.physical_block_size)}}) {
      if (absl::Status s = store.Write(be + "/" + key, value, tx); !s.ok()) return s;
    }
    return absl::OkStatus();
  });
}

absl::Status BlkifBackend::Resize() {
  const uint64_t sectors = device_->capacity() / kSectorSize;
  XenStore& store = platform_->xenstore();
  const std::string& be = options_.backend_path;
  // As xen_vbd_resize(): sectors and a rewrite of state in one transaction, so the frontend's
  // state watch fires and it re-reads sectors.
  absl::Status status = store.RunTransaction([&](TransactionId tx) -> absl::Status {
    if (absl::Status s = store.Write(be + "/sectors", std::to_string(sectors), tx); !s.ok()) {
      return s;
    }
    absl::StatusOr<std::string> state = store.Read(be + "/state", tx);
    if (!state.ok()) return state.status();
    return store.Write(be + "/state", *state, tx);
  });
  if (status.ok()) {
    BP_LOG(Info) << "blkback " << be << ": resized to " << sectors << " sectors";
  }
  return status;
}

void BlkifBackend::Detach(std::function<void()> done) {
  detaching_ = true;
  // Closing tells a frontend to let go; a backend already Closed (its frontend closed first) has
  // nobody to tell, and a Closing there would send a closed frontend through its close path again.
  if (backend_state_ != XenbusState::kClosed) (void)SwitchState(XenbusState::kClosing);
  auto finish = [this, done = std::move(done)] {
    (void)SwitchState(XenbusState::kClosed);
    if (xenstore_watch_) loop_->RemoveFd(xenstore_watch_);
    xenstore_watch_ = common::EventLoop::kInvalidFdWatch;
    if (watching_) (void)platform_->xenstore().Unwatch(frontend_path_ + "/state", watch_token_);
    watching_ = false;
    done();
  };
  if (disconnecting_) {
    // A frontend-initiated disconnect is under way: chain onto it.
    auto previous = std::move(after_disconnect_);
    after_disconnect_ = [previous = std::move(previous), finish = std::move(finish)] {
      if (previous) previous();
      finish();
    };
    return;
  }
  Disconnect(std::move(finish));
}

void BlkifBackend::Disconnect(std::function<void()> then) {
  disconnecting_ = true;
  after_disconnect_ = std::move(then);
  for (auto& queue : queues_) {
    if (queue->channel_watch) loop_->RemoveFd(queue->channel_watch);
    queue->channel_watch = common::EventLoop::kInvalidFdWatch;
    queue->held_barrier.reset();
  }
  MaybeFinishDisconnect();
}

void BlkifBackend::MaybeFinishDisconnect() {
  if (!disconnecting_) return;
  for (const auto& queue : queues_) {
    if (queue->in_flight != 0 || queue->push_scheduled || queue->process_scheduled) return;
  }
  ReleaseQueues();
  disconnecting_ = false;
  std::function<void()> then = std::move(after_disconnect_);
  after_disconnect_ = nullptr;
  if (then) then();
}

void BlkifBackend::ReleaseQueues() {
  for (auto& queue : queues_) {
    if (queue->channel_watch) loop_->RemoveFd(queue->channel_watch);
    queue->channel_watch = common::EventLoop::kInvalidFdWatch;
    // Every persistent grant goes (blkback's free_persistent_gnts at disconnect).
    while (!queue->lru.empty()) {
      EvictPersistent(*queue, queue->persistent.Find(queue->lru.back()));
    }
    queue->channel.reset();
    queue->ring.reset();
  }
  queues_.clear();
  if (journal_recording_) {
    // A clean disconnect: no request is owed any more.
    journal_->End();
    journal_recording_ = false;
  }
  if (ring_mapping_) {
    const size_t pages = ring_mapping_->refs().size();
    (void)ring_mapping_->Unmap();
    ring_mapping_.reset();
    // Each queue's ring pages are consecutive in the mapping (see ConnectRings).
    const size_t per_queue = size_t{1} << ring_page_order_;
    for (size_t q = 0; q < pages / per_queue; ++q) counters_[q]->grant_unmaps.Add(per_queue);
    mapped_pages_ -= pages;
  }
  use_persistent_ = false;
}

BlkifFrontendInfo BlkifBackend::FrontendInfo() const {
  BlkifFrontendInfo info;
  info.backend_state = backend_state_;
  info.frontend_state = frontend_state_;
  info.num_queues = static_cast<uint32_t>(queues_.size());
  if (!queues_.empty()) info.protocol = std::string(ProtocolName(protocol_));
  info.persistent_grants = use_persistent_;
  info.ring_page_order = ring_page_order_;
  return info;
}

BlkifBackendStats BlkifBackend::Stats() const {
  BlkifBackendStats s;
  for (const BlkifCounters* c : counters_) {
    s.requests_taken += c->requests_taken.Get();
    s.responses += c->responses.Get();
    s.notifications_sent += c->notifications_sent.Get();
    s.notifications_received += c->notifications_received.Get();
    s.ring_full_stalls += c->ring_full_stalls.Get();
    s.broken_queues += c->broken_queues.Get();
    for (size_t i = 0; i < kInvalidReasonCount; ++i) s.invalid[i] += c->invalid[i].Get();
    s.io_errors += c->io_errors.Get();
    s.grant_maps += c->grant_maps.Get();
    s.grant_map_failures += c->grant_map_failures.Get();
    s.grant_unmaps += c->grant_unmaps.Get();
    s.grant_copies += c->grant_copies.Get();
    s.grant_copy_failures += c->grant_copy_failures.Get();
    s.persistent_hits += c->persistent_hits.Get();
    s.persistent_misses += c->persistent_misses.Get();
    s.persistent_evictions += c->persistent_evictions.Get();
    s.requests_replayed += c->requests_replayed.Get();
  }
  s.persistent_grants_mapped = persistent_mapped_.Get();
  s.in_flight = in_flight_.Get();
  return s;
}

// ---------------------------------------------------------------------------------------------
// Data path.

void BlkifBackend::ProcessQueue(Queue& queue) {
  if (!queue.ring || queue.stopped || disconnecting_ || detaching_ || queue.held_barrier) return;
  // Responses written on this pass go out before new requests are taken: the frontend starts
  // refilling the ring while this pass parses and submits.
  if (!queue.answered.empty()) PushResponses(queue);
  uint32_t budget = options_.max_requests_per_pass;
  queue.geometry = Geometry();
  // Requests a crashed worker took and did not answer come first.
  while (budget > 0 && !queue.held_barrier && queue.replay_next < queue.replay.size()) {
    --budget;
    TakeJournaled(queue, queue.replay[queue.replay_next++]);
  }
  if (queue.replay_next < queue.replay.size()) budget = 0;  // not done: continue next pass
  while (budget > 0 && !queue.held_barrier) {
    absl::StatusOr<uint32_t> available = queue.ring->PollRequests();
    if (!available.ok()) {
      StopQueue(queue, available.status());
      return;
    }
    if (*available == 0) {
      if (options_.poll_ns > 0 &&
          loop_->now_ns() - queue.last_request_ns < static_cast<int64_t>(options_.poll_ns)) {
        // Polling: look again on the next pass, without asking the frontend for a kick.
        if (!queue.process_scheduled) {
          queue.process_scheduled = true;
          loop_->Defer(&queue.process_kick, 0);
        }
        return;
      }
      if (queue.ring->FinalCheckForRequests()) continue;
      return;
    }
    if (options_.poll_ns > 0) queue.last_request_ns = loop_->now_ns();
    if (queue.ring->outstanding() + *available >= queue.ring->size())
      queue.counters.ring_full_stalls.Add();
    uint32_t taken = 0;
    while (budget > 0 && !queue.held_barrier && !queue.stopped) {
      std::optional<std::span<const uint8_t>> slot = queue.ring->NextRequestSlot();
      if (!slot) break;
      --budget;
      ++taken;
      TakeRequest(queue, *slot);
    }
    queue.counters.requests_taken.Add(taken);  // once per batch: the counters are shared memory
    if (queue.stopped) return;
  }
  if (budget == 0 && !queue.process_scheduled) {
    // More may be waiting: yield to the rest of the loop, continue on the next pass.
    queue.process_scheduled = true;
    loop_->Defer(&queue.process_kick, 0);
  }
}

void BlkifBackend::StopQueue(Queue& queue, const absl::Status& why) {
  BP_LOG(Error) << "blkback " << options_.backend_path << ": queue " << queue.index
                << " stopped, the frontend broke the ring protocol: " << why.message();
  queue.counters.broken_queues.Add();
  queue.stopped = true;
  if (queue.channel_watch) loop_->RemoveFd(queue.channel_watch);
  queue.channel_watch = common::EventLoop::kInvalidFdWatch;
}

void BlkifBackend::TakeRequest(Queue& queue, std::span<const uint8_t> slot) {
  if (queue.journal_free.empty()) {
    // An honest frontend cannot get here: it has at most a ring of requests without a published
    // response, and entries are freed when responses are published.
    StopQueue(queue, absl::DataLossError("more requests outstanding than the ring holds"));
    return;
  }
  const uint32_t entry = queue.journal_free.back();
  queue.journal_free.pop_back();
  // The single fetch of the slot from guest memory: into the journal, then parsed from there
  // (the journal entry is the private copy that is validated and executed). The barrier keeps the
  // compiler from reading the guest's slot instead of the journal entry after the copy.
  journal_->Record(*queue.journal, entry, queue.ring->req_cons() - 1, slot);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  TakeJournaled(queue, entry);
}

void BlkifBackend::TakeJournaled(Queue& queue, uint32_t entry) {
  const JournalEntry& recorded = queue.journal->entries[entry];
  const std::span<const uint8_t> copy(
      recorded.request, std::min<size_t>(recorded.request_size, kJournalRequestBytes));
  if (std::optional<RequestError> error =
          ValidateRequestInto(protocol_, copy, queue.geometry, &queue.parsed)) {
    Refuse(queue, *error, entry);
    return;
  }
  const BlkifRequest& request = queue.parsed;
  if (request.operation == BLKIF_OP_WRITE_BARRIER && queue.in_flight > 0) {
    // blkback drains the ring's in-flight I/O before a barrier (xen_blk_drain_io).
    queue.held_barrier = request;
    queue.held_barrier_entry = entry;
    return;
  }
  StartRequest(queue, request, entry);
}

void BlkifBackend::Refuse(Queue& queue, const RequestError& error, uint32_t entry) {
  queue.counters.invalid[static_cast<size_t>(error.reason)].Add();
  RespondLater(queue, error.id, error.operation, error.status, entry);
}

absl::Status BlkifBackend::MapData(Pending& p, bool writable) {
  p.misses.clear();
  for (uint32_t i = 0; i < p.nr_segments; ++i) p.misses.push_back(p.segments[i].gref);
  absl::StatusOr<std::unique_ptr<GrantMapping>> mapping =
      platform_->grant_table().Map(options_.frontend_domid, p.misses, writable);
  if (!mapping.ok()) {
    p.queue->counters.grant_map_failures.Add();
    return mapping.status();
  }
  p.queue->counters.grant_maps.Add(p.nr_segments);
  mapped_pages_ += p.nr_segments;
  p.mapping = std::move(*mapping);
  for (uint32_t i = 0; i < p.nr_segments; ++i) p.pages[i] = p.mapping->page(i).data();
  return absl::OkStatus();
}

absl::Status BlkifBackend::MapPersistent(Queue& queue, Pending& p) {
  p.misses.clear();
  for (uint32_t i = 0; i < p.nr_segments; ++i) {
    const GrantRef ref = p.segments[i].gref;
    if (PersistentGrant* found = queue.persistent.Find(ref)) {
      queue.counters.persistent_hits.Add();
      PersistentGrant& grant = *found;
      ++grant.users;
      grant.used = ++queue.lru_clock;
      p.persistent_used.push_back(&grant);
      p.pages[i] = grant.page;
    } else {
      queue.counters.persistent_misses.Add();
      p.pages[i] = nullptr;
      if (std::find(p.misses.begin(), p.misses.end(), ref) == p.misses.end()) {
        p.misses.push_back(ref);
      }
    }
  }
  if (p.misses.empty()) return absl::OkStatus();
  // Persistent grants are mapped writable: a page granted for a write may serve a read later
  // (Linux blkfront grants persistent pages read-write).
  absl::StatusOr<std::unique_ptr<GrantMapping>> mapping =
      platform_->grant_table().Map(options_.frontend_domid, p.misses, /*writable=*/true);
  if (!mapping.ok()) {
    queue.counters.grant_map_failures.Add();
    return mapping.status();
  }
  queue.counters.grant_maps.Add(p.misses.size());
  mapped_pages_ += p.misses.size();
  // Make room by releasing unused least-recently-used grants; if the cache is still too full,
  // these pages are used for this request only (blkback maps them non-persistently too).
  const bool keep = MakeRoomForPersistent(queue, p.misses.size());
  std::shared_ptr<GrantGroup> group;
  if (keep) {
    group = std::make_shared<GrantGroup>();
    group->mapping = std::move(*mapping);
  } else {
    p.mapping = std::move(*mapping);
  }
  GrantMapping& pages = keep ? *group->mapping : *p.mapping;
  for (size_t j = 0; j < p.misses.size(); ++j) {
    std::byte* page = pages.page(j).data();
    if (keep) {
      PersistentGrant& grant = queue.persistent.FindOrInsert(p.misses[j]);
      grant.ref = p.misses[j];
      grant.page = page;
      grant.group = group;
      grant.users = 1;
      queue.lru.push_front(grant.ref);
      grant.lru = queue.lru.begin();
      grant.used = grant.listed = ++queue.lru_clock;
      p.persistent_used.push_back(&grant);
      persistent_mapped_.Add();
    }
    for (uint32_t i = 0; i < p.nr_segments; ++i) {
      if (p.pages[i] == nullptr && p.segments[i].gref == p.misses[j]) p.pages[i] = page;
    }
  }
  return absl::OkStatus();
}

bool BlkifBackend::MakeRoomForPersistent(Queue& queue, size_t pages) {
  const size_t cap = options_.max_persistent_grants;
  auto victim = queue.lru.end();
  // From the back (longest at its place). A grant used since it was put there gets a second
  // chance at the front instead (hits do not move list nodes: see PersistentGrant::used); it is
  // looked at again only after every other grant. Each grant moves at most once per call.
  while (queue.persistent.size() + pages > cap && victim != queue.lru.begin()) {
    --victim;
    PersistentGrant& grant = *queue.persistent.Find(*victim);
    if (grant.used != grant.listed) {
      auto next = victim;
      ++next;
      grant.listed = grant.used;
      queue.lru.splice(queue.lru.begin(), queue.lru, victim);
      victim = next;
      continue;
    }
    if (grant.users != 0) continue;
    auto next = victim;
    ++next;
    EvictPersistent(queue, &grant);
    victim = next;
  }
  return queue.persistent.size() + pages <= cap;
}

absl::StatusOr<const std::byte*> BlkifBackend::IndirectPagePersistent(
    Queue& queue, GrantRef ref, std::unique_ptr<GrantMapping>* temporary) {
  if (PersistentGrant* found = queue.persistent.Find(ref)) {
    queue.counters.persistent_hits.Add();
    found->used = ++queue.lru_clock;
    return found->page;
  }
  queue.counters.persistent_misses.Add();
  // Writable like every persistent grant: the page may carry data in a later request.
  absl::StatusOr<std::unique_ptr<GrantMapping>> mapping = platform_->grant_table().Map(
      options_.frontend_domid, std::span<const GrantRef>(&ref, 1), /*writable=*/true);
  if (!mapping.ok()) return mapping.status();  // the caller falls back to a read-only map
  queue.counters.grant_maps.Add();
  if (!MakeRoomForPersistent(queue, 1)) {
    *temporary = std::move(*mapping);
    return (*temporary)->page(0).data();
  }
  mapped_pages_ += 1;
  auto group = std::make_shared<GrantGroup>();
  group->mapping = std::move(*mapping);
  PersistentGrant& grant = queue.persistent.FindOrInsert(ref);
  grant.ref = ref;
  grant.page = group->mapping->page(0).data();
  grant.group = std::move(group);
  grant.users = 0;
  queue.lru.push_front(ref);
  grant.lru = queue.lru.begin();
  grant.used = grant.listed = ++queue.lru_clock;
  persistent_mapped_.Add();
  return grant.page;
}

void BlkifBackend::EvictPersistent(Queue& queue, PersistentGrant* grant) {
  std::shared_ptr<GrantGroup> group = std::move(grant->group);
  queue.lru.erase(grant->lru);
  queue.persistent.Erase(grant->ref);  // resets *grant
  queue.counters.persistent_evictions.Add();
  persistent_mapped_.Sub();
  if (group.use_count() == 1) {
    const size_t pages = group->mapping->refs().size();
    (void)group->mapping->Unmap();
    queue.counters.grant_unmaps.Add(pages);
    mapped_pages_ -= pages;
  }
}

void BlkifBackend::BuildCopySegments(Pending& p) {
  p.copy_segments.clear();
  size_t offset = 0;
  for (uint32_t i = 0; i < p.nr_segments; ++i) {
    const BlkifSegment& seg = p.segments[i];
    GrantCopySegment c;
    c.direction = p.data_operation == BLKIF_OP_READ ? GrantCopySegment::Direction::kToGrant
                                                    : GrantCopySegment::Direction::kFromGrant;
    c.domid = options_.frontend_domid;
    c.ref = seg.gref;
    c.offset = static_cast<uint16_t>(seg.offset_bytes());
    c.len = static_cast<uint16_t>(seg.length_bytes());
    c.local = p.bounce + offset;
    offset += seg.length_bytes();
    p.copy_segments.push_back(c);
  }
}

void BlkifBackend::StartRequest(Queue& queue, const BlkifRequest& request, uint32_t entry) {
  if (queue.free.empty()) {  // cannot happen: one Pending per ring slot
    RespondLater(queue, request.id, request.data_operation(), BLKIF_RSP_ERROR, entry);
    return;
  }
  Pending& p = *queue.free.back();
  queue.free.pop_back();
  p.journal_entry = entry;
  p.id = request.id;
  p.echo_operation = request.data_operation();
  p.data_operation = request.data_operation();
  p.sector = request.sector_number;
  p.nr_segments = 0;
  p.transfer_bytes = request.transfer_bytes;
  p.step_index = 0;
  p.step_count = 0;
  p.iov.clear();
  p.persistent_used.clear();

  auto fail = [&](int16_t status) {
    ReleaseGrants(p);
    queue.free.push_back(&p);
    RespondLater(queue, p.id, p.echo_operation, status, p.journal_entry);
  };

  switch (request.operation) {
    case BLKIF_OP_DISCARD:
      if (request.discard.secure) {
        // discard-secure is not advertised: blkback answers EOPNOTSUPP.
        queue.counters.invalid[static_cast<size_t>(InvalidReason::kNotAdvertised)].Add();
        return fail(BLKIF_RSP_EOPNOTSUPP);
      }
      p.sector = request.discard.sector;
      p.discard_sectors = request.discard.nr_sectors;
      p.steps[p.step_count++] = Pending::Step::kDiscard;
      break;
    case BLKIF_OP_FLUSH_DISKCACHE:
      p.steps[p.step_count++] = Pending::Step::kFlush;
      if (request.nr_segments > 0) p.steps[p.step_count++] = Pending::Step::kWrite;
      p.data_operation = BLKIF_OP_WRITE;
      break;
    case BLKIF_OP_WRITE_BARRIER:
      // PREFLUSH | FUA, as blkback.
      p.steps[p.step_count++] = Pending::Step::kFlush;
      p.steps[p.step_count++] = Pending::Step::kWriteFua;
      p.data_operation = BLKIF_OP_WRITE;
      break;
    case BLKIF_OP_READ:
      p.steps[p.step_count++] = Pending::Step::kRead;
      break;
    case BLKIF_OP_WRITE:
      p.steps[p.step_count++] = Pending::Step::kWrite;
      break;
    case BLKIF_OP_INDIRECT:
      p.steps[p.step_count++] =
          request.indirect.op == BLKIF_OP_READ ? Pending::Step::kRead : Pending::Step::kWrite;
      break;
    default:
      return fail(BLKIF_RSP_EOPNOTSUPP);
  }

  if (request.is_indirect()) {
    // The descriptor pages are copied out once by the parser. With persistent grants a one-page
    // list (up to 512 segments) goes through the persistent-grant cache, as in blkback, whose
    // frontend grants indirect pages from its persistent pool: a warm request maps nothing.
    // Otherwise the pages are mapped read-only for the copy and unmapped.
    // A frontend that grants its indirect pages read-only (allowed: the backend only reads them)
    // cannot have them mapped writable: its queue goes back to mapping them per request.
    std::unique_ptr<GrantMapping> temporary;
    std::span<const std::byte> bytes;
    if (use_persistent_ && !queue.indirect_read_only && request.indirect.nr_pages == 1) {
      absl::StatusOr<const std::byte*> page =
          IndirectPagePersistent(queue, request.indirect.grefs[0], &temporary);
      if (page.ok()) {
        bytes = std::span<const std::byte>(*page, kXenPageSize);
      } else {
        queue.indirect_read_only = true;
        BP_LOG(Info) << "blkback " << options_.backend_path << ": queue " << queue.index
                     << ": indirect page not writable (" << page.status().message()
                     << "); indirect pages are mapped per request from now on";
      }
    }
    if (bytes.empty()) {
      absl::StatusOr<std::unique_ptr<GrantMapping>> pages = platform_->grant_table().Map(
          options_.frontend_domid,
          std::span<const GrantRef>(request.indirect.grefs.data(), request.indirect.nr_pages),
          /*writable=*/false);
      if (pages.ok()) {
        queue.counters.grant_maps.Add(request.indirect.nr_pages);
        temporary = std::move(*pages);
        bytes = temporary->bytes();
      } else {
        queue.counters.grant_map_failures.Add();
      }
    }
    if (bytes.empty()) {
      queue.counters.invalid[static_cast<size_t>(InvalidReason::kBadIndirect)].Add();
      return fail(BLKIF_RSP_ERROR);
    }
    Parsed<IndirectSegments> segments = ParseIndirectSegments(
        request,
        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()),
        Geometry(), std::span<BlkifSegment>(p.segments));
    if (temporary) {
      const size_t pages = temporary->refs().size();
      (void)temporary->Unmap();
      queue.counters.grant_unmaps.Add(pages);
    }
    if (!segments.ok()) {
      queue.counters.invalid[static_cast<size_t>(segments.error().reason)].Add();
      return fail(segments.error().status);
    }
    p.nr_segments = segments.value().nr_segments;
    p.transfer_bytes = segments.value().transfer_bytes;
  } else {
    p.nr_segments = request.nr_segments;
    std::copy_n(request.segments.begin(), request.nr_segments, p.segments.begin());
  }

  if (p.nr_segments > 0) {
    if (options_.grant_mode == GrantMode::kCopy) {
      if (p.bounce_size < p.transfer_bytes) {
        std::free(p.bounce);
        p.bounce_size = (p.transfer_bytes + kXenPageSize - 1) / kXenPageSize * kXenPageSize;
        p.bounce = static_cast<std::byte*>(std::aligned_alloc(kXenPageSize, p.bounce_size));
        if (p.bounce == nullptr) {
          p.bounce_size = 0;
          return fail(BLKIF_RSP_ERROR);
        }
      }
      BuildCopySegments(p);
      if (p.data_operation != BLKIF_OP_READ) {
        absl::Status copied = platform_->grant_table().Copy(p.copy_segments);
        queue.counters.grant_copies.Add(p.copy_segments.size());
        bool ok = copied.ok();
        for (const GrantCopySegment& c : p.copy_segments) ok &= c.status == 0;
        if (!ok) {
          queue.counters.grant_copy_failures.Add();
          return fail(BLKIF_RSP_ERROR);
        }
      }
      p.iov.push_back(iovec{p.bounce, static_cast<size_t>(p.transfer_bytes)});
    } else {
      absl::Status mapped =
          use_persistent_ ? MapPersistent(queue, p) : MapData(p, p.data_operation == BLKIF_OP_READ);
      if (!mapped.ok()) {
        BP_LOG(Warning) << "blkback " << options_.backend_path << ": request " << p.id
                        << ": mapping its grants failed: " << mapped.message();
        return fail(BLKIF_RSP_ERROR);
      }
      for (uint32_t i = 0; i < p.nr_segments; ++i) {
        const BlkifSegment& seg = p.segments[i];
        p.iov.push_back(iovec{p.pages[i] + seg.offset_bytes(), seg.length_bytes()});
      }
    }
  }

  ++queue.in_flight;
  in_flight_.Add();
  SubmitStep(p);
}

void BlkifBackend::SubmitStep(Pending& p) {
  BlockRequest request;
  switch (p.steps[p.step_index]) {
    case Pending::Step::kFlush:
      request.op = BlockOp::kFlush;
      break;
    case Pending::Step::kRead:
      request.op = BlockOp::kRead;
      break;
    case Pending::Step::kWriteFua:
      request.flags = kBlockFua;
      [[fallthrough]];
    case Pending::Step::kWrite:
      request.op = BlockOp::kWrite;
      break;
    case Pending::Step::kDiscard:
      request.op = BlockOp::kDiscard;
      request.offset = p.sector * kSectorSize;
      request.length = p.discard_sectors * kSectorSize;
      break;
  }
  if (request.op == BlockOp::kRead || request.op == BlockOp::kWrite) {
    request.offset = p.sector * kSectorSize;
    request.iov = p.iov.data();
    request.iovcnt = static_cast<int>(p.iov.size());
  }
  device_->Submit(request, &p);
}

void BlkifBackend::OnStepDone(Pending& p, int result) {
  if (result < 0) {
    if (result != -EOPNOTSUPP) p.queue->counters.io_errors.Add();
    Complete(p, result == -EOPNOTSUPP ? BLKIF_RSP_EOPNOTSUPP : BLKIF_RSP_ERROR);
    return;
  }
  if (++p.step_index < p.step_count) {
    SubmitStep(p);
    return;
  }
  int16_t status = BLKIF_RSP_OKAY;
  if (options_.grant_mode == GrantMode::kCopy && p.data_operation == BLKIF_OP_READ &&
      p.nr_segments > 0) {
    absl::Status copied = platform_->grant_table().Copy(p.copy_segments);
    p.queue->counters.grant_copies.Add(p.copy_segments.size());
    bool ok = copied.ok();
    for (const GrantCopySegment& c : p.copy_segments) ok &= c.status == 0;
    if (!ok) {
      p.queue->counters.grant_copy_failures.Add();
      status = BLKIF_RSP_ERROR;
    }
  }
  Complete(p, status);
}

void BlkifBackend::ReleaseGrants(Pending& p) {
  for (PersistentGrant* grant : p.persistent_used) --grant->users;
  p.persistent_used.clear();
  if (p.mapping) {
    const size_t pages = p.mapping->refs().size();
    (void)p.mapping->Unmap();
    p.mapping.reset();
    p.queue->counters.grant_unmaps.Add(pages);
    mapped_pages_ -= pages;
  }
}

void BlkifBackend::Complete(Pending& p, int16_t status) {
  Queue& queue = *p.queue;
  // Unmap before answering: once the frontend sees the response it may reuse the pages.
  ReleaseGrants(p);
  --queue.in_flight;
  in_flight_.Sub();
  queue.free.push_back(&p);
  RespondLater(queue, p.id, p.echo_operation, status, p.journal_entry);
  if (queue.in_flight == 0 && queue.held_barrier && !disconnecting_) {
    BlkifRequest barrier = *queue.held_barrier;
    queue.held_barrier.reset();
    StartRequest(queue, barrier, queue.held_barrier_entry);
    if (!queue.process_scheduled) {
      queue.process_scheduled = true;
      loop_->Defer(&queue.process_kick, 0);
    }
  }
  if (disconnecting_) MaybeFinishDisconnect();
}

void BlkifBackend::RespondLater(Queue& queue, uint64_t id, uint8_t operation, int16_t status,
                                uint32_t entry) {
  if (!queue.ring) return;
  // Before the response lands in the ring: a worker that replaces us after a crash knows from
  // rsp_prod whether the guest got it (blkif_journal.h).
  BlkifJournal::MarkAnswered(*queue.journal, entry, queue.ring->rsp_prod_pvt());
  if (absl::Status s = queue.ring->WriteResponse(id, operation, status); !s.ok()) {
    BlkifJournal::MarkTaken(*queue.journal, entry);
    BP_LOG(Error) << "blkback " << options_.backend_path << ": queue " << queue.index << ": "
                  << s.message();
    return;
  }
  queue.answered.push_back(entry);
  if (!queue.push_scheduled) {
    queue.push_scheduled = true;
    loop_->Defer(&queue.push_kick, 0);
  }
}

void BlkifBackend::PushResponses(Queue& queue) {
  if (!queue.ring || queue.answered.empty()) return;
  const bool notify = queue.ring->PushResponsesAndCheckNotify();
  queue.counters.responses.Add(queue.answered.size());  // published now
  // Published: the guest has these responses; their requests are no longer owed.
  for (uint32_t entry : queue.answered) {
    BlkifJournal::Clear(*queue.journal, entry);
    queue.journal_free.push_back(entry);
  }
  queue.answered.clear();
  if (notify && queue.channel) {
    if (absl::Status s = queue.channel->Notify(); s.ok()) {
      queue.counters.notifications_sent.Add();
    } else {
      BP_LOG(Warning) << "blkback " << options_.backend_path << ": notify failed: " << s.message();
    }
  }
}

}  // namespace blockplane::worker::xen
