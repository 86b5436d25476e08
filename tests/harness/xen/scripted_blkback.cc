#include "tests/harness/xen/scripted_blkback.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cstring>

#include "worker/xen/blkif_ring.h"

namespace blockplane::harness {
namespace {

using common::xen::GrantMapping;
using common::xen::GrantRef;
using common::xen::kNoTransaction;
using common::xen::kXenPageSize;
using common::xen::XenStore;
using worker::xen::BlkifRequest;
using worker::xen::BlkifSegment;
using worker::xen::kSectorSize;

constexpr char kWatchToken[] = "scripted-blkback";

absl::StatusOr<uint64_t> ReadU64(XenStore& store, const std::string& path,
                                 std::optional<uint64_t> fallback) {
  auto text = store.Read(path, kNoTransaction);
  if (!text.ok()) {
    if (absl::IsNotFound(text.status()) && fallback) return *fallback;
    return text.status();
  }
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(text->data(), text->data() + text->size(), value);
  if (ec != std::errc() || end != text->data() + text->size() || text->empty()) {
    return absl::InvalidArgumentError(path + ": not a number");
  }
  return value;
}

}  // namespace

struct ScriptedBlkback::Queue {
  uint32_t index = 0;
  std::unique_ptr<GrantMapping> ring_mapping;
  std::optional<worker::xen::BlkifBackRing> ring;
  std::unique_ptr<common::xen::EventChannel> channel;
  bool broken = false;
  std::map<GrantRef, std::unique_ptr<GrantMapping>> persistent;
  std::vector<BlkifSegment> segments;  // indirect descriptors, sized for the advertised maximum
  std::vector<uint8_t> indirect_copy;  // indirect pages, copied out of guest memory
  std::vector<std::unique_ptr<GrantMapping>> held;  // unmap_late: the last request's mappings
};

ScriptedBlkback::ScriptedBlkback(ScriptedBlkbackOptions options)
    : options_(std::move(options)), image_(options_.sectors * kSectorSize) {}

ScriptedBlkback::~ScriptedBlkback() {
  Stop();
  Join();
}

worker::xen::DeviceGeometry ScriptedBlkback::Geometry() const {
  worker::xen::DeviceGeometry g;
  g.sectors = options_.sectors;
  g.read_only = options_.read_only;
  g.max_indirect_segments = options_.max_indirect_segments;
  g.discard_enabled = options_.discard;
  g.flush_enabled = options_.flush;
  g.barrier_enabled = options_.barrier;
  return g;
}

absl::Status ScriptedBlkback::Start() {
  stop_fd_ = common::UniqueFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop_fd_) return absl::InternalError("eventfd");
  XenStore& store = options_.dom0->xenstore();
  const std::string& be = options_.paths.backend;
  std::vector<std::pair<std::string, std::string>> keys = {
      {"/feature-flush-cache", options_.flush ? "1" : "0"},
      {"/feature-barrier", options_.barrier ? "1" : "0"},
      {"/feature-discard", options_.discard ? "1" : "0"},
      {"/feature-persistent", options_.persistent_grants ? "1" : "0"},
      {"/feature-max-indirect-segments", std::to_string(options_.max_indirect_segments)},
      {"/max-ring-page-order", std::to_string(options_.max_ring_page_order)},
      {"/multi-queue-max-queues", std::to_string(options_.max_queues)},
      {"/state", "2"}};
  if (options_.discard) {
    keys.insert(
        keys.begin(),
        {{"/discard-granularity", "512"}, {"/discard-alignment", "0"}, {"/discard-secure", "0"}});
  }
  for (const auto& [key, value] : keys) {
    if (absl::Status status = store.Write(be + key, value, kNoTransaction); !status.ok()) {
      return status;
    }
  }
  thread_ = std::thread([this] { Run(); });
  return absl::OkStatus();
}

void ScriptedBlkback::Stop() {
  if (stop_fd_) {
    uint64_t one = 1;
    (void)!::write(stop_fd_.get(), &one, sizeof(one));
  }
}

void ScriptedBlkback::Join() {
  if (thread_.joinable()) thread_.join();
}

void ScriptedBlkback::Run() {
  absl::Status status = Connect();
  if (status.ok()) status = Serve();
  Shutdown();
  if (report_.status.ok()) report_.status = status;
}

absl::Status ScriptedBlkback::Connect() {
  XenStore& store = options_.dom0->xenstore();
  const std::string& fe = options_.paths.frontend;
  const std::string& be = options_.paths.backend;
  auto state = WaitForXenbusState(
      store, fe + "/state", kWatchToken,
      [](XenbusState s) { return s == XenbusState::kInitialised; },
      [](XenbusState s) { return s == XenbusState::kClosing || s == XenbusState::kClosed; },
      options_.timeout_ms);
  if (!state.ok()) return state.status();
  auto order = ReadU64(store, fe + "/ring-page-order", 0);
  auto queues = ReadU64(store, fe + "/multi-queue-num-queues", 1);
  auto persistent = ReadU64(store, fe + "/feature-persistent", 0);
  auto protocol = store.Read(fe + "/protocol", kNoTransaction);
  if (absl::IsNotFound(protocol.status())) protocol = std::string();  // native
  for (const absl::Status& s :
       {order.status(), queues.status(), persistent.status(), protocol.status()}) {
    if (!s.ok()) return s;
  }
  if (*order > options_.max_ring_page_order || *queues == 0 || *queues > options_.max_queues) {
    return absl::InvalidArgumentError("frontend asked for more than was advertised");
  }
  auto parsed = worker::xen::ParseProtocolName(*protocol);
  if (!parsed) return absl::InvalidArgumentError("unknown protocol " + *protocol);
  protocol_ = *parsed;
  report_.protocol = protocol->empty() ? "native" : *protocol;
  report_.queues = static_cast<uint32_t>(*queues);
  report_.ring_page_order = static_cast<uint32_t>(*order);
  report_.frontend_persistent = *persistent != 0 && options_.persistent_grants;
  report_.requests_per_queue.assign(*queues, 0);

  const uint32_t max_segments =
      std::max<uint32_t>(options_.max_indirect_segments, BLKIF_MAX_SEGMENTS_PER_REQUEST);
  for (uint32_t q = 0; q < *queues; ++q) {
    auto queue = std::make_unique<Queue>();
    queue->index = q;
    queue->segments.resize(max_segments);
    queue->indirect_copy.resize(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * kXenPageSize);
    const std::string dir = *queues > 1 ? fe + "/queue-" + std::to_string(q) : fe;
    std::vector<GrantRef> refs;
    for (uint32_t i = 0; i < (1u << *order); ++i) {
      auto ref =
          ReadU64(store, *order == 0 ? dir + "/ring-ref" : dir + "/ring-ref" + std::to_string(i),
                  std::nullopt);
      if (!ref.ok()) return ref.status();
      refs.push_back(static_cast<GrantRef>(*ref));
    }
    auto mapping = options_.dom0->grant_table().Map(options_.frontend_domid, refs, true);
    if (!mapping.ok()) return mapping.status();
    queue->ring_mapping = std::move(*mapping);
    auto ring = worker::xen::BlkifBackRing::Attach(
        protocol_, std::span<uint8_t>(reinterpret_cast<uint8_t*>(queue->ring_mapping->data()),
                                      queue->ring_mapping->size()));
    if (!ring.ok()) return ring.status();
    queue->ring.emplace(std::move(*ring));
    auto port = ReadU64(store, dir + "/event-channel", std::nullopt);
    if (!port.ok()) return port.status();
    auto channel = options_.dom0->BindInterdomain(
        options_.frontend_domid, static_cast<common::xen::EventChannelPort>(*port));
    if (!channel.ok()) return channel.status();
    queue->channel = std::move(*channel);
    queues_.push_back(std::move(queue));
  }
  const uint32_t info = options_.read_only ? VDISK_READONLY : 0;
  for (const auto& [key, value] : std::vector<std::pair<std::string, std::string>>{
           {"/sectors", std::to_string(options_.sectors)},
           {"/sector-size", "512"},
           {"/physical-sector-size", "512"},
           {"/info", std::to_string(info)},
           {"/state", "4"}}) {
    if (absl::Status status = store.Write(be + key, value, kNoTransaction); !status.ok()) {
      return status;
    }
  }
  report_.connected = true;
  return absl::OkStatus();
}

absl::Status ScriptedBlkback::Serve() {
  XenStore& store = options_.dom0->xenstore();
  const std::string state_path = options_.paths.frontend + "/state";
  if (absl::Status status = store.Watch(state_path, kWatchToken); !status.ok()) return status;
  std::vector<pollfd> fds;
  while (true) {
    fds.clear();
    fds.push_back({stop_fd_.get(), POLLIN, 0});
    fds.push_back({store.WatchFd(), POLLIN, 0});
    for (auto& queue : queues_) fds.push_back({queue->channel->ReadinessFd(), POLLIN, 0});
    if (poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) {
      return absl::InternalError("poll");
    }
    if (fds[0].revents) return absl::OkStatus();  // Stop()
    // Requests kicked before a state change are served first (the frontend saw them go out).
    for (size_t i = 0; i < queues_.size(); ++i) {
      if (fds[2 + i].revents == 0) continue;
      (void)queues_[i]->channel->Ack();
      ProcessQueue(*queues_[i]);
    }
    if (fds[1].revents) {
      if (auto events = store.ReadWatchEvents(); !events.ok()) return events.status();
      auto state = ReadXenbusState(store, state_path);
      if (!state.ok()) return state.status();
      if (*state == XenbusState::kClosing || *state == XenbusState::kClosed) {
        (void)store.Unwatch(state_path, kWatchToken);
        return CloseSequence();
      }
    }
  }
}

void ScriptedBlkback::ProcessQueue(Queue& queue) {
  if (queue.broken) return;
  worker::xen::BlkifBackRing& ring = *queue.ring;
  const worker::xen::DeviceGeometry geometry = Geometry();
  do {
    absl::StatusOr<uint32_t> available = ring.PollRequests();
    if (!available.ok()) {
      // A frontend that broke the ring protocol loses this queue only.
      queue.broken = true;
      ++report_.broken_queues;
      return;
    }
    while (auto slot = ring.NextRequestSlot()) {
      queue.held.clear();  // unmap_late: the previous request's pages go now
      ++report_.requests_per_queue[queue.index];
      auto parsed = worker::xen::ParseRequest(protocol_, *slot, geometry);
      uint64_t id = 0;
      uint8_t operation = 0;
      int16_t status = BLKIF_RSP_OKAY;
      if (!parsed.ok()) {
        id = parsed.error().id;
        operation = parsed.error().operation;
        status = parsed.error().status;
        ++report_.invalid[static_cast<size_t>(parsed.error().reason)];
        ++report_.invalid_total;
      } else {
        id = parsed.value().id;
        operation = parsed.value().data_operation();
        status = Execute(queue, parsed.value());
      }
      (void)ring.WriteResponse(id, operation, status);
    }
    if (ring.PushResponsesAndCheckNotify()) {
      (void)queue.channel->Notify();
      ++report_.notifications_sent;
    }
  } while (ring.FinalCheckForRequests());
}

int16_t ScriptedBlkback::Execute(Queue& queue, const BlkifRequest& request) {
  switch (request.operation) {
    case BLKIF_OP_FLUSH_DISKCACHE:
      ++report_.ops[request.operation];
      if (request.nr_segments == 0) return BLKIF_RSP_OKAY;
      return Transfer(queue, BLKIF_OP_WRITE, request.sector_number,
                      std::span(request.segments.data(), request.nr_segments));
    case BLKIF_OP_DISCARD: {
      if (request.discard.secure) {  // discard-secure is advertised as 0
        ++report_.secure_discards_refused;
        return BLKIF_RSP_EOPNOTSUPP;
      }
      ++report_.ops[request.operation];
      const uint64_t end = request.discard.sector + request.discard.nr_sectors;
      if (end > options_.sectors || end < request.discard.sector) return BLKIF_RSP_ERROR;
      std::memset(image_.data() + request.discard.sector * kSectorSize, 0,
                  request.discard.nr_sectors * kSectorSize);
      return BLKIF_RSP_OKAY;
    }
    case BLKIF_OP_INDIRECT: {
      ++report_.indirect_requests;
      ++report_.ops[request.indirect.op];
      // Indirect pages: read once into private memory, then parse the copy.
      const size_t pages = request.indirect.nr_pages;
      for (size_t i = 0; i < pages; ++i) {
        auto mapping = options_.dom0->grant_table().MapOne(options_.frontend_domid,
                                                           request.indirect.grefs[i], false);
        if (!mapping.ok()) {
          ++report_.grant_map_failures;
          return BLKIF_RSP_ERROR;
        }
        ++report_.grant_maps;
        std::memcpy(queue.indirect_copy.data() + i * kXenPageSize, (*mapping)->data(),
                    kXenPageSize);
      }
      auto segments = worker::xen::ParseIndirectSegments(
          request, std::span<const uint8_t>(queue.indirect_copy.data(), pages * kXenPageSize),
          Geometry(), queue.segments);
      if (!segments.ok()) {
        ++report_.invalid[static_cast<size_t>(segments.error().reason)];
        ++report_.invalid_total;
        return segments.error().status;
      }
      report_.max_segments_seen = std::max(report_.max_segments_seen, segments.value().nr_segments);
      return Transfer(queue, request.indirect.op, request.sector_number,
                      std::span(queue.segments.data(), segments.value().nr_segments));
    }
    default:
      ++report_.ops[request.operation];
      report_.max_segments_seen =
          std::max<uint32_t>(report_.max_segments_seen, request.nr_segments);
      return Transfer(queue, request.operation, request.sector_number,
                      std::span(request.segments.data(), request.nr_segments));
  }
}

int16_t ScriptedBlkback::Transfer(Queue& queue, uint8_t op, uint64_t sector,
                                  std::span<const BlkifSegment> segments) {
  const bool to_guest = op == BLKIF_OP_READ;
  uint64_t disk_offset = sector * kSectorSize;
  for (const BlkifSegment& segment : segments) {
    std::byte* page = nullptr;
    std::unique_ptr<GrantMapping> transient;
    if (report_.frontend_persistent) {
      auto it = queue.persistent.find(segment.gref);
      if (it == queue.persistent.end()) {
        // Persistent grants are mapped writable whatever the first use, as blkback does.
        auto mapping = options_.dom0->grant_table().MapOne(options_.frontend_domid, segment.gref,
                                                           /*writable=*/true);
        if (!mapping.ok()) {
          ++report_.grant_map_failures;
          return BLKIF_RSP_ERROR;
        }
        ++report_.grant_maps;
        it = queue.persistent.emplace(segment.gref, std::move(*mapping)).first;
        report_.persistent_refs.insert(segment.gref);
      }
      page = it->second->data();
    } else {
      auto mapping = options_.dom0->grant_table().MapOne(options_.frontend_domid, segment.gref,
                                                         /*writable=*/to_guest);
      if (!mapping.ok()) {
        ++report_.grant_map_failures;
        return BLKIF_RSP_ERROR;
      }
      ++report_.grant_maps;
      transient = std::move(*mapping);
      page = transient->data();
    }
    const uint64_t length = segment.length_bytes();
    if (disk_offset + length > image_.size()) return BLKIF_RSP_ERROR;  // validated; be safe
    std::byte* data = page + segment.offset_bytes();
    if (to_guest) {
      std::memcpy(data, image_.data() + disk_offset, length);
      if (options_.corrupt_read_sector) {
        const uint64_t bad = *options_.corrupt_read_sector * kSectorSize;
        if (bad >= disk_offset && bad < disk_offset + length) {
          data[bad - disk_offset + 100] ^= std::byte{0x5a};
          ++report_.corrupted_reads;
        }
      }
    } else {
      std::memcpy(image_.data() + disk_offset, data, length);
    }
    disk_offset += length;
    // `transient` unmaps here, before the response, as blkback unmaps before responding (unless
    // told to unmap late).
    if (options_.unmap_late && transient) queue.held.push_back(std::move(transient));
  }
  return BLKIF_RSP_OKAY;
}

void ScriptedBlkback::Shutdown() {
  for (auto& queue : queues_) {
    queue->persistent.clear();
    queue->held.clear();
    queue->ring.reset();
    queue->ring_mapping.reset();
    queue->channel.reset();
  }
  queues_.clear();
}

absl::Status ScriptedBlkback::CloseSequence() {
  XenStore& store = options_.dom0->xenstore();
  Shutdown();  // unmap every ring and grant before saying Closing
  if (absl::Status status = store.Write(options_.paths.backend + "/state", "5", kNoTransaction);
      !status.ok()) {
    return status;
  }
  auto state = WaitForXenbusState(
      store, options_.paths.frontend + "/state", kWatchToken,
      [](XenbusState s) { return s == XenbusState::kClosed; }, nullptr, options_.timeout_ms);
  if (!state.ok()) return state.status();
  report_.closed = true;
  return store.Write(options_.paths.backend + "/state", "6", kNoTransaction);
}

}  // namespace blockplane::harness
