// XenPlatform on real Xen. Apart from xenstore_client.cc (libxenstore, shared with the emulated
// platform), this is the only file that includes the libxen headers' function declarations.

#include "common/xen/host_platform.h"

#include <errno.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <mutex>

#include "common/logging.h"
#include "common/xen/xenstore_client.h"

extern "C" {
#include <xenevtchn.h>
#include <xengnttab.h>
}

namespace blockplane::common::xen {
namespace {

class HostGrantMapping final : public GrantMapping {
 public:
  HostGrantMapping(xengnttab_handle* handle, DomainId domid, std::vector<GrantRef> refs,
                   bool writable, void* addr)
      : handle_(handle), domid_(domid), refs_(std::move(refs)), writable_(writable), addr_(addr) {}
  ~HostGrantMapping() override { (void)Unmap(); }

  std::byte* data() const override { return static_cast<std::byte*>(addr_); }
  size_t size() const override { return refs_.size() * kXenPageSize; }
  bool writable() const override { return writable_; }
  DomainId domid() const override { return domid_; }
  std::span<const GrantRef> refs() const override { return refs_; }

  absl::Status Unmap() override {
    if (!addr_) return absl::OkStatus();
    int rc = xengnttab_unmap(handle_, addr_, static_cast<uint32_t>(refs_.size()));
    addr_ = nullptr;
    if (rc != 0) {
      absl::Status status = ErrnoToStatus(errno, "xengnttab_unmap");
      BP_LOG(Error) << status;
      return status;
    }
    return absl::OkStatus();
  }

 private:
  xengnttab_handle* handle_;
  DomainId domid_;
  std::vector<GrantRef> refs_;
  bool writable_;
  void* addr_;
};

class HostGrantTable final : public GrantTable {
 public:
  explicit HostGrantTable(xengnttab_handle* handle) : handle_(handle) {}
  ~HostGrantTable() override { xengnttab_close(handle_); }

  absl::StatusOr<std::unique_ptr<GrantMapping>> Map(DomainId domid, std::span<const GrantRef> refs,
                                                    bool writable) override {
    if (refs.empty()) return ErrnoToStatus(EINVAL, "grant map of zero refs");
    std::vector<GrantRef> copy(refs.begin(), refs.end());
    used_ = true;
    void* addr =
        xengnttab_map_domain_grant_refs(handle_, static_cast<uint32_t>(copy.size()), domid,
                                        copy.data(), writable ? PROT_READ | PROT_WRITE : PROT_READ);
    if (!addr) return ErrnoToStatus(errno, "xengnttab_map_domain_grant_refs");
    return std::make_unique<HostGrantMapping>(handle_, domid, std::move(copy), writable, addr);
  }

  absl::Status Copy(std::span<GrantCopySegment> segments) override {
    std::vector<xengnttab_grant_copy_segment_t> raw(segments.size());
    for (size_t i = 0; i < segments.size(); ++i) {
      const GrantCopySegment& segment = segments[i];
      xengnttab_grant_copy_segment_t& out = raw[i];
      out.len = segment.len;
      if (segment.direction == GrantCopySegment::Direction::kFromGrant) {
        out.flags = GNTCOPY_source_gref;
        out.source.foreign = {segment.ref, segment.offset, segment.domid};
        out.dest.virt = segment.local;
      } else {
        out.flags = GNTCOPY_dest_gref;
        out.dest.foreign = {segment.ref, segment.offset, segment.domid};
        out.source.virt = segment.local;
      }
    }
    used_ = true;
    if (xengnttab_grant_copy(handle_, static_cast<uint32_t>(raw.size()), raw.data()) != 0) {
      return ErrnoToStatus(errno, "xengnttab_grant_copy");
    }
    for (size_t i = 0; i < segments.size(); ++i) segments[i].status = raw[i].status;
    return absl::OkStatus();
  }

  uint32_t MaxGrants() const override { return max_grants_; }
  absl::Status SetMaxGrants(uint32_t count) override {
    // libxengnttab: must be called before any other operation on the handle.
    if (used_) return absl::FailedPreconditionError("SetMaxGrants after the first map or copy");
    if (xengnttab_set_max_grants(handle_, count) != 0) {
      return ErrnoToStatus(errno, "xengnttab_set_max_grants");
    }
    max_grants_ = count;
    return absl::OkStatus();
  }

 private:
  xengnttab_handle* handle_;
  bool used_ = false;
  uint32_t max_grants_ = 128;  // gntdev's historical default limit
};

// One xenevtchn handle per channel, so that each channel has its own readiness fd.
class HostEventChannel final : public EventChannel {
 public:
  HostEventChannel(xenevtchn_handle* handle, EventChannelPort port)
      : handle_(handle), port_(port) {}
  ~HostEventChannel() override {
    xenevtchn_unbind(handle_, port_);
    xenevtchn_close(handle_);
  }
  EventChannelPort local_port() const override { return port_; }
  int ReadinessFd() const override { return xenevtchn_fd(handle_); }
  absl::Status Notify() override {
    if (xenevtchn_notify(handle_, port_) != 0) return ErrnoToStatus(errno, "xenevtchn_notify");
    return absl::OkStatus();
  }
  absl::StatusOr<bool> Ack() override {
    pollfd pfd{xenevtchn_fd(handle_), POLLIN, 0};
    if (::poll(&pfd, 1, 0) <= 0) return false;  // xenevtchn_pending would block
    xenevtchn_port_or_error_t port = xenevtchn_pending(handle_);
    if (port < 0) return ErrnoToStatus(errno, "xenevtchn_pending");
    if (xenevtchn_unmask(handle_, static_cast<evtchn_port_t>(port)) != 0) {
      return ErrnoToStatus(errno, "xenevtchn_unmask");
    }
    return true;
  }

 private:
  xenevtchn_handle* handle_;
  EventChannelPort port_;
};

class HostXenPlatform final : public XenPlatform {
 public:
  HostXenPlatform(xengnttab_handle* gnttab, std::unique_ptr<XenStore> xenstore)
      : grant_table_(gnttab), xenstore_(std::move(xenstore)) {}

  DomainId domid() const override { return 0; }  // backends run in dom0 or a driver domain
  GrantTable& grant_table() override { return grant_table_; }
  XenStore& xenstore() override { return *xenstore_; }

  absl::StatusOr<std::unique_ptr<EventChannel>> BindInterdomain(
      DomainId remote_domid, EventChannelPort remote_port) override {
    xenevtchn_handle* handle = xenevtchn_open(nullptr, 0);
    if (!handle) return ErrnoToStatus(errno, "xenevtchn_open");
    xenevtchn_port_or_error_t port = xenevtchn_bind_interdomain(handle, remote_domid, remote_port);
    if (port < 0) {
      int error = errno;
      xenevtchn_close(handle);
      return ErrnoToStatus(error, "xenevtchn_bind_interdomain");
    }
    return std::make_unique<HostEventChannel>(handle, static_cast<EventChannelPort>(port));
  }

  absl::StatusOr<std::unique_ptr<EventChannel>> AllocUnbound(DomainId remote_domid) override {
    xenevtchn_handle* handle = xenevtchn_open(nullptr, 0);
    if (!handle) return ErrnoToStatus(errno, "xenevtchn_open");
    xenevtchn_port_or_error_t port = xenevtchn_bind_unbound_port(handle, remote_domid);
    if (port < 0) {
      int error = errno;
      xenevtchn_close(handle);
      return ErrnoToStatus(error, "xenevtchn_bind_unbound_port");
    }
    return std::make_unique<HostEventChannel>(handle, static_cast<EventChannelPort>(port));
  }

 private:
  HostGrantTable grant_table_;
  std::unique_ptr<XenStore> xenstore_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<XenPlatform>> CreateHostXenPlatformAt(const std::string& dev_xen) {
  if (::access(dev_xen.c_str(), F_OK) != 0) {
    return absl::FailedPreconditionError(
        dev_xen +
        " is absent: this machine is not running as a Xen domain (no hypervisor), so "
        "the host Xen platform cannot work here. Use the emulated Xen platform instead "
        "(start bp-xenhost --run-dir DIR and select the emulated mode with that run "
        "dir).");
  }
  xengnttab_handle* gnttab = xengnttab_open(nullptr, 0);
  if (!gnttab) return ErrnoToStatus(errno, "xengnttab_open (is the gntdev driver loaded?)");
  auto xenstore = OpenLibXenStore("");
  if (!xenstore.ok()) {
    xengnttab_close(gnttab);
    return xenstore.status();
  }
  return std::make_unique<HostXenPlatform>(gnttab, std::move(*xenstore));
}

absl::StatusOr<std::unique_ptr<XenPlatform>> CreateHostXenPlatform() {
  return CreateHostXenPlatformAt(kDevXen);
}

}  // namespace blockplane::common::xen
