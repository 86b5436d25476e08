// The hypervisor-side grant checks of the emulated host (common/xen/grant_access.h), on plain
// memory standing in for the shared grant table.

#include "common/xen/grant_access.h"

#include <atomic>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace blockplane::common::xen {
namespace {

class GrantAccessTest : public ::testing::Test {
 protected:
  static constexpr uint32_t kEntries = 8;
  static constexpr uint32_t kFrames = 16;

  void Grant(GrantRef ref, DomainId to, uint32_t frame, uint16_t extra_flags = 0) {
    entries_[ref].domid = to;
    entries_[ref].frame = frame;
    entries_[ref].flags = GTF_permit_access | extra_flags;
  }

  grant_entry_v1_t entries_[kEntries] = {};
  emulated::GrantActiveEntry active_[kEntries] = {};
  GrantAccess access_{entries_, active_, kEntries, kFrames};
};

TEST_F(GrantAccessTest, ChecksRefTypeDomainReadonlyAndFrame) {
  EXPECT_EQ(access_.Pin(kEntries, 0, true).status, GNTST_bad_gntref);
  EXPECT_EQ(access_.Pin(0, 0, true).status, GNTST_general_error);  // GTF_invalid
  Grant(1, 3, 2);
  EXPECT_EQ(access_.Pin(1, 0, true).status, GNTST_general_error);  // granted to d3
  Grant(2, 0, 2, GTF_readonly);
  EXPECT_EQ(access_.Pin(2, 0, /*readonly=*/false).status, GNTST_general_error);
  EXPECT_EQ(entries_[2].flags, GTF_permit_access | GTF_readonly);  // untouched on failure
  Grant(3, 0, kFrames);
  EXPECT_EQ(access_.Pin(3, 0, true).status, GNTST_bad_page);
  EXPECT_EQ(entries_[3].flags, GTF_permit_access);  // GTF_reading undone
  Grant(4, 0, kFrames - 1);
  GrantAccess::PinResult pin = access_.Pin(4, 0, true);
  EXPECT_EQ(pin.status, GNTST_okay);
  EXPECT_EQ(pin.frame, kFrames - 1);
}

TEST_F(GrantAccessTest, InUseFlagsFollowThePins) {
  Grant(0, 0, 1);
  ASSERT_EQ(access_.Pin(0, 0, /*readonly=*/true).status, GNTST_okay);
  EXPECT_EQ(entries_[0].flags, GTF_permit_access | GTF_reading);
  ASSERT_EQ(access_.Pin(0, 0, /*readonly=*/false).status, GNTST_okay);
  EXPECT_EQ(entries_[0].flags, GTF_permit_access | GTF_reading | GTF_writing);
  access_.Unpin(0, /*readonly=*/false);
  EXPECT_EQ(entries_[0].flags, GTF_permit_access | GTF_reading);
  access_.Unpin(0, /*readonly=*/true);
  EXPECT_EQ(entries_[0].flags, GTF_permit_access);
  access_.Unpin(0, true);  // unbalanced unpin: ignored, no underflow
  EXPECT_EQ(active_[0].read_pins, 0);
}

// A guest revoking a grant (cmpxchg flags to 0 unless in use) races with a backend pinning it.
// Whatever the interleaving, a successful pin means the revoke failed until the unpin, and a
// successful revoke means the pin failed.
TEST_F(GrantAccessTest, RevokeRacesWithPinSafely) {
  constexpr int kRounds = 20000;
  std::atomic<int> round{-1};
  std::atomic<int> pinned_rounds{0};
  std::atomic<int> violations{0};
  std::atomic<bool> backend_done{false};
  std::thread backend([&] {
    for (int r = 0; r < kRounds; ++r) {
      while (round.load(std::memory_order_acquire) < r) std::this_thread::yield();
      GrantAccess::PinResult pin = access_.Pin(0, 0, false);
      if (pin.status == GNTST_okay) {
        ++pinned_rounds;
        // While pinned, the entry must still grant access to us.
        uint16_t flags = std::atomic_ref<uint16_t>(entries_[0].flags).load();
        if ((flags & GTF_permit_access) == 0 || (flags & GTF_writing) == 0) ++violations;
        access_.Unpin(0, false);
      }
      round.store(-2 - r, std::memory_order_release);  // "backend finished round r"
    }
    backend_done = true;
  });
  for (int r = 0; r < kRounds; ++r) {
    Grant(0, 0, 1);
    round.store(r, std::memory_order_release);
    // Revoke concurrently with the pin attempt.
    std::atomic_ref<uint16_t> flags(entries_[0].flags);
    uint16_t current = flags.load();
    while (!(current & (GTF_reading | GTF_writing)) && !flags.compare_exchange_weak(current, 0)) {
    }
    while (round.load(std::memory_order_acquire) != -2 - r) std::this_thread::yield();
    // After the backend's round: no pin is held, so no in-use flag may remain.
    if (flags.load() & (GTF_reading | GTF_writing)) ++violations;
  }
  backend.join();
  EXPECT_TRUE(backend_done);
  EXPECT_EQ(violations.load(), 0);
  EXPECT_EQ(active_[0].read_pins + active_[0].write_pins, 0);
}

}  // namespace
}  // namespace blockplane::common::xen
