#include "tests/harness/xen/hypervisor.h"

#include <errno.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <xen/grant_table.h>

#include <algorithm>
#include <cstring>

#include "common/logging.h"
#include "common/xen/fd_passing.h"
#include "common/xen/xen_platform.h"

namespace blockplane::harness {
namespace {

using common::UniqueFd;
using common::xen::GrantAccess;
using common::xen::GrantRef;
using common::xen::emulated::GrantActiveEntry;
using common::xen::emulated::GrantBatchReply;
using common::xen::emulated::GrantBatchRequest;
using common::xen::emulated::HypervisorOp;
using common::xen::emulated::HypervisorReply;
using common::xen::emulated::HypervisorRequest;
using common::xen::emulated::kProtocolMagic;

UniqueFd MakeMemfd(const char* name, size_t size) {
  UniqueFd fd(::memfd_create(name, MFD_CLOEXEC));
  if (fd && ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) fd.Reset();
  return fd;
}

size_t RoundUpToPage(size_t size) {
  return (size + common::xen::kXenPageSize - 1) / common::xen::kXenPageSize *
         common::xen::kXenPageSize;
}

}  // namespace

Hypervisor::Grants::~Grants() {
  if (table) ::munmap(table, table_bytes);
}

Hypervisor::Hypervisor(PollLoop* loop, std::string run_dir)
    : loop_(loop), run_dir_(std::move(run_dir)) {}

Hypervisor::~Hypervisor() {
  for (auto& [fd, owner] : connections_) loop_->Remove(fd);
  for (auto& [domid, domain] : domains_) {
    if (domain.listener) {
      loop_->Remove(domain.listener.get());
      ::unlink(SocketPath(domid).c_str());
    }
  }
  if (dom0_listener_) {
    loop_->Remove(dom0_listener_.get());
    ::unlink(SocketPath(0).c_str());
  }
}

std::string Hypervisor::SocketPath(DomainId domid) const {
  if (domid == 0) return run_dir_ + "/hypervisor";
  return run_dir_ + "/hypervisor." + std::to_string(domid);
}

absl::Status Hypervisor::Start() { return Listen(0); }

absl::Status Hypervisor::Listen(DomainId domid) {
  std::string path = SocketPath(domid);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return absl::InvalidArgumentError("path too long");
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  ::unlink(path.c_str());
  if (!fd || ::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(fd.get(), 64) != 0) {
    return absl::InternalError("listen " + path + ": " + std::strerror(errno));
  }
  int raw = fd.get();
  if (absl::Status status =
          loop_->Add(raw, EPOLLIN, [this, domid, raw](uint32_t) { Accept(domid, raw); });
      !status.ok()) {
    return status;
  }
  if (domid == 0) {
    dom0_listener_ = std::move(fd);
  } else {
    domains_.at(domid).listener = std::move(fd);
  }
  return absl::OkStatus();
}

void Hypervisor::Accept(DomainId domid, int listen_fd) {
  while (true) {
    int raw = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (raw < 0) return;
    UniqueFd fd(raw);
    if (!loop_->Add(raw, EPOLLIN, [this, domid, raw](uint32_t) { OnRequest(domid, raw); }).ok()) {
      continue;
    }
    connections_[raw] = std::move(fd);
  }
}

Hypervisor::Domain& Hypervisor::DomainOf(DomainId domid) { return domains_[domid]; }

int Hypervisor::CreateDomain(DomainId domid, uint32_t pages, uint32_t grant_entries) {
  if (domid == 0 || domid >= 0x7ff0) return EINVAL;
  if (pages == 0 || pages > kMaxPages || grant_entries == 0 || grant_entries > kMaxGrantEntries) {
    return EINVAL;
  }
  auto existing = domains_.find(domid);
  if (existing != domains_.end() && existing->second.memory) return EEXIST;
  Domain domain;
  domain.pages = pages;
  domain.grant_entries = grant_entries;
  domain.memory = MakeMemfd("guest-memory", size_t{pages} * common::xen::kXenPageSize);
  domain.grant_table = MakeMemfd("grant-table", RoundUpToPage(size_t{grant_entries} * 8));
  domain.status = MakeMemfd("domain-status", common::xen::emulated::kDomainStatusSize);
  if (!domain.memory || !domain.grant_table || !domain.status) return ENOMEM;
  domain.grants = std::make_unique<Grants>();
  domain.grants->table_bytes = RoundUpToPage(size_t{grant_entries} * sizeof(grant_entry_v1_t));
  void* table = ::mmap(nullptr, domain.grants->table_bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
                       domain.grant_table.get(), 0);
  if (table == MAP_FAILED) return ENOMEM;
  domain.grants->table = table;
  domain.grants->active.resize(grant_entries);
  domain.grants->access = std::make_unique<GrantAccess>(
      static_cast<grant_entry_v1_t*>(table), domain.grants->active.data(), grant_entries, pages);
  if (existing != domains_.end()) domain.ports = std::move(existing->second.ports);
  domains_[domid] = std::move(domain);
  if (absl::Status status = Listen(domid); !status.ok()) {
    BP_LOG(Error) << "hypervisor: d" << domid << ": " << status;
    domains_.erase(domid);
    return EIO;
  }
  BP_LOG(Info) << "hypervisor: created d" << domid << " pages=" << pages
               << " grants=" << grant_entries;
  return 0;
}

int Hypervisor::DestroyDomain(DomainId domid) {
  auto it = domains_.find(domid);
  if (domid == 0 || it == domains_.end() || !it->second.memory) return ESRCH;
  if (it->second.listener) {
    loop_->Remove(it->second.listener.get());
    ::unlink(SocketPath(domid).c_str());
  }
  common::xen::emulated::DomainStatus status{1};
  if (::pwrite(it->second.status.get(), &status, sizeof(status), 0) != sizeof(status)) {
    BP_LOG(Warning) << "hypervisor: d" << domid
                    << ": cannot mark destroyed: " << std::strerror(errno);
  }
  // Pins on its grants are forgotten with it (the pages stay mapped where they are, as on Xen).
  for (auto& [fd, pins] : pins_) {
    std::erase_if(pins, [domid](const auto& pin) { return std::get<0>(pin.first) == domid; });
  }
  // Ports of other domains bound to this one become unbound, as when Xen closes the peer.
  for (auto& [other_id, other] : domains_) {
    for (auto& [port, entry] : other.ports) {
      if (entry.bound && entry.remote_domid == domid) {
        entry.bound = false;
        entry.remote_port = 0;
      }
    }
  }
  domains_.erase(it);
  BP_LOG(Info) << "hypervisor: destroyed d" << domid;
  return 0;
}

void Hypervisor::OnRequest(DomainId domid, int fd) {
  auto message = std::make_unique<GrantBatchRequest>();
  const HypervisorRequest& request = message->header;
  auto received = common::xen::ReceiveWithFds(
      fd, std::as_writable_bytes(std::span<GrantBatchRequest>(message.get(), 1)), 0);
  if (!received.ok() || received->size == 0) {
    DropConnection(fd);
    return;
  }
  auto answer = std::make_unique<GrantBatchReply>();
  HypervisorReply& reply = answer->header;
  size_t reply_size = sizeof(HypervisorReply);
  std::vector<int> fds;
  const bool grant_op =
      request.op == HypervisorOp::kGrantPin || request.op == HypervisorOp::kGrantUnpin;
  const size_t expected =
      grant_op ? sizeof(HypervisorRequest) +
                     size_t{std::min(request.arg0, common::xen::emulated::kMaxGrantBatch)} *
                         sizeof(uint32_t)
               : sizeof(HypervisorRequest);
  if (received->size < sizeof(HypervisorRequest) || received->size != expected ||
      received->truncated || request.magic != kProtocolMagic) {
    reply.error = EINVAL;
  } else if (grant_op) {
    if (domid != 0) {
      reply.error = EPERM;
    } else if (request.arg0 == 0 || request.arg0 > common::xen::emulated::kMaxGrantBatch) {
      reply.error = EINVAL;
    } else if (request.op == HypervisorOp::kGrantPin) {
      PinGrants(fd, request, std::span<const uint32_t>(message->refs, request.arg0), &reply,
                std::span<uint32_t>(answer->frames, request.arg0));
      if (reply.error == 0) reply_size += size_t{request.arg0} * sizeof(uint32_t);
    } else {
      UnpinGrants(fd, request, std::span<const uint32_t>(message->refs, request.arg0), &reply);
    }
  } else {
    Handle(fd, domid, request, &reply, &fds);
  }
  if (!common::xen::SendWithFds(
           fd, std::as_bytes(std::span<GrantBatchReply>(answer.get(), 1)).first(reply_size), fds)
           .ok()) {
    DropConnection(fd);
  }
}

void Hypervisor::PinGrants(int fd, const HypervisorRequest& request, std::span<const uint32_t> refs,
                           HypervisorReply* reply, std::span<uint32_t> frames) {
  const DomainId granter = static_cast<DomainId>(request.domid);
  auto it = domains_.find(granter);
  if (request.domid > 0xffff || it == domains_.end() || !it->second.grants) {
    reply->error = ESRCH;
    return;
  }
  const bool readonly = (request.arg1 & common::xen::emulated::kGrantReadonly) != 0;
  GrantAccess& access = *it->second.grants->access;
  for (size_t i = 0; i < refs.size(); ++i) {
    GrantAccess::PinResult pin = access.Pin(refs[i], /*mapper=*/0, readonly);
    if (pin.status != GNTST_okay) {
      for (size_t j = 0; j < i; ++j) access.Unpin(refs[j], readonly);
      reply->error = EINVAL;
      reply->value0 = static_cast<uint32_t>(i);
      reply->value1 = static_cast<uint32_t>(static_cast<uint16_t>(pin.status));
      return;
    }
    frames[i] = pin.frame;
  }
  std::map<PinKey, uint32_t>& mine = pins_[fd];
  for (uint32_t ref : refs) ++mine[PinKey{granter, ref, readonly}];
}

void Hypervisor::UnpinGrants(int fd, const HypervisorRequest& request,
                             std::span<const uint32_t> refs, HypervisorReply* reply) {
  const DomainId granter = static_cast<DomainId>(request.domid);
  const bool readonly = (request.arg1 & common::xen::emulated::kGrantReadonly) != 0;
  auto domain = domains_.find(granter);
  auto mine = pins_.find(fd);
  if (request.domid > 0xffff || domain == domains_.end() || !domain->second.grants ||
      mine == pins_.end()) {
    reply->error = EINVAL;
    return;
  }
  // Check first (a ref may appear more than once), then release: all or nothing.
  std::map<PinKey, uint32_t> wanted;
  for (uint32_t ref : refs) ++wanted[PinKey{granter, ref, readonly}];
  for (const auto& [key, count] : wanted) {
    auto held = mine->second.find(key);
    if (held == mine->second.end() || held->second < count) {
      reply->error = EINVAL;
      return;
    }
  }
  for (const auto& [key, count] : wanted) {
    auto held = mine->second.find(key);
    for (uint32_t i = 0; i < count; ++i)
      domain->second.grants->access->Unpin(std::get<1>(key), readonly);
    held->second -= count;
    if (held->second == 0) mine->second.erase(held);
  }
}

void Hypervisor::DropPins(int fd) {
  auto mine = pins_.find(fd);
  if (mine == pins_.end()) return;
  uint64_t dropped = 0;
  for (const auto& [key, count] : mine->second) {
    auto domain = domains_.find(std::get<0>(key));
    if (domain == domains_.end() || !domain->second.grants) continue;
    for (uint32_t i = 0; i < count; ++i) {
      domain->second.grants->access->Unpin(std::get<1>(key), std::get<2>(key));
    }
    dropped += count;
  }
  pins_.erase(mine);
  if (dropped > 0) {
    BP_LOG(Info) << "hypervisor: released " << dropped
                 << " grant pin(s) of a connection that went away";
  }
}

void Hypervisor::DropConnection(int fd) {
  loop_->Remove(fd);
  DropPins(fd);
  for (auto& [domid, domain] : domains_) {
    std::vector<uint32_t> owned;
    for (const auto& [port, entry] : domain.ports) {
      if (entry.owner_fd == fd) owned.push_back(port);
    }
    for (uint32_t port : owned) ClosePort(domid, port);
    if (!owned.empty()) {
      BP_LOG(Info) << "hypervisor: d" << domid << " closed " << owned.size()
                   << " event channel(s) of a connection that went away";
    }
  }
  connections_.erase(fd);  // closes
}

// As Xen's get_free_port(): the lowest port number not in use, so a closed port's number comes
// back (a frontend that starts over may get the event channel of its previous connection).
uint32_t Hypervisor::LowestFreePort(const Domain& domain) {
  uint32_t port = 1;  // port 0 is reserved
  for (const auto& [used, entry] : domain.ports) {
    if (used != port) break;
    ++port;
  }
  return port;
}

bool Hypervisor::ClosePort(DomainId domid, uint32_t port) {
  Domain& self = DomainOf(domid);
  auto it = self.ports.find(port);
  if (it == self.ports.end()) return false;
  Port closed = std::move(it->second);
  self.ports.erase(it);
  if (closed.bound) {
    // The peer's port goes back to unbound, offered to the closer again, as in Xen; it keeps
    // its eventfds, so a later bind reuses them.
    auto peer_domain = domains_.find(closed.remote_domid);
    if (peer_domain != domains_.end()) {
      auto peer = peer_domain->second.ports.find(closed.remote_port);
      if (peer != peer_domain->second.ports.end()) {
        peer->second.bound = false;
        peer->second.remote_port = 0;
        peer->second.remote_domid = domid;
      }
    }
  }
  return true;
}

void Hypervisor::Handle(int fd, DomainId caller, const HypervisorRequest& request,
                        HypervisorReply* reply, std::vector<int>* fds) {
  const DomainId target = static_cast<DomainId>(request.domid);
  if (request.domid > 0xffff) {
    reply->error = EINVAL;
    return;
  }
  switch (request.op) {
    case HypervisorOp::kCreateDomain: {
      if (caller != 0) {
        reply->error = EPERM;
        return;
      }
      reply->error = CreateDomain(target, request.arg0, request.arg1);
      if (reply->error == 0 && hooks_.created) {
        if (int error = hooks_.created(target)) {
          DestroyDomain(target);
          reply->error = error;
        }
      }
      return;
    }
    case HypervisorOp::kDestroyDomain: {
      if (caller != 0) {
        reply->error = EPERM;
        return;
      }
      reply->error = DestroyDomain(target);
      if (reply->error == 0 && hooks_.destroyed) hooks_.destroyed(target);
      return;
    }
    case HypervisorOp::kGetDomainMemory: {
      if (caller != 0 && caller != target) {
        reply->error = EPERM;
        return;
      }
      auto it = domains_.find(target);
      if (it == domains_.end() || !it->second.memory) {
        reply->error = ESRCH;
        return;
      }
      reply->value0 = it->second.pages;
      reply->value1 = it->second.grant_entries;
      fds->push_back(it->second.memory.get());
      fds->push_back(it->second.grant_table.get());
      if (caller == 0) fds->push_back(it->second.status.get());
      return;
    }
    case HypervisorOp::kEvtchnAllocUnbound: {
      Domain& self = DomainOf(caller);
      if (self.ports.size() >= kMaxPortsPerDomain) {
        reply->error = ENOSPC;
        return;
      }
      auto channel = std::make_shared<Channel>();
      for (UniqueFd& wake : channel->wake) {
        wake.Reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
        if (!wake) {
          reply->error = ENOMEM;
          return;
        }
      }
      const uint32_t port = LowestFreePort(self);
      self.ports[port] = Port{target, 0, false, channel, 0, fd};
      reply->value0 = port;
      fds->push_back(channel->wake[0].get());  // receive
      fds->push_back(channel->wake[1].get());  // notify the peer
      return;
    }
    case HypervisorOp::kEvtchnBindInterdomain: {
      auto remote_domain = domains_.find(target);
      if (remote_domain == domains_.end()) {
        reply->error = ESRCH;
        return;
      }
      auto remote = remote_domain->second.ports.find(request.arg0);
      // Xen: the remote port must be unbound and offered to the caller.
      if (remote == remote_domain->second.ports.end() || remote->second.bound ||
          remote->second.remote_domid != caller || !remote->second.channel) {
        reply->error = EINVAL;
        return;
      }
      Domain& self = DomainOf(caller);
      if (self.ports.size() >= kMaxPortsPerDomain) {
        reply->error = ENOSPC;
        return;
      }
      const uint32_t port = LowestFreePort(self);
      std::shared_ptr<Channel> channel = remote->second.channel;
      remote->second.bound = true;
      remote->second.remote_port = port;
      self.ports[port] = Port{target, request.arg0, true, channel, 1, fd};
      reply->value0 = port;
      fds->push_back(channel->wake[1].get());
      fds->push_back(channel->wake[0].get());
      return;
    }
    case HypervisorOp::kEvtchnClose:
      if (!ClosePort(caller, request.arg0)) reply->error = EINVAL;
      return;
    case HypervisorOp::kGrantPin:
    case HypervisorOp::kGrantUnpin:
      break;  // OnRequest handles them (they carry refs)
  }
  reply->error = EINVAL;
}

}  // namespace blockplane::harness
