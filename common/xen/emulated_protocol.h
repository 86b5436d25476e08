#pragma once

// The wire protocol of the emulated hypervisor (bp-xenhost), shared by the daemon and the emulated
// XenPlatform. Test infrastructure: not a security boundary beyond what is stated here.
//
// Transport: unix SOCK_SEQPACKET sockets; one request datagram, one reply datagram carrying file
// descriptors with SCM_RIGHTS. The socket identifies the caller's domain:
//   <run_dir>/hypervisor           dom0 (backends, the toolstack)
//   <run_dir>/hypervisor.<domid>   guest <domid>, created with the domain
//
// Domain memory, as handed out by kGetDomainMemory (fds in this order):
//   0: guest memory, `pages` * 4096 bytes; frame numbers are page indexes into it.
//   1: grant table, `grant_entries` grant_entry_v1_t (xen/grant_table.h), page-rounded.
//   2: (dom0 only) a DomainStatus page (kDomainStatusSize bytes).
// A guest may only get its own memory (fds 0 and 1).
//
// Grant pins (kGrantPin / kGrantUnpin) are made by the hypervisor, as Xen's grant-table hypercalls
// are: the active-grant table is private to bp-xenhost, and every pin is recorded against the
// connection that asked for it. When that connection closes (the backend process exited or was
// killed), its pins are dropped and GTF_reading/GTF_writing cleared where no pin remains, as
// gntdev unmaps everything of a file when it is released. A connection can only unpin what it
// pinned itself, so a backend cannot release (or leak into) another process's pins.

#include <cstdint>

namespace blockplane::common::xen::emulated {

inline constexpr uint32_t kProtocolMagic = 0x42504856;  // "BPHV"

enum class HypervisorOp : uint32_t {
  // dom0 only. arg0 = pages, arg1 = grant entries. Also introduces the domain to xenstored.
  kCreateDomain = 1,
  // dom0 only. Releases the domain from xenstored and forgets it (mappings stay valid).
  kDestroyDomain = 2,
  // Reply value0 = pages, value1 = grant entries; fds as above.
  kGetDomainMemory = 3,
  // domid = remote domain. Reply value0 = new port; fds: [receive eventfd, notify eventfd].
  kEvtchnAllocUnbound = 4,
  // domid = remote domain, arg0 = remote port. Reply value0 = local port; fds as above.
  kEvtchnBindInterdomain = 5,
  // arg0 = local port of the caller.
  kEvtchnClose = 6,
  // dom0 only. domid = granting domain, arg0 = count (1..kMaxGrantBatch), arg1 = kGrantReadonly
  // or 0; the request datagram continues with `count` uint32_t grant refs (GrantBatchRequest).
  // All or nothing: on success the reply continues with `count` uint32_t frames (GrantBatchReply);
  // on a failed grant, error = EINVAL, value0 = index of the ref, value1 = its GNTST_* status
  // (as int16_t), and nothing stays pinned.
  kGrantPin = 7,
  // dom0 only. Same request layout. Every ref must be pinned by this connection with the same
  // readonly flag (EINVAL otherwise, and nothing is unpinned).
  kGrantUnpin = 8,
};

inline constexpr uint32_t kGrantReadonly = 1;
inline constexpr uint32_t kMaxGrantBatch = 1024;

struct HypervisorRequest {
  uint32_t magic = kProtocolMagic;
  HypervisorOp op = HypervisorOp::kGetDomainMemory;
  uint32_t domid = 0;
  uint32_t arg0 = 0;
  uint32_t arg1 = 0;
  uint32_t arg2 = 0;
};

struct HypervisorReply {
  uint32_t magic = kProtocolMagic;
  int32_t error = 0;  // 0 or a positive errno (EINVAL, EPERM, ESRCH, EEXIST, ENOMEM...)
  uint32_t value0 = 0;
  uint32_t value1 = 0;
};

inline constexpr int kMaxReplyFds = 3;

struct GrantBatchRequest {
  HypervisorRequest header;
  uint32_t refs[kMaxGrantBatch];
};
struct GrantBatchReply {
  HypervisorReply header;
  uint32_t frames[kMaxGrantBatch];
};

// Per grant entry, in the active table: what Xen keeps in its private active-grant table. Only
// the hypervisor sees it. `lock` serialises pin/unpin of the entry (GrantAccess is also usable
// across threads); the pin counts decide when GTF_reading/GTF_writing are cleared.
struct GrantActiveEntry {
  uint32_t lock;
  uint16_t read_pins;   // read-only pins
  uint16_t write_pins;  // writable pins
};
static_assert(sizeof(GrantActiveEntry) == 8);

// Written by the hypervisor when the domain is destroyed, so that backends holding its memory
// drop their cached view (mappings already made stay valid, as on Xen) and a new domain that
// reuses the id is not confused with the old one.
struct DomainStatus {
  uint32_t destroyed;
};

inline constexpr uint64_t kDomainStatusSize = 4096;

}  // namespace blockplane::common::xen::emulated
