#pragma once

// What the hypervisor does when a grant is mapped or copied, over a domain's shared grant table
// (real grant_entry_v1_t layout and GTF_* flags) and the emulated host's active-grant table. Used
// by the emulated hypervisor (bp-xenhost), which pins on behalf of backends.
// Follows Xen's _set_status_v1(): the first pin checks that the entry is GTF_permit_access,
// granted to the mapping domain and, for a writable pin, not GTF_readonly; GTF_reading (and
// GTF_writing for writable pins) is set with a cmpxchg on the combined flags+domid word, so a guest
// that changes the entry concurrently either sees the pin or makes it fail. Flags are cleared when
// the last pin goes away.
//
// Guest memory is hostile: every field is read once, bounds-checked, and never trusted after.
// Thread- and process-safe (atomics and a per-entry lock in shared memory).

#include <stdint.h>
#include <xen/grant_table.h>

#include <cstdint>

#include "common/xen/emulated_protocol.h"
#include "common/xen/xen_platform.h"

namespace blockplane::common::xen {

class GrantAccess {
 public:
  // Non-owning; the memory must outlive this object. `frames` is the granter's memory size in
  // pages.
  GrantAccess(grant_entry_v1_t* entries, emulated::GrantActiveEntry* active, uint32_t nr_entries,
              uint32_t frames)
      : entries_(entries), active_(active), nr_entries_(nr_entries), frames_(frames) {}

  struct PinResult {
    int16_t status = GNTST_general_error;  // GNTST_okay or a GNTST_* error
    uint32_t frame = 0;                    // valid (< frames) when status is GNTST_okay
  };
  // Pins `ref` for `mapper`. Every successful Pin() must be matched by Unpin() with the same
  // `readonly`.
  PinResult Pin(GrantRef ref, DomainId mapper, bool readonly);
  void Unpin(GrantRef ref, bool readonly);

  uint32_t nr_entries() const { return nr_entries_; }
  uint32_t frames() const { return frames_; }

  static const char* StatusName(int16_t status);

 private:
  void Lock(GrantRef ref);
  void Unlock(GrantRef ref);
  // Clears the flags no remaining pin needs. Called with the entry locked.
  void ClearUnusedFlags(GrantRef ref);

  grant_entry_v1_t* entries_;
  emulated::GrantActiveEntry* active_;
  uint32_t nr_entries_;
  uint32_t frames_;
};

}  // namespace blockplane::common::xen
