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

#include <cstring>

#include "common/logging.h"
#include "common/xen/fd_passing.h"
#include "common/xen/xen_platform.h"

namespace blockplane::harness {
namespace {

using common::UniqueFd;
using common::xen::emulated::GrantActiveEntry;
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
  domain.active = MakeMemfd("grant-active", common::xen::emulated::ActiveTableSize(grant_entries));
  if (!domain.memory || !domain.grant_table || !domain.active) return ENOMEM;
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
  if (::pwrite(it->second.active.get(), &status, sizeof(status),
               static_cast<off_t>(common::xen::emulated::ActiveTableStatusOffset(
                   it->second.grant_entries))) != sizeof(status)) {
    BP_LOG(Warning) << "hypervisor: d" << domid
                    << ": cannot mark destroyed: " << std::strerror(errno);
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
  HypervisorRequest request;
  auto received = common::xen::ReceiveWithFds(
      fd, std::as_writable_bytes(std::span<HypervisorRequest>(&request, 1)), 0);
  if (!received.ok() || received->size == 0) {
    DropConnection(fd);
    return;
  }
  HypervisorReply reply;
  std::vector<int> fds;
  if (received->size != sizeof(request) || received->truncated || request.magic != kProtocolMagic) {
    reply.error = EINVAL;
  } else {
    Handle(fd, domid, request, &reply, &fds);
  }
  if (!common::xen::SendWithFds(fd, std::as_bytes(std::span<HypervisorReply>(&reply, 1)), fds)
           .ok()) {
    DropConnection(fd);
  }
}

void Hypervisor::DropConnection(int fd) {
  loop_->Remove(fd);
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
      if (caller == 0) fds->push_back(it->second.active.get());
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
      uint32_t port = self.next_port++;
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
      uint32_t port = self.next_port++;
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
  }
  reply->error = EINVAL;
}

}  // namespace blockplane::harness
