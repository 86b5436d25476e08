// XenPlatform on the emulated Xen host (tests/harness/xen, bp-xenhost). See xen_platform.h and
// emulated_protocol.h. Grants are pinned and unpinned by the hypervisor (kGrantPin/kGrantUnpin,
// which record the pins against this process's connection); the mapped pages are mmaps of the
// granter's memory memfd at the frames the pin returned.

#include <errno.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>

#include "common/logging.h"
#include "common/unique_fd.h"
#include "common/xen/emulated_protocol.h"
#include "common/xen/fd_passing.h"
#include "common/xen/grant_access.h"
#include "common/xen/xen_platform.h"
#include "common/xen/xenstore_client.h"

namespace blockplane::common::xen {
namespace {

using emulated::HypervisorOp;
using emulated::HypervisorReply;
using emulated::HypervisorRequest;

std::string DomainSuffix(DomainId domid) {
  return domid == 0 ? std::string() : "." + std::to_string(domid);
}

// A shared mapping of a whole memfd; unmapped on destruction.
class SharedMap {
 public:
  SharedMap() = default;
  SharedMap(void* addr, size_t size) : addr_(addr), size_(size) {}
  SharedMap(const SharedMap&) = delete;
  SharedMap& operator=(const SharedMap&) = delete;
  ~SharedMap() {
    if (addr_) ::munmap(addr_, size_);
  }
  static absl::StatusOr<std::unique_ptr<SharedMap>> Map(int fd, size_t size) {
    void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (addr == MAP_FAILED) return ErrnoToStatus(errno, "mmap shared memory");
    return std::make_unique<SharedMap>(addr, size);
  }
  std::byte* data() const { return static_cast<std::byte*>(addr_); }
  size_t size() const { return size_; }

 private:
  void* addr_ = nullptr;
  size_t size_ = 0;
};

// The connection to the emulated hypervisor; one request at a time.
class HypervisorClient {
 public:
  static absl::StatusOr<std::shared_ptr<HypervisorClient>> Connect(const std::string& path) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof(addr.sun_path)) {
      return absl::InvalidArgumentError("hypervisor socket path too long: " + path);
    }
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    if (!fd || ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      return ErrnoToStatus(errno, "cannot connect to the emulated hypervisor at " + path);
    }
    // A hung host must fail calls, not hang the backend forever.
    timeval timeout{30, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    auto client = std::make_shared<HypervisorClient>();
    client->fd_ = std::move(fd);
    return client;
  }

  struct Result {
    HypervisorReply reply;
    std::vector<UniqueFd> fds;
  };
  absl::StatusOr<Result> Call(const HypervisorRequest& request) {
    Result result;
    auto received = Exchange(std::as_bytes(std::span<const HypervisorRequest>(&request, 1)),
                             std::as_writable_bytes(std::span<HypervisorReply>(&result.reply, 1)));
    if (!received.ok()) return received.status();
    if (received->size != sizeof(HypervisorReply)) {
      return absl::DataLossError("malformed reply from the emulated hypervisor");
    }
    result.fds = std::move(received->fds);
    return result;
  }

  // kGrantPin of `refs` (in batches of kMaxGrantBatch, all or nothing): the frames, or EINVAL
  // naming the first grant that failed.
  // `grant_status`, if given, receives the GNTST_* status of the grant that failed.
  absl::StatusOr<std::vector<uint32_t>> Pin(DomainId domid, std::span<const GrantRef> refs,
                                            bool readonly, int16_t* grant_status = nullptr) {
    std::vector<uint32_t> frames;
    frames.reserve(refs.size());
    auto request = std::make_unique<emulated::GrantBatchRequest>();
    auto reply = std::make_unique<emulated::GrantBatchReply>();
    for (size_t done = 0; done < refs.size();) {
      const uint32_t count =
          static_cast<uint32_t>(std::min<size_t>(refs.size() - done, emulated::kMaxGrantBatch));
      absl::Status status = GrantCall(
          HypervisorOp::kGrantPin, domid, refs.subspan(done, count), readonly, *request, *reply,
          sizeof(HypervisorReply) + size_t{count} * sizeof(uint32_t), grant_status);
      if (!status.ok()) {
        if (done > 0) (void)Unpin(domid, refs.first(done), readonly);
        return status;
      }
      frames.insert(frames.end(), reply->frames, reply->frames + count);
      done += count;
    }
    return frames;
  }

  absl::Status Unpin(DomainId domid, std::span<const GrantRef> refs, bool readonly) {
    auto request = std::make_unique<emulated::GrantBatchRequest>();
    auto reply = std::make_unique<emulated::GrantBatchReply>();
    absl::Status result;
    for (size_t done = 0; done < refs.size();) {
      const uint32_t count =
          static_cast<uint32_t>(std::min<size_t>(refs.size() - done, emulated::kMaxGrantBatch));
      absl::Status status = GrantCall(HypervisorOp::kGrantUnpin, domid, refs.subspan(done, count),
                                      readonly, *request, *reply, sizeof(HypervisorReply), nullptr);
      if (!status.ok()) result.Update(status);
      done += count;
    }
    return result;
  }

 private:
  absl::Status GrantCall(HypervisorOp op, DomainId domid, std::span<const GrantRef> refs,
                         bool readonly, emulated::GrantBatchRequest& request,
                         emulated::GrantBatchReply& reply, size_t reply_size,
                         int16_t* grant_status) {
    request.header = HypervisorRequest{};
    request.header.op = op;
    request.header.domid = domid;
    request.header.arg0 = static_cast<uint32_t>(refs.size());
    request.header.arg1 = readonly ? emulated::kGrantReadonly : 0;
    std::copy(refs.begin(), refs.end(), request.refs);
    auto received =
        Exchange(std::as_bytes(std::span<const emulated::GrantBatchRequest>(&request, 1))
                     .first(sizeof(HypervisorRequest) + refs.size() * sizeof(uint32_t)),
                 std::as_writable_bytes(std::span<emulated::GrantBatchReply>(&reply, 1)));
    if (!received.ok()) return received.status();
    const std::string what =
        std::string(op == HypervisorOp::kGrantPin ? "grant map" : "grant unmap") + " d" +
        std::to_string(domid);
    if (reply.header.error != 0) {
      if (op == HypervisorOp::kGrantPin && reply.header.error == EINVAL &&
          reply.header.value0 < refs.size()) {
        if (grant_status) *grant_status = static_cast<int16_t>(reply.header.value1);
        // gntdev reports any failed grant status as EINVAL.
        return ErrnoToStatus(
            EINVAL, what + " ref " + std::to_string(refs[reply.header.value0]) + ": " +
                        GrantAccess::StatusName(static_cast<int16_t>(reply.header.value1)));
      }
      return ErrnoToStatus(reply.header.error, what);
    }
    if (received->size != reply_size) {
      return absl::DataLossError("malformed grant reply from the emulated hypervisor");
    }
    return absl::OkStatus();
  }

  // One request, one reply (the reply's magic checked).
  absl::StatusOr<ReceivedMessage> Exchange(std::span<const std::byte> request,
                                           std::span<std::byte> reply) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (absl::Status status = SendWithFds(fd_.get(), request, {}); !status.ok()) return status;
    auto received = ReceiveWithFds(fd_.get(), reply, emulated::kMaxReplyFds);
    if (!received.ok()) {
      // A late reply would answer the next request: this connection is unusable from now on.
      ::shutdown(fd_.get(), SHUT_RDWR);
      return received.status();
    }
    uint32_t magic = 0;
    if (received->size >= sizeof(HypervisorReply)) std::memcpy(&magic, reply.data(), sizeof(magic));
    if (received->size < sizeof(HypervisorReply) || received->truncated ||
        magic != emulated::kProtocolMagic) {
      return absl::DataLossError("malformed reply from the emulated hypervisor");
    }
    return std::move(*received);
  }

  std::mutex mutex_;
  UniqueFd fd_;
};

// A granting domain's memory and status page, mapped into this process.
struct DomainMemory {
  DomainId domid = 0;
  uint32_t pages = 0;
  uint32_t grant_entries = 0;
  UniqueFd memory_fd;
  std::unique_ptr<SharedMap> memory;  // whole guest memory, for grant copy
  std::unique_ptr<SharedMap> status;

  bool destroyed() const {
    auto* page = reinterpret_cast<emulated::DomainStatus*>(status->data());
    return std::atomic_ref<uint32_t>(page->destroyed).load(std::memory_order_acquire) != 0;
  }
};

struct MapAccounting {
  std::atomic<uint32_t> mapped_pages{0};
  std::atomic<uint32_t> max_pages{0};
};

class EmulatedGrantMapping final : public GrantMapping {
 public:
  EmulatedGrantMapping(std::shared_ptr<HypervisorClient> hypervisor,
                       std::shared_ptr<DomainMemory> domain, std::vector<GrantRef> refs,
                       bool writable, std::byte* addr, std::shared_ptr<MapAccounting> accounting)
      : hypervisor_(std::move(hypervisor)),
        domain_(std::move(domain)),
        refs_(std::move(refs)),
        writable_(writable),
        addr_(addr),
        accounting_(std::move(accounting)) {}
  ~EmulatedGrantMapping() override { (void)Unmap(); }

  std::byte* data() const override { return addr_; }
  size_t size() const override { return refs_.size() * kXenPageSize; }
  bool writable() const override { return writable_; }
  DomainId domid() const override { return domain_->domid; }
  std::span<const GrantRef> refs() const override { return refs_; }

  absl::Status Unmap() override {
    if (!addr_) return absl::OkStatus();
    absl::Status status;
    if (::munmap(addr_, size()) != 0) status = ErrnoToStatus(errno, "munmap grant mapping");
    addr_ = nullptr;
    // Release the pins only once the pages are gone from this process, as Xen does on unmap. A
    // destroyed domain's pins were forgotten with it.
    if (!domain_->destroyed()) {
      status.Update(hypervisor_->Unpin(domain_->domid, refs_, !writable_));
    }
    accounting_->mapped_pages.fetch_sub(static_cast<uint32_t>(refs_.size()));
    return status;
  }

 private:
  std::shared_ptr<HypervisorClient> hypervisor_;
  std::shared_ptr<DomainMemory> domain_;
  std::vector<GrantRef> refs_;
  bool writable_;
  std::byte* addr_;
  std::shared_ptr<MapAccounting> accounting_;
};

class EmulatedGrantTable final : public GrantTable {
 public:
  EmulatedGrantTable(DomainId self, std::shared_ptr<HypervisorClient> hypervisor,
                     uint32_t max_grants)
      : self_(self),
        hypervisor_(std::move(hypervisor)),
        accounting_(std::make_shared<MapAccounting>()) {
    accounting_->max_pages = max_grants;
  }

  absl::StatusOr<std::unique_ptr<GrantMapping>> Map(DomainId domid, std::span<const GrantRef> refs,
                                                    bool writable) override {
    if (refs.empty()) return ErrnoToStatus(EINVAL, "grant map of zero refs");
    uint32_t count = static_cast<uint32_t>(refs.size());
    if (refs.size() > accounting_->max_pages.load() ||
        accounting_->mapped_pages.fetch_add(count) + count > accounting_->max_pages.load()) {
      if (refs.size() <= accounting_->max_pages.load()) accounting_->mapped_pages.fetch_sub(count);
      return ErrnoToStatus(
          EINVAL, "grant map beyond max grants " + std::to_string(accounting_->max_pages.load()));
    }
    auto domain = GetDomain(domid);
    if (!domain.ok()) {
      accounting_->mapped_pages.fetch_sub(count);
      return domain.status();
    }
    std::shared_ptr<DomainMemory> memory = *domain;

    // The hypervisor pins every ref (all-or-nothing), then we map the pinned frames.
    absl::StatusOr<std::vector<uint32_t>> pinned = hypervisor_->Pin(domid, refs, !writable);
    if (!pinned.ok()) {
      accounting_->mapped_pages.fetch_sub(count);
      return pinned.status();
    }
    const std::vector<uint32_t>& frames = *pinned;
    for (uint32_t frame : frames) {
      if (frame >= memory->pages) {
        (void)hypervisor_->Unpin(domid, refs, !writable);
        accounting_->mapped_pages.fetch_sub(count);
        return absl::DataLossError("emulated hypervisor returned a frame beyond guest memory");
      }
    }
    size_t bytes = refs.size() * kXenPageSize;
    void* base = ::mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int error = base == MAP_FAILED ? errno : 0;
    int prot = writable ? (PROT_READ | PROT_WRITE) : PROT_READ;
    for (size_t i = 0; error == 0 && i < frames.size(); ++i) {
      void* page = static_cast<std::byte*>(base) + i * kXenPageSize;
      if (::mmap(page, kXenPageSize, prot, MAP_SHARED | MAP_FIXED, memory->memory_fd.get(),
                 static_cast<off_t>(frames[i]) * kXenPageSize) == MAP_FAILED) {
        error = errno;
      }
    }
    if (error != 0) {
      if (base != MAP_FAILED) ::munmap(base, bytes);
      (void)hypervisor_->Unpin(domid, refs, !writable);
      accounting_->mapped_pages.fetch_sub(count);
      return ErrnoToStatus(error, "mmap granted pages");
    }
    return std::make_unique<EmulatedGrantMapping>(
        hypervisor_, memory, std::vector<GrantRef>(refs.begin(), refs.end()), writable,
        static_cast<std::byte*>(base), accounting_);
  }

  // Each segment is pinned by the hypervisor for the copy and unpinned after it. Segments of one
  // domain and direction are pinned in one call; if that fails, one by one, so that every segment
  // gets its own status.
  absl::Status Copy(std::span<GrantCopySegment> segments) override {
    std::vector<bool> done(segments.size(), false);
    for (size_t first = 0; first < segments.size(); ++first) {
      if (done[first]) continue;
      const DomainId domid = segments[first].domid;
      const auto direction = segments[first].direction;
      std::vector<size_t> group;
      for (size_t i = first; i < segments.size(); ++i) {
        if (done[i] || segments[i].domid != domid || segments[i].direction != direction) continue;
        done[i] = true;
        GrantCopySegment& segment = segments[i];
        if (segment.local == nullptr || size_t{segment.offset} + segment.len > kXenPageSize) {
          segment.status = GNTST_bad_copy_arg;
          continue;
        }
        group.push_back(i);
      }
      if (group.empty()) continue;
      auto domain = GetDomain(domid);
      if (!domain.ok()) {
        for (size_t i : group) segments[i].status = GNTST_bad_domain;
        continue;
      }
      const bool readonly = direction == GrantCopySegment::Direction::kFromGrant;
      std::vector<GrantRef> refs;
      for (size_t i : group) refs.push_back(segments[i].ref);
      absl::StatusOr<std::vector<uint32_t>> frames = hypervisor_->Pin(domid, refs, readonly);
      if (frames.ok()) {
        for (size_t k = 0; k < group.size(); ++k) {
          CopyOne(**domain, segments[group[k]], (*frames)[k], readonly);
        }
        (void)hypervisor_->Unpin(domid, refs, readonly);
        continue;
      }
      for (size_t i : group) {
        GrantCopySegment& segment = segments[i];
        int16_t grant_status = GNTST_general_error;
        absl::StatusOr<std::vector<uint32_t>> frame = hypervisor_->Pin(
            domid, std::span<const GrantRef>(&segment.ref, 1), readonly, &grant_status);
        if (!frame.ok()) {
          segment.status = grant_status;
          continue;
        }
        CopyOne(**domain, segment, (*frame)[0], readonly);
        (void)hypervisor_->Unpin(domid, std::span<const GrantRef>(&segment.ref, 1), readonly);
      }
    }
    return absl::OkStatus();
  }

  uint32_t MaxGrants() const override { return accounting_->max_pages.load(); }
  absl::Status SetMaxGrants(uint32_t count) override {
    if (count == 0) return ErrnoToStatus(EINVAL, "max grants must be positive");
    accounting_->max_pages = count;
    return absl::OkStatus();
  }

 private:
  absl::StatusOr<std::shared_ptr<DomainMemory>> GetDomain(DomainId domid) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = domains_.find(domid);
    if (it != domains_.end()) {
      if (!it->second->destroyed()) return it->second;
      domains_.erase(it);  // gone (perhaps replaced by a new domain with the same id): refetch
    }
    HypervisorRequest request;
    request.op = HypervisorOp::kGetDomainMemory;
    request.domid = domid;
    auto result = hypervisor_->Call(request);
    if (!result.ok()) return result.status();
    if (result->reply.error != 0) {
      return ErrnoToStatus(result->reply.error, "domain " + std::to_string(domid) + " memory");
    }
    if (result->fds.size() != 3) {
      // Only dom0 gets the status page; a guest cannot map grants (it has no business to).
      return ErrnoToStatus(EPERM, "no domain status page for d" + std::to_string(domid));
    }
    auto memory = std::make_shared<DomainMemory>();
    memory->domid = domid;
    memory->pages = result->reply.value0;
    memory->grant_entries = result->reply.value1;
    memory->memory_fd = std::move(result->fds[0]);
    size_t memory_bytes = size_t{memory->pages} * kXenPageSize;
    auto whole = SharedMap::Map(memory->memory_fd.get(), memory_bytes);
    auto status = SharedMap::Map(result->fds[2].get(), emulated::kDomainStatusSize);
    if (!whole.ok()) return whole.status();
    if (!status.ok()) return status.status();
    memory->memory = std::move(*whole);
    memory->status = std::move(*status);
    domains_[domid] = memory;
    return memory;
  }

  static void CopyOne(const DomainMemory& memory, GrantCopySegment& segment, uint32_t frame,
                      bool from_grant) {
    if (frame >= memory.pages) {
      segment.status = GNTST_bad_page;
      return;
    }
    std::byte* page = memory.memory->data() + size_t{frame} * kXenPageSize;
    if (from_grant) {
      std::memcpy(segment.local, page + segment.offset, segment.len);
    } else {
      std::memcpy(page + segment.offset, segment.local, segment.len);
    }
    segment.status = GNTST_okay;
  }

  DomainId self_;
  std::shared_ptr<HypervisorClient> hypervisor_;
  std::shared_ptr<MapAccounting> accounting_;
  std::mutex mutex_;
  std::map<DomainId, std::shared_ptr<DomainMemory>> domains_;
};

class EmulatedEventChannel final : public EventChannel {
 public:
  EmulatedEventChannel(std::shared_ptr<HypervisorClient> hypervisor, EventChannelPort port,
                       UniqueFd receive, UniqueFd notify)
      : hypervisor_(std::move(hypervisor)),
        port_(port),
        receive_(std::move(receive)),
        notify_(std::move(notify)) {}
  ~EmulatedEventChannel() override {
    HypervisorRequest request;
    request.op = HypervisorOp::kEvtchnClose;
    request.arg0 = port_;
    auto result = hypervisor_->Call(request);
    if (!result.ok() || result->reply.error != 0) {
      BP_LOG(Warning) << "closing event channel port " << port_ << " failed";
    }
  }

  EventChannelPort local_port() const override { return port_; }
  int ReadinessFd() const override { return receive_.get(); }

  absl::Status Notify() override {
    uint64_t one = 1;
    while (::write(notify_.get(), &one, sizeof(one)) < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return absl::OkStatus();  // counter saturated: already pending
      return ErrnoToStatus(errno, "event channel notify");
    }
    return absl::OkStatus();
  }

  absl::StatusOr<bool> Ack() override {
    uint64_t count = 0;
    while (::read(receive_.get(), &count, sizeof(count)) < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return false;
      return ErrnoToStatus(errno, "event channel ack");
    }
    return true;
  }

 private:
  std::shared_ptr<HypervisorClient> hypervisor_;
  EventChannelPort port_;
  UniqueFd receive_;
  UniqueFd notify_;
};

class EmulatedXenPlatform final : public XenPlatform {
 public:
  EmulatedXenPlatform(DomainId domid, std::shared_ptr<HypervisorClient> hypervisor,
                      std::unique_ptr<XenStore> xenstore, uint32_t max_grants)
      : domid_(domid),
        hypervisor_(hypervisor),
        grant_table_(domid, hypervisor, max_grants),
        xenstore_(std::move(xenstore)) {}

  DomainId domid() const override { return domid_; }
  GrantTable& grant_table() override { return grant_table_; }
  XenStore& xenstore() override { return *xenstore_; }

  absl::StatusOr<std::unique_ptr<EventChannel>> BindInterdomain(
      DomainId remote_domid, EventChannelPort remote_port) override {
    HypervisorRequest request;
    request.op = HypervisorOp::kEvtchnBindInterdomain;
    request.domid = remote_domid;
    request.arg0 = remote_port;
    return Open(request, "bind interdomain d" + std::to_string(remote_domid) + " port " +
                             std::to_string(remote_port));
  }

  absl::StatusOr<std::unique_ptr<EventChannel>> AllocUnbound(DomainId remote_domid) override {
    HypervisorRequest request;
    request.op = HypervisorOp::kEvtchnAllocUnbound;
    request.domid = remote_domid;
    return Open(request, "alloc unbound for d" + std::to_string(remote_domid));
  }

 private:
  absl::StatusOr<std::unique_ptr<EventChannel>> Open(const HypervisorRequest& request,
                                                     const std::string& what) {
    auto result = hypervisor_->Call(request);
    if (!result.ok()) return result.status();
    if (result->reply.error != 0) return ErrnoToStatus(result->reply.error, what);
    if (result->fds.size() != 2) return absl::DataLossError(what + ": reply without eventfds");
    return std::make_unique<EmulatedEventChannel>(
        hypervisor_, result->reply.value0, std::move(result->fds[0]), std::move(result->fds[1]));
  }

  DomainId domid_;
  std::shared_ptr<HypervisorClient> hypervisor_;
  EmulatedGrantTable grant_table_;
  std::unique_ptr<XenStore> xenstore_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<XenPlatform>> CreateEmulatedXenPlatform(
    const EmulatedXenOptions& options) {
  if (options.run_dir.empty()) return absl::InvalidArgumentError("emulated Xen: run_dir is empty");
  if (options.max_grants == 0) return absl::InvalidArgumentError("emulated Xen: max_grants is 0");
  std::string suffix = DomainSuffix(options.domid);
  auto hypervisor = HypervisorClient::Connect(options.run_dir + "/hypervisor" + suffix);
  if (!hypervisor.ok()) return hypervisor.status();
  auto xenstore = OpenLibXenStore(options.run_dir + "/xenstored" + suffix);
  if (!xenstore.ok()) return xenstore.status();
  return std::make_unique<EmulatedXenPlatform>(options.domid, *hypervisor, std::move(*xenstore),
                                               options.max_grants);
}

}  // namespace blockplane::common::xen
