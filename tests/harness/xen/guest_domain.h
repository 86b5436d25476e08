#pragma once

// The guest side of the emulated hypervisor: a process acting as domain N maps its own memory and
// grant table (from <run_dir>/hypervisor.<N>) and grants pages the way a Linux guest's gnttab
// driver does. Used by tests and by the userspace blkfront.
//
// Not thread-safe; one owner. Frames are page indexes into the guest's memory.

#include <stdint.h>
#include <xen/grant_table.h>

#include <cstddef>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "common/unique_fd.h"
#include "common/xen/xen_platform.h"

namespace blockplane::harness {

class GuestDomain {
 public:
  static absl::StatusOr<std::unique_ptr<GuestDomain>> Connect(const std::string& run_dir,
                                                              common::xen::DomainId domid);
  ~GuestDomain();
  GuestDomain(const GuestDomain&) = delete;
  GuestDomain& operator=(const GuestDomain&) = delete;

  common::xen::DomainId domid() const { return domid_; }
  uint32_t pages() const { return pages_; }
  uint32_t grant_entries() const { return grant_entries_; }

  // The guest's own page `frame` (must be < pages()).
  std::span<std::byte> Page(uint32_t frame) const;

  // Grants `to` access to `frame` through `ref`: writes domid and frame, then the flags with
  // release ordering, like gnttab_grant_foreign_access(). InvalidArgument for a ref or frame out
  // of range (the guest's own bookkeeping; a hostile guest writes the entry directly, see
  // RawEntry()).
  absl::Status GrantAccess(common::xen::GrantRef ref, common::xen::DomainId to, uint32_t frame,
                           bool readonly);
  // Revokes a grant if no one has it mapped (cmpxchg flags to 0 unless GTF_reading/GTF_writing),
  // like gnttab_end_foreign_access_ref(). Returns false if the grant is still in use.
  bool EndAccess(common::xen::GrantRef ref);
  // Current flags of an entry, e.g. to observe GTF_reading/GTF_writing.
  uint16_t EntryFlags(common::xen::GrantRef ref) const;
  // The raw shared entry, for hostile-guest tests.
  grant_entry_v1_t* RawEntry(common::xen::GrantRef ref) const;

 private:
  GuestDomain() = default;

  common::xen::DomainId domid_ = 0;
  uint32_t pages_ = 0;
  uint32_t grant_entries_ = 0;
  std::byte* memory_ = nullptr;
  size_t memory_bytes_ = 0;
  grant_entry_v1_t* grants_ = nullptr;
  size_t grant_bytes_ = 0;
};

}  // namespace blockplane::harness
