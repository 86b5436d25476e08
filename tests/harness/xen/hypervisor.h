#pragma once

// The emulated hypervisor: per guest domain, guest memory (a memfd of pages; frame = page index),
// a grant table (grant_entry_v1_t, memfd), a status page (memfd, dom0 only) and the active-grant
// table (private to this process), plus interdomain event channels as eventfd pairs. Grant pins
// are made here, on a backend's request, and recorded per connection: a connection that closes
// (its process died) loses its pins, as gntdev releases a file's mappings. Served on SOCK_SEQPACKET
// sockets with the protocol in common/xen/emulated_protocol.h; the socket a request arrives on
// names the calling domain.
//
// Threading: everything runs on the PollLoop's thread.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "common/unique_fd.h"
#include "common/xen/emulated_protocol.h"
#include "common/xen/grant_access.h"
#include "tests/harness/xen/poll_loop.h"
#include "tests/harness/xen/xenstore_tree.h"

namespace blockplane::harness {

class Hypervisor {
 public:
  // Called when a domain is created or destroyed through the socket, so that the host can
  // introduce it to or release it from xenstored. Returns 0 or an errno.
  struct DomainHooks {
    std::function<int(DomainId)> created;
    std::function<void(DomainId)> destroyed;
  };

  Hypervisor(PollLoop* loop, std::string run_dir);
  ~Hypervisor();
  Hypervisor(const Hypervisor&) = delete;
  Hypervisor& operator=(const Hypervisor&) = delete;

  void set_domain_hooks(DomainHooks hooks) { hooks_ = std::move(hooks); }

  // Listens on <run_dir>/hypervisor for dom0. Call once before Run().
  absl::Status Start();
  // Creates a guest with `pages` of memory and `grant_entries` grants and its socket
  // <run_dir>/hypervisor.<domid>. Returns 0 or an errno (EEXIST, EINVAL, ENOMEM).
  int CreateDomain(DomainId domid, uint32_t pages, uint32_t grant_entries);
  int DestroyDomain(DomainId domid);

  std::string SocketPath(DomainId domid) const;

  static constexpr uint32_t kMaxPages = 1u << 18;         // 1 GiB per guest
  static constexpr uint32_t kMaxGrantEntries = 1u << 16;  // more than Xen's default 32 frames
  static constexpr size_t kMaxPortsPerDomain = 4096;      // Xen's 2-level ABI limit on 64-bit

 private:
  struct Channel {
    common::UniqueFd wake[2];  // wake[side] is readable when the other side notified `side`
  };
  struct Port {
    DomainId remote_domid = 0;
    uint32_t remote_port = 0;  // 0 while unbound
    bool bound = false;
    std::shared_ptr<Channel> channel;
    int side = 0;
    // The connection that opened the port. When it goes away (the process exited or was killed)
    // its ports are closed, as the kernel's evtchn driver does when its file is released.
    int owner_fd = -1;
  };
  // The guest's grant table mapped here and the private active-grant table.
  struct Grants {
    Grants() = default;
    Grants(const Grants&) = delete;
    Grants& operator=(const Grants&) = delete;
    ~Grants();
    void* table = nullptr;
    size_t table_bytes = 0;
    std::vector<common::xen::emulated::GrantActiveEntry> active;
    std::unique_ptr<common::xen::GrantAccess> access;
  };
  struct Domain {
    uint32_t pages = 0;
    uint32_t grant_entries = 0;
    common::UniqueFd memory;
    common::UniqueFd grant_table;
    common::UniqueFd status;  // DomainStatus page
    std::unique_ptr<Grants> grants;
    common::UniqueFd listener;       // guests only
    std::map<uint32_t, Port> ports;  // by port number, from 1
  };

  absl::Status Listen(DomainId domid);
  void Accept(DomainId domid, int listen_fd);
  void OnRequest(DomainId domid, int fd);
  static uint32_t LowestFreePort(const Domain& domain);
  // Closes `port` of `domid` (EVTCHNOP_close semantics). False if there is no such port.
  bool ClosePort(DomainId domid, uint32_t port);
  // Closes the connection `fd` and every event-channel port it opened.
  void DropConnection(int fd);
  void Handle(int fd, DomainId caller, const common::xen::emulated::HypervisorRequest& request,
              common::xen::emulated::HypervisorReply* reply, std::vector<int>* fds);
  Domain& DomainOf(DomainId domid);  // creates dom0's (memory-less) entry on demand
  // kGrantPin / kGrantUnpin for connection `fd`; `refs` has request.arg0 entries.
  void PinGrants(int fd, const common::xen::emulated::HypervisorRequest& request,
                 std::span<const uint32_t> refs, common::xen::emulated::HypervisorReply* reply,
                 std::span<uint32_t> frames);
  void UnpinGrants(int fd, const common::xen::emulated::HypervisorRequest& request,
                   std::span<const uint32_t> refs, common::xen::emulated::HypervisorReply* reply);
  // Drops every pin connection `fd` holds.
  void DropPins(int fd);

  PollLoop* loop_;
  std::string run_dir_;
  DomainHooks hooks_;
  common::UniqueFd dom0_listener_;
  std::map<DomainId, Domain> domains_;
  std::map<int, common::UniqueFd> connections_;  // fd -> owner
  // Per connection: (granting domain, ref, readonly) -> pins it holds.
  using PinKey = std::tuple<DomainId, common::xen::GrantRef, bool>;
  std::map<int, std::map<PinKey, uint32_t>> pins_;
};

}  // namespace blockplane::harness
