#pragma once

// XenPlatform: the three narrow interfaces through which blockplane talks to Xen (grant table,
// event channels, xenstore), and the factories of its two implementations:
//
//  - host:     libxengnttab / libxenevtchn / libxenstore on a real dom0 or driver domain.
//  - emulated: the emulated Xen host of the test harness (bp-xenhost): its xenstored through the
//              real libxenstore, guest memory, grant tables and event channels through shared
//              memory and eventfds handed over its hypervisor socket.
//
// Nothing outside common/xen includes libxen headers; code depends on these interfaces only.
//
// Errors: control-plane style absl::Status. The errno the real library would give is kept in the
// status code via ErrnoToStatus() below (EINVAL -> InvalidArgument, ENOENT -> NotFound,
// EACCES -> PermissionDenied, EAGAIN -> Aborted, ...) and StatusToErrno() recovers it at the edge.
//
// Threading: each object may be used from one thread at a time; different objects from one
// platform may be used from different threads (mappings and channels are independent).

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace blockplane::common::xen {

using DomainId = uint16_t;
using GrantRef = uint32_t;
using EventChannelPort = uint32_t;
using TransactionId = uint32_t;

inline constexpr size_t kXenPageSize = 4096;
inline constexpr TransactionId kNoTransaction = 0;

// errno <-> absl::Status, one mapping for the whole Xen layer. EAGAIN maps to Aborted because for
// xenstore it means "transaction conflict, retry".
absl::Status ErrnoToStatus(int error, std::string_view message);
int StatusToErrno(const absl::Status& status);  // 0 for OK; EIO for codes with no errno origin

// ---------------------------------------------------------------------------------------------
// Grant table.

// Pages of another domain mapped into this process, contiguous, page-aligned. Unmapped (and the
// grants released, clearing GTF_reading/GTF_writing) by Unmap() or destruction.
class GrantMapping {
 public:
  virtual ~GrantMapping() = default;
  // Valid until Unmap(): data() has size() == refs().size() * kXenPageSize bytes. Read-only
  // mappings are mapped PROT_READ: writing to them faults.
  virtual std::byte* data() const = 0;
  virtual size_t size() const = 0;
  virtual bool writable() const = 0;
  virtual DomainId domid() const = 0;
  virtual std::span<const GrantRef> refs() const = 0;
  std::span<std::byte> bytes() const { return {data(), size()}; }
  std::span<std::byte> page(size_t index) const {
    return bytes().subspan(index * kXenPageSize, kXenPageSize);
  }
  // Idempotent. Errors are logged by the implementation and returned.
  virtual absl::Status Unmap() = 0;
};

// One segment of a grant copy (xengnttab_grant_copy_segment): `len` bytes between local memory
// and a granted page at `offset`. offset + len must not exceed kXenPageSize.
struct GrantCopySegment {
  enum class Direction { kFromGrant, kToGrant };
  Direction direction = Direction::kFromGrant;
  DomainId domid = 0;
  GrantRef ref = 0;
  uint16_t offset = 0;
  uint16_t len = 0;
  void* local = nullptr;
  // Out: GNTST_okay (0) or a GNTST_* error for this segment, like the hypervisor reports it.
  int16_t status = 0;
};

class GrantTable {
 public:
  virtual ~GrantTable() = default;
  // Maps `refs` granted by `domid` to this domain. Fails (InvalidArgument, errno EINVAL, as the
  // gntdev ioctl/mmap does) if any ref is out of range, not GTF_permit_access, granted to another
  // domain, read-only while `writable`, or names a frame outside the granter's memory; nothing
  // stays mapped or pinned on failure. Also fails if the mapping would exceed MaxGrants().
  virtual absl::StatusOr<std::unique_ptr<GrantMapping>> Map(DomainId domid,
                                                            std::span<const GrantRef> refs,
                                                            bool writable) = 0;
  absl::StatusOr<std::unique_ptr<GrantMapping>> MapOne(DomainId domid, GrantRef ref,
                                                       bool writable) {
    return Map(domid, std::span<const GrantRef>(&ref, 1), writable);
  }
  // Performs every segment; per-segment results go to `status`. The returned status is an error
  // only if the operation as a whole could not run (like the ioctl's return value).
  virtual absl::Status Copy(std::span<GrantCopySegment> segments) = 0;
  // The most pages this table will keep mapped at once (xengnttab_set_max_grants).
  virtual uint32_t MaxGrants() const = 0;
  virtual absl::Status SetMaxGrants(uint32_t count) = 0;
};

// ---------------------------------------------------------------------------------------------
// Event channels.

// One bound port. The remote end's notifications make ReadinessFd() readable; Ack() consumes the
// pending notification and unmasks the port (xenevtchn_pending + xenevtchn_unmask). The port is
// closed on destruction.
class EventChannel {
 public:
  virtual ~EventChannel() = default;
  virtual EventChannelPort local_port() const = 0;
  virtual int ReadinessFd() const = 0;
  virtual absl::Status Notify() = 0;
  // Returns true if a notification was pending. Never blocks.
  virtual absl::StatusOr<bool> Ack() = 0;
};

// ---------------------------------------------------------------------------------------------
// Xenstore.

struct XenStorePermission {
  enum class Access { kNone, kRead, kWrite, kBoth };
  DomainId domid = 0;
  Access access = Access::kNone;
  bool operator==(const XenStorePermission&) const = default;
};

struct XenStoreWatchEvent {
  std::string path;
  std::string token;
  bool operator==(const XenStoreWatchEvent&) const = default;
};

// Paths are absolute or relative to this domain's /local/domain/<id>. `tx` is kNoTransaction or
// an id from StartTransaction(). Errors keep xenstored's errno (see ErrnoToStatus).
class XenStore {
 public:
  virtual ~XenStore() = default;
  virtual absl::StatusOr<std::string> Read(std::string_view path, TransactionId tx) = 0;
  virtual absl::Status Write(std::string_view path, std::string_view value, TransactionId tx) = 0;
  virtual absl::Status Mkdir(std::string_view path, TransactionId tx) = 0;
  virtual absl::Status Remove(std::string_view path, TransactionId tx) = 0;
  virtual absl::StatusOr<std::vector<std::string>> Directory(std::string_view path,
                                                             TransactionId tx) = 0;
  virtual absl::StatusOr<std::vector<XenStorePermission>> GetPermissions(std::string_view path,
                                                                         TransactionId tx) = 0;
  // The first entry names the owner and the access of unlisted domains.
  virtual absl::Status SetPermissions(std::string_view path,
                                      std::span<const XenStorePermission> permissions,
                                      TransactionId tx) = 0;

  // A watch fires once when registered, then on every change at or below `path`.
  virtual absl::Status Watch(std::string_view path, std::string_view token) = 0;
  virtual absl::Status Unwatch(std::string_view path, std::string_view token) = 0;
  // Readable while watch events are pending. Valid for the object's lifetime.
  virtual int WatchFd() = 0;
  // Returns the pending events (possibly none). Never blocks.
  virtual absl::StatusOr<std::vector<XenStoreWatchEvent>> ReadWatchEvents() = 0;

  virtual absl::StatusOr<TransactionId> StartTransaction() = 0;
  // Commits (or aborts). A conflicting commit returns Aborted (errno EAGAIN): retry.
  virtual absl::Status EndTransaction(TransactionId tx, bool abort) = 0;

  // Runs `body` in a transaction and commits, retrying the whole body on EAGAIN up to
  // `max_attempts` times. An error from `body` aborts the transaction and is returned.
  absl::Status RunTransaction(const std::function<absl::Status(TransactionId)>& body,
                              int max_attempts = 16);
};

// ---------------------------------------------------------------------------------------------
// The platform.

class XenPlatform {
 public:
  virtual ~XenPlatform() = default;
  // The domain this process acts as (0 for dom0 backends; a guest id for the test blkfront).
  virtual DomainId domid() const = 0;
  virtual GrantTable& grant_table() = 0;
  virtual XenStore& xenstore() = 0;
  // Binds to `remote_port`, an unbound port of `remote_domid` offered to this domain.
  virtual absl::StatusOr<std::unique_ptr<EventChannel>> BindInterdomain(
      DomainId remote_domid, EventChannelPort remote_port) = 0;
  // Allocates an unbound port that `remote_domid` may bind (what a frontend does).
  virtual absl::StatusOr<std::unique_ptr<EventChannel>> AllocUnbound(DomainId remote_domid) = 0;
};

// Real Xen. Fails with FailedPrecondition if /dev/xen is absent (not a Xen domain), saying so and
// suggesting the emulated platform; otherwise with the error of the library that failed to open.
absl::StatusOr<std::unique_ptr<XenPlatform>> CreateHostXenPlatform();

struct EmulatedXenOptions {
  std::string run_dir;  // bp-xenhost --run-dir
  DomainId domid = 0;   // act as this domain (its sockets: xenstored[.<id>], hypervisor[.<id>])
  uint32_t max_grants = 4096;
};

// The emulated host of the test harness. Fails if its sockets cannot be reached.
absl::StatusOr<std::unique_ptr<XenPlatform>> CreateEmulatedXenPlatform(
    const EmulatedXenOptions& options);

}  // namespace blockplane::common::xen
