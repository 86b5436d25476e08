#include "common/xen/grant_access.h"

#include <sched.h>

#include <atomic>
#include <bit>
#include <cstddef>

namespace blockplane::common::xen {
namespace {

static_assert(sizeof(grant_entry_v1_t) == 8);
static_assert(offsetof(grant_entry_v1_t, flags) == 0 && offsetof(grant_entry_v1_t, domid) == 2,
              "flags and domid form one 32-bit word, like Xen's cmpxchg on the shared entry");
static_assert(std::endian::native == std::endian::little);

constexpr uint32_t kFlagsMask = 0xffff;
constexpr int kCmpxchgRetries = 5;  // Xen gives up on an "unstable" entry after 5 tries

std::atomic_ref<uint32_t> Word(grant_entry_v1_t* entry) {
  return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(entry));
}

}  // namespace

void GrantAccess::Lock(GrantRef ref) {
  std::atomic_ref<uint32_t> lock(active_[ref].lock);
  for (int spins = 0; lock.exchange(1, std::memory_order_acquire) != 0; ++spins) {
    if (spins > 64) sched_yield();
  }
}

void GrantAccess::Unlock(GrantRef ref) {
  std::atomic_ref<uint32_t>(active_[ref].lock).store(0, std::memory_order_release);
}

void GrantAccess::ClearUnusedFlags(GrantRef ref) {
  const emulated::GrantActiveEntry& active = active_[ref];
  uint32_t clear = 0;
  if (active.write_pins == 0) clear |= GTF_writing;
  if (active.read_pins == 0 && active.write_pins == 0) clear |= GTF_reading;
  if (clear) Word(&entries_[ref]).fetch_and(~clear, std::memory_order_acq_rel);
}

GrantAccess::PinResult GrantAccess::Pin(GrantRef ref, DomainId mapper, bool readonly) {
  PinResult result;
  if (ref >= nr_entries_) {
    result.status = GNTST_bad_gntref;
    return result;
  }
  Lock(ref);
  emulated::GrantActiveEntry& active = active_[ref];
  if ((readonly ? active.read_pins : active.write_pins) == UINT16_MAX) {
    Unlock(ref);
    result.status = GNTST_no_space;
    return result;
  }
  std::atomic_ref<uint32_t> word = Word(&entries_[ref]);
  uint32_t current = word.load(std::memory_order_acquire);
  for (int attempt = 0;; ++attempt) {
    uint16_t flags = current & kFlagsMask;
    uint16_t domid = current >> 16;
    if ((flags & (GTF_type_mask | GTF_sub_page)) != GTF_permit_access || domid != mapper ||
        (!readonly && (flags & GTF_readonly))) {
      Unlock(ref);
      result.status = GNTST_general_error;
      return result;
    }
    uint32_t wanted = current | GTF_reading | (readonly ? 0 : GTF_writing);
    if (word.compare_exchange_strong(current, wanted, std::memory_order_acq_rel)) break;
    if (attempt + 1 == kCmpxchgRetries) {
      Unlock(ref);
      result.status = GNTST_general_error;  // "shared grant entry is unstable"
      return result;
    }
  }
  // Read the frame once, after the pin is visible to the guest, and check it.
  uint32_t frame = std::atomic_ref<uint32_t>(entries_[ref].frame).load(std::memory_order_acquire);
  if (frame >= frames_) {
    ClearUnusedFlags(ref);
    Unlock(ref);
    result.status = GNTST_bad_page;
    return result;
  }
  if (readonly) {
    ++active.read_pins;
  } else {
    ++active.write_pins;
  }
  Unlock(ref);
  result.status = GNTST_okay;
  result.frame = frame;
  return result;
}

void GrantAccess::Unpin(GrantRef ref, bool readonly) {
  if (ref >= nr_entries_) return;
  Lock(ref);
  emulated::GrantActiveEntry& active = active_[ref];
  uint16_t& pins = readonly ? active.read_pins : active.write_pins;
  if (pins > 0) --pins;
  ClearUnusedFlags(ref);
  Unlock(ref);
}

const char* GrantAccess::StatusName(int16_t status) {
  switch (status) {
    case GNTST_okay:
      return "GNTST_okay";
    case GNTST_general_error:
      return "GNTST_general_error";
    case GNTST_bad_domain:
      return "GNTST_bad_domain";
    case GNTST_bad_gntref:
      return "GNTST_bad_gntref";
    case GNTST_permission_denied:
      return "GNTST_permission_denied";
    case GNTST_bad_page:
      return "GNTST_bad_page";
    case GNTST_bad_copy_arg:
      return "GNTST_bad_copy_arg";
    case GNTST_no_space:
      return "GNTST_no_space";
    default:
      return "GNTST_unknown";
  }
}

}  // namespace blockplane::common::xen
