#include "tests/harness/xen/guest_domain.h"

#include <errno.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <atomic>
#include <cstring>

#include "common/xen/emulated_protocol.h"
#include "common/xen/fd_passing.h"

namespace blockplane::harness {

using common::UniqueFd;
using common::xen::ErrnoToStatus;
using common::xen::kXenPageSize;
namespace emulated = common::xen::emulated;

absl::StatusOr<std::unique_ptr<GuestDomain>> GuestDomain::Connect(const std::string& run_dir,
                                                                  common::xen::DomainId domid) {
  std::string path = run_dir + "/hypervisor." + std::to_string(domid);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (domid == 0 || path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError("bad guest domain or socket path: " + path);
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd || ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return ErrnoToStatus(errno, "connect " + path);
  }
  emulated::HypervisorRequest request;
  request.op = emulated::HypervisorOp::kGetDomainMemory;
  request.domid = domid;
  if (absl::Status status = common::xen::SendWithFds(
          fd.get(), std::as_bytes(std::span<emulated::HypervisorRequest>(&request, 1)), {});
      !status.ok()) {
    return status;
  }
  emulated::HypervisorReply reply;
  auto received = common::xen::ReceiveWithFds(
      fd.get(), std::as_writable_bytes(std::span<emulated::HypervisorReply>(&reply, 1)),
      emulated::kMaxReplyFds);
  if (!received.ok()) return received.status();
  if (received->size != sizeof(reply) || reply.magic != emulated::kProtocolMagic) {
    return absl::DataLossError("malformed hypervisor reply");
  }
  if (reply.error != 0) return ErrnoToStatus(reply.error, "get own memory");
  if (received->fds.size() != 2) return absl::DataLossError("expected memory and grant table fds");

  std::unique_ptr<GuestDomain> guest(new GuestDomain());
  guest->domid_ = domid;
  guest->pages_ = reply.value0;
  guest->grant_entries_ = reply.value1;
  guest->memory_bytes_ = size_t{guest->pages_} * kXenPageSize;
  guest->grant_bytes_ = size_t{guest->grant_entries_} * sizeof(grant_entry_v1_t);
  void* memory = ::mmap(nullptr, guest->memory_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED,
                        received->fds[0].get(), 0);
  if (memory == MAP_FAILED) return ErrnoToStatus(errno, "mmap guest memory");
  guest->memory_ = static_cast<std::byte*>(memory);
  void* grants = ::mmap(nullptr, guest->grant_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED,
                        received->fds[1].get(), 0);
  if (grants == MAP_FAILED) return ErrnoToStatus(errno, "mmap grant table");
  guest->grants_ = static_cast<grant_entry_v1_t*>(grants);
  return guest;
}

GuestDomain::~GuestDomain() {
  if (memory_) ::munmap(memory_, memory_bytes_);
  if (grants_) ::munmap(grants_, grant_bytes_);
}

std::span<std::byte> GuestDomain::Page(uint32_t frame) const {
  if (frame >= pages_) return {};
  return {memory_ + size_t{frame} * kXenPageSize, kXenPageSize};
}

absl::Status GuestDomain::GrantAccess(common::xen::GrantRef ref, common::xen::DomainId to,
                                      uint32_t frame, bool readonly) {
  if (ref >= grant_entries_) return absl::InvalidArgumentError("grant ref out of range");
  if (frame >= pages_) return absl::InvalidArgumentError("frame out of range");
  grant_entry_v1_t* entry = &grants_[ref];
  std::atomic_ref<uint32_t>(entry->frame).store(frame, std::memory_order_relaxed);
  std::atomic_ref<uint16_t>(entry->domid).store(to, std::memory_order_relaxed);
  uint16_t flags = GTF_permit_access | (readonly ? GTF_readonly : 0);
  std::atomic_ref<uint16_t>(entry->flags).store(flags, std::memory_order_release);
  return absl::OkStatus();
}

bool GuestDomain::EndAccess(common::xen::GrantRef ref) {
  if (ref >= grant_entries_) return false;
  std::atomic_ref<uint16_t> flags(grants_[ref].flags);
  uint16_t current = flags.load(std::memory_order_acquire);
  do {
    if (current & (GTF_reading | GTF_writing)) return false;
  } while (!flags.compare_exchange_weak(current, 0, std::memory_order_acq_rel));
  return true;
}

uint16_t GuestDomain::EntryFlags(common::xen::GrantRef ref) const {
  if (ref >= grant_entries_) return 0;
  return std::atomic_ref<uint16_t>(grants_[ref].flags).load(std::memory_order_acquire);
}

grant_entry_v1_t* GuestDomain::RawEntry(common::xen::GrantRef ref) const {
  return ref < grant_entries_ ? &grants_[ref] : nullptr;
}

}  // namespace blockplane::harness
