#include "tests/harness/xen/host_control.h"

#include <errno.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <cstring>

#include "common/unique_fd.h"
#include "common/xen/emulated_protocol.h"
#include "common/xen/fd_passing.h"

namespace blockplane::harness {
namespace {

namespace emulated = common::xen::emulated;

absl::Status Call(const std::string& run_dir, const emulated::HypervisorRequest& request,
                  const std::string& what) {
  std::string path = run_dir + "/hypervisor";
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return absl::InvalidArgumentError("path too long");
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  common::UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd || ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return common::xen::ErrnoToStatus(errno, "connect " + path);
  }
  if (absl::Status status = common::xen::SendWithFds(
          fd.get(), std::as_bytes(std::span<const emulated::HypervisorRequest>(&request, 1)), {});
      !status.ok()) {
    return status;
  }
  emulated::HypervisorReply reply;
  auto received = common::xen::ReceiveWithFds(
      fd.get(), std::as_writable_bytes(std::span<emulated::HypervisorReply>(&reply, 1)), 0);
  if (!received.ok()) return received.status();
  if (received->size != sizeof(reply) || reply.magic != emulated::kProtocolMagic) {
    return absl::DataLossError("malformed hypervisor reply");
  }
  return common::xen::ErrnoToStatus(reply.error, what);
}

}  // namespace

absl::Status CreateGuestDomain(const std::string& run_dir, common::xen::DomainId domid,
                               uint32_t pages, uint32_t grant_entries) {
  emulated::HypervisorRequest request;
  request.op = emulated::HypervisorOp::kCreateDomain;
  request.domid = domid;
  request.arg0 = pages;
  request.arg1 = grant_entries;
  return Call(run_dir, request, "create domain " + std::to_string(domid));
}

absl::Status DestroyGuestDomain(const std::string& run_dir, common::xen::DomainId domid) {
  emulated::HypervisorRequest request;
  request.op = emulated::HypervisorOp::kDestroyDomain;
  request.domid = domid;
  return Call(run_dir, request, "destroy domain " + std::to_string(domid));
}

}  // namespace blockplane::harness
