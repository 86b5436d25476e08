// A worker killed with SIGKILL in the middle of guest I/O loses no request (issue 4): the
// controller starts the next generation, which re-attaches to the guest's rings without the guest
// noticing and answers, from the request journal, every request the dead worker had taken and
// not answered, exactly once. The guest here is bp-blkfront, a separate process running a
// verified workload; it must finish with no error, no verify failure, every op counted once, and
// a clean disconnect (no grant left mapped: the emulated hypervisor released the dead worker's
// pins, as gntdev does).

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/harness/xen/test_support.h"
#include "tests/integration/controller/fixture.h"
#include "tests/integration/xen/xen_e2e_fixture.h"
#include "worker/metrics/stats_segment.h"
#include "worker/xen/blkif_backend.h"
#include "worker/xen/blkif_journal.h"

namespace blockplane::xen_e2e {
namespace {

using harness::GuestIo;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr uint32_t kGuestPages = 16384;
constexpr uint32_t kGuestGrants = 8192;
constexpr uint64_t kDiskSize = 64ull << 20;

// The sum over queues of the blkif requests_replayed counter in the device's stats segment
// (read-only mapping; the counters outlive every worker generation); -1 if it cannot be read.
int64_t ReplayedInStatsSegment(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  void* map = ::mmap(nullptr, sizeof(worker::StatsSegmentLayout), PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return -1;
  const auto* layout = static_cast<const worker::StatsSegmentLayout*>(map);
  int64_t sum = 0;
  for (const worker::StatsSegmentQueueCounters& queue : layout->transport) {
    sum += static_cast<int64_t>(
        reinterpret_cast<const worker::xen::BlkifCounters*>(queue.data())->requests_replayed.Get());
  }
  ::munmap(map, sizeof(worker::StatsSegmentLayout));
  return sum;
}

struct CrashRun {
  bool persistent_grants = true;
  bool grant_copy = false;
  uint32_t queues = 2;
  uint32_t iodepth = 16;
  int kills = 3;
};

class WorkerCrashTest : public XenE2eTest {
 protected:
  void Start(const CrashRun& run) {
    StartXenHost(kGuest, kGuestPages, kGuestGrants);
    if (HasFatalFailure()) return;
    std::vector<std::string> flags;
    if (run.grant_copy) flags.push_back("--xen-grant-copy");
    StartController(flags);
    v1::DeviceSpec spec =
        testing::XenSpec(controller_->CreateDisk("disk0.img", kDiskSize), kGuest, "xvda");
    spec.mutable_xen()->set_max_queues(run.queues);
    spec.mutable_xen()->set_persistent_grants(run.persistent_grants);
    spec.mutable_backend()->set_cache(v1::CACHE_MODE_WRITEBACK);
    grpc::ClientContext context;
    v1::AttachDeviceRequest request;
    request.set_device_id("xd0");
    *request.mutable_spec() = spec;
    v1::Device device;
    grpc::Status status = controller_->stub().AttachDevice(&context, request, &device);
    ASSERT_TRUE(status.ok()) << status.error_message();
  }

  // A Blkfront on xvda of kGuest, one queue of 8 slots, connected (the guest's handles must be
  // open: ConnectGuest).
  std::unique_ptr<Blkfront> ConnectedFront() {
    BlkfrontOptions options;
    options.devid = kDevid;
    options.slots_per_queue = 8;
    options.timeout_ms = 20000;
    auto front = std::make_unique<Blkfront>(guest_platform_.get(), guest_.get(), options);
    absl::Status connected = front->Connect();
    EXPECT_TRUE(connected.ok()) << connected << "\n" << ReadWholeFile(controller_->log_path());
    return connected.ok() ? std::move(front) : nullptr;
  }

  // Writes `data` (whole 4 KiB blocks) at sector 0 through `front`, or reads that many blocks
  // back into it; every request must succeed.
  static void BlockIo(Blkfront& front, BlkfrontOp op, std::span<uint8_t> data) {
    std::vector<GuestIo> ios(data.size() / kPage);
    for (uint32_t b = 0; b < ios.size(); ++b) {
      ios[b].request = {op, uint64_t{b} * kSectorsPerPage, kSectorsPerPage};
      if (op == BlkfrontOp::kWrite) {
        ios[b].write_data = data.subspan(b * kPage, kPage);
      } else {
        ios[b].read_data = data.subspan(b * kPage, kPage);
      }
    }
    auto done = harness::RunGuestRequests(front, ios, 4);
    ASSERT_TRUE(done.ok()) << done.status();
    for (const BlkfrontCompletion& c : *done) ASSERT_EQ(c.status, BLKIF_RSP_OKAY);
  }

  // Eight 4 KiB blocks of a pattern.
  static std::vector<uint8_t> Pattern(uint32_t seed) {
    std::vector<uint8_t> pattern(8 * kPage);
    for (size_t i = 0; i < pattern.size(); ++i) {
      pattern[i] = static_cast<uint8_t>(i * seed + i / kPage + 1);
    }
    return pattern;
  }

  // One queue, and guest kGuest's handles open (the start of every in-process crash case).
  void StartOneQueueWithGuest() {
    Start(CrashRun{.queues = 1});
    if (::testing::Test::HasFatalFailure()) return;
    ConnectGuest(kGuest);
  }

  // Stops the device's worker with SIGSTOP; `before` is the device as it was, `pid` the worker.
  void FreezeWorker(v1::Device* before, pid_t* pid) {
    *before = GetDevice();
    *pid = before->status().worker_pid();
    ASSERT_GT(*pid, 0);
    ASSERT_EQ(::kill(*pid, SIGSTOP), 0);
  }

  // Reads back through `front` the blocks that `pattern` was written to (at sector 0).
  static void ExpectReadBack(Blkfront& front, const std::vector<uint8_t>& pattern) {
    std::vector<uint8_t> read_back(pattern.size(), 0);
    ASSERT_NO_FATAL_FAILURE(BlockIo(front, BlkfrontOp::kRead, read_back));
    EXPECT_EQ(read_back, pattern);
  }

  // Runs bp-blkfront's verified randrw workload while killing the worker `run.kills` times,
  // each time once the previous generation has the guest connected and has served it a while.
  void RunWithKills(const CrashRun& run) {
    Start(run);
    if (HasFatalFailure()) return;
    const uint32_t flush_every = 50;
    std::vector<std::string> argv = {BP_BLKFRONT_PATH,
                                     "--run-dir",
                                     run_dir_.path(),
                                     "--domid",
                                     std::to_string(kGuest),
                                     "--vdev",
                                     "xvda",
                                     "--queues",
                                     std::to_string(run.queues),
                                     "--persistent-grants",
                                     run.persistent_grants ? "on" : "off",
                                     "--workload",
                                     "randrw",
                                     "--rwmix-read",
                                     "50",
                                     "--bs",
                                     "4k",
                                     "--iodepth",
                                     std::to_string(run.iodepth),
                                     "--runtime",
                                     std::to_string(2 + 2 * run.kills),
                                     "--flush-every",
                                     std::to_string(flush_every),
                                     "--verify",
                                     "--assume-zeroed",
                                     "--timeout-ms",
                                     "30000"};
    std::atomic<bool> done{false};
    harness::CommandResult result;
    std::thread guest([&] {
      result = harness::RunXenstoreTool(argv, run_dir_.path() + "/xenstored", 240000);
      done = true;
    });

    int kills = 0;
    uint64_t killed_generation = 0;
    for (int i = 0; i < run.kills && !done; ++i) {
      // The guest is connected to a newer generation and doing I/O through it.
      int32_t pid = 0;
      uint64_t generation = 0;
      if (!testing::WaitFor(
              [&] {
                if (done) return true;
                v1::Device device = GetDevice();
                if (device.status().state() != v1::DEVICE_STATE_CONNECTED ||
                    device.status().worker_generation() <= killed_generation) {
                  return false;
                }
                pid = device.status().worker_pid();
                generation = device.status().worker_generation();
                return true;
              },
              30000) ||
          done) {
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(700));
      if (done) break;
      ASSERT_GT(pid, 0);
      ASSERT_EQ(::kill(pid, SIGKILL), 0);
      ++kills;
      killed_generation = generation;
    }
    guest.join();
    const std::string log = ReadWholeFile(controller_->log_path());
    SCOPED_TRACE("bp-blkfront stdout: " + result.out + "\nstderr: " + result.err);

    // Every kill hit a guest with I/O in flight: otherwise the test proves nothing.
    ASSERT_EQ(kills, run.kills) << "the workload finished before the kills\n" << log;
    EXPECT_EQ(result.exit_code, 0) << log;
    EXPECT_THAT(result.out, HasSubstr("\"errors\":{\"total\":0,"));
    EXPECT_THAT(result.out, HasSubstr("\"failures\":0"));
    EXPECT_THAT(result.out, HasSubstr("\"ok\":true"));
    EXPECT_THAT(result.out, Not(HasSubstr("\"error\":")));
    // Every request issued got exactly one response (a duplicate would also be a bogus_response
    // error, a lost one would hang the run), and each is one op of the workload.
    const int64_t ops = JsonNumber(result.out, "\"ops\":");
    EXPECT_GT(ops, 1000);
    EXPECT_EQ(JsonNumber(result.out, "\"requests\":"), ops);
    EXPECT_EQ(JsonNumber(result.out, "\"responses\":"), ops);
    EXPECT_EQ(JsonNumber(result.out, "\"reads\":") + JsonNumber(result.out, "\"writes\":") +
                  JsonNumber(result.out, "\"flushes\":"),
              ops);
    EXPECT_GT(JsonNumber(result.out, "\"flushes\":"), 0);
    // The clean disconnect worked: no grant of the guest is still mapped.
    EXPECT_THAT(result.err, Not(HasSubstr("bp-blkfront: disconnect:")));
    // A new worker generation per kill, each resuming the rings from the journal.
    EXPECT_TRUE(testing::WaitFor([&] {
      v1::Device device = GetDevice();
      return device.status().worker_generation() > killed_generation &&
             device.status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
    }));
    EXPECT_THAT(log, HasSubstr("resumed at rsp_prod"));
    // How many requests the new generations answered from the journal (usually some per kill;
    // zero when a kill found nothing taken and unanswered, so it is reported, not asserted).
    int64_t replayed = 0;
    for (size_t at = log.find("resumed at rsp_prod"); at != std::string::npos;
         at = log.find("resumed at rsp_prod", at + 1)) {
      replayed += JsonNumber(log.substr(at, log.find('\n', at) - at), ": ");
    }
    std::printf("%d kill(s), %lld request(s) answered again from the journal\n", kills,
                static_cast<long long>(replayed));
    // The per-queue counter (blockplane_xen_ring_requests_replayed_total) counts exactly what the
    // logs announced, summed over the generations (the segment survives them).
    EXPECT_EQ(ReplayedInStatsSegment(worker::StatsSegmentPath(controller_->state_dir(), "xd0")),
              replayed);
    EXPECT_THAT(log, Not(HasSubstr("request journal does not match")));

    // The journal lives next to the stats segment until the device is detached.
    const std::string journal = worker::xen::BlkifJournalPath(controller_->state_dir(), "xd0");
    struct stat st {};
    EXPECT_EQ(stat(journal.c_str(), &st), 0);
    grpc::ClientContext context;
    v1::DetachDeviceRequest detach;
    detach.set_device_id("xd0");
    v1::DetachDeviceResponse detached;
    grpc::Status status = controller_->stub().DetachDevice(&context, detach, &detached);
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_NE(stat(journal.c_str(), &st), 0);
    // The last generation's summary at detach (BlkifBackend::Stats(), over the segment that
    // outlived the others) counts the replays of every generation.
    EXPECT_TRUE(testing::WaitFor([&] {
      return ReadWholeFile(controller_->log_path())
                 .find(" requests (" + std::to_string(replayed) + " replayed from the journal)") !=
             std::string::npos;
    })) << ReadWholeFile(controller_->log_path());
  }
};

TEST_F(WorkerCrashTest, TwoQueuesVerifiedRandrwSurviveRepeatedKills) {
  RunWithKills(CrashRun{.queues = 2, .iodepth = 16, .kills = 3});
}

TEST_F(WorkerCrashTest, OneQueueWithoutPersistentGrantsSurvivesKills) {
  RunWithKills(CrashRun{.persistent_grants = false, .queues = 1, .iodepth = 8, .kills = 2});
}

TEST_F(WorkerCrashTest, OneQueueInGrantCopyModeSurvivesKills) {
  RunWithKills(CrashRun{.grant_copy = true, .queues = 1, .iodepth = 8, .kills = 2});
}

// The worker dies while the guest closes the device: it is frozen (SIGSTOP) before it can see
// the frontend's Closing, then killed. The next generation finds the frontend Closing and must
// finish the close (backend Closing, then Closed) so that the guest's Disconnect returns, with
// none of the dead worker's grant maps left behind (the guest revokes every grant); then the same
// guest connects again and reads back, through the new worker, what it wrote before.
TEST_F(WorkerCrashTest, WorkerKilledWhileTheGuestClosesLetsItCloseAndReconnect) {
  StartOneQueueWithGuest();
  if (HasFatalFailure()) return;
  blkfront_ = ConnectedFront();
  ASSERT_TRUE(blkfront_);
  // Writes with persistent grants, so the worker holds maps of the guest's pages.
  std::vector<uint8_t> pattern = Pattern(7);
  ASSERT_NO_FATAL_FAILURE(BlockIo(*blkfront_, BlkfrontOp::kWrite, pattern));

  v1::Device before;
  pid_t pid = 0;
  ASSERT_NO_FATAL_FAILURE(FreezeWorker(&before, &pid));
  ASSERT_EQ(before.status().state(), v1::DEVICE_STATE_CONNECTED);
  absl::Status closed = absl::UnknownError("Disconnect did not return");
  std::thread closer([&] { closed = blkfront_->Disconnect(); });
  // The frontend has said Closing and now waits for the backend, which cannot answer.
  const std::string frontend_state = blkfront_->paths().frontend + "/state";
  EXPECT_TRUE(testing::WaitFor([&] {
    auto state = guest_platform_->xenstore().Read(frontend_state, common::xen::kNoTransaction);
    return state.ok() && *state == "5";  // XenbusStateClosing
  }));
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  closer.join();
  const std::string log = ReadWholeFile(controller_->log_path());
  ASSERT_TRUE(closed.ok()) << closed << "\n" << log;
  EXPECT_TRUE(testing::WaitFor([&] {
    v1::Device device = GetDevice();
    return device.status().worker_generation() > before.status().worker_generation() &&
           device.status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
  })) << GetDevice().DebugString();

  // A fresh connection of the same guest, served by the new worker, sees the data.
  blkfront_ = ConnectedFront();
  ASSERT_TRUE(blkfront_);
  ASSERT_NO_FATAL_FAILURE(ExpectReadBack(*blkfront_, pattern));
  EXPECT_TRUE(blkfront_->Disconnect().ok());
  blkfront_.reset();
}

// The guest's driver starts over while no worker runs: the worker is frozen, the old frontend
// goes away without closing, and a new one does its handshake on new rings. It finds the
// backend's state still Connected in xenstore and connects at once, as Linux blkfront would.
// Then the worker is killed. The next generation must not apply the journal of the old rings to
// the new ones (it would answer requests the new rings never carried and skip ones they do):
// the new rings are served afresh, every request on them is answered, and the data written
// through the old ones is there.
TEST_F(WorkerCrashTest, FrontendThatStartsOverWhileNoWorkerRunsIsServedAfresh) {
  StartOneQueueWithGuest();
  if (HasFatalFailure()) return;
  blkfront_ = ConnectedFront();
  ASSERT_TRUE(blkfront_);
  // Some requests on the first rings, so that the journal's req_cons is past 0.
  std::vector<uint8_t> pattern = Pattern(13);
  ASSERT_NO_FATAL_FAILURE(BlockIo(*blkfront_, BlkfrontOp::kWrite, pattern));

  v1::Device before;
  pid_t pid = 0;
  ASSERT_NO_FATAL_FAILURE(FreezeWorker(&before, &pid));
  // The old driver is gone without closing (its pages stay granted, as Linux leaks them).
  std::unique_ptr<Blkfront> old = std::move(blkfront_);
  blkfront_ = ConnectedFront();
  ASSERT_TRUE(blkfront_);
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  EXPECT_TRUE(testing::WaitFor([&] {
    v1::Device device = GetDevice();
    return device.status().worker_generation() > before.status().worker_generation() &&
           device.status().state() == v1::DEVICE_STATE_CONNECTED;
  })) << GetDevice().DebugString();
  const std::string log = ReadWholeFile(controller_->log_path());
  // Neither resumed nor even compared with the journal: the rings are not the recorded ones.
  EXPECT_THAT(log, Not(HasSubstr("resumed at rsp_prod"))) << log;
  EXPECT_THAT(log, Not(HasSubstr("request journal does not match"))) << log;

  // The new rings serve every request, and the data written through the old ones is there.
  ASSERT_NO_FATAL_FAILURE(ExpectReadBack(*blkfront_, pattern));
  EXPECT_TRUE(blkfront_->Disconnect().ok());
  blkfront_.reset();
  old.reset();
}

// The narrow case of the test above: the old frontend had requests taken (recorded in the
// journal) and no response published yet, and the new one starts over on the same grant refs, the
// same ring page and the same event-channel port (Xen hands out the lowest free port, guests reuse
// freed refs). Grant refs, ports and counts then all match the journal, and its requests (3
// taken, rsp_prod 0) add up on the fresh ring as well; only the mark the backend wrote into the
// ring header at connect, which the new frontend's SHARED_RING_INIT wiped, tells the rings apart.
// Without it the next generation would answer the old requests on the new ring (ids the new
// frontend never issued) and skip the new frontend's first three requests.
TEST_F(WorkerCrashTest, FrontendThatStartsOverOnTheSameRefsAndPortIsServedAfresh) {
  StartOneQueueWithGuest();
  if (HasFatalFailure()) return;
  std::unique_ptr<Blkfront> old = ConnectedFront();
  ASSERT_TRUE(old);
  // Drained: the worker takes (and journals) the next requests, but the block layer holds them.
  {
    v1::Device drained;
    ASSERT_TRUE(testing::DrainDevice(*controller_, "xd0", &drained).ok());
    ASSERT_EQ(drained.status().state(), v1::DEVICE_STATE_DRAINED);
  }
  for (uint32_t i = 0; i < 3; ++i) {
    std::optional<uint32_t> slot = old->AcquireSlot(0);
    ASSERT_TRUE(slot.has_value());
    std::memset(old->Slot(0, *slot).data.data(), 0x77, kPage);
    ASSERT_TRUE(
        old->Enqueue(0, *slot, {BlkfrontOp::kWrite, uint64_t{i} * kSectorsPerPage, kSectorsPerPage})
            .ok());
  }
  ASSERT_TRUE(old->Push(0).ok());
  // All three taken: the backend asked for a kick at the next request (req_event = req_prod + 1).
  auto shared_word = [](const Blkfront& front, size_t offset) {
    return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(front.queues()[0].ring + offset))
        .load(std::memory_order_acquire);
  };
  ASSERT_TRUE(testing::WaitFor([&] {
    return shared_word(*old, offsetof(blkif_sring, req_event)) == 4u &&
           shared_word(*old, offsetof(blkif_sring, req_prod)) == 3u;
  })) << ReadWholeFile(controller_->log_path());
  EXPECT_EQ(shared_word(*old, offsetof(blkif_sring, rsp_prod)), 0u);
  const common::xen::GrantRef old_ring_ref = old->queues()[0].ring_refs[0];
  const uint32_t old_port = old->queues()[0].event_channel->local_port();

  v1::Device before;
  pid_t pid = 0;
  ASSERT_NO_FATAL_FAILURE(FreezeWorker(&before, &pid));
  // The old driver goes away without closing; its event channel is closed and its ring ref is
  // given again to the new driver's ring, on the same page.
  old.reset();
  blkfront_ = ConnectedFront();
  ASSERT_TRUE(blkfront_);
  // The case this test is about (otherwise the identity check alone tells the rings apart).
  ASSERT_EQ(blkfront_->queues()[0].ring_refs[0], old_ring_ref);
  ASSERT_EQ(blkfront_->queues()[0].event_channel->local_port(), old_port);
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  // The controller drains the next generation again (the device stays drained across worker
  // restarts); then the test resumes it.
  v1::Device after;
  ASSERT_TRUE(testing::WaitFor([&] {
    after = GetDevice();
    return after.status().worker_generation() > before.status().worker_generation() &&
           after.status().state() == v1::DEVICE_STATE_DRAINED;
  })) << after.DebugString();
  {
    v1::Device resumed;
    ASSERT_TRUE(testing::ResumeDevice(*controller_, "xd0", &resumed).ok());
  }
  const std::string log = ReadWholeFile(controller_->log_path());
  EXPECT_THAT(log, HasSubstr("started its rings over")) << log;
  EXPECT_THAT(log, Not(HasSubstr("resumed at rsp_prod"))) << log;

  // The new rings serve every request from their first, and nothing answers the old ones there.
  std::vector<uint8_t> pattern = Pattern(29);
  ASSERT_NO_FATAL_FAILURE(BlockIo(*blkfront_, BlkfrontOp::kWrite, pattern));
  ASSERT_NO_FATAL_FAILURE(ExpectReadBack(*blkfront_, pattern));
  EXPECT_EQ(blkfront_->counters().bogus_responses, 0u);
  EXPECT_EQ(ReplayedInStatsSegment(worker::StatsSegmentPath(controller_->state_dir(), "xd0")), 0);
  EXPECT_TRUE(blkfront_->Disconnect().ok());
  blkfront_.reset();
}

}  // namespace
}  // namespace blockplane::xen_e2e
