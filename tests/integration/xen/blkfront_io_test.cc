// The userspace blkfront's data path (requests, grants, rings, workloads, verify and hostile
// modes) against ScriptedBlkback, a small test backend serving a RAM image, through the emulated
// Xen host. Nothing here is timed: every wait is bounded and fails the test when it runs out.

#include <stdint.h>
#include <sys/wait.h>
#include <xen/grant_table.h>

#include <chrono>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/event_loop.h"
#include "common/xen/xen_platform.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/harness/xen/blkfront.h"
#include "tests/harness/xen/guest_domain.h"
#include "tests/harness/xen/scripted_blkback.h"
#include "tests/harness/xen/test_support.h"
#include "tests/harness/xen/workload.h"
#include "worker/backend/ram_backend.h"
#include "worker/block/block_device.h"
#include "worker/xen/blkif_backend.h"
#include "worker/xen/blkif_request.h"

namespace blockplane::harness {
namespace {

using common::xen::CreateEmulatedXenPlatform;
using common::xen::EmulatedXenOptions;
using common::xen::GrantRef;
using common::xen::XenPlatform;
using ::testing::HasSubstr;
using worker::xen::InvalidReason;

constexpr common::xen::DomainId kGuest = 3;
constexpr uint32_t kDevid = 51712;
constexpr uint32_t kGuestPages = 4096;
constexpr uint32_t kGuestGrants = 4096;

class BlkfrontIoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto xen = StartInProcessXen(dir_.path(), kGuest, kGuestPages, kGuestGrants);
    ASSERT_TRUE(xen.ok()) << xen.status();
    xen_ = std::move(*xen);
    ASSERT_TRUE(WriteVbdToolstackEntries(xen_.dom0->xenstore(), kGuest, 0, kDevid).ok());
    paths_ = VbdPathsFor(kGuest, 0, kDevid);
  }
  void TearDown() override {
    front_.reset();
    backend_.reset();
    EXPECT_TRUE(xen_.Stop().ok());
  }

  ScriptedBlkbackOptions BackendOptions() {
    ScriptedBlkbackOptions options;
    options.dom0 = xen_.dom0.get();
    options.frontend_domid = kGuest;
    options.paths = paths_;
    options.sectors = 4096;  // 2 MiB
    return options;
  }

  // Starts the backend, connects a frontend; fails the test on error.
  void Connect(const ScriptedBlkbackOptions& backend, BlkfrontOptions front) {
    backend_ = std::make_unique<ScriptedBlkback>(backend);
    ASSERT_TRUE(backend_->Start().ok());
    front.devid = kDevid;
    front_ = std::make_unique<Blkfront>(xen_.guest_platform.get(), xen_.guest.get(), front);
    absl::Status status = front_->Connect();
    ASSERT_TRUE(status.ok()) << status;
  }

  // Disconnects and joins the backend; the report is then final.
  void Disconnect() {
    absl::Status closed = front_->Disconnect();
    backend_->Join();
    EXPECT_TRUE(closed.ok()) << closed;
    EXPECT_TRUE(backend_->report().status.ok()) << backend_->report().status;
    EXPECT_TRUE(backend_->report().closed);
  }

  // Submits one request on queue `q` and waits for its completion.
  BlkfrontCompletion RoundTrip(uint32_t q, uint32_t slot, const BlkfrontRequest& request) {
    absl::Status status = front_->Enqueue(q, slot, request);
    EXPECT_TRUE(status.ok()) << status;
    EXPECT_TRUE(front_->Push(q).ok());
    BlkfrontCompletion completion[1];
    for (int waits = 0; waits < 100; ++waits) {
      if (front_->Reap(q, completion) == 1) return completion[0];
      auto woke = front_->WaitForEvent(10000);
      EXPECT_TRUE(woke.ok() && *woke) << "no event";
    }
    ADD_FAILURE() << "no completion";
    return {};
  }

  TempDir dir_;
  InProcessXen xen_;
  VbdPaths paths_;
  std::unique_ptr<ScriptedBlkback> backend_;
  std::unique_ptr<Blkfront> front_;
};

struct AbiParams {
  const char* protocol;
  bool persistent;
};

class BlkfrontOpsTest : public BlkfrontIoTest, public ::testing::WithParamInterface<AbiParams> {};

// Every operation, byte for byte, in every ABI, with and without persistent grants.
TEST_P(BlkfrontOpsTest, EveryOperationMovesTheRightBytes) {
  const AbiParams params = GetParam();
  BlkfrontOptions options;
  options.protocol = params.protocol;
  options.persistent_grants = params.persistent;
  options.slots_per_queue = 4;
  options.max_request_bytes = 3 * 4096;
  Connect(BackendOptions(), options);
  ASSERT_EQ(front_->persistent_grants(), params.persistent);
  ASSERT_EQ(std::string(worker::xen::ProtocolName(front_->protocol())),
            std::string(params.protocol) == "native" ? "native" : params.protocol);

  // A write of 13 sectors starting 3 sectors into the slot's first page (segments: 3..7, 0..7).
  auto slot = front_->AcquireSlot(0);
  ASSERT_TRUE(slot);
  SlotView view = front_->Slot(0, *slot);
  ASSERT_GE(view.data.size(), 3u * 4096);
  std::vector<std::byte> payload(13 * 512);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = std::byte(i * 7 + 1);
  std::memset(view.data.data(), 0xcc, view.data.size());
  std::memcpy(view.data.data() + 3 * 512, payload.data(), payload.size());
  BlkfrontCompletion done = RoundTrip(0, *slot, {BlkfrontOp::kWrite, 100, 13, 3, false});
  EXPECT_EQ(done.status, BLKIF_RSP_OKAY);
  EXPECT_EQ(done.operation, BLKIF_OP_WRITE);
  if (!params.persistent) {
    // The response ended the access of every page the request granted.
    for (GrantRef ref : view.data_refs) EXPECT_EQ(xen_.guest->EntryFlags(ref), 0) << ref;
  }
  front_->ReleaseSlot(0, *slot);

  // Read it back at another buffer offset (5), plus one sector on each side.
  slot = front_->AcquireSlot(0);
  ASSERT_TRUE(slot);
  view = front_->Slot(0, *slot);
  std::memset(view.data.data(), 0xdd, view.data.size());
  done = RoundTrip(0, *slot, {BlkfrontOp::kRead, 99, 15, 5, false});
  EXPECT_EQ(done.status, BLKIF_RSP_OKAY);
  EXPECT_EQ(done.operation, BLKIF_OP_READ);
  const std::byte* got = view.data.data() + 5 * 512;
  EXPECT_EQ(got[0], std::byte{0});  // sector 99 was never written
  EXPECT_EQ(std::memcmp(got + 512, payload.data(), payload.size()), 0);
  EXPECT_EQ(got[14 * 512], std::byte{0});              // sector 113
  EXPECT_EQ(view.data[5 * 512 - 1], std::byte{0xdd});  // untouched before the data
  EXPECT_EQ(view.data[20 * 512], std::byte{0xdd});     // and after it
  front_->ReleaseSlot(0, *slot);

  // Flush, barrier (a write with ordering), discard, secure discard (not advertised).
  slot = front_->AcquireSlot(0);
  ASSERT_TRUE(slot);
  done = RoundTrip(0, *slot, {BlkfrontOp::kFlush, 0, 0, 0, false});
  EXPECT_EQ(done.status, BLKIF_RSP_OKAY);
  EXPECT_EQ(done.operation, BLKIF_OP_FLUSH_DISKCACHE);
  front_->ReleaseSlot(0, *slot);
  slot = front_->AcquireSlot(0);
  view = front_->Slot(0, *slot);
  std::memset(view.data.data(), 0xab, 512);
  done = RoundTrip(0, *slot, {BlkfrontOp::kBarrier, 200, 1, 0, false});
  EXPECT_EQ(done.status, BLKIF_RSP_OKAY);
  EXPECT_EQ(done.operation, BLKIF_OP_WRITE_BARRIER);
  front_->ReleaseSlot(0, *slot);
  slot = front_->AcquireSlot(0);
  done = RoundTrip(0, *slot, {BlkfrontOp::kDiscard, 104, 4, 0, false});
  EXPECT_EQ(done.status, BLKIF_RSP_OKAY);
  EXPECT_EQ(done.operation, BLKIF_OP_DISCARD);
  front_->ReleaseSlot(0, *slot);
  slot = front_->AcquireSlot(0);
  done = RoundTrip(0, *slot, {BlkfrontOp::kDiscard, 104, 4, 0, true});
  EXPECT_EQ(done.status, BLKIF_RSP_EOPNOTSUPP);
  front_->ReleaseSlot(0, *slot);

  Disconnect();
  const ScriptedBlkbackReport& report = backend_->report();
  EXPECT_EQ(report.protocol, params.protocol);
  EXPECT_EQ(report.invalid_total, 0u);
  EXPECT_EQ(report.ops[BLKIF_OP_WRITE], 1u);
  EXPECT_EQ(report.ops[BLKIF_OP_READ], 1u);
  EXPECT_EQ(report.ops[BLKIF_OP_FLUSH_DISKCACHE], 1u);
  EXPECT_EQ(report.ops[BLKIF_OP_WRITE_BARRIER], 1u);
  EXPECT_EQ(report.ops[BLKIF_OP_DISCARD], 1u);
  EXPECT_EQ(report.secure_discards_refused, 1u);
  EXPECT_EQ(report.frontend_persistent, params.persistent);
  EXPECT_EQ(report.persistent_refs.empty(), !params.persistent);
  const std::vector<std::byte>& image = backend_->image();
  EXPECT_EQ(std::memcmp(image.data() + 100 * 512, payload.data(), 4 * 512), 0);
  for (size_t i = 104 * 512; i < 108 * 512; ++i)
    ASSERT_EQ(image[i], std::byte{0}) << i;  // discarded
  EXPECT_EQ(std::memcmp(image.data() + 108 * 512, payload.data() + 8 * 512, 5 * 512), 0);
  EXPECT_EQ(image[200 * 512], std::byte{0xab});
  EXPECT_EQ(front_->counters().bogus_responses, 0u);
  EXPECT_EQ(front_->counters().grants_still_mapped, 0u);
}

INSTANTIATE_TEST_SUITE_P(AbisAndGrants, BlkfrontOpsTest,
                         ::testing::Values(AbiParams{"native", true}, AbiParams{"native", false},
                                           AbiParams{"x86_32-abi", true},
                                           AbiParams{"x86_32-abi", false},
                                           AbiParams{"x86_64-abi", true},
                                           AbiParams{"x86_64-abi", false}),
                         [](const ::testing::TestParamInfo<AbiParams>& info) {
                           std::string name = info.param.protocol;
                           for (char& c : name) {
                             if (c == '-') c = '_';
                           }
                           return name + (info.param.persistent ? "_persistent" : "_mapped");
                         });

TEST_F(BlkfrontIoTest, RequestsThatDoNotFitAreRefusedByTheFrontend) {
  BlkfrontOptions options;
  options.slots_per_queue = 2;
  Connect(BackendOptions(), options);
  ASSERT_EQ(front_->indirect_segments(), 0u);  // not advertised
  auto slot = front_->AcquireSlot(0);
  ASSERT_TRUE(slot);
  // 11 pages fit, 12 would need indirect segments.
  EXPECT_TRUE(absl::IsInvalidArgument(
      front_->Enqueue(0, *slot, {BlkfrontOp::kRead, 0, 11 * 8 + 1, 0, false})));
  EXPECT_TRUE(
      absl::IsInvalidArgument(front_->Enqueue(0, *slot, {BlkfrontOp::kRead, 0, 0, 0, false})));
  EXPECT_TRUE(
      absl::IsInvalidArgument(front_->Enqueue(0, *slot, {BlkfrontOp::kRead, 0, 1, 8, false})));
  EXPECT_TRUE(absl::IsFailedPrecondition(
      front_->Enqueue(0, *slot + 1 < 2 ? *slot + 1 : 0, {BlkfrontOp::kRead, 0, 1, 0, false})));
  EXPECT_EQ(front_->counters().requests, 0u);
  front_->ReleaseSlot(0, *slot);
  Disconnect();
}

// Requests above 11 pages go out indirect; their data lands where it should.
TEST_F(BlkfrontIoTest, IndirectRequestsCarryLargeBlocks) {
  ScriptedBlkbackOptions backend = BackendOptions();
  backend.max_indirect_segments = 64;
  BlkfrontOptions options;
  options.max_indirect_segments = 32;
  options.max_request_bytes = 128 * 1024;
  options.slots_per_queue = 8;
  options.persistent_grants = false;
  Connect(backend, options);
  ASSERT_EQ(front_->indirect_segments(), 32u);
  ASSERT_EQ(front_->indirect_pages_per_slot(), 1u);
  WorkloadOptions workload;
  workload.read_percent = 50;
  workload.block_bytes = 128 * 1024;
  workload.iodepth = 8;
  workload.ops = 200;
  workload.verify = true;
  workload.assume_zeroed = true;
  auto result = RunWorkload(*front_, workload);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->reads + result->writes, 200u);
  EXPECT_EQ(result->total_errors(), 0u) << result->ToJson(*front_);
  EXPECT_EQ(result->verify_failures, 0u);
  EXPECT_GT(result->sectors_verified, 0u);
  EXPECT_EQ(front_->counters().indirect_requests, 200u);
  Disconnect();
  EXPECT_EQ(backend_->report().indirect_requests, 200u);
  EXPECT_EQ(backend_->report().max_segments_seen, 32u);
  EXPECT_EQ(backend_->report().invalid_total, 0u);
}

struct TopologyParams {
  uint32_t order;
  uint32_t queues;
  bool persistent;
  const char* protocol;
};

class BlkfrontTopologyTest : public BlkfrontIoTest,
                             public ::testing::WithParamInterface<TopologyParams> {};

// A verified random mix over multi-page rings and several queues: every queue carries requests,
// the queue depth exceeds one page's ring, and every read matches the last write.
TEST_P(BlkfrontTopologyTest, VerifiedMixSpreadsOverQueues) {
  const TopologyParams params = GetParam();
  ScriptedBlkbackOptions backend = BackendOptions();
  backend.max_ring_page_order = 2;
  backend.max_queues = 4;
  BlkfrontOptions options;
  options.ring_page_order = params.order;
  options.num_queues = params.queues;
  options.persistent_grants = params.persistent;
  options.protocol = params.protocol;
  options.max_request_bytes = 8192;
  Connect(backend, options);
  ASSERT_EQ(front_->num_queues(), params.queues);
  ASSERT_EQ(front_->ring_page_order(), params.order);
  WorkloadOptions workload;
  workload.read_percent = 60;
  workload.block_bytes = 8192;
  workload.iodepth = 48;
  workload.ops = 3000;
  workload.flush_every = 10;
  workload.discard_every = 25;
  workload.barrier_every = 7;
  workload.sectors = 1024;  // small region: reads often land on written blocks
  workload.verify = true;
  workload.assume_zeroed = true;
  auto result = RunWorkload(*front_, workload);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->reads + result->writes, 3000u);
  EXPECT_EQ(result->flushes, 300u);
  EXPECT_EQ(result->discards, 120u);
  EXPECT_EQ(result->total_errors(), 0u) << result->ToJson(*front_);
  EXPECT_EQ(result->verify_failures, 0u) << result->ToJson(*front_);
  EXPECT_GT(result->sectors_verified, 1000u);
  EXPECT_TRUE(result->ok());
  const BlkfrontCounters counters = front_->counters();
  EXPECT_EQ(counters.requests, counters.responses);
  EXPECT_LE(counters.notifications_sent, counters.pushes);
  Disconnect();
  const ScriptedBlkbackReport& report = backend_->report();
  ASSERT_EQ(report.requests_per_queue.size(), params.queues);
  for (uint64_t n : report.requests_per_queue) EXPECT_GT(n, 0u);
  EXPECT_EQ(report.ring_page_order, params.order);
  EXPECT_GT(report.ops[BLKIF_OP_WRITE_BARRIER], 0u);
  EXPECT_EQ(report.ops[BLKIF_OP_WRITE_BARRIER] + report.ops[BLKIF_OP_WRITE], result->writes);
  if (params.persistent) {
    // The pool is granted once: the backend maps each ref once, and never more refs than slots.
    EXPECT_EQ(report.grant_maps, report.persistent_refs.size());
    EXPECT_LE(report.persistent_refs.size(),
              size_t{front_->slots_per_queue()} * params.queues * front_->data_pages_per_slot());
  } else {
    EXPECT_TRUE(report.persistent_refs.empty());
    EXPECT_GE(report.grant_maps, 3000u);
  }
}

INSTANTIATE_TEST_SUITE_P(RingsAndQueues, BlkfrontTopologyTest,
                         ::testing::Values(TopologyParams{0, 1, true, "x86_64-abi"},
                                           TopologyParams{2, 1, false, "x86_32-abi"},
                                           TopologyParams{1, 4, true, "native"},
                                           TopologyParams{2, 4, false, "x86_64-abi"}));

// Like a real blkfront, the workload sends no flush, discard or barrier the backend does not
// advertise, and says so.
TEST_F(BlkfrontIoTest, WorkloadSkipsWhatIsNotAdvertised) {
  ScriptedBlkbackOptions backend = BackendOptions();
  backend.flush = false;
  backend.discard = false;
  backend.barrier = false;
  BlkfrontOptions options;
  options.slots_per_queue = 4;
  options.max_request_bytes = 4096;
  Connect(backend, options);
  WorkloadOptions workload;
  workload.read_percent = 50;
  workload.iodepth = 4;
  workload.ops = 100;
  workload.flush_every = 10;
  workload.discard_every = 10;
  workload.barrier_every = 2;
  auto result = RunWorkload(*front_, workload);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->flushes + result->discards, 0u);
  EXPECT_EQ(result->total_errors(), 0u);
  EXPECT_EQ(result->not_advertised, (std::vector<std::string>{"flush", "discard", "barrier"}));
  EXPECT_THAT(result->ToJson(*front_),
              HasSubstr("\"not_advertised\":[\"flush\",\"discard\",\"barrier\"]"));
  Disconnect();
  EXPECT_EQ(backend_->report().ops[BLKIF_OP_WRITE_BARRIER], 0u);
  EXPECT_EQ(backend_->report().ops[BLKIF_OP_FLUSH_DISKCACHE], 0u);
}

// The fake backend flips a byte of sector 100 in every read: verify mode must say so, and name
// the sector.
TEST_F(BlkfrontIoTest, VerifyReportsACorruptedSector) {
  ScriptedBlkbackOptions backend = BackendOptions();
  backend.corrupt_read_sector = 100;
  BlkfrontOptions options;
  options.slots_per_queue = 4;
  options.max_request_bytes = 4096;
  Connect(backend, options);
  WorkloadOptions workload;
  workload.random = false;
  workload.read_percent = 50;
  workload.first_sector = 96;
  workload.sectors = 8;  // one block, holding sector 100
  workload.iodepth = 2;
  workload.ops = 64;
  workload.verify = true;
  auto result = RunWorkload(*front_, workload);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_GT(result->reads, 0u);
  EXPECT_GT(result->verify_failures, 0u);
  EXPECT_FALSE(result->ok());
  ASSERT_FALSE(result->mismatches.empty());
  EXPECT_EQ(result->mismatches[0].sector, 100u);
  EXPECT_EQ(result->mismatches[0].reason, "checksum");
  for (const VerifyMismatch& m : result->mismatches) EXPECT_EQ(m.sector, 100u);
  // Exactly one bad sector per read that was checked against a write.
  EXPECT_EQ(result->verify_failures * 8, result->sectors_verified);
  EXPECT_THAT(result->ToJson(*front_), HasSubstr("\"reason\":\"checksum\""));
  EXPECT_THAT(result->ToJson(*front_), HasSubstr("\"ok\":false"));
  Disconnect();
  EXPECT_EQ(backend_->report().corrupted_reads, result->reads);
}

TEST_F(BlkfrontIoTest, VerifyPassesWithoutCorruption) {
  BlkfrontOptions options;
  options.slots_per_queue = 4;
  options.max_request_bytes = 4096;
  Connect(BackendOptions(), options);
  WorkloadOptions workload;
  workload.random = false;
  workload.read_percent = 50;
  workload.first_sector = 96;
  workload.sectors = 8;
  workload.iodepth = 2;
  workload.ops = 64;
  workload.verify = true;
  auto result = RunWorkload(*front_, workload);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_GT(result->sectors_verified, 0u);
  EXPECT_EQ(result->verify_failures, 0u);
  EXPECT_TRUE(result->ok());
  Disconnect();
}

// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY and RING_FINAL_CHECK_FOR_RESPONSES, observed on the shared
// page: the frontend kicks only when req_event falls inside the pushed batch, and asks for a kick
// on the next response (rsp_event = rsp_cons + 1) when it runs out of responses. The backend is
// stopped first so that only the test moves the backend's words.
TEST_F(BlkfrontIoTest, NotificationsFollowTheRingIndices) {
  BlkfrontOptions options;
  options.slots_per_queue = 8;
  options.max_request_bytes = 4096;
  options.timeout_ms = 200;
  Connect(BackendOptions(), options);
  backend_->Stop();
  backend_->Join();
  auto* sring = reinterpret_cast<blkif_sring*>(front_->queues()[0].ring);
  auto enqueue_read = [&] {
    auto slot = front_->AcquireSlot(0);
    ASSERT_TRUE(slot);
    ASSERT_TRUE(front_->Enqueue(0, *slot, {BlkfrontOp::kRead, 0, 8, 0, false}).ok());
  };
  ASSERT_EQ(sring->req_prod, 0u);
  sring->req_event = 5;  // the backend wants a kick once request 5 (index 4) is there
  enqueue_read();
  enqueue_read();
  auto kicked = front_->Push(0);  // req_prod 0 -> 2: event 5 not reached
  ASSERT_TRUE(kicked.ok());
  EXPECT_FALSE(*kicked);
  EXPECT_EQ(sring->req_prod, 2u);
  EXPECT_FALSE(*front_->Push(0));  // nothing new: no push, no kick
  enqueue_read();
  enqueue_read();
  enqueue_read();
  kicked = front_->Push(0);  // 2 -> 5: crosses the event
  ASSERT_TRUE(kicked.ok());
  EXPECT_TRUE(*kicked);
  EXPECT_EQ(front_->counters().notifications_sent, 1u);
  EXPECT_EQ(front_->counters().pushes, 2u);

  // No responses yet: Reap finds none and asks for a kick on the first.
  BlkfrontCompletion out[8];
  EXPECT_EQ(front_->Reap(0, out), 0u);
  EXPECT_EQ(sring->rsp_event, 1u);
  // Play the backend: answer the first two requests (their ids are in the slots).
  const uint64_t first_id = [&] {
    blkif_request request;
    std::memcpy(&request, &sring->ring[0], sizeof(request));
    return request.id;
  }();
  for (int i = 0; i < 2; ++i) {
    blkif_request request;
    std::memcpy(&request, &sring->ring[i], sizeof(request));
    blkif_response response{};
    response.id = request.id;
    response.operation = BLKIF_OP_READ;
    response.status = BLKIF_RSP_OKAY;
    std::memcpy(&sring->ring[i], &response, sizeof(response));
  }
  __atomic_store_n(&sring->rsp_prod, 2u, __ATOMIC_RELEASE);
  ASSERT_EQ(front_->Reap(0, out), 2u);
  EXPECT_EQ(out[0].status, BLKIF_RSP_OKAY);
  EXPECT_EQ(out[0].slot, static_cast<uint32_t>(first_id & 0xffff));
  EXPECT_EQ(sring->rsp_event, 3u);  // next kick wanted for response 3
  EXPECT_EQ(front_->in_flight(0), 3u);
  // A response with an id no request has is dropped and counted.
  blkif_response bogus{};
  bogus.id = first_id;  // already completed
  std::memcpy(&sring->ring[2], &bogus, sizeof(bogus));
  __atomic_store_n(&sring->rsp_prod, 3u, __ATOMIC_RELEASE);
  EXPECT_EQ(front_->Reap(0, out), 0u);
  EXPECT_EQ(front_->counters().bogus_responses, 1u);
  EXPECT_EQ(front_->in_flight(0), 3u);
  // A backend claiming far more responses than requests: only the pushed entries are looked at
  // (3 and 4 still hold requests, whose bytes name no request in flight).
  __atomic_store_n(&sring->rsp_prod, 1000u, __ATOMIC_RELEASE);
  EXPECT_EQ(front_->Reap(0, out), 0u);
  EXPECT_EQ(front_->counters().responses, 5u);
  EXPECT_EQ(front_->counters().bogus_responses, 3u);
}

// Without persistent grants, a backend that still maps a request's pages when the response
// arrives: the frontend counts it, keeps that slot out of use, and takes it back once the backend
// lets go.
TEST_F(BlkfrontIoTest, SlotsWhosePagesStayMappedAreHeldBack) {
  ScriptedBlkbackOptions backend = BackendOptions();
  backend.unmap_late = true;
  BlkfrontOptions options;
  options.persistent_grants = false;
  options.slots_per_queue = 2;
  options.max_request_bytes = 4096;
  Connect(backend, options);
  auto a = front_->AcquireSlot(0);
  ASSERT_TRUE(a);
  const GrantRef ref_a = front_->Slot(0, *a).data_refs[0];
  EXPECT_EQ(RoundTrip(0, *a, {BlkfrontOp::kWrite, 0, 8, 0, false}).status, BLKIF_RSP_OKAY);
  EXPECT_EQ(front_->counters().grants_still_mapped, 1u);
  EXPECT_EQ(xen_.guest->EntryFlags(ref_a) & GTF_reading, GTF_reading);  // mapped for the write
  front_->ReleaseSlot(0, *a);

  auto b = front_->AcquireSlot(0);  // a is held back
  ASSERT_TRUE(b);
  EXPECT_NE(*b, *a);
  // The next request makes the backend drop a's mapping (and keep b's).
  EXPECT_EQ(RoundTrip(0, *b, {BlkfrontOp::kRead, 0, 8, 0, false}).status, BLKIF_RSP_OKAY);
  EXPECT_EQ(front_->counters().grants_still_mapped, 2u);
  front_->ReleaseSlot(0, *b);
  auto again = front_->AcquireSlot(0);  // no free slot: retries the held ones; a is revocable
  ASSERT_TRUE(again);
  EXPECT_EQ(*again, *a);
  EXPECT_EQ(xen_.guest->EntryFlags(ref_a), 0);
  EXPECT_FALSE(front_->AcquireSlot(0));  // b is still mapped
  front_->ReleaseSlot(0, *again);
  Disconnect();  // the backend unmaps everything at Closing; every grant is revoked
}

TEST(VerifyFormatTest, DetectsEachKindOfDamage) {
  std::byte sector[512];
  FillVerifySector(sector, 77, 5);
  EXPECT_TRUE(CheckVerifySector(sector, 77, 5).ok());
  EXPECT_EQ(CheckVerifySector(sector, 77, 5).found_generation, 5u);
  EXPECT_EQ(CheckVerifySector(sector, 78, 5).reason, "wrong_lba");
  EXPECT_EQ(CheckVerifySector(sector, 77, 6).reason, "stale_generation");
  EXPECT_EQ(CheckVerifySector(sector, 77, 0).reason, "not_zero");
  sector[300] ^= std::byte{1};
  EXPECT_EQ(CheckVerifySector(sector, 77, 5).reason, "checksum");
  std::memset(sector, 0, sizeof(sector));
  EXPECT_TRUE(CheckVerifySector(sector, 77, 0).ok());
  EXPECT_EQ(CheckVerifySector(sector, 77, 5).reason, "bad_magic");
  EXPECT_EQ(CheckVerifySector(sector, 77, 5).found_generation, 0u);
}

TEST(LatencyHistogramTest, QuantilesAreWithinOneBucket) {
  LatencyHistogram h;
  for (uint64_t i = 1; i <= 1000; ++i) h.Record(i * 1000);  // 1..1000 us
  EXPECT_EQ(h.count(), 1000u);
  auto near = [](uint64_t got, uint64_t want) { return got >= want && got <= want + want / 8; };
  EXPECT_TRUE(near(h.Quantile(0.5), 500000)) << h.Quantile(0.5);
  EXPECT_TRUE(near(h.Quantile(0.99), 990000)) << h.Quantile(0.99);
  EXPECT_EQ(h.Quantile(1.0), 1000000u);
}

struct HostileParams {
  bool read_only;
  bool persistent;
  const char* protocol;
  uint32_t indirect;
};

class BlkfrontHostileTest : public BlkfrontIoTest,
                            public ::testing::WithParamInterface<HostileParams> {};

// Every malformed kind is sent, each is refused with the right status, the good requests around
// them complete with the right data, and breaking one queue leaves the other serving.
TEST_P(BlkfrontHostileTest, EveryMalformedRequestIsRefused) {
  const HostileParams params = GetParam();
  ScriptedBlkbackOptions backend = BackendOptions();
  backend.read_only = params.read_only;
  backend.max_queues = 2;
  backend.max_indirect_segments = params.indirect;
  BlkfrontOptions options;
  options.num_queues = 2;
  options.slots_per_queue = 4;
  options.persistent_grants = params.persistent;
  options.protocol = params.protocol;
  options.max_indirect_segments = params.indirect;
  options.max_request_bytes = 8192;
  Connect(backend, options);
  WorkloadResult result;
  HostileOptions hostile;
  hostile.good_sector = 64;
  absl::Status status = RunHostile(*front_, hostile, result);
  ASSERT_TRUE(status.ok()) << status << "\n" << result.ToJson(*front_);
  std::set<std::string> kinds;
  for (const HostileCheck& check : result.hostile) {
    kinds.insert(check.kind);
    if (check.skipped) continue;
    EXPECT_TRUE(check.passed) << check.kind << ": " << check.detail;
  }
  for (const char* kind :
       {"unknown_operation", "nr_segments_0", "nr_segments_12", "first_sect_after_last_sect",
        "last_sect_8", "sector_range_past_end", "sector_range_overflow",
        "write_to_read_only_device", "indirect_too_many_segments", "indirect_zero_segments",
        "indirect_bad_operation", "indirect_bad_page_ref", "indirect_bad_page_count",
        "indirect_bad_descriptor", "discard_out_of_range", "bad_grant_ref_out_of_table",
        "bad_grant_ref_not_granted", "req_prod_far_ahead"}) {
    EXPECT_EQ(kinds.count(kind), 1u) << kind;
  }
  const uint64_t skipped = params.read_only ? 0 : 1;  // write_to_read_only_device
  EXPECT_EQ(result.invalid_checks_passed, result.hostile.size() - skipped);
  EXPECT_EQ(result.invalid_checks_failed, 0u);
  EXPECT_TRUE(result.ok());
  EXPECT_EQ(result.verify_failures, 0u);
  EXPECT_EQ(result.total_errors(), 0u) << result.ToJson(*front_);
  if (!params.read_only) {
    EXPECT_GT(result.sectors_verified, 0u);
  }
  Disconnect();
  const ScriptedBlkbackReport& report = backend_->report();
  // What the backend saw confirms each request was malformed the intended way.
  auto invalid = [&](InvalidReason reason) { return report.invalid[static_cast<size_t>(reason)]; };
  EXPECT_EQ(invalid(InvalidReason::kUnknownOperation), 1u);
  EXPECT_GE(invalid(InvalidReason::kBadNrSegments), 2u);
  EXPECT_GE(invalid(InvalidReason::kBadFirstLastSect), 2u);
  EXPECT_GE(invalid(InvalidReason::kBadSectorRange), 2u);
  EXPECT_GE(invalid(InvalidReason::kBadIndirect), 1u);
  EXPECT_EQ(invalid(InvalidReason::kReadOnlyWrite) > 0, params.read_only);
  EXPECT_GE(report.grant_map_failures, 2u);  // the two bad refs
  EXPECT_EQ(report.broken_queues, 1u);
}

INSTANTIATE_TEST_SUITE_P(Devices, BlkfrontHostileTest,
                         ::testing::Values(HostileParams{false, true, "x86_64-abi", 32},
                                           HostileParams{true, false, "x86_32-abi", 32},
                                           HostileParams{false, false, "native", 0}));

// The same frontend against the worker's blkif backend (worker/xen/blkif_backend) over a RAM
// block device, in this process: the backend on its own event-loop thread, the frontend on the
// test thread. Checks that the two sides agree on every ABI, indirect segments, persistent
// grants, multi-page rings, queues, and on the answers to malformed requests.
class ProductBackendTest : public BlkfrontIoTest {
 protected:
  void StartBackend(worker::xen::BlkifBackendOptions options, bool read_only) {
    auto loop = common::EventLoop::Create();
    ASSERT_TRUE(loop.ok()) << loop.status();
    loop_ = std::move(*loop);
    auto platform = CreateEmulatedXenPlatform(EmulatedXenOptions{dir_.path(), 0});
    ASSERT_TRUE(platform.ok()) << platform.status();
    backend_platform_ = std::move(*platform);
    worker::RamBackend::Options ram;
    ram.capacity = 4096 * 512;
    ram.limits.discard_granularity = 512;
    worker::BlockDeviceOptions device_options;
    device_options.read_only = read_only;
    device_options.discard = worker::DiscardMode::kUnmap;
    auto device = worker::BlockDevice::Create(
        loop_.get(), std::make_unique<worker::RamBackend>(loop_.get(), ram), device_options);
    ASSERT_TRUE(device.ok()) << device.status();
    device_ = std::move(*device);
    options.frontend_domid = kGuest;
    options.devid = kDevid;
    options.backend_path = paths_.backend;
    blkback_ = std::make_unique<worker::xen::BlkifBackend>(loop_.get(), backend_platform_.get(),
                                                           device_.get(), options,
                                                           worker::xen::BlkifBackend::Callbacks{});
    // Started before the loop thread exists, so still single-threaded.
    absl::Status started = blkback_->Start();
    ASSERT_TRUE(started.ok()) << started;
    loop_thread_ = std::thread([this] { loop_->Run(); });
  }

  void ConnectFront(BlkfrontOptions options) {
    options.devid = kDevid;
    front_ = std::make_unique<Blkfront>(xen_.guest_platform.get(), xen_.guest.get(), options);
    absl::Status status = front_->Connect();
    ASSERT_TRUE(status.ok()) << status;
  }

  // A verified random 50/50 read/write run of `ops` blocks over the first 4096 sectors, which
  // must end with no error and no verify failure.
  void RunVerifiedMix(uint32_t block_bytes, uint32_t iodepth, uint64_t ops) {
    WorkloadOptions workload;
    workload.read_percent = 50;
    workload.block_bytes = block_bytes;
    workload.iodepth = iodepth;
    workload.ops = ops;
    workload.sectors = 4096;
    workload.verify = true;
    auto result = RunWorkload(*front_, workload);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->total_errors(), 0u) << result->ToJson(*front_);
    EXPECT_EQ(result->verify_failures, 0u);
  }

  // Disconnects the frontend (if still connected), then destroys the backend on its loop thread
  // and stops the loop; stats_ keeps the backend's last counters. Idempotent.
  void StopBackend() {
    if (front_) {
      absl::Status closed = front_->Disconnect();
      EXPECT_TRUE(closed.ok()) << closed;
      front_.reset();
    }
    if (loop_thread_.joinable()) {
      loop_->Post([this] {
        stats_ = blkback_->Stats();
        blkback_.reset();
        device_.reset();
        loop_->Stop();
      });
      loop_thread_.join();
    }
    backend_platform_.reset();
  }

  void TearDown() override {
    StopBackend();
    BlkfrontIoTest::TearDown();
  }

  std::unique_ptr<common::EventLoop> loop_;
  std::unique_ptr<XenPlatform> backend_platform_;
  std::unique_ptr<worker::BlockDevice> device_;
  std::unique_ptr<worker::xen::BlkifBackend> blkback_;
  std::thread loop_thread_;
  worker::xen::BlkifBackendStats stats_;
};

// Linux's xenbus reconnect: a second frontend after the first closed, with another queue count,
// ring size and ABI. The backend, Closed, goes back to InitWait on Initialising and serves the new
// rings (none of the first connection's keys linger); data written by the first is read back by
// the second.
TEST_F(ProductBackendTest, ReconnectsAfterClose) {
  StartBackend(worker::xen::BlkifBackendOptions{}, /*read_only=*/false);
  BlkfrontOptions options;
  options.slots_per_queue = 8;
  options.max_request_bytes = 4096;
  options.num_queues = 2;
  options.ring_page_order = 1;
  ConnectFront(options);
  ASSERT_EQ(front_->num_queues(), 2u);
  WorkloadOptions workload;
  workload.random = false;
  workload.read_percent = 0;
  workload.iodepth = 8;
  workload.ops = 64;  // sectors 0..511
  workload.verify = true;
  auto first = RunWorkload(*front_, workload);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->total_errors(), 0u);
  ASSERT_TRUE(front_->Disconnect().ok());
  front_.reset();

  options.protocol = "x86_32-abi";  // a different guest kernel this time
  options.persistent_grants = false;
  options.num_queues = 1;
  options.ring_page_order = 0;
  ConnectFront(options);
  ASSERT_EQ(front_->num_queues(), 1u);
  auto slot = front_->AcquireSlot(0);
  ASSERT_TRUE(slot);
  EXPECT_EQ(RoundTrip(0, *slot, {BlkfrontOp::kRead, 8, 8, 0, false}).status, BLKIF_RSP_OKAY);
  const std::byte* data = front_->Slot(0, *slot).data.data();
  for (uint32_t i = 0; i < 8; ++i) {
    // Sequential writes of one block each: block 1 (sectors 8..15) was the second write.
    EXPECT_TRUE(CheckVerifySector(data + i * 512, 8 + i, 2).ok()) << i;
  }
  front_->ReleaseSlot(0, *slot);
}

struct ProductParams {
  const char* protocol;
  bool persistent;
  uint32_t order;
  uint32_t queues;
  uint32_t indirect;
  uint32_t block_bytes;
};

class ProductBackendWorkloadTest : public ProductBackendTest,
                                   public ::testing::WithParamInterface<ProductParams> {};

TEST_P(ProductBackendWorkloadTest, VerifiedMixCompletes) {
  const ProductParams params = GetParam();
  worker::xen::BlkifBackendOptions backend;
  backend.max_indirect_segments = 64;
  StartBackend(backend, /*read_only=*/false);
  BlkfrontOptions options;
  options.protocol = params.protocol;
  options.persistent_grants = params.persistent;
  options.ring_page_order = params.order;
  options.num_queues = params.queues;
  options.max_indirect_segments = params.indirect;
  options.max_request_bytes = params.block_bytes;
  options.slots_per_queue = 16;
  ConnectFront(options);
  ASSERT_EQ(front_->persistent_grants(), params.persistent);
  WorkloadOptions workload;
  workload.read_percent = 60;
  workload.block_bytes = params.block_bytes;
  workload.iodepth = 16 * params.queues;
  workload.ops = 2000;
  workload.flush_every = 20;
  workload.discard_every = 50;
  workload.barrier_every = 5;
  workload.sectors = 2048;
  workload.verify = true;
  workload.assume_zeroed = true;
  workload.read_back = true;
  auto result = RunWorkload(*front_, workload);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->total_errors(), 0u) << result->ToJson(*front_);
  EXPECT_EQ(result->verify_failures, 0u) << result->ToJson(*front_);
  EXPECT_GT(result->sectors_verified, 1000u);
  EXPECT_EQ(result->flushes, 100u);
  EXPECT_EQ(result->discards, 40u);
  if (params.block_bytes > 11 * 4096) {
    EXPECT_GT(front_->counters().indirect_requests, 0u);
  }
  EXPECT_EQ(front_->counters().bogus_responses, 0u);
}

INSTANTIATE_TEST_SUITE_P(Negotiations, ProductBackendWorkloadTest,
                         ::testing::Values(ProductParams{"x86_64-abi", true, 0, 1, 0, 4096},
                                           ProductParams{"x86_32-abi", false, 1, 2, 0, 8192},
                                           ProductParams{"native", true, 2, 4, 32, 64 * 1024},
                                           ProductParams{"x86_32-abi", false, 0, 2, 32,
                                                         128 * 1024}));

// Polling on both sides (--xen-poll-us in the worker, --poll in bp-blkfront): the backend looks
// at the ring on every pass for poll_ns after its last request instead of setting req_event,
// and the polling frontend never sets rsp_event, so neither side sends events while requests
// keep coming. Once the backend has been idle for poll_ns it asks for kicks again, and a
// frontend that sleeps on its event channel is served.
TEST_F(ProductBackendTest, PollingSidesExchangeNoEventsAndFallBackToKicks) {
  worker::xen::BlkifBackendOptions backend;
  backend.poll_ns = 200'000'000;  // 200 ms: a loaded machine does not end the polling early
  StartBackend(backend, /*read_only=*/false);
  BlkfrontOptions options;
  options.slots_per_queue = 16;
  ConnectFront(options);
  WorkloadOptions workload;
  workload.read_percent = 50;
  workload.iodepth = 8;
  workload.ops = 4000;
  workload.sectors = 2048;
  workload.verify = true;
  workload.poll = true;
  auto polled = RunWorkload(*front_, workload);
  ASSERT_TRUE(polled.ok()) << polled.status();
  EXPECT_EQ(polled->total_errors(), 0u) << polled->ToJson(*front_);
  EXPECT_EQ(polled->verify_failures, 0u);
  const BlkfrontCounters polling = front_->counters();
  // The first push kicks (the ring starts with req_event 1); then the backend polls.
  EXPECT_GE(polling.notifications_sent, 1u);
  EXPECT_LT(polling.notifications_sent, 20u) << polled->ToJson(*front_);
  EXPECT_GE(polling.pushes, 4000u / 8) << polled->ToJson(*front_);  // at most iodepth per push
  // Responses were pushed without events: at most the first one kicked (rsp_event starts at 1).
  EXPECT_LE(blkback_->Stats().notifications_sent, 1u);

  // Idle for longer than the window, then a frontend that sleeps until kicked.
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  workload.poll = false;
  workload.ops = 200;
  auto kicked = RunWorkload(*front_, workload);
  ASSERT_TRUE(kicked.ok()) << kicked.status();
  EXPECT_EQ(kicked->total_errors(), 0u) << kicked->ToJson(*front_);
  EXPECT_GT(front_->counters().notifications_sent, polling.notifications_sent);
  EXPECT_GT(front_->counters().events_received, polling.events_received);
  StopBackend();
  EXPECT_EQ(stats_.broken_queues, 0u);
}

// With persistent grants the indirect descriptor pages stay mapped like the data pages (blkback
// does the same): after the first use of each slot, an indirect request maps nothing.
TEST_F(ProductBackendTest, IndirectPagesArePersistentGrants) {
  worker::xen::BlkifBackendOptions backend;
  backend.max_indirect_segments = 32;
  StartBackend(backend, /*read_only=*/false);
  BlkfrontOptions options;
  options.max_indirect_segments = 32;
  options.max_request_bytes = 64 * 1024;  // 16 pages: above 11, so every request is indirect
  options.slots_per_queue = 8;
  ConnectFront(options);
  ASSERT_TRUE(front_->persistent_grants());
  ASSERT_NO_FATAL_FAILURE(RunVerifiedMix(64 * 1024, /*iodepth=*/8, /*ops=*/1000));
  EXPECT_GE(front_->counters().indirect_requests, 1000u);
  const worker::xen::BlkifBackendStats stats = blkback_->Stats();
  // At most every slot's 16 data pages and 1 indirect page, plus the ring: not one per request.
  EXPECT_LE(stats.grant_maps, 8u * 17 + 1) << "grant maps " << stats.grant_maps;
  EXPECT_GE(stats.persistent_hits, 1000u * 17 - 8 * 17);
  StopBackend();
  EXPECT_EQ(stats_.grant_maps, stats_.grant_unmaps);
}

// More pages in use than the cache may keep (blkback's max_persistent_grants): the cache never
// grows past the cap, releases unused grants to make room, serves the pages that do not fit for
// one request only, and the data stays right through all of it.
TEST_F(ProductBackendTest, PersistentGrantCacheStaysWithinItsCap) {
  worker::xen::BlkifBackendOptions backend;
  backend.max_persistent_grants = 8;
  StartBackend(backend, /*read_only=*/false);
  BlkfrontOptions options;
  options.slots_per_queue = 32;
  ConnectFront(options);
  ASSERT_TRUE(front_->persistent_grants());
  // Two pages per request.
  ASSERT_NO_FATAL_FAILURE(RunVerifiedMix(8192, /*iodepth=*/32, /*ops=*/4000));
  const worker::xen::BlkifBackendStats stats = blkback_->Stats();
  EXPECT_LE(stats.persistent_grants_mapped, 8u);
  EXPECT_GT(stats.persistent_evictions, 0u);
  EXPECT_GT(stats.persistent_hits, 0u);
  // 32 slots of 2 pages take turns in 8 places: most pages are mapped again and again.
  EXPECT_GT(stats.persistent_misses, 4000u);
  // Every page mapped is either still cached or was unmapped (at eviction, or after its request).
  EXPECT_EQ(stats.grant_maps - stats.grant_unmaps, stats.persistent_grants_mapped + 1);  // + ring
  StopBackend();
  EXPECT_EQ(stats_.grant_maps, stats_.grant_unmaps);
  EXPECT_EQ(stats_.persistent_grants_mapped, 0u);
}

class ProductBackendHostileTest : public ProductBackendTest,
                                  public ::testing::WithParamInterface<bool> {};

TEST_P(ProductBackendHostileTest, RefusesEveryMalformedRequestAndKeepsServing) {
  const bool read_only = GetParam();
  worker::xen::BlkifBackendOptions backend;
  backend.max_indirect_segments = 32;
  StartBackend(backend, read_only);
  BlkfrontOptions options;
  options.num_queues = 2;
  options.slots_per_queue = 4;
  options.max_indirect_segments = 32;
  options.persistent_grants = !read_only;
  options.max_request_bytes = 8192;
  ConnectFront(options);
  WorkloadResult result;
  absl::Status status = RunHostile(*front_, HostileOptions{}, result);
  ASSERT_TRUE(status.ok()) << status << "\n" << result.ToJson(*front_);
  for (const HostileCheck& check : result.hostile) {
    if (!check.skipped) {
      EXPECT_TRUE(check.passed) << check.kind << ": " << check.detail;
    }
  }
  EXPECT_EQ(result.invalid_checks_failed, 0u);
  EXPECT_EQ(result.invalid_checks_passed, result.hostile.size() - (read_only ? 0 : 1));
  EXPECT_EQ(result.total_errors(), 0u) << result.ToJson(*front_);
  // The broken queue is gone; the other one still serves a verified workload.
  WorkloadOptions workload;
  workload.read_percent = read_only ? 100 : 50;
  workload.iodepth = 4;
  workload.ops = 200;
  workload.verify = !read_only;
  auto after = RunWorkload(*front_, workload);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->total_errors(), 0u) << after->ToJson(*front_);
  EXPECT_EQ(after->verify_failures, 0u);
  StopBackend();
  EXPECT_EQ(stats_.broken_queues, 1u);
  EXPECT_GE(stats_.invalid[static_cast<size_t>(InvalidReason::kUnknownOperation)], 1u);
}

INSTANTIATE_TEST_SUITE_P(Devices, ProductBackendHostileTest, ::testing::Values(false, true));

#ifdef BP_BLKFRONT_PATH
// The CLI: runs as its own process against this test's emulated host and scripted backend,
// prints one JSON object, and its exit code says whether verification passed.
class BlkfrontCliTest : public BlkfrontIoTest {
 protected:
  CommandResult RunCli(std::vector<std::string> extra) {
    std::vector<std::string> argv = {BP_BLKFRONT_PATH,       "--run-dir", dir_.path(), "--domid",
                                     std::to_string(kGuest), "--vdev",    "xvda"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return RunXenstoreTool(argv, dir_.path() + "/xenstored", 60000);
  }
};

TEST_F(BlkfrontCliTest, VerifiedRunPrintsJsonAndSucceeds) {
  backend_ = std::make_unique<ScriptedBlkback>(BackendOptions());
  ASSERT_TRUE(backend_->Start().ok());
  CommandResult run =
      RunCli({"--workload", "randrw", "--bs", "4096", "--iodepth", "8", "--ops", "500", "--verify",
              "--flush-every", "50", "--protocol", "x86_32-abi", "--persistent-grants", "off"});
  backend_->Join();
  EXPECT_EQ(run.exit_code, 0) << run.err;
  EXPECT_THAT(run.out, HasSubstr("\"ops\":510"));
  EXPECT_THAT(run.out, HasSubstr("\"protocol\":\"x86_32-abi\""));
  EXPECT_THAT(run.out, HasSubstr("\"persistent_grants\":false"));
  EXPECT_THAT(run.out, HasSubstr("\"failures\":0"));
  EXPECT_THAT(run.out, HasSubstr("\"ok\":true"));
  EXPECT_TRUE(backend_->report().closed);
}

TEST_F(BlkfrontCliTest, CorruptionFailsTheRun) {
  ScriptedBlkbackOptions backend = BackendOptions();
  backend.corrupt_read_sector = 8;
  backend_ = std::make_unique<ScriptedBlkback>(backend);
  ASSERT_TRUE(backend_->Start().ok());
  CommandResult run =
      RunCli({"--workload", "seqwrite", "--bs", "4096", "--ops", "4", "--verify", "--then-read"});
  backend_->Join();
  EXPECT_EQ(run.exit_code, 1) << run.out << run.err;
  EXPECT_THAT(run.out, HasSubstr("\"sector\":8"));
  EXPECT_THAT(run.out, HasSubstr("\"ok\":false"));
}

TEST_F(BlkfrontCliTest, HostileRunPasses) {
  ScriptedBlkbackOptions backend = BackendOptions();
  backend.max_queues = 2;
  backend.max_indirect_segments = 32;
  backend_ = std::make_unique<ScriptedBlkback>(backend);
  ASSERT_TRUE(backend_->Start().ok());
  CommandResult run = RunCli({"--queues", "2", "--indirect", "32", "--hostile"});
  backend_->Join();
  EXPECT_EQ(run.exit_code, 0) << run.out << run.err;
  EXPECT_THAT(run.out, HasSubstr("\"failed\":0"));
  EXPECT_THAT(run.out, HasSubstr("\"kind\":\"req_prod_far_ahead\""));
}

TEST_F(BlkfrontCliTest, BadFlagsAreRejected) {
  CommandResult run = RunCli({"--workload", "sideways"});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_THAT(run.err, HasSubstr("--workload"));
}
#endif

}  // namespace
}  // namespace blockplane::harness
