#include "tests/harness/xen/xen_host.h"

#include <errno.h>

#include "common/logging.h"

namespace blockplane::harness {

XenHost::XenHost(const XenHostOptions& options)
    : options_(options), xenstored_(&loop_), hypervisor_(&loop_, options.run_dir) {
  hypervisor_.set_domain_hooks(Hypervisor::DomainHooks{
      [this](DomainId domid) {
        int error = OnIntroduce(domid);
        if (error == 0) xenstored_.FireSpecialWatch("@introduceDomain");
        return error;
      },
      [this](DomainId domid) {
        if (OnRelease(domid) == 0) xenstored_.FireSpecialWatch("@releaseDomain");
      },
  });
  xenstored_.set_domain_hooks(Xenstored::DomainHooks{
      [this](DomainId domid) { return OnIntroduce(domid); },
      [this](DomainId domid) { return OnRelease(domid); },
  });
}

XenHost::~XenHost() {
  if (thread_.joinable()) (void)StopThread();
}

absl::StatusOr<std::unique_ptr<XenHost>> XenHost::Create(const XenHostOptions& options) {
  if (options.run_dir.empty()) return absl::InvalidArgumentError("run_dir is required");
  std::unique_ptr<XenHost> host(new XenHost(options));
  if (absl::Status status = host->xenstored_.AddDomainSocket(0, host->XenstoredSocket(0));
      !status.ok()) {
    return status;
  }
  if (absl::Status status = host->hypervisor_.Start(); !status.ok()) return status;
  // The tree a toolstack starts with: /local/domain/0 and /tool, readable by dom0 only.
  host->xenstored_.WriteAsDom0("/local/domain/0/name", "Domain-0");
  host->xenstored_.WriteAsDom0("/local/domain/0/domid", "0");
  host->xenstored_.WriteAsDom0("/tool", "");
  return host;
}

std::string XenHost::XenstoredSocket(DomainId domid) const {
  if (domid == 0) return options_.run_dir + "/xenstored";
  return options_.run_dir + "/xenstored." + std::to_string(domid);
}

absl::Status XenHost::IntroduceDomain(DomainId domid) {
  if (int error = OnIntroduce(domid)) {
    return absl::FailedPreconditionError("introduce domain " + std::to_string(domid) +
                                         " failed: errno " + std::to_string(error));
  }
  xenstored_.FireSpecialWatch("@introduceDomain");
  return absl::OkStatus();
}

absl::Status XenHost::CreateDomain(DomainId domid, uint32_t pages, uint32_t grant_entries) {
  if (int error = hypervisor_.CreateDomain(domid, pages, grant_entries)) {
    return absl::FailedPreconditionError("create domain " + std::to_string(domid) +
                                         " failed: errno " + std::to_string(error));
  }
  if (absl::Status status = IntroduceDomain(domid); !status.ok()) {
    hypervisor_.DestroyDomain(domid);
    return status;
  }
  return absl::OkStatus();
}

int XenHost::OnIntroduce(DomainId domid) {
  if (xenstored_.IsIntroduced(domid)) return EEXIST;
  if (absl::Status status = xenstored_.AddDomainSocket(domid, XenstoredSocket(domid));
      !status.ok()) {
    BP_LOG(Error) << "introduce d" << domid << ": " << status;
    return EINVAL;
  }
  // Like a toolstack: the guest owns its home directory; other guests cannot see it.
  std::string home = "/local/domain/" + std::to_string(domid);
  if (!xenstored_.store().tree().Find(home)) {
    xenstored_.WriteAsDom0(home, "");
    xenstored_.SetPermsAsDom0(home, {XsPerm{domid, XsPerm::kNone}});
    xenstored_.WriteAsDom0(home + "/domid", std::to_string(domid));
  }
  BP_LOG(Info) << "introduced d" << domid << " socket=" << XenstoredSocket(domid);
  return 0;
}

int XenHost::OnRelease(DomainId domid) {
  if (!xenstored_.IsIntroduced(domid)) return ENOENT;
  xenstored_.RemoveDomainSocket(domid);
  BP_LOG(Info) << "released d" << domid;
  return 0;
}

absl::Status XenHost::Run() { return loop_.Run(); }

void XenHost::Stop() { loop_.Stop(); }

void XenHost::StartThread() {
  thread_ = std::thread([this] { thread_status_ = Run(); });
}

absl::Status XenHost::StopThread() {
  Stop();
  if (thread_.joinable()) thread_.join();
  return thread_status_;
}

}  // namespace blockplane::harness
