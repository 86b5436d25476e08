// BlkifBackRing against a frontend written from ring.h: slot positions for each ABI, response
// layouts, notification suppression on both sides, index wrap-around at 2^32, and a req_prod
// that runs ahead of the ring (broken frontend).

#include "worker/xen/blkif_ring.h"

#include <atomic>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/worker/xen/blkif_test_util.h"
#include "worker/xen/blkif_request.h"

// ring.h's macros use the includer's barriers (xen_mb() -> mb() at the default interface version).
#ifndef mb
#define mb() std::atomic_thread_fence(std::memory_order_seq_cst)
#define rmb() std::atomic_thread_fence(std::memory_order_acquire)
#define wmb() std::atomic_thread_fence(std::memory_order_release)
#endif

namespace blockplane::worker::xen {
namespace {

using testing::Get;
using testing::OffsetsFor;
using testing::Put;
using testing::RwSlot;

const DeviceGeometry kGeometry{.sectors = 1 << 20};

// The frontend side, from the ABI offsets and the ring.h macro definitions.
class FakeFrontend {
 public:
  FakeFrontend(Protocol protocol, std::span<uint8_t> shared)
      : protocol_(protocol),
        shared_(shared),
        size_(RingEntries(protocol, shared.size())),
        entry_(OffsetsFor(protocol).entry_size) {}

  // SHARED_RING_INIT + FRONT_RING_ATTACH at `start`.
  void Init(RingIdx start) {
    std::memset(shared_.data(), 0, 64);
    Word(0) = start;       // req_prod
    Word(4) = start + 1;   // req_event
    Word(8) = start;       // rsp_prod
    Word(12) = start + 1;  // rsp_event
    req_prod_pvt_ = start;
    rsp_cons_ = start;
  }

  uint8_t* Slot(RingIdx idx) { return shared_.data() + 64 + size_t{idx & (size_ - 1)} * entry_; }

  void Queue(uint64_t id, uint8_t op = BLKIF_OP_READ) {
    const auto bytes = RwSlot(protocol_, op, id, 8, {{static_cast<uint32_t>(id), 0, 7}});
    std::memcpy(Slot(req_prod_pvt_), bytes.data(), bytes.size());
    ++req_prod_pvt_;
  }

  // RING_PUSH_REQUESTS_AND_CHECK_NOTIFY.
  bool Push() {
    const RingIdx old_prod = Word(0);
    const RingIdx new_prod = req_prod_pvt_;
    Word(0) = new_prod;
    return static_cast<RingIdx>(new_prod - Word(4)) < static_cast<RingIdx>(new_prod - old_prod);
  }

  struct Response {
    uint64_t id;
    uint8_t operation;
    int16_t status;
  };
  // Takes the next response (RING_GET_RESPONSE at rsp_cons).
  Response Take() {
    const auto& o = OffsetsFor(protocol_);
    const uint8_t* slot = Slot(rsp_cons_++);
    return {Get<uint64_t>(slot, o.rsp_id), Get<uint8_t>(slot, o.rsp_operation),
            Get<int16_t>(slot, o.rsp_status)};
  }
  uint32_t ResponsesPending() const { return Word(8) - rsp_cons_; }

  uint32_t& Word(size_t offset) const {
    return *reinterpret_cast<uint32_t*>(shared_.data() + offset);
  }
  RingIdx req_event() const { return Word(4); }
  RingIdx rsp_prod() const { return Word(8); }
  void set_rsp_event(RingIdx v) { Word(12) = v; }
  void set_req_prod(RingIdx v) { Word(0) = v; }
  RingIdx rsp_cons() const { return rsp_cons_; }

 private:
  Protocol protocol_;
  std::span<uint8_t> shared_;
  uint32_t size_;
  size_t entry_;
  RingIdx req_prod_pvt_ = 0;
  RingIdx rsp_cons_ = 0;
};

class BlkifRingTest : public ::testing::TestWithParam<Protocol> {
 protected:
  Protocol p() const { return GetParam(); }

  BlkifBackRing Attach(RingIdx start = 0) {
    front_.Init(start);
    auto ring = BlkifBackRing::Attach(p(), pages_.span(), start);
    EXPECT_TRUE(ring.ok()) << ring.status();
    return std::move(ring).value();
  }

  // Takes every available request, answers each with OKAY echoing id and operation.
  std::vector<uint64_t> Serve(BlkifBackRing& ring) {
    std::vector<uint64_t> ids;
    auto n = ring.PollRequests();
    EXPECT_TRUE(n.ok()) << n.status();
    while (auto slot = ring.NextRequestSlot()) {
      auto parsed = ParseRequest(p(), *slot, kGeometry);
      EXPECT_TRUE(parsed.ok());
      if (!parsed.ok()) continue;
      ids.push_back(parsed.value().id);
      EXPECT_TRUE(
          ring.WriteResponse(parsed.value().id, parsed.value().operation, BLKIF_RSP_OKAY).ok());
    }
    return ids;
  }

  testing::MappedPages pages_{1};
  FakeFrontend front_{GetParam(), pages_.span()};
};

TEST_P(BlkifRingTest, AttachComputesSize) {
  BlkifBackRing ring = Attach();
  EXPECT_EQ(ring.size(), 32u);
  EXPECT_EQ(ring.protocol(), p());
  testing::MappedPages four(4);
  auto big = BlkifBackRing::Attach(p(), four.span());
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(big->size(), 128u);
}

TEST_P(BlkifRingTest, AttachRejectsBadSpans) {
  EXPECT_FALSE(BlkifBackRing::Attach(p(), pages_.span().first(64)).ok());
  EXPECT_FALSE(BlkifBackRing::Attach(p(), pages_.span().subspan(1)).ok());
  EXPECT_FALSE(BlkifBackRing::Attach(p(), {}).ok());
}

TEST_P(BlkifRingTest, SlotsInOrderAtTheAbiStride) {
  BlkifBackRing ring = Attach();
  EXPECT_EQ(*ring.PollRequests(), 0u);
  EXPECT_FALSE(ring.NextRequestSlot().has_value());
  for (uint64_t id = 100; id < 105; ++id) front_.Queue(id);
  front_.Push();
  ASSERT_EQ(*ring.PollRequests(), 5u);
  for (uint64_t i = 0; i < 5; ++i) {
    auto slot = ring.NextRequestSlot();
    ASSERT_TRUE(slot.has_value());
    EXPECT_EQ(slot->data(), pages_.data() + 64 + i * OffsetsFor(p()).entry_size);
    EXPECT_EQ(slot->size(), OffsetsFor(p()).request_size);
    EXPECT_EQ(ParseRequest(p(), *slot, kGeometry).value().id, 100 + i);
  }
  EXPECT_FALSE(ring.NextRequestSlot().has_value());
  EXPECT_EQ(ring.req_cons(), 5u);
  EXPECT_EQ(ring.outstanding(), 5u);
}

TEST_P(BlkifRingTest, RequestsPublishedAfterThePollWaitForTheNextPoll) {
  BlkifBackRing ring = Attach();
  front_.Queue(1);
  front_.Push();
  ASSERT_EQ(*ring.PollRequests(), 1u);
  front_.Queue(2);
  front_.Push();
  ASSERT_TRUE(ring.NextRequestSlot().has_value());
  EXPECT_FALSE(ring.NextRequestSlot().has_value());  // req_prod is read once per poll
  ASSERT_EQ(*ring.PollRequests(), 1u);
  EXPECT_TRUE(ring.NextRequestSlot().has_value());
}

TEST_P(BlkifRingTest, RingMarkLivesInThePadAndSharedRingInitWipesIt) {
  BlkifBackRing ring = Attach();
  front_.Queue(7);
  front_.Push();
  const std::span<uint8_t> shared = pages_.span();
  std::vector<uint8_t> before(shared.begin(), shared.end());
  WriteRingMark(shared, 0x0102030405060708ull);
  EXPECT_EQ(ReadRingMark(shared), 0x0102030405060708ull);
  // Only the 8 bytes at kRingMarkOffset changed: not the indexes, not an entry.
  for (size_t i = 0; i < shared.size(); ++i) {
    if (i >= kRingMarkOffset && i < kRingMarkOffset + 8) continue;
    ASSERT_EQ(shared[i], before[i]) << i;
  }
  EXPECT_EQ(Get<uint64_t>(shared.data(), kRingMarkOffset), 0x0102030405060708ull);
  // The ring works as before.
  ASSERT_EQ(*ring.PollRequests(), 1u);
  ASSERT_TRUE(ring.NextRequestSlot().has_value());
  // SHARED_RING_INIT, as every frontend runs it on a new ring, zeroes the whole pad.
  auto* sring = reinterpret_cast<blkif_sring*>(shared.data());
  SHARED_RING_INIT(sring);
  EXPECT_EQ(ReadRingMark(shared), 0u);
  // A span too short for the header reads as no mark and is not written.
  EXPECT_EQ(ReadRingMark(std::span<const uint8_t>(shared.data(), 16)), 0u);
}

TEST_P(BlkifRingTest, ResponseLayoutAndNoLeakedBytes) {
  BlkifBackRing ring = Attach();
  front_.Queue(7);
  front_.Push();
  ASSERT_EQ(*ring.PollRequests(), 1u);
  ASSERT_TRUE(ring.NextRequestSlot().has_value());
  // The slot still holds the request; fill it so that stale bytes would show.
  uint8_t* slot = front_.Slot(0);
  std::memset(slot, 0xEE, OffsetsFor(p()).entry_size);
  ASSERT_TRUE(ring.WriteResponse(0x0123456789ABCDEFull, BLKIF_OP_WRITE, BLKIF_RSP_EOPNOTSUPP).ok());
  const auto& o = OffsetsFor(p());
  EXPECT_EQ(Get<uint64_t>(slot, o.rsp_id), 0x0123456789ABCDEFull);
  EXPECT_EQ(Get<uint8_t>(slot, o.rsp_operation), BLKIF_OP_WRITE);
  EXPECT_EQ(Get<int16_t>(slot, o.rsp_status), BLKIF_RSP_EOPNOTSUPP);
  EXPECT_EQ(slot[9], 0);  // padding between operation and status is zeroed
  for (size_t i = 12; i < o.response_size; ++i) EXPECT_EQ(slot[i], 0) << i;
  EXPECT_EQ(slot[o.response_size], 0xEE);  // nothing written past the response
  // Not visible until pushed.
  EXPECT_EQ(front_.rsp_prod(), 0u);
  ring.PushResponsesAndCheckNotify();
  EXPECT_EQ(front_.rsp_prod(), 1u);
}

TEST_P(BlkifRingTest, ResponseWithoutOutstandingRequestIsRefused) {
  BlkifBackRing ring = Attach();
  EXPECT_EQ(ring.WriteResponse(1, 0, 0).code(), absl::StatusCode::kFailedPrecondition);
  front_.Queue(1);
  front_.Push();
  ring.PollRequests().IgnoreError();
  ring.NextRequestSlot();
  EXPECT_TRUE(ring.WriteResponse(1, 0, 0).ok());
  EXPECT_EQ(ring.WriteResponse(1, 0, 0).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(ring.rsp_prod_pvt(), 1u);
}

TEST_P(BlkifRingTest, ResponseNotificationSuppression) {
  BlkifBackRing ring = Attach();  // rsp_event = 1
  for (int i = 0; i < 8; ++i) front_.Queue(i);
  front_.Push();
  ring.PollRequests().IgnoreError();
  for (int i = 0; i < 8; ++i) ring.NextRequestSlot();

  // Nothing new: never notify.
  EXPECT_FALSE(ring.PushResponsesAndCheckNotify());
  // rsp_event 1 is inside (0, 1]: notify.
  ASSERT_TRUE(ring.WriteResponse(0, 0, 0).ok());
  EXPECT_TRUE(ring.PushResponsesAndCheckNotify());
  // The frontend has not re-armed (rsp_event still 1): suppressed.
  ASSERT_TRUE(ring.WriteResponse(1, 0, 0).ok());
  EXPECT_FALSE(ring.PushResponsesAndCheckNotify());
  // Re-armed at 3, batch (2, 4]: notify once for the batch.
  front_.set_rsp_event(3);
  ASSERT_TRUE(ring.WriteResponse(2, 0, 0).ok());
  ASSERT_TRUE(ring.WriteResponse(3, 0, 0).ok());
  EXPECT_TRUE(ring.PushResponsesAndCheckNotify());
  // rsp_event exactly at the new producer: notify.
  front_.set_rsp_event(5);
  ASSERT_TRUE(ring.WriteResponse(4, 0, 0).ok());
  EXPECT_TRUE(ring.PushResponsesAndCheckNotify());
  // rsp_event beyond this batch: the frontend will look itself; suppressed.
  front_.set_rsp_event(8);
  ASSERT_TRUE(ring.WriteResponse(5, 0, 0).ok());
  ASSERT_TRUE(ring.WriteResponse(6, 0, 0).ok());
  EXPECT_FALSE(ring.PushResponsesAndCheckNotify());
  EXPECT_EQ(front_.rsp_prod(), 7u);
  // A guest scribbling rsp_prod does not change our notion of what was published.
  front_.Word(8) = 1000;
  ASSERT_TRUE(ring.WriteResponse(7, 0, 0).ok());
  EXPECT_TRUE(ring.PushResponsesAndCheckNotify());  // (7, 8] contains 8
  EXPECT_EQ(front_.rsp_prod(), 8u);
}

TEST_P(BlkifRingTest, FinalCheckForRequestsArmsReqEvent) {
  BlkifBackRing ring = Attach();
  // Idle: arm req_event = req_cons + 1 and report no work.
  EXPECT_FALSE(ring.FinalCheckForRequests());
  EXPECT_EQ(front_.req_event(), 1u);
  // The frontend now notifies for its next request...
  front_.Queue(1);
  EXPECT_TRUE(front_.Push());
  // ...but not for the one after, until the backend re-arms.
  front_.Queue(2);
  EXPECT_FALSE(front_.Push());
  // Work pending: req_event untouched.
  EXPECT_TRUE(ring.FinalCheckForRequests());
  EXPECT_EQ(front_.req_event(), 1u);
  EXPECT_EQ(Serve(ring), (std::vector<uint64_t>{1, 2}));
  ring.PushResponsesAndCheckNotify();
  EXPECT_FALSE(ring.FinalCheckForRequests());
  EXPECT_EQ(front_.req_event(), 3u);
  front_.Queue(3);
  EXPECT_TRUE(front_.Push());
}

TEST_P(BlkifRingTest, FinalCheckSeesRequestsPublishedAfterTheLastPoll) {
  BlkifBackRing ring = Attach();
  ASSERT_EQ(*ring.PollRequests(), 0u);
  front_.Queue(1);
  front_.Push();  // raced with the backend going idle
  EXPECT_TRUE(ring.FinalCheckForRequests());
}

TEST_P(BlkifRingTest, FullRingOfOutstandingRequestsIsNotUnconsumedWork) {
  BlkifBackRing ring = Attach();
  for (uint32_t i = 0; i < ring.size(); ++i) front_.Queue(i);
  front_.Push();
  ASSERT_EQ(*ring.PollRequests(), ring.size());
  while (ring.NextRequestSlot()) {
  }
  EXPECT_EQ(ring.outstanding(), ring.size());
  // Nothing more can legally come until responses free slots.
  EXPECT_FALSE(ring.FinalCheckForRequests());
  EXPECT_EQ(*ring.PollRequests(), 0u);
}

TEST_P(BlkifRingTest, IndicesWrapAt2To32) {
  const RingIdx start = 0xFFFFFFF0u;
  BlkifBackRing ring = Attach(start);
  uint64_t next_id = 0;
  std::vector<uint64_t> served;
  // 5 rounds of 13 requests: crosses 2^32 and wraps the 32-entry ring twice.
  for (int round = 0; round < 5; ++round) {
    for (int i = 0; i < 13; ++i) front_.Queue(next_id++);
    front_.set_rsp_event(front_.rsp_cons() + 1);
    front_.Push();
    auto ids = Serve(ring);
    served.insert(served.end(), ids.begin(), ids.end());
    EXPECT_TRUE(ring.PushResponsesAndCheckNotify()) << round;
    while (front_.ResponsesPending() > 0) {
      auto rsp = front_.Take();
      EXPECT_EQ(rsp.status, BLKIF_RSP_OKAY);
      EXPECT_EQ(rsp.operation, BLKIF_OP_READ);
    }
    EXPECT_FALSE(ring.FinalCheckForRequests());
    EXPECT_EQ(front_.req_event(), ring.req_cons() + 1);
  }
  ASSERT_EQ(served.size(), 65u);
  for (uint64_t i = 0; i < served.size(); ++i) EXPECT_EQ(served[i], i);
  EXPECT_EQ(ring.req_cons(), start + 65);  // wrapped
  EXPECT_LT(ring.req_cons(), start);
  EXPECT_EQ(front_.rsp_prod(), start + 65);
}

TEST_P(BlkifRingTest, ReqProdTooFarAheadIsABrokenFrontend) {
  BlkifBackRing ring = Attach();
  front_.set_req_prod(ring.size());  // exactly a full ring: legal
  EXPECT_EQ(*ring.PollRequests(), ring.size());
  front_.set_req_prod(ring.size() + 1);
  auto polled = ring.PollRequests();
  EXPECT_EQ(polled.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(ring.broken());
  // Broken for good: even a sane req_prod afterwards is refused, no slot is handed out.
  front_.set_req_prod(1);
  EXPECT_EQ(ring.PollRequests().status().code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(ring.NextRequestSlot().has_value());
  EXPECT_FALSE(ring.FinalCheckForRequests());
}

TEST_P(BlkifRingTest, OutstandingRequestsCountAgainstTheRing) {
  BlkifBackRing ring = Attach();
  for (int i = 0; i < 10; ++i) front_.Queue(i);
  front_.Push();
  ASSERT_EQ(*ring.PollRequests(), 10u);
  for (int i = 0; i < 10; ++i) ring.NextRequestSlot();
  // 10 unanswered: the frontend may have at most size - 10 more.
  front_.set_req_prod(ring.size());
  EXPECT_EQ(*ring.PollRequests(), ring.size() - 10);
  front_.set_req_prod(ring.size() + 1);
  EXPECT_FALSE(ring.PollRequests().ok());
}

// A worker that replaces a crashed one resumes after the last published response with the
// requests the journal says were taken: they count as outstanding, new ones follow them.
TEST_P(BlkifRingTest, AttachWithTakenRequestsResumesAfterThem) {
  front_.Init(5);
  for (int i = 0; i < 6; ++i) front_.Queue(i);
  front_.Push();  // requests 5..10; 5..7 were taken by the crashed worker
  auto ring = BlkifBackRing::Attach(p(), pages_.span(), 5, 3);
  ASSERT_TRUE(ring.ok()) << ring.status();
  EXPECT_EQ(ring->req_cons(), 8u);
  EXPECT_EQ(ring->rsp_prod_pvt(), 5u);
  EXPECT_EQ(ring->outstanding(), 3u);
  ASSERT_EQ(*ring->PollRequests(), 3u);  // only the three not taken yet
  auto slot = ring->NextRequestSlot();
  ASSERT_TRUE(slot.has_value());
  auto parsed = ParseRequest(p(), *slot, kGeometry);
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed.value().id, 3u);
  // The three taken earlier are answered (from the journal) at 5, 6, 7.
  for (uint64_t id : {1u, 0u, 2u}) EXPECT_TRUE(ring->WriteResponse(id, BLKIF_OP_READ, 0).ok());
  ring->PushResponsesAndCheckNotify();
  EXPECT_EQ(front_.rsp_prod(), 8u);
  // More taken than a ring holds is refused.
  EXPECT_FALSE(BlkifBackRing::Attach(p(), pages_.span(), 5, ring->size() + 1).ok());
}

TEST_P(BlkifRingTest, ReqProdMovedBackwardsIsBroken) {
  BlkifBackRing ring = Attach();
  for (int i = 0; i < 4; ++i) front_.Queue(i);
  front_.Push();
  Serve(ring);
  front_.set_req_prod(2);
  EXPECT_EQ(ring.PollRequests().status().code(), absl::StatusCode::kDataLoss);
}

TEST_P(BlkifRingTest, BrokenDetectionAcrossTheWrap) {
  const RingIdx start = 0xFFFFFFFEu;
  BlkifBackRing ring = Attach(start);
  front_.set_req_prod(start + ring.size());  // wraps to 30: legal
  EXPECT_EQ(*ring.PollRequests(), ring.size());
  front_.set_req_prod(start + ring.size() + 1);
  EXPECT_FALSE(ring.PollRequests().ok());
}

TEST_P(BlkifRingTest, MultiPageRing) {
  testing::MappedPages four(4);
  FakeFrontend front(p(), four.span());
  front.Init(0);
  auto ring = BlkifBackRing::Attach(p(), four.span());
  ASSERT_TRUE(ring.ok());
  for (uint64_t i = 0; i < 128; ++i) front.Queue(i);
  front.Push();
  ASSERT_EQ(*ring->PollRequests(), 128u);
  uint64_t expect = 0;
  while (auto slot = ring->NextRequestSlot()) {
    // Slots past the first page are where the frontend put them.
    EXPECT_EQ(ParseRequest(p(), *slot, kGeometry).value().id, expect++);
  }
  EXPECT_EQ(expect, 128u);
}

INSTANTIATE_TEST_SUITE_P(AllAbis, BlkifRingTest, ::testing::ValuesIn(testing::kAllProtocols),
                         [](const auto& info) {
                           switch (info.param) {
                             case Protocol::kX86_32:
                               return std::string("x86_32");
                             case Protocol::kX86_64:
                               return std::string("x86_64");
                             default:
                               return std::string("native");
                           }
                         });

// The native ABI against a frontend that uses the real ring.h macros and blkif.h structs.
TEST(BlkifRingNativeTest, AgainstRingHMacros) {
  testing::MappedPages page(1);
  auto* sring = reinterpret_cast<blkif_sring_t*>(page.data());
  SHARED_RING_INIT(sring);
  blkif_front_ring_t front;
  FRONT_RING_INIT(&front, sring, kXenPageSize);

  auto ring = BlkifBackRing::Attach(Protocol::kNative, page.span());
  ASSERT_TRUE(ring.ok());
  ASSERT_EQ(ring->size(), RING_SIZE(&front));

  for (int round = 0; round < 40; ++round) {  // 40 x 3 requests: wraps the 32-slot ring
    for (int i = 0; i < 3; ++i) {
      blkif_request_t* req = RING_GET_REQUEST(&front, front.req_prod_pvt);
      req->operation = BLKIF_OP_READ;
      req->nr_segments = 1;
      req->handle = 0;
      req->id = round * 3 + i;
      req->sector_number = 8 * i;
      req->seg[0] = {.gref = 9, .first_sect = 0, .last_sect = 7};
      front.req_prod_pvt++;
    }
    int notify = 0;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
    // The backend armed req_event at the end of the previous round.
    EXPECT_TRUE(notify) << round;

    ASSERT_EQ(*ring->PollRequests(), 3u);
    while (auto slot = ring->NextRequestSlot()) {
      auto parsed = ParseRequest(Protocol::kNative, *slot, kGeometry);
      ASSERT_TRUE(parsed.ok());
      ASSERT_TRUE(ring->WriteResponse(parsed.value().id, BLKIF_OP_READ, BLKIF_RSP_OKAY).ok());
    }
    const bool backend_notify = ring->PushResponsesAndCheckNotify();
    EXPECT_FALSE(ring->FinalCheckForRequests());

    int more = 0;
    RING_FINAL_CHECK_FOR_RESPONSES(&front, more);
    EXPECT_TRUE(more);
    EXPECT_TRUE(backend_notify) << round;  // the frontend was waiting (rsp_event armed)
    for (int i = 0; i < 3; ++i) {
      blkif_response_t* rsp = RING_GET_RESPONSE(&front, front.rsp_cons);
      EXPECT_EQ(rsp->id, static_cast<uint64_t>(round * 3 + i));
      EXPECT_EQ(rsp->status, BLKIF_RSP_OKAY);
      front.rsp_cons++;
    }
    RING_FINAL_CHECK_FOR_RESPONSES(&front, more);  // re-arms rsp_event
    EXPECT_FALSE(more);
  }
}

}  // namespace
}  // namespace blockplane::worker::xen
