// End to end: bp-xenhost (the emulated Xen host, with guest domain 5), a real blockplaned with
// --xen-platform=emulated whose worker runs the blkif backend, and the userspace blkfront of the
// harness acting as the guest (handshake and requests). Data is checked byte for byte against what
// the guest wrote and against the backing file.

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <thread>
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

extern char** environ;

namespace blockplane::xen_e2e {
namespace {

using harness::GuestIo;
using harness::RawBlkifRequest;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr uint32_t kGuestPages = 8192;
constexpr uint32_t kGuestGrants = 8192;
constexpr uint32_t kSlotPages = 32;  // the largest request: indirect, 32 segments
constexpr uint64_t kDiskSize = 64ull << 20;

std::vector<uint8_t> Pattern(uint64_t sector, uint32_t pages, uint32_t seed) {
  std::vector<uint8_t> data(size_t{pages} * kPage);
  std::mt19937_64 rng(sector * 1000003 + seed);
  for (size_t i = 0; i < data.size(); i += 8) {
    uint64_t v = rng();
    std::memcpy(&data[i], &v, 8);
  }
  return data;
}

std::vector<uint8_t> ReadFileRange(const std::string& path, uint64_t offset, size_t length) {
  std::vector<uint8_t> out(length);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  ssize_t got = ::pread(fd, out.data(), length, static_cast<off_t>(offset));
  ::close(fd);
  if (got != static_cast<ssize_t>(length)) return {};
  return out;
}

class XenBackendE2eTest : public XenE2eTest {
 protected:
  // bp-xenhost, blockplaned --xen-platform=emulated, the guest's handles.
  void StartAll(std::vector<std::string> extra_flags = {}) {
    StartXenHost(kGuest, kGuestPages, kGuestGrants);
    if (HasFatalFailure()) return;
    StartController(extra_flags);
    ConnectGuest(kGuest);
    if (HasFatalFailure()) return;
    auto dom0 = common::xen::CreateEmulatedXenPlatform({run_dir_.path(), 0});
    ASSERT_TRUE(dom0.ok()) << dom0.status();
    dom0_ = std::move(*dom0);
    disk_path_ = controller_->CreateDisk("disk0.img", kDiskSize);
  }

  v1::DeviceSpec Spec(uint32_t queues, uint32_t order, bool persistent) {
    v1::DeviceSpec spec = testing::XenSpec(disk_path_, kGuest, "xvda");
    spec.mutable_xen()->set_max_queues(queues);
    spec.mutable_xen()->set_max_ring_page_order(order);
    spec.mutable_xen()->set_persistent_grants(persistent);
    spec.mutable_xen()->set_max_indirect_segments(32);
    spec.mutable_backend()->set_cache(v1::CACHE_MODE_WRITEBACK);
    return spec;
  }

  absl::StatusOr<v1::Device> Attach(const v1::DeviceSpec& spec) {
    grpc::ClientContext context;
    v1::AttachDeviceRequest request;
    request.set_device_id("xd0");
    *request.mutable_spec() = spec;
    v1::Device device;
    grpc::Status status = controller_->stub().AttachDevice(&context, request, &device);
    if (!status.ok()) {
      return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                          status.error_message());
    }
    return device;
  }

  v1::DeviceStats GetStats() { return testing::GetDeviceStats(*controller_, "xd0"); }

  static uint64_t Ops(const v1::DeviceStats& stats, const std::string& op) {
    return testing::OpOf(stats, op).operations();
  }

  // The handshake up to Connected, with 32 request slots of 32 pages per queue.
  void ConnectFrontend(const std::string& protocol, bool persistent, uint32_t order,
                       uint32_t queues) {
    blkfront_.reset();
    BlkfrontOptions options;
    options.devid = kDevid;
    options.protocol = protocol;
    options.persistent_grants = persistent;
    options.ring_page_order = order;
    options.num_queues = queues;
    options.max_indirect_segments = kSlotPages;
    options.slots_per_queue = 32;
    options.max_request_bytes = kSlotPages * kPage;
    options.timeout_ms = 20000;
    blkfront_ = std::make_unique<Blkfront>(guest_platform_.get(), guest_.get(), options);
    absl::Status connected = blkfront_->Connect();
    ASSERT_TRUE(connected.ok()) << connected << "\n" << ReadWholeFile(controller_->log_path());
    ASSERT_EQ(blkfront_->slots_per_queue(), 32u);
  }

  // `count` requests of `pages` pages on `queue` at disjoint places from `first_sector`.
  struct Batch {
    uint32_t queue = 0;
    uint64_t first_sector = 0;
    uint32_t count = 0;
    uint32_t pages = 1;
    uint32_t seed = 0;
  };

  // Writes every batch (all queues at once, up to `depth` in flight per queue), reads them back
  // through the guest, and compares with the pattern and with the backing file. Requests above 11
  // pages go out as BLKIF_OP_INDIRECT.
  void VerifiedIo(std::span<const Batch> batches, uint32_t depth) {
    std::vector<std::vector<uint8_t>> written, read;
    std::vector<GuestIo> writes, reads;
    uint64_t indirect = 0;
    for (const Batch& batch : batches) {
      for (uint32_t i = 0; i < batch.count; ++i) {
        const uint64_t sector = batch.first_sector + uint64_t{i} * batch.pages * kSectorsPerPage;
        written.push_back(Pattern(sector, batch.pages, batch.seed));
        read.emplace_back(written.back().size(), 0xee);
        if (batch.pages > BLKIF_MAX_SEGMENTS_PER_REQUEST) indirect += 2;
      }
    }
    size_t n = 0;
    for (const Batch& batch : batches) {
      for (uint32_t i = 0; i < batch.count; ++i, ++n) {
        const uint64_t sector = batch.first_sector + uint64_t{i} * batch.pages * kSectorsPerPage;
        const uint32_t sectors = batch.pages * kSectorsPerPage;
        writes.push_back(GuestIo{.queue = batch.queue,
                                 .request = {BlkfrontOp::kWrite, sector, sectors, 0, false},
                                 .write_data = written[n]});
        reads.push_back(GuestIo{.queue = batch.queue,
                                .request = {BlkfrontOp::kRead, sector, sectors, 0, false},
                                .read_data = read[n]});
      }
    }
    const uint64_t indirect_before = blkfront_->counters().indirect_requests;
    auto w = harness::RunGuestRequests(*blkfront_, writes, depth);
    ASSERT_TRUE(w.ok()) << w.status();
    for (const BlkfrontCompletion& r : *w) {
      ASSERT_EQ(r.status, BLKIF_RSP_OKAY);
      ASSERT_EQ(r.operation, BLKIF_OP_WRITE);
    }
    auto r = harness::RunGuestRequests(*blkfront_, reads, depth);
    ASSERT_TRUE(r.ok()) << r.status();
    for (size_t i = 0; i < reads.size(); ++i) {
      ASSERT_EQ((*r)[i].status, BLKIF_RSP_OKAY);
      ASSERT_EQ((*r)[i].operation, BLKIF_OP_READ);
      ASSERT_TRUE(read[i] == written[i]) << "guest read differs, request " << i;
      ASSERT_TRUE(ReadFileRange(disk_path_, writes[i].request.sector * 512, written[i].size()) ==
                  written[i])
          << "backing file differs, request " << i;
    }
    EXPECT_EQ(blkfront_->counters().indirect_requests - indirect_before, indirect);
    EXPECT_EQ(blkfront_->counters().grants_still_mapped, 0u);
    EXPECT_EQ(blkfront_->counters().bogus_responses, 0u);
  }
  void VerifiedIo(uint32_t queue, uint64_t first_sector, uint32_t count, uint32_t pages,
                  uint32_t seed, uint32_t depth = 16) {
    const Batch batch{queue, first_sector, count, pages, seed};
    VerifiedIo(std::span<const Batch>(&batch, 1), depth);
  }

  // Attach (one queue, indirect segments, persistent grants), connect, some verified I/O, then the
  // frontend closes; returns once the device waits for a frontend again. The disconnect fails if
  // the backend still maps the ring or a persistent grant after Closed.
  void ServeThenCloseFrontend() {
    StartAll();
    if (HasFatalFailure()) return;
    ASSERT_TRUE(Attach(Spec(1, 1, true)).ok());
    ConnectFrontend("x86_64-abi", true, 1, 1);
    if (HasFatalFailure()) return;
    VerifiedIo(0, 0, 8, 4, 1);
    ASSERT_TRUE(blkfront_->Disconnect().ok());
    ASSERT_TRUE(testing::WaitFor(
        [&] { return GetDevice().status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND; }));
  }

  // Sends one raw (hostile) request in `slot` of `queue`, which stays acquired, and waits for its
  // response. A response whose id is not the request's is dropped by the Blkfront (counted as
  // bogus) and ends here in a failure.
  BlkfrontCompletion RawRoundTrip(uint32_t queue, uint32_t slot, const RawBlkifRequest& request) {
    absl::Status enqueued = blkfront_->EnqueueRaw(queue, slot, request);
    EXPECT_TRUE(enqueued.ok()) << enqueued;
    EXPECT_TRUE(blkfront_->Push(queue).ok());
    BlkfrontCompletion completion[1];
    for (;;) {
      if (blkfront_->Reap(queue, completion) == 1) return completion[0];
      absl::StatusOr<bool> woke = blkfront_->WaitForEvent(20000);
      if (!woke.ok() || !*woke) break;
    }
    ADD_FAILURE() << "no response";
    return {};
  }

  absl::Status Detach() {
    grpc::ClientContext context;
    v1::DetachDeviceRequest request;
    request.set_device_id("xd0");
    v1::DetachDeviceResponse response;
    grpc::Status status = controller_->stub().DetachDevice(&context, request, &response);
    if (!status.ok()) {
      return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                          status.error_message());
    }
    return absl::OkStatus();
  }

  std::string Xenstore(const std::vector<std::string>& argv) {
    harness::CommandResult result = harness::RunXenstoreTool(argv, run_dir_.path() + "/xenstored");
    EXPECT_EQ(result.exit_code, 0) << result.err;
    return result.out;
  }

  std::string disk_path_;
};

// Stops and joins a load thread also when an ASSERT leaves the test early.
struct JoinOnExit {
  std::atomic<bool>* stop;
  std::thread* thread;
  void Join() {
    stop->store(true);
    if (thread->joinable()) thread->join();
  }
  ~JoinOnExit() { Join(); }
};

const std::string kBackend = "/local/domain/0/backend/vbd/5/51712";
const std::string kFrontend = "/local/domain/5/device/vbd/51712";

struct AbiParams {
  std::string protocol;  // "" = native (no ABI named)
  bool persistent;
  bool grant_copy;
};

class XenBackendAbiTest : public XenBackendE2eTest,
                          public ::testing::WithParamInterface<AbiParams> {};

// Attach -> toolstack entries + InitWait -> handshake -> Connected -> verified direct and indirect
// I/O, flush, barrier -> detach while connected: Closing -> Closed, every grant unmapped,
// xenstore directories removed.
TEST_P(XenBackendAbiTest, HandshakeVerifiedIoAndDetach) {
  const AbiParams params = GetParam();
  StartAll(params.grant_copy ? std::vector<std::string>{"--xen-grant-copy"}
                             : std::vector<std::string>{});
  if (HasFatalFailure()) return;
  auto device = Attach(Spec(1, 0, params.persistent));
  ASSERT_TRUE(device.ok()) << device.status();
  EXPECT_EQ(device->status().state(), v1::DEVICE_STATE_WAITING_FOR_FRONTEND);

  // The toolstack's and the backend's keys, as the real xenstore-ls shows them.
  const std::string tree = Xenstore({"xenstore-ls", "-f", "/local/domain/0/backend/vbd"});
  for (const std::string& line :
       {kBackend + "/frontend = \"" + kFrontend + "\"", kBackend + "/frontend-id = \"5\"",
        kBackend + "/online = \"1\"", kBackend + "/state = \"2\"", kBackend + "/mode = \"w\"",
        kBackend + "/params = \"" + disk_path_ + "\"", kBackend + "/feature-flush-cache = \"1\"",
        kBackend + "/feature-barrier = \"1\"",
        kBackend + "/feature-persistent = \"" +
            std::string(params.persistent && !params.grant_copy ? "1" : "0") + "\"",
        kBackend + "/feature-max-indirect-segments = \"32\"",
        kBackend + "/max-ring-page-order = \"0\"", kBackend + "/multi-queue-max-queues = \"1\"",
        kBackend + "/sectors = \"" + std::to_string(kDiskSize / 512) + "\"",
        kBackend + "/sector-size = \"512\"", kBackend + "/info = \"0\""}) {
    EXPECT_THAT(tree, HasSubstr(line + "\n"));
  }
  const std::string fe_tree = Xenstore({"xenstore-ls", "-f", kFrontend});
  EXPECT_THAT(fe_tree, HasSubstr(kFrontend + "/backend = \"" + kBackend + "\"\n"));
  EXPECT_THAT(fe_tree, HasSubstr(kFrontend + "/virtual-device = \"51712\"\n"));
  // The guest may read its backend's directory but not write it.
  EXPECT_FALSE(guest_platform_->xenstore().Write(kBackend + "/sectors", "1", 0).ok());

  ConnectFrontend(params.protocol, params.persistent, 0, 1);
  if (HasFatalFailure()) return;
  EXPECT_EQ(blkfront_->backend_info().sectors, kDiskSize / 512);
  ASSERT_TRUE(
      testing::WaitFor([&] { return GetDevice().status().state() == v1::DEVICE_STATE_CONNECTED; }));
  v1::Device connected = GetDevice();
  EXPECT_EQ(connected.status().frontend().xen_backend_state(), "Connected");
  EXPECT_EQ(connected.status().frontend().num_queues(), 1u);
  EXPECT_EQ(connected.status().frontend().protocol(), params.protocol == "x86_32-abi" ? "x86_32-abi"
                                                      : params.protocol.empty()       ? "native"
                                                                                : "x86_64-abi");
  EXPECT_EQ(connected.status().frontend().persistent_grants(),
            params.persistent && !params.grant_copy);
  EXPECT_EQ(Xenstore({"xenstore-read", kBackend + "/state"}), "4\n");

  VerifiedIo(0, 0, 24, 1, 1);      // one page
  VerifiedIo(0, 4096, 16, 11, 2);  // a full direct request
  VerifiedIo(0, 8192, 12, 32, 3);  // indirect, 32 segments
  VerifiedIo(0, 0, 24, 1, 4);      // rewrite (persistent hits)
  if (HasFatalFailure()) return;

  // Flush (no data) and a barrier write.
  std::vector<uint8_t> barrier_data = Pattern(30000, 2, 9);
  std::vector<GuestIo> more = {
      GuestIo{.request = {BlkfrontOp::kFlush, 0, 0, 0, false}},
      GuestIo{.request = {BlkfrontOp::kBarrier, 30000, 2 * kSectorsPerPage, 0, false},
              .write_data = barrier_data},
      // Discard was not advertised (discard=ignore): EOPNOTSUPP.
      GuestIo{.request = {BlkfrontOp::kDiscard, 0, 8, 0, false}}};
  auto result = harness::RunGuestRequests(*blkfront_, more, 4);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ((*result)[0].status, BLKIF_RSP_OKAY);
  EXPECT_EQ((*result)[0].operation, BLKIF_OP_FLUSH_DISKCACHE);
  EXPECT_EQ((*result)[1].status, BLKIF_RSP_OKAY);
  EXPECT_EQ((*result)[1].operation, BLKIF_OP_WRITE_BARRIER);
  EXPECT_EQ((*result)[2].status, BLKIF_RSP_EOPNOTSUPP);
  EXPECT_TRUE(ReadFileRange(disk_path_, 30000 * 512, barrier_data.size()) == barrier_data);
  v1::DeviceStats stats = GetStats();
  EXPECT_GE(Ops(stats, "write"), 24u * 2 + 16 + 12 + 1) << stats.DebugString();
  EXPECT_GE(Ops(stats, "flush"), 1u);

  // Detach while connected.
  ASSERT_TRUE(Detach().ok());
  const std::string log = ReadWholeFile(controller_->log_path());
  EXPECT_THAT(log, HasSubstr("Connected -> Closing"));
  EXPECT_THAT(log, HasSubstr("Closing -> Closed"));
  EXPECT_THAT(log, HasSubstr(" 0 still mapped"));
  // Also catches sanitizer reports at exit (ASan/LSan exit codes).
  EXPECT_THAT(log, HasSubstr("worker exited with status 0"));
  // Every grant is free again: ring and (persistent) data pages.
  for (common::xen::GrantRef ref : blkfront_->queues()[0].ring_refs) {
    EXPECT_TRUE(guest_->EndAccess(ref)) << "ring grant " << ref << " still mapped";
  }
  EXPECT_TRUE(harness::RevokeSlotGrants(*blkfront_, *guest_));
  // The toolstack's directories are gone.
  EXPECT_FALSE(dom0_->xenstore().Read(kBackend + "/state", 0).ok());
  EXPECT_FALSE(dom0_->xenstore().Read(kFrontend + "/state", 0).ok());
}

INSTANTIATE_TEST_SUITE_P(
    Abis, XenBackendAbiTest,
    ::testing::Values(AbiParams{"x86_64-abi", true, false}, AbiParams{"x86_64-abi", false, false},
                      AbiParams{"x86_32-abi", true, false}, AbiParams{"x86_32-abi", false, false},
                      AbiParams{"", true, false}, AbiParams{"", false, false},
                      AbiParams{"x86_64-abi", true, true}, AbiParams{"x86_32-abi", false, true}),
    [](const ::testing::TestParamInfo<AbiParams>& info) {
      std::string name = info.param.protocol.empty() ? "native" : info.param.protocol;
      for (char& c : name) {
        if (c == '-') c = '_';
      }
      name += info.param.persistent ? "_persistent" : "_mapped";
      if (info.param.grant_copy) name += "_grantcopy";
      return name;
    });

// Four queues with four-page rings and indirect requests, all busy at once.
TEST_F(XenBackendE2eTest, FourQueuesMultiPageRingsIndirect) {
  StartAll();
  if (HasFatalFailure()) return;
  ASSERT_TRUE(Attach(Spec(4, 2, true)).ok());
  ConnectFrontend("x86_64-abi", true, 2, 4);
  if (HasFatalFailure()) return;
  ASSERT_EQ(blkfront_->num_queues(), 4u);
  EXPECT_EQ(blkfront_->ring_page_order(), 2u);
  EXPECT_EQ(blkfront_->ring_size(), 128u);
  EXPECT_EQ(Xenstore({"xenstore-read", kFrontend + "/multi-queue-num-queues"}), "4\n");
  // Every queue has its requests in flight at the same time (one thread drives all four rings).
  std::vector<Batch> indirect, small;
  for (uint32_t q = 0; q < 4; ++q) {
    indirect.push_back(Batch{q, 20000 * uint64_t{q}, 16, 32, 10 + q});
    small.push_back(Batch{q, 20000 * uint64_t{q} + 8192, 64, 2, 20 + q});
  }
  VerifiedIo(indirect, 32);
  if (HasFatalFailure()) return;
  VerifiedIo(small, 32);
  if (HasFatalFailure()) return;
  EXPECT_EQ(GetDevice().status().frontend().num_queues(), 4u);
}

// Drain while the guest keeps writing: once DRAINED, requests the guest pushes reach no backend
// I/O until the device is resumed; then they complete with the right data.
TEST_F(XenBackendE2eTest, DrainDuringLoadThenResume) {
  StartAll();
  if (HasFatalFailure()) return;
  ASSERT_TRUE(Attach(Spec(1, 0, true)).ok());
  ConnectFrontend("x86_64-abi", true, 0, 1);
  if (HasFatalFailure()) return;
  // The load thread owns the Blkfront until it is joined; this thread only looks at the shared
  // ring's indexes and at the counts of the load.
  harness::GuestIoProgress progress;
  std::byte* ring = blkfront_->queues()[0].ring;
  auto shared_word = [ring](size_t offset) {
    return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(ring + offset))
        .load(std::memory_order_acquire);
  };

  std::atomic<bool> stop{false};
  std::atomic<int> errors{0};
  std::atomic<uint64_t> round{0};
  std::thread load;
  JoinOnExit guard{&stop, &load};
  load = std::thread([&] {
    while (!stop.load()) {
      const uint32_t seed = static_cast<uint32_t>(round.load());
      std::vector<std::vector<uint8_t>> data;
      std::vector<GuestIo> writes;
      for (uint32_t i = 0; i < 16; ++i) {
        data.push_back(Pattern(i * 16, 2, seed));
      }
      for (uint32_t i = 0; i < 16; ++i) {
        writes.push_back(
            GuestIo{.request = {BlkfrontOp::kWrite, i * 16, 16, 0, false}, .write_data = data[i]});
      }
      auto result = harness::RunGuestRequests(*blkfront_, writes, 16, 20000, &progress);
      if (!result.ok()) {
        errors.fetch_add(1);
        return;
      }
      for (const BlkfrontCompletion& r : *result) {
        if (r.status != BLKIF_RSP_OKAY) errors.fetch_add(1);
      }
      round.fetch_add(1);
    }
  });
  ASSERT_TRUE(testing::WaitFor([&] { return round.load() >= 3; }, 20000));

  v1::Device drained;
  ASSERT_TRUE(testing::DrainDevice(*controller_, "xd0", &drained).ok());
  ASSERT_EQ(drained.status().state(), v1::DEVICE_STATE_DRAINED);
  const v1::DeviceStats at_drain = GetStats();
  // The guest has requests on the ring (left over or its next batch); the backend has taken them
  // all (the ring says so: req_event == req_prod + 1) but the block layer holds them.
  ASSERT_TRUE(testing::WaitFor(
      [&] {
        return progress.pushed.load() > progress.completed.load() &&
               shared_word(offsetof(blkif_sring, req_event)) ==
                   shared_word(offsetof(blkif_sring, req_prod)) + 1;
      },
      20000));
  const uint64_t completed_while_drained = progress.completed.load();
  const v1::DeviceStats while_drained = GetStats();
  EXPECT_EQ(Ops(while_drained, "write"), Ops(at_drain, "write"));
  EXPECT_EQ(Ops(while_drained, "read"), Ops(at_drain, "read"));
  EXPECT_EQ(GetDevice().status().state(), v1::DEVICE_STATE_DRAINED);

  v1::Device resumed;
  ASSERT_TRUE(testing::ResumeDevice(*controller_, "xd0", &resumed).ok());
  EXPECT_EQ(resumed.status().state(), v1::DEVICE_STATE_CONNECTED);
  ASSERT_TRUE(testing::WaitFor(
      [&] { return progress.completed.load() > completed_while_drained + 16; }, 20000));
  guard.Join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_GT(Ops(GetStats(), "write"), Ops(at_drain, "write"));
  // The last round is on disk.
  const uint32_t last = static_cast<uint32_t>(round.load() - 1);
  for (uint32_t i = 0; i < 16; ++i) {
    EXPECT_TRUE(ReadFileRange(disk_path_, uint64_t{i} * 16 * 512, 2 * kPage) ==
                Pattern(i * 16, 2, last))
        << i;
  }
}

// Resize while the guest writes: the frontend reads the new sectors, and I/O beyond the old end
// works.
TEST_F(XenBackendE2eTest, ResizeDuringLoad) {
  StartAll();
  if (HasFatalFailure()) return;
  ASSERT_TRUE(Attach(Spec(2, 0, true)).ok());
  ConnectFrontend("x86_64-abi", true, 0, 2);
  if (HasFatalFailure()) return;
  ASSERT_EQ(blkfront_->num_queues(), 2u);
  // The load thread owns the Blkfront until it is joined.
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::thread load;
  JoinOnExit guard{&stop, &load};
  load = std::thread([&] {
    uint32_t seed = 100;
    while (!stop.load()) {
      VerifiedIo(0, 0, 8, 4, seed++, 8);
      if (::testing::Test::HasFailure()) {
        failures.fetch_add(1);
        return;
      }
    }
  });
  constexpr uint64_t kNewSize = kDiskSize * 2;
  grpc::ClientContext context;
  v1::ResizeDeviceRequest resize;
  resize.set_device_id("xd0");
  resize.set_new_size_bytes(kNewSize);
  v1::Device resized;
  grpc::Status status = controller_->stub().ResizeDevice(&context, resize, &resized);
  ASSERT_TRUE(status.ok()) << status.error_message();
  // What the guest reads from its backend's directory.
  ASSERT_TRUE(testing::WaitFor([&] {
    return guest_platform_->xenstore().Read(kBackend + "/sectors", 0).value_or("") ==
           std::to_string(kNewSize / 512);
  }));
  EXPECT_EQ(guest_platform_->xenstore().Read(kBackend + "/state", 0).value_or(""), "4");
  guard.Join();
  EXPECT_EQ(failures.load(), 0);
  // Beyond the old end, on the other queue, indirect (12 pages).
  VerifiedIo(1, kDiskSize / 512, 4, 12, 7);
  // And the end of the new size is the end.
  std::vector<GuestIo> past = {
      GuestIo{.queue = 1, .request = {BlkfrontOp::kRead, kNewSize / 512, 8, 0, false}}};
  auto result = harness::RunGuestRequests(*blkfront_, past, 1);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ((*result)[0].status, BLKIF_RSP_ERROR);
}

// Malformed requests get error responses and are counted; a frontend that breaks its ring stops
// only that queue; the worker and the control channel keep working.
TEST_F(XenBackendE2eTest, HostileRequestsAndBrokenRing) {
  StartAll();
  if (HasFatalFailure()) return;
  ASSERT_TRUE(Attach(Spec(2, 0, false)).ok());
  ConnectFrontend("x86_64-abi", false, 0, 2);
  if (HasFatalFailure()) return;
  ASSERT_EQ(blkfront_->num_queues(), 2u);
  const int32_t worker_pid = GetDevice().status().worker_pid();
  ASSERT_GT(worker_pid, 0);

  // One slot for every case; without persistent grants EnqueueRaw grants its pages for each
  // request (data read-write, indirect read-only): a good page to point segments at.
  std::optional<uint32_t> slot = blkfront_->AcquireSlot(0);
  ASSERT_TRUE(slot);
  const harness::SlotView view = blkfront_->Slot(0, *slot);
  ASSERT_FALSE(view.data_refs.empty());
  ASSERT_FALSE(view.indirect_refs.empty());
  const common::xen::GrantRef good = view.data_refs[0];
  const std::optional<common::xen::GrantRef> ungranted = blkfront_->UnusedGrantRef();
  ASSERT_TRUE(ungranted);
  auto rw = [&](uint8_t op, uint8_t nr, uint64_t sector, uint8_t first, uint8_t last,
                common::xen::GrantRef gref) {
    RawBlkifRequest r;
    r.operation = op;
    r.nr_segments = nr;
    r.sector_number = sector;
    for (blkif_request_segment& seg : r.seg) seg = blkif_request_segment{gref, first, last};
    return r;
  };
  struct Case {
    const char* what;
    RawBlkifRequest request;
    int16_t status;
  };
  RawBlkifRequest too_many;
  too_many.operation = BLKIF_OP_INDIRECT;
  too_many.indirect_op = BLKIF_OP_READ;
  too_many.indirect_nr_segments = 1000;
  too_many.indirect_grefs[0] = view.indirect_refs[0];
  RawBlkifRequest discard;
  discard.operation = BLKIF_OP_DISCARD;
  discard.discard_nr_sectors = 8;
  const uint64_t sectors = kDiskSize / 512;
  std::vector<Case> cases = {
      {"unknown operation", rw(99, 1, 0, 0, 7, good), BLKIF_RSP_EOPNOTSUPP},
      {"no segments", rw(BLKIF_OP_READ, 0, 0, 0, 7, good), BLKIF_RSP_ERROR},
      {"12 segments", rw(BLKIF_OP_READ, 12, 0, 0, 7, good), BLKIF_RSP_ERROR},
      {"first > last", rw(BLKIF_OP_READ, 1, 0, 3, 2, good), BLKIF_RSP_ERROR},
      {"last_sect 8", rw(BLKIF_OP_WRITE, 1, 0, 0, 8, good), BLKIF_RSP_ERROR},
      {"beyond the disk", rw(BLKIF_OP_READ, 1, sectors - 4, 0, 7, good), BLKIF_RSP_ERROR},
      {"sector overflow", rw(BLKIF_OP_READ, 1, ~0ull - 2, 0, 7, good), BLKIF_RSP_ERROR},
      {"ungranted page", rw(BLKIF_OP_WRITE, 1, 0, 0, 7, *ungranted), BLKIF_RSP_ERROR},
      {"grant out of range", rw(BLKIF_OP_READ, 1, 0, 0, 7, 0xfffffff0u), BLKIF_RSP_ERROR},
      {"indirect above the advertised", too_many, BLKIF_RSP_ERROR},
      {"discard not advertised", discard, BLKIF_RSP_EOPNOTSUPP},
  };
  for (const Case& c : cases) {
    // The Blkfront only hands out a response whose id is the request's (slot in the low bits).
    const BlkfrontCompletion response = RawRoundTrip(0, *slot, c.request);
    EXPECT_EQ(response.status, c.status) << c.what;
    EXPECT_EQ(response.slot, *slot) << c.what;
  }
  blkfront_->ReleaseSlot(0, *slot);
  EXPECT_EQ(blkfront_->counters().bogus_responses, 0u);
  EXPECT_EQ(blkfront_->counters().grants_still_mapped, 0u);
  // Good requests still complete on the same queue.
  VerifiedIo(0, 0, 8, 3, 5);

  // Queue 1: req_prod a whole ring ahead of what was answered.
  ASSERT_TRUE(blkfront_->BreakRing(1, blkfront_->ring_size() + 5).ok());
  ASSERT_TRUE(testing::WaitFor([&] {
    return ReadWholeFile(controller_->log_path()).find("queue 1 stopped") != std::string::npos;
  }));
  // Queue 0, the worker and the control channel carry on.
  VerifiedIo(0, 1000, 8, 2, 6);
  v1::Device device = GetDevice();
  EXPECT_EQ(device.status().worker_pid(), worker_pid);
  EXPECT_EQ(device.status().state(), v1::DEVICE_STATE_CONNECTED);
  EXPECT_GT(Ops(GetStats(), "write"), 0u);
  ASSERT_TRUE(Detach().ok());
  EXPECT_THAT(ReadWholeFile(controller_->log_path()), HasSubstr(" 0 still mapped"));
}

// The frontend closes and comes back: Closing/Closed, then InitWait and a new connection.
TEST_F(XenBackendE2eTest, FrontendReconnects) {
  ServeThenCloseFrontend();
  if (HasFatalFailure()) return;
  // A new frontend instance: Initialising, and the backend offers InitWait again.
  ASSERT_TRUE(guest_platform_->xenstore().Write(kFrontend + "/state", "1", 0).ok());
  ConnectFrontend("x86_32-abi", true, 1, 1);
  if (HasFatalFailure()) return;
  VerifiedIo(0, 0, 8, 4, 2);
  ASSERT_TRUE(
      testing::WaitFor([&] { return GetDevice().status().state() == v1::DEVICE_STATE_CONNECTED; }));
}

// The frontend closes first, then the device is detached: the backend, Closed already, stays
// Closed (no Closing the closed frontend would react to) and the worker exits cleanly.
TEST_F(XenBackendE2eTest, DetachAfterFrontendClosedStaysClosed) {
  ServeThenCloseFrontend();
  if (HasFatalFailure()) return;
  EXPECT_EQ(Xenstore({"xenstore-read", kBackend + "/state"}), "6\n");
  ASSERT_TRUE(Detach().ok());
  const std::string log = ReadWholeFile(controller_->log_path());
  EXPECT_THAT(log, HasSubstr("Connected -> Closing"));
  EXPECT_THAT(log, Not(HasSubstr("Closed -> Closing"))) << log;
  EXPECT_THAT(log, HasSubstr(" 0 still mapped"));
  EXPECT_THAT(log, HasSubstr("worker exited with status 0"));
  EXPECT_FALSE(dom0_->xenstore().Read(kBackend + "/state", 0).ok());
}

// A persistent-grant cache far smaller than the working set: least recently used grants are
// released (and pages beyond the cap are mapped per request), data stays right, and nothing stays
// mapped after detach.
TEST_F(XenBackendE2eTest, PersistentGrantCacheEvictsLeastRecentlyUsed) {
  StartAll({"--xen-max-persistent-grants=16"});
  if (HasFatalFailure()) return;
  ASSERT_TRUE(Attach(Spec(1, 0, true)).ok());
  ConnectFrontend("x86_64-abi", true, 0, 1);
  if (HasFatalFailure()) return;
  VerifiedIo(0, 0, 32, 4, 1, 32);    // 128 pages in flight, cap 16
  VerifiedIo(0, 0, 32, 1, 2, 4);     // small working set: hits
  VerifiedIo(0, 4096, 8, 20, 3, 8);  // indirect, above the cap per request
  if (HasFatalFailure()) return;
  ASSERT_TRUE(Detach().ok());
  const std::string log = ReadWholeFile(controller_->log_path());
  EXPECT_THAT(log, HasSubstr(" 0 still mapped"));
  // Also catches sanitizer reports at exit (ASan/LSan exit codes).
  EXPECT_THAT(log, HasSubstr("worker exited with status 0"));
  EXPECT_THAT(log, ::testing::Not(HasSubstr(" 0 persistent evictions")));
  EXPECT_THAT(log, HasSubstr(" persistent evictions"));
  EXPECT_TRUE(harness::RevokeSlotGrants(*blkfront_, *guest_));
}

// --xen-platform=host on a machine without Xen: attach says what is missing.
TEST(XenHostPlatformTest, AttachWithoutXenFailsWithFailedPrecondition) {
  if (access("/dev/xen", F_OK) == 0) GTEST_SKIP() << "this machine is a Xen domain (/dev/xen)";
  testing::ControllerProcess controller({"--xen-platform=host"});
  controller.Start();
  std::string disk = controller.CreateDisk("d.img", 1 << 20);
  grpc::ClientContext context;
  v1::AttachDeviceRequest request;
  request.set_device_id("xd0");
  *request.mutable_spec() = testing::XenSpec(disk, kGuest, "xvda");
  request.mutable_spec()->mutable_backend()->set_cache(v1::CACHE_MODE_WRITEBACK);
  v1::Device device;
  grpc::Status status = controller.stub().AttachDevice(&context, request, &device);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("/dev/xen"));
  grpc::ClientContext list_context;
  v1::ListDevicesResponse list;
  ASSERT_TRUE(controller.stub().ListDevices(&list_context, v1::ListDevicesRequest(), &list).ok());
  EXPECT_EQ(list.devices_size(), 0);
}

}  // namespace
}  // namespace blockplane::xen_e2e
