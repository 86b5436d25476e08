// The request journal's recovery decisions (every entry state against rsp_prod and req_cons,
// across index wrap-around) and the file's life: kept across "generations", reset when it does
// not hold a journal, forgotten after a clean End().

#include "worker/xen/blkif_journal.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace blockplane::worker::xen {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

constexpr uint64_t Taken() { return JournalStateWord(JournalState::kTaken); }
constexpr uint64_t Answered(uint32_t rsp_idx) {
  return JournalStateWord(JournalState::kAnswered, rsp_idx);
}

TEST(BlkifJournalRecoveryTest, FreeEntriesNeedNothing) {
  EXPECT_EQ(DecideRecovery(0, 0, 0, 0), RecoveryAction::kNone);
  EXPECT_EQ(DecideRecovery(0, 77, 100, 90), RecoveryAction::kNone);
}

TEST(BlkifJournalRecoveryTest, TakenAndCommittedIsReplayed) {
  // Taken at 9, req_cons 10: the crashed worker took it and never answered.
  EXPECT_EQ(DecideRecovery(Taken(), 9, 10, 5), RecoveryAction::kReplay);
  EXPECT_EQ(DecideRecovery(Taken(), 5, 10, 5), RecoveryAction::kReplay);
}

TEST(BlkifJournalRecoveryTest, TakenButNotCommittedIsTakenAgainFromTheRing) {
  // Crashed between recording the entry and advancing req_cons: the ring hands it out again.
  EXPECT_EQ(DecideRecovery(Taken(), 10, 10, 5), RecoveryAction::kDiscard);
  // A stale entry from far ahead (cannot be written, but must not be replayed either).
  EXPECT_EQ(DecideRecovery(Taken(), 12, 10, 5), RecoveryAction::kDiscard);
}

TEST(BlkifJournalRecoveryTest, AnsweredBeforeRspProdWasDelivered) {
  // Response in slot 6, rsp_prod 7: the guest has it (crashed between push and clear).
  EXPECT_EQ(DecideRecovery(Answered(6), 8, 10, 7), RecoveryAction::kDiscard);
}

TEST(BlkifJournalRecoveryTest, AnsweredAtOrAfterRspProdIsReplayed) {
  // Marked, maybe written, not pushed: the guest never saw it.
  EXPECT_EQ(DecideRecovery(Answered(7), 8, 10, 7), RecoveryAction::kReplay);
  EXPECT_EQ(DecideRecovery(Answered(9), 3, 10, 7), RecoveryAction::kReplay);
}

TEST(BlkifJournalRecoveryTest, IndexesCompareModulo32Bits) {
  const uint32_t near_end = 0xfffffffeu;
  // req_cons wrapped to 2: requests at 0xfffffffe and 1 are committed.
  EXPECT_EQ(DecideRecovery(Taken(), near_end, 2, near_end), RecoveryAction::kReplay);
  EXPECT_EQ(DecideRecovery(Taken(), 1, 2, near_end), RecoveryAction::kReplay);
  EXPECT_EQ(DecideRecovery(Taken(), 2, 2, near_end), RecoveryAction::kDiscard);
  // rsp_prod wrapped to 1: a response at 0xffffffff was published, one at 1 was not.
  EXPECT_EQ(DecideRecovery(Answered(0xffffffffu), near_end, 3, 1), RecoveryAction::kDiscard);
  EXPECT_EQ(DecideRecovery(Answered(1), 0, 3, 1), RecoveryAction::kReplay);
}

class BlkifJournalPlanTest : public ::testing::Test {
 protected:
  void Set(uint32_t entry, uint64_t state, uint32_t req_idx) {
    entries_[entry].state.store(state);
    entries_[entry].req_idx.store(req_idx);
  }
  QueueRecoveryPlan Plan(uint32_t req_cons, uint32_t rsp_prod) {
    return PlanQueueRecovery(std::span<const JournalEntry>(entries_.get(), kRing), kRing, req_cons,
                             rsp_prod);
  }
  static constexpr uint32_t kRing = 8;
  std::unique_ptr<JournalEntry[]> entries_ = std::make_unique<JournalEntry[]>(kRing);
};

// Requests 10..15 were taken (req_cons 16), responses 0..11 published (rsp_prod 12). Of the
// four the guest has no response for, two were answered out of order but not pushed.
TEST_F(BlkifJournalPlanTest, ReplaysExactlyTheUnpublishedInTakenOrder) {
  Set(0, Answered(10), 13);  // published (slot 10 < 12): drop
  Set(1, Taken(), 15);       // replay
  Set(2, Answered(12), 11);  // written at 12, not pushed: replay
  Set(3, Taken(), 14);       // replay
  Set(4, Answered(11), 10);  // published: drop
  Set(5, Answered(13), 12);  // not pushed: replay
  Set(6, Taken(), 16);       // not committed: the ring gives it again
  QueueRecoveryPlan plan = Plan(16, 12);
  EXPECT_TRUE(plan.consistent);
  EXPECT_THAT(plan.replay, ElementsAre(2, 5, 3, 1));  // requests 11, 12, 14, 15
  EXPECT_THAT(plan.discard, ElementsAre(0, 4, 6));
}

TEST_F(BlkifJournalPlanTest, NothingOwedIsConsistent) {
  Set(3, Answered(4), 4);
  QueueRecoveryPlan plan = Plan(5, 5);
  EXPECT_TRUE(plan.consistent);
  EXPECT_THAT(plan.replay, IsEmpty());
  EXPECT_THAT(plan.discard, ElementsAre(3));
}

TEST_F(BlkifJournalPlanTest, CountsThatDoNotAddUpAreInconsistent) {
  // Two unanswered requests by the indexes, one in the journal (e.g. a guest that rewrote
  // rsp_prod): the queue must not be resumed from it.
  Set(0, Taken(), 4);
  EXPECT_FALSE(Plan(5, 3).consistent);
  // rsp_prod beyond req_cons, or more than a ring apart.
  EXPECT_FALSE(Plan(5, 6).consistent);
  EXPECT_FALSE(Plan(20, 3).consistent);
}

class BlkifJournalFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/blkif-journal-test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = BlkifJournalPath(dir_, "xd0");
  }
  void TearDown() override {
    RemoveBlkifJournal(path_);
    rmdir((dir_ + "/stats").c_str());
    rmdir(dir_.c_str());
  }
  std::string dir_, path_;
};

TEST_F(BlkifJournalFileTest, SurvivesAGenerationAndIsForgottenAfterEnd) {
  EXPECT_EQ(path_, dir_ + "/stats/xd0.journal");
  ASSERT_TRUE(PrepareBlkifJournal(path_).ok());
  JournalIdentity identity;
  identity.frontend_domid = 5;
  identity.num_queues = 2;
  identity.ring_refs[1] = 33;
  identity.ring_mark = 0x1234567890abcdefull;
  const uint32_t starts[] = {0, 7};
  {
    auto journal = BlkifJournal::Open(path_);
    ASSERT_TRUE(journal.ok()) << journal.status();
    EXPECT_FALSE((*journal)->Recorded(identity));
    EXPECT_FALSE((*journal)->RecordedIdentity().has_value());
    (*journal)->Begin(identity, starts);
    const uint8_t slot[4] = {1, 2, 3, 4};
    (*journal)->Record((*journal)->queue(1), 3, 7, slot);
    BlkifJournal::MarkAnswered((*journal)->queue(1), 3, 7);
  }                                              // the worker dies
  ASSERT_TRUE(PrepareBlkifJournal(path_).ok());  // the controller, before the next generation
  {
    auto journal = BlkifJournal::Open(path_);
    ASSERT_TRUE(journal.ok()) << journal.status();
    EXPECT_TRUE((*journal)->Recorded(identity));
    JournalIdentity other = identity;
    other.event_channels[0] = 9;
    EXPECT_FALSE((*journal)->Recorded(other));
    // Same refs and ports, rings started over (their mark is gone): another connection.
    JournalIdentity restarted = identity;
    restarted.ring_mark = 0;
    EXPECT_FALSE((*journal)->Recorded(restarted));
    ASSERT_TRUE((*journal)->RecordedIdentity().has_value());
    EXPECT_EQ(*(*journal)->RecordedIdentity(), identity);
    JournalQueue& q = (*journal)->queue(1);
    EXPECT_EQ(q.req_cons.load(), 8u);
    EXPECT_EQ(q.entries[3].state.load(), Answered(7));
    EXPECT_EQ(q.entries[3].req_idx.load(), 7u);
    ASSERT_EQ(q.entries[3].request_size, 4u);
    EXPECT_EQ(q.entries[3].request[2], 3);
    (*journal)->End();
  }
  auto journal = BlkifJournal::Open(path_);
  ASSERT_TRUE(journal.ok());
  EXPECT_FALSE((*journal)->Recorded(identity));
  EXPECT_FALSE((*journal)->RecordedIdentity().has_value());
}

TEST_F(BlkifJournalFileTest, AFileOfAnotherLayoutIsReplacedAndAMissingOneRefused) {
  EXPECT_FALSE(BlkifJournal::Open(path_).ok());  // not prepared
  ASSERT_TRUE(PrepareBlkifJournal(path_).ok());
  ASSERT_EQ(truncate(path_.c_str(), 4096), 0);
  EXPECT_FALSE(BlkifJournal::Open(path_).ok());
  ASSERT_TRUE(PrepareBlkifJournal(path_).ok());
  struct stat st {};
  ASSERT_EQ(stat(path_.c_str(), &st), 0);
  EXPECT_EQ(static_cast<size_t>(st.st_size), sizeof(JournalLayout));
  EXPECT_TRUE(BlkifJournal::Open(path_).ok());
  RemoveBlkifJournal(path_);
  EXPECT_NE(access(path_.c_str(), F_OK), 0);
}

}  // namespace
}  // namespace blockplane::worker::xen
