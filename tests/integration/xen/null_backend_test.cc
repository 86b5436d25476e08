// A device with a null backend (spec.backend.null) end to end: attached with bpctl through a real
// blockplaned --xen-platform=emulated, served by a real worker's blkif backend over NullBackend,
// driven by the userspace blkfront of the harness (exact bytes through its slots) and by the
// bp-blkfront program (a workload, as the benchmark runs it).

#include <signal.h>
#include <sys/wait.h>

#include <cstring>
#include <fstream>
#include <memory>
#include <span>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "common/xen/xen_platform.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/harness/xen/blkfront.h"
#include "tests/harness/xen/guest_domain.h"
#include "tests/harness/xen/test_support.h"
#include "tests/integration/controller/fixture.h"
#include "tests/integration/xen/xen_e2e_fixture.h"
#include "worker/xen/blkif_abi.h"

namespace blockplane::xen_e2e {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

constexpr uint32_t kGuestPages = 8192;
constexpr uint64_t kSize = 64ull << 20;

class NullBackendTest : public XenE2eTest {
 protected:
  void SetUp() override {
    StartXenHost(kGuest, kGuestPages, 8192);
    if (HasFatalFailure()) return;
    StartController();
    ConnectGuest(kGuest);
  }

  // bpctl attach xd0 --null-size 64M [flags] --xen-domid 5 --xen-vdev xvda.
  void AttachWithBpctl(std::vector<std::string> flags) {
    std::vector<std::string> args = {"attach", "xd0", "--null-size", "64M"};
    args.insert(args.end(), flags.begin(), flags.end());
    args.insert(args.end(), {"--xen-domid", "5", "--xen-vdev", "xvda", "--xen-max-queues", "1"});
    testing::CommandResult attached = controller_->Bpctl(args);
    ASSERT_EQ(attached.exit_code, 0) << attached.out << attached.err;
    EXPECT_THAT(attached.out, HasSubstr("null"));
  }

  // The worker's loop counters (GetDeviceStats).
  v1::LoopStats Loop() { return testing::GetDeviceStats(*controller_, "xd0").loop(); }

  uint64_t Ops(const std::string& op) {
    return testing::OpOf(testing::GetDeviceStats(*controller_, "xd0"), op).operations();
  }

  void ConnectFrontend() {
    BlkfrontOptions options;
    options.devid = kDevid;
    options.protocol = "x86_64-abi";
    options.persistent_grants = true;
    options.num_queues = 1;
    options.max_indirect_segments = 16;
    options.slots_per_queue = 4;
    options.max_request_bytes = 16 * kPage;
    options.timeout_ms = 20000;
    blkfront_ = std::make_unique<Blkfront>(guest_platform_.get(), guest_.get(), options);
    absl::Status connected = blkfront_->Connect();
    ASSERT_TRUE(connected.ok()) << connected << "\n" << ReadWholeFile(controller_->log_path());
  }

  // One request at a time, so every request uses the same slot (the free slot given back last is
  // taken first, and the returned completion says which): a read then finds in the slot's guest
  // frames what the write before it left there, unless the backend wrote to them.
  BlkfrontCompletion RunOne(const harness::GuestIo& io) {
    auto done = harness::RunGuestRequests(*blkfront_, std::span<const harness::GuestIo>(&io, 1), 1);
    EXPECT_TRUE(done.ok()) << done.status();
    return done.ok() ? (*done)[0] : BlkfrontCompletion{.status = BLKIF_RSP_ERROR};
  }

  // Writes a non-zero pattern at `sector`, then reads it back into the same guest frames (not
  // scrubbed first). Requests above 11 pages go out as BLKIF_OP_INDIRECT.
  std::vector<uint8_t> WriteThenRead(uint64_t sector, uint32_t pages) {
    std::vector<uint8_t> pattern(pages * kPage);
    for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint8_t>(0x5a ^ i);
    const uint64_t indirect_before = blkfront_->counters().indirect_requests;
    BlkfrontCompletion w =
        RunOne({.request = {BlkfrontOp::kWrite, sector, pages * kSectorsPerPage, 0, false},
                .write_data = pattern});
    EXPECT_EQ(w.status, BLKIF_RSP_OKAY);
    std::vector<uint8_t> read(pages * kPage, 0xee);
    BlkfrontCompletion r =
        RunOne({.request = {BlkfrontOp::kRead, sector, pages * kSectorsPerPage, 0, false},
                .read_data = read,
                .scrub_read_buffer = false});
    EXPECT_EQ(r.status, BLKIF_RSP_OKAY);
    EXPECT_EQ(r.slot, w.slot) << "the read must use the frames the write filled";
    EXPECT_EQ(blkfront_->counters().indirect_requests - indirect_before,
              pages > BLKIF_MAX_SEGMENTS_PER_REQUEST ? 2u : 0u);
    // The pattern the write left in the frames, for comparison.
    written_ = std::move(pattern);
    return read;
  }

  // The bp-blkfront program against `vdev` with `extra` flags.
  harness::CommandResult RunBlkfront(std::vector<std::string> extra,
                                     const std::string& vdev = "xvda") {
    std::vector<std::string> argv = {BP_BLKFRONT_PATH, "--run-dir", run_dir_.path(), "--domid", "5",
                                     "--vdev",         vdev};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return harness::RunXenstoreTool(argv, run_dir_.path() + "/xenstored", 60000);
  }

  std::vector<uint8_t> written_;
};

TEST_F(NullBackendTest, ReadZeroesDeviceReadsZeroesAndDropsWrites) {
  AttachWithBpctl({"--read-zeroes"});
  if (HasFatalFailure()) return;
  v1::Device device = GetDevice();
  EXPECT_TRUE(device.spec().backend().has_null());
  EXPECT_TRUE(device.spec().backend().null().read_zeroes());
  EXPECT_EQ(device.spec().backend().path(), "");
  EXPECT_EQ(device.status().size_bytes(), kSize);
  ConnectFrontend();
  if (HasFatalFailure()) return;
  EXPECT_EQ(blkfront_->backend_info().sectors, kSize / 512);

  const std::vector<uint8_t> zeroes(16 * kPage, 0);
  // Direct segments, then an indirect request of 16 pages; both at the start and the last page.
  std::vector<uint8_t> read = WriteThenRead(0, 1);
  EXPECT_TRUE(std::equal(read.begin(), read.end(), zeroes.begin())) << "one page at sector 0";
  read = WriteThenRead(kSize / 512 - 8, 1);
  EXPECT_TRUE(std::equal(read.begin(), read.end(), zeroes.begin())) << "last page";
  read = WriteThenRead(1024, 16);
  EXPECT_TRUE(std::equal(read.begin(), read.end(), zeroes.begin())) << "indirect, 16 pages";

  // Past the end is refused, like any device's.
  std::vector<uint8_t> buffer(kPage);
  EXPECT_EQ(RunOne({.request = {BlkfrontOp::kRead, kSize / 512, kSectorsPerPage, 0, false},
                    .read_data = buffer})
                .status,
            BLKIF_RSP_ERROR);
  // Flushes complete. The second has nothing written before it: the block layer answers it
  // without a backend flush and says so (GetDeviceStats, bpctl stats).
  EXPECT_EQ(RunOne({.request = {BlkfrontOp::kFlush, 0, 0, 0, false}}).status, BLKIF_RSP_OKAY);
  EXPECT_EQ(testing::GetDeviceStats(*controller_, "xd0").block_layer().flushes_skipped(), 0u);
  EXPECT_EQ(RunOne({.request = {BlkfrontOp::kFlush, 0, 0, 0, false}}).status, BLKIF_RSP_OKAY);
  const v1::BlockLayerStats block = testing::GetDeviceStats(*controller_, "xd0").block_layer();
  EXPECT_EQ(block.flushes_skipped(), 1u) << block.DebugString();
  EXPECT_EQ(block.read_modify_writes(), 0u);
  EXPECT_FALSE(block.discard_withdrawn());
  testing::CommandResult stats = controller_->Bpctl({"stats", "xd0"});
  EXPECT_THAT(stats.out, HasSubstr("block layer:        1 flushes skipped\n")) << stats.out;
  EXPECT_EQ(Ops("read"), 3u);
  EXPECT_EQ(Ops("write"), 3u);
  EXPECT_EQ(Ops("flush"), 2u);
  EXPECT_EQ(blkfront_->counters().grants_still_mapped, 0u);
}

TEST_F(NullBackendTest, WithoutReadZeroesBuffersAreLeftUntouched) {
  AttachWithBpctl({});
  if (HasFatalFailure()) return;
  EXPECT_FALSE(GetDevice().spec().backend().null().read_zeroes());
  ConnectFrontend();
  if (HasFatalFailure()) return;
  // The read completes OKAY and the guest frames still hold what the write put there.
  std::vector<uint8_t> read = WriteThenRead(64, 2);
  EXPECT_TRUE(read == written_);
  read = WriteThenRead(4096, 16);
  EXPECT_TRUE(read == written_);
}

// The default completion is spelled out in the stored spec; the deferred one (no kernel call per
// request) serves the same I/O: direct and indirect requests through the harness blkfront, and a
// polled QD32 bp-blkfront run as the benchmark does it.
TEST_F(NullBackendTest, DeferredCompletionServesTheSameIo) {
  AttachWithBpctl({"--read-zeroes", "--null-completion", "deferred"});
  if (HasFatalFailure()) return;
  EXPECT_EQ(GetDevice().spec().backend().null().completion(), v1::NULL_COMPLETION_DEFERRED);
  testing::CommandResult shown = controller_->Bpctl({"get", "xd0"});
  EXPECT_THAT(shown.out, HasSubstr("null read-zeroes deferred")) << shown.out;
  ConnectFrontend();
  if (HasFatalFailure()) return;
  const std::vector<uint8_t> zeroes(16 * kPage, 0);
  std::vector<uint8_t> read = WriteThenRead(8, 1);
  EXPECT_TRUE(std::equal(read.begin(), read.end(), zeroes.begin()));
  read = WriteThenRead(2048, 16);
  EXPECT_TRUE(std::equal(read.begin(), read.end(), zeroes.begin()));
  EXPECT_EQ(RunOne({.request = {BlkfrontOp::kFlush, 0, 0, 0, false}}).status, BLKIF_RSP_OKAY);
  ASSERT_TRUE(blkfront_->Disconnect().ok());
  blkfront_.reset();

  harness::CommandResult reads =
      RunBlkfront({"--workload", "randread", "--bs", "4k", "--iodepth", "32", "--ops", "20000",
                   "--verify", "--assume-zeroed", "--poll"});
  ASSERT_EQ(reads.exit_code, 0) << reads.out << reads.err;
  EXPECT_THAT(reads.out, HasSubstr("\"errors\":{\"total\":0"));
  EXPECT_THAT(reads.out, HasSubstr("\"failures\":0"));
  EXPECT_EQ(Ops("read"), 2u + 20000u);
  EXPECT_EQ(Ops("flush"), 1u);
  // No kernel call per request: the worker's ring saw only its own polls' SQEs, not one per
  // request (the NOP device below submits at least one per request).
  const v1::LoopStats loop = Loop();
  EXPECT_LT(loop.sqes_submitted(), 1000u) << loop.DebugString();
  EXPECT_GT(loop.passes(), 0u);
}

TEST_F(NullBackendTest, DefaultCompletionIsTheRingNop) {
  AttachWithBpctl({});
  if (HasFatalFailure()) return;
  EXPECT_EQ(GetDevice().spec().backend().null().completion(), v1::NULL_COMPLETION_NOP);
  testing::CommandResult shown = controller_->Bpctl({"get", "xd0"});
  EXPECT_THAT(shown.out, Not(HasSubstr("deferred"))) << shown.out;
  // One NOP per request goes through the worker's ring.
  harness::CommandResult reads =
      RunBlkfront({"--workload", "randread", "--bs", "4k", "--iodepth", "8", "--ops", "4000"});
  ASSERT_EQ(reads.exit_code, 0) << reads.out << reads.err;
  const v1::LoopStats loop = Loop();
  EXPECT_GE(loop.sqes_submitted(), 4000u) << loop.DebugString();
  EXPECT_GE(loop.completions(), 4000u) << loop.DebugString();
  EXPECT_LE(loop.submit_calls(), loop.sqes_submitted());
  testing::CommandResult stats = controller_->Bpctl({"stats", "xd0"});
  EXPECT_THAT(stats.out, HasSubstr("worker loop:")) << stats.out;
}

// spec.xen.poll_us per device: on a controller that does not poll by default, the device that
// asks for polling keeps looking at its ring, so a polling guest pushes without kicking; the one
// that does not gets a kick with (almost) every push.
TEST_F(NullBackendTest, PollingIsChosenPerDevice) {
  for (const auto& [id, vdev, poll] :
       {std::tuple{"polled", "xvda", true}, std::tuple{"kicked", "xvdb", false}}) {
    std::vector<std::string> args = {"attach",           id,  "--null-size", "64M",
                                     "--xen-domid",      "5", "--xen-vdev",  vdev,
                                     "--xen-max-queues", "1"};
    if (poll) args.insert(args.end(), {"--xen-poll-us", "200000"});
    testing::CommandResult attached = controller_->Bpctl(args);
    ASSERT_EQ(attached.exit_code, 0) << attached.out << attached.err;
  }
  EXPECT_EQ(GetDevice("polled").spec().xen().poll_us(), 200000u);
  EXPECT_FALSE(GetDevice("kicked").spec().xen().has_poll_us());
  EXPECT_THAT(controller_->Bpctl({"get", "polled"}).out, HasSubstr("poll-us=200000"));
  const std::vector<std::string> workload = {
      "--workload", "randread", "--bs",   "4k",           "--iodepth", "4",
      "--ops",      "4000",     "--poll", "--timeout-ms", "20000"};
  harness::CommandResult polled = RunBlkfront(workload, "xvda");
  ASSERT_EQ(polled.exit_code, 0) << polled.out << polled.err;
  harness::CommandResult kicked = RunBlkfront(workload, "xvdb");
  ASSERT_EQ(kicked.exit_code, 0) << kicked.out << kicked.err;
  const int64_t polled_kicks = JsonNumber(polled.out, "\"notifications_sent\":");
  const int64_t kicked_kicks = JsonNumber(kicked.out, "\"notifications_sent\":");
  // At most iodepth requests per push: at least 1000 pushes each.
  EXPECT_LT(polled_kicks, 50) << polled.out;
  EXPECT_GT(kicked_kicks, 500) << kicked.out;
}

TEST_F(NullBackendTest, ResizeGrowsAndShrinksTheNullDevice) {
  AttachWithBpctl({"--read-zeroes"});
  if (HasFatalFailure()) return;
  testing::CommandResult grown =
      controller_->Bpctl({"resize", "xd0", "--size", std::to_string(2 * kSize)});
  ASSERT_EQ(grown.exit_code, 0) << grown.out << grown.err;
  EXPECT_EQ(GetDevice().status().size_bytes(), 2 * kSize);
  ConnectFrontend();
  if (HasFatalFailure()) return;
  EXPECT_EQ(blkfront_->backend_info().sectors, 2 * kSize / 512);
  // Beyond the old end works now.
  std::vector<uint8_t> read = WriteThenRead(kSize / 512 + 8, 1);
  EXPECT_TRUE(std::all_of(read.begin(), read.end(), [](uint8_t b) { return b == 0; }));
  // Shrinking below what the guest wrote is refused; to above it, with allow_shrink, works, and
  // growing again after a shrink works too (the null backend keeps no data).
  testing::CommandResult refused =
      controller_->Bpctl({"resize", "xd0", "--size", std::to_string(kSize / 2), "--allow-shrink"});
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_THAT(refused.err, HasSubstr("new_size_bytes"));
  testing::CommandResult shrunk = controller_->Bpctl(
      {"resize", "xd0", "--size", std::to_string(kSize + (1 << 20)), "--allow-shrink"});
  ASSERT_EQ(shrunk.exit_code, 0) << shrunk.out << shrunk.err;
  testing::CommandResult regrown =
      controller_->Bpctl({"resize", "xd0", "--size", std::to_string(kSize + (2 << 20))});
  ASSERT_EQ(regrown.exit_code, 0) << regrown.out << regrown.err;
  EXPECT_EQ(GetDevice().status().size_bytes(), kSize + (2 << 20));
  read = WriteThenRead(kSize / 512 + 2048 + 8, 1);  // in the last MiB
  EXPECT_TRUE(std::all_of(read.begin(), read.end(), [](uint8_t b) { return b == 0; }));
}

// bp-blkfront, as tests/bench/xen/run.sh runs it, against a null device: writes succeed, and
// reads checked with --verify --assume-zeroed see zeroes everywhere.
TEST_F(NullBackendTest, BlkfrontProgramRunsAgainstANullDevice) {
  AttachWithBpctl({"--read-zeroes"});
  if (HasFatalFailure()) return;
  auto run = [&](std::vector<std::string> extra) { return RunBlkfront(std::move(extra)); };
  harness::CommandResult writes = run(
      {"--workload", "randwrite", "--bs", "4k", "--iodepth", "32", "--ops", "4000", "--verify"});
  ASSERT_EQ(writes.exit_code, 0) << writes.out << writes.err;
  EXPECT_THAT(writes.out, HasSubstr("\"writes\":4000"));
  EXPECT_THAT(writes.out, HasSubstr("\"errors\":{\"total\":0"));
  // The write run left its (verify-formatted) data in the guest's frames, which the reads use
  // again; they must find zeroes.
  harness::CommandResult reads = run({"--workload", "randread", "--bs", "16k", "--iodepth", "32",
                                      "--ops", "4000", "--verify", "--assume-zeroed", "--poll"});
  ASSERT_EQ(reads.exit_code, 0) << reads.out << reads.err;
  EXPECT_THAT(reads.out, HasSubstr("\"reads\":4000"));
  EXPECT_THAT(reads.out, HasSubstr("\"errors\":{\"total\":0"));
  EXPECT_THAT(reads.out, HasSubstr("\"failures\":0"));
  EXPECT_THAT(reads.out, Not(HasSubstr("\"sectors_checked\":0,")));
  EXPECT_EQ(Ops("write"), 4000u);
  EXPECT_EQ(Ops("read"), 4000u);
}

}  // namespace
}  // namespace blockplane::xen_e2e
