#pragma once

// The emulated Xen host: one process (bp-xenhost, or a thread inside a test) that plays xenstored
// and the hypervisor for every emulated domain. Everything it serves lives under one run directory:
//
//   <run_dir>/xenstored            xenstore socket for dom0 (XENSTORED_PATH for tools and backends)
//   <run_dir>/xenstored.<domid>    xenstore socket of an introduced guest (acts as that domain)
//   <run_dir>/hypervisor           emulated hypervisor socket for dom0
//   (common/xen/emulated_protocol.h) <run_dir>/hypervisor.<domid>   emulated hypervisor socket of
//   guest <domid>
//
// A guest is created by CreateDomain() (or kCreateDomain on the hypervisor socket, or
// bp-xenhost --domain): memory, grant table, its hypervisor socket, and its introduction to
// xenstored. Introduction alone (XS_INTRODUCE, xs_introduce_domain) creates the guest's xenstore
// socket and /local/domain/<domid> owned by the guest; XS_RELEASE removes the socket.
//
// Threading: Run() owns all state on the calling thread; Stop() may be called from any thread.
// StartThread()/StopThread() run the loop on a background thread for in-process tests.

#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tests/harness/xen/hypervisor.h"
#include "tests/harness/xen/poll_loop.h"
#include "tests/harness/xen/xenstore_tree.h"
#include "tests/harness/xen/xenstored.h"

namespace blockplane::harness {

struct XenHostOptions {
  std::string run_dir;  // must exist; sockets are created inside
};

class XenHost {
 public:
  static absl::StatusOr<std::unique_ptr<XenHost>> Create(const XenHostOptions& options);
  ~XenHost();
  XenHost(const XenHost&) = delete;
  XenHost& operator=(const XenHost&) = delete;

  // Introduces a guest to xenstored (as XS_INTRODUCE does). Loop thread or before Run() only.
  absl::Status IntroduceDomain(DomainId domid);
  // Creates a guest (memory, grant table) and introduces it. Loop thread or before Run() only.
  absl::Status CreateDomain(DomainId domid, uint32_t pages, uint32_t grant_entries);

  absl::Status Run();
  void Stop();
  void StartThread();
  // Stops the background loop and joins it; returns what Run() returned.
  absl::Status StopThread();

  std::string XenstoredSocket(DomainId domid) const;
  std::string HypervisorSocket(DomainId domid) const { return hypervisor_.SocketPath(domid); }

 private:
  explicit XenHost(const XenHostOptions& options);
  int OnIntroduce(DomainId domid);
  int OnRelease(DomainId domid);

  XenHostOptions options_;
  PollLoop loop_;
  Xenstored xenstored_;
  Hypervisor hypervisor_;
  std::thread thread_;
  absl::Status thread_status_;
};

}  // namespace blockplane::harness
