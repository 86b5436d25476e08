// End to end: bp-xenhost (the emulated Xen host, with guest domain 5), a real blockplaned with
// --xen-platform=emulated whose worker runs the blkif backend, and the userspace blkfront of the
// harness (handshake) plus blkif_guest_io (requests) acting as the guest. Data is checked byte for
// byte against what the guest wrote and against the backing file.

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
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
#include "tests/integration/xen/blkif_guest_io.h"

extern char** environ;

namespace blockplane::xen_e2e {
namespace {

using harness::Blkfront;
using harness::BlkfrontOptions;
using harness::GuestDomain;
using harness::TempDir;
using ::testing::HasSubstr;
using worker::xen::Protocol;

constexpr common::xen::DomainId kGuest = 5;
constexpr uint32_t kDevid = 51712;  // xvda
constexpr uint32_t kGuestPages = 8192;
constexpr uint32_t kGuestGrants = 8192;
constexpr uint32_t kDataFirstFrame = 128;  // frames below hold the rings
constexpr size_t kPage = 4096;
constexpr uint64_t kDiskSize = 64ull << 20;

std::string ReadWholeFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

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

Protocol ProtocolOf(const std::string& name) {
  if (name == "x86_32-abi") return Protocol::kX86_32;
  if (name == "x86_64-abi") return Protocol::kX86_64;
  return Protocol::kNative;
}

class XenBackendE2eTest : public ::testing::Test {
 protected:
  void TearDown() override {
    queues_.clear();
    blkfront_.reset();
    controller_.reset();  // kills the workers
    guest_.reset();
    guest_platform_.reset();
    dom0_.reset();
    if (xenhost_pid_ > 0) {
      kill(xenhost_pid_, SIGTERM);
      int status = 0;
      waitpid(xenhost_pid_, &status, 0);
    }
  }

  void StartXenHost() {
    absl::StatusOr<pid_t> pid =
        harness::SpawnXenHost(BP_XENHOST_PATH, run_dir_.path(),
                              std::to_string(kGuest) + ":" + std::to_string(kGuestPages) + ":" +
                                  std::to_string(kGuestGrants));
    ASSERT_TRUE(pid.ok()) << pid.status();
    xenhost_pid_ = *pid;
  }

  // bp-xenhost, blockplaned --xen-platform=emulated, the guest's handles.
  void StartAll(std::vector<std::string> extra_flags = {}) {
    StartXenHost();
    if (HasFatalFailure()) return;
    std::vector<std::string> flags = {"--xen-platform=emulated",
                                      "--xen-run-dir=" + run_dir_.path()};
    flags.insert(flags.end(), extra_flags.begin(), extra_flags.end());
    controller_ = std::make_unique<testing::ControllerProcess>(flags);
    controller_->Start();
    auto guest = GuestDomain::Connect(run_dir_.path(), kGuest);
    ASSERT_TRUE(guest.ok()) << guest.status();
    guest_ = std::move(*guest);
    auto platform = common::xen::CreateEmulatedXenPlatform({run_dir_.path(), kGuest});
    ASSERT_TRUE(platform.ok()) << platform.status();
    guest_platform_ = std::move(*platform);
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

  v1::Device GetDevice() {
    grpc::ClientContext context;
    v1::GetDeviceRequest request;
    request.set_device_id("xd0");
    v1::Device device;
    EXPECT_TRUE(controller_->stub().GetDevice(&context, request, &device).ok());
    return device;
  }

  v1::DeviceStats GetStats() {
    grpc::ClientContext context;
    v1::GetDeviceStatsRequest request;
    request.set_device_id("xd0");
    v1::DeviceStats stats;
    EXPECT_TRUE(controller_->stub().GetDeviceStats(&context, request, &stats).ok());
    return stats;
  }

  static uint64_t Ops(const v1::DeviceStats& stats, const std::string& op) {
    for (const auto& o : stats.ops()) {
      if (o.op() == op) return o.operations();
    }
    return 0;
  }

  // The handshake up to Connected, then one GuestQueue per negotiated queue.
  void ConnectFrontend(const std::string& protocol, bool persistent, uint32_t order,
                       uint32_t queues) {
    BlkfrontOptions options;
    options.devid = kDevid;
    options.protocol = protocol;
    options.persistent_grants = persistent;
    options.ring_page_order = order;
    options.num_queues = queues;
    options.timeout_ms = 20000;
    blkfront_ = std::make_unique<Blkfront>(guest_platform_.get(), guest_.get(), options);
    absl::Status connected = blkfront_->Connect();
    ASSERT_TRUE(connected.ok()) << connected << "\n" << ReadWholeFile(controller_->log_path());
    const uint32_t slots = 32, max_pages = 32;
    for (size_t q = 0; q < blkfront_->queues().size(); ++q) {
      queues_.push_back(std::make_unique<GuestQueue>(
          guest_.get(), &blkfront_->queues()[q], ProtocolOf(protocol), 0,
          persistent && blkfront_->backend_info().feature_persistent,
          kDataFirstFrame + static_cast<uint32_t>(q) * slots * (max_pages + 1), slots, max_pages));
    }
  }

  // Writes `count` requests of `pages` pages at disjoint places from `first_sector`, reads them
  // back through the guest, and compares with the pattern and with the backing file.
  void VerifiedIo(GuestQueue& queue, uint64_t first_sector, uint32_t count, uint32_t pages,
                  bool indirect, uint32_t seed, uint32_t depth = 16) {
    std::vector<std::vector<uint8_t>> written(count), read(count);
    std::vector<GuestRequest> writes(count), reads(count);
    for (uint32_t i = 0; i < count; ++i) {
      const uint64_t sector = first_sector + uint64_t{i} * pages * 8;
      written[i] = Pattern(sector, pages, seed);
      read[i].assign(written[i].size(), 0xee);
      writes[i] = GuestRequest{.operation = BLKIF_OP_WRITE,
                               .sector = sector,
                               .pages = pages,
                               .indirect = indirect,
                               .write_data = written[i].data()};
      reads[i] = GuestRequest{.operation = BLKIF_OP_READ,
                              .sector = sector,
                              .pages = pages,
                              .indirect = indirect,
                              .read_data = read[i].data()};
    }
    auto w = queue.Run(writes, depth);
    ASSERT_TRUE(w.ok()) << w.status();
    for (const GuestResponse& r : *w) {
      ASSERT_EQ(r.status, BLKIF_RSP_OKAY);
      ASSERT_EQ(r.operation, BLKIF_OP_WRITE);
    }
    auto r = queue.Run(reads, depth);
    ASSERT_TRUE(r.ok()) << r.status();
    for (uint32_t i = 0; i < count; ++i) {
      ASSERT_EQ((*r)[i].status, BLKIF_RSP_OKAY);
      ASSERT_EQ((*r)[i].operation, BLKIF_OP_READ);
      ASSERT_TRUE(read[i] == written[i]) << "guest read differs, request " << i;
      ASSERT_TRUE(ReadFileRange(disk_path_, writes[i].sector * 512, written[i].size()) ==
                  written[i])
          << "backing file differs, request " << i;
    }
    EXPECT_EQ(queue.grants_still_mapped(), 0u);
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

  TempDir run_dir_;
  pid_t xenhost_pid_ = -1;
  std::unique_ptr<testing::ControllerProcess> controller_;
  std::unique_ptr<GuestDomain> guest_;
  std::unique_ptr<common::xen::XenPlatform> guest_platform_;
  std::unique_ptr<common::xen::XenPlatform> dom0_;
  std::string disk_path_;
  std::unique_ptr<Blkfront> blkfront_;
  std::vector<std::unique_ptr<GuestQueue>> queues_;
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

  GuestQueue& queue = *queues_[0];
  VerifiedIo(queue, 0, 24, 1, false, 1);      // one page
  VerifiedIo(queue, 4096, 16, 11, false, 2);  // a full direct request
  VerifiedIo(queue, 8192, 12, 32, true, 3);   // indirect, 32 segments
  VerifiedIo(queue, 0, 24, 1, false, 4);      // rewrite (persistent hits)
  if (HasFatalFailure()) return;

  // Flush (no data) and a barrier write.
  std::vector<uint8_t> barrier_data = Pattern(30000, 2, 9);
  std::vector<GuestRequest> more = {
      GuestRequest{.operation = BLKIF_OP_FLUSH_DISKCACHE, .pages = 0},
      GuestRequest{.operation = BLKIF_OP_WRITE_BARRIER,
                   .sector = 30000,
                   .pages = 2,
                   .write_data = barrier_data.data()},
      // Discard was not advertised (discard=ignore): EOPNOTSUPP.
      GuestRequest{.operation = BLKIF_OP_DISCARD, .sector = 0, .discard_sectors = 8}};
  auto result = queue.Run(more, 4);
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
  EXPECT_TRUE(queue.RevokePersistentGrants());
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
  ASSERT_EQ(queues_.size(), 4u);
  EXPECT_EQ(blkfront_->ring_page_order(), 2u);
  EXPECT_EQ(queues_[0]->ring_size(), 128u);
  EXPECT_EQ(Xenstore({"xenstore-read", kFrontend + "/multi-queue-num-queues"}), "4\n");
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (uint32_t q = 0; q < 4; ++q) {
    threads.emplace_back([&, q] {
      VerifiedIo(*queues_[q], 20000 * uint64_t{q}, 16, 32, true, 10 + q, 32);
      VerifiedIo(*queues_[q], 20000 * uint64_t{q} + 8192, 64, 2, false, 20 + q, 64);
      if (::testing::Test::HasFailure()) failures.fetch_add(1);
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
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
  GuestQueue& queue = *queues_[0];

  std::atomic<bool> stop{false};
  std::atomic<int> errors{0};
  std::atomic<uint64_t> round{0};
  std::thread load;
  JoinOnExit guard{&stop, &load};
  load = std::thread([&] {
    while (!stop.load()) {
      const uint32_t seed = static_cast<uint32_t>(round.load());
      std::vector<std::vector<uint8_t>> data;
      std::vector<GuestRequest> writes;
      for (uint32_t i = 0; i < 16; ++i) {
        data.push_back(Pattern(i * 16, 2, seed));
      }
      for (uint32_t i = 0; i < 16; ++i) {
        writes.push_back(GuestRequest{.operation = BLKIF_OP_WRITE,
                                      .sector = i * 16,
                                      .pages = 2,
                                      .write_data = data[i].data()});
      }
      auto result = queue.Run(writes, 16);
      if (!result.ok()) {
        errors.fetch_add(1);
        return;
      }
      for (const GuestResponse& r : *result) {
        if (r.status != BLKIF_RSP_OKAY) errors.fetch_add(1);
      }
      round.fetch_add(1);
    }
  });
  ASSERT_TRUE(testing::WaitFor([&] { return round.load() >= 3; }, 20000));

  grpc::ClientContext drain_context;
  v1::DrainDeviceRequest drain;
  drain.set_device_id("xd0");
  v1::Device drained;
  ASSERT_TRUE(controller_->stub().DrainDevice(&drain_context, drain, &drained).ok());
  ASSERT_EQ(drained.status().state(), v1::DEVICE_STATE_DRAINED);
  const v1::DeviceStats at_drain = GetStats();
  // The guest has requests on the ring (left over or its next batch); the backend has taken them
  // all (the ring says so: req_event == req_prod + 1) but the block layer holds them.
  ASSERT_TRUE(testing::WaitFor(
      [&] { return queue.pushed() > queue.completed() && queue.BackendIdle(); }, 20000));
  const uint64_t completed_while_drained = queue.completed();
  const v1::DeviceStats while_drained = GetStats();
  EXPECT_EQ(Ops(while_drained, "write"), Ops(at_drain, "write"));
  EXPECT_EQ(Ops(while_drained, "read"), Ops(at_drain, "read"));
  EXPECT_EQ(GetDevice().status().state(), v1::DEVICE_STATE_DRAINED);

  grpc::ClientContext resume_context;
  v1::ResumeDeviceRequest resume;
  resume.set_device_id("xd0");
  v1::Device resumed;
  ASSERT_TRUE(controller_->stub().ResumeDevice(&resume_context, resume, &resumed).ok());
  EXPECT_EQ(resumed.status().state(), v1::DEVICE_STATE_CONNECTED);
  ASSERT_TRUE(
      testing::WaitFor([&] { return queue.completed() > completed_while_drained + 16; }, 20000));
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
  ASSERT_EQ(queues_.size(), 2u);
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::thread load;
  JoinOnExit guard{&stop, &load};
  load = std::thread([&] {
    uint32_t seed = 100;
    while (!stop.load()) {
      VerifiedIo(*queues_[0], 0, 8, 4, false, seed++, 8);
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
  // Beyond the old end, on the other queue.
  VerifiedIo(*queues_[1], kDiskSize / 512, 4, 8, true, 7);
  // And the end of the new size is the end.
  std::vector<GuestRequest> past = {GuestRequest{
      .operation = BLKIF_OP_READ, .sector = kNewSize / 512, .pages = 1, .read_data = nullptr}};
  auto result = queues_[1]->Run(past, 1);
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
  ASSERT_EQ(queues_.size(), 2u);
  const int32_t worker_pid = GetDevice().status().worker_pid();
  ASSERT_GT(worker_pid, 0);

  // A good page to point segments at.
  const uint32_t good_frame = kGuestPages - 1;
  ASSERT_TRUE(guest_->GrantAccess(good_frame, 0, good_frame, false).ok());
  auto rw = [&](uint8_t op, uint8_t nr, uint64_t sector, uint8_t first, uint8_t last,
                uint32_t gref) {
    worker::xen::blkif_x86_64_request r{};
    r.operation = op;
    r.nr_segments = nr;
    r.id = 0xabc0 + op;
    r.sector_number = sector;
    for (int i = 0; i < BLKIF_MAX_SEGMENTS_PER_REQUEST; ++i) {
      r.seg[i] = blkif_request_segment{gref, first, last};
    }
    std::vector<uint8_t> bytes(sizeof(r));
    std::memcpy(bytes.data(), &r, sizeof(r));
    return bytes;
  };
  struct Case {
    const char* what;
    std::vector<uint8_t> bytes;
    int16_t status;
  };
  worker::xen::blkif_x86_64_request_indirect too_many{};
  too_many.operation = BLKIF_OP_INDIRECT;
  too_many.indirect_op = BLKIF_OP_READ;
  too_many.nr_segments = 1000;
  too_many.id = 77;
  too_many.indirect_grefs[0] = good_frame;
  std::vector<uint8_t> too_many_bytes(sizeof(too_many));
  std::memcpy(too_many_bytes.data(), &too_many, sizeof(too_many));
  worker::xen::blkif_x86_64_request_discard discard{};
  discard.operation = BLKIF_OP_DISCARD;
  discard.id = 78;
  discard.nr_sectors = 8;
  std::vector<uint8_t> discard_bytes(sizeof(discard));
  std::memcpy(discard_bytes.data(), &discard, sizeof(discard));
  const uint64_t sectors = kDiskSize / 512;
  std::vector<Case> cases = {
      {"unknown operation", rw(99, 1, 0, 0, 7, good_frame), BLKIF_RSP_EOPNOTSUPP},
      {"no segments", rw(BLKIF_OP_READ, 0, 0, 0, 7, good_frame), BLKIF_RSP_ERROR},
      {"12 segments", rw(BLKIF_OP_READ, 12, 0, 0, 7, good_frame), BLKIF_RSP_ERROR},
      {"first > last", rw(BLKIF_OP_READ, 1, 0, 3, 2, good_frame), BLKIF_RSP_ERROR},
      {"last_sect 8", rw(BLKIF_OP_WRITE, 1, 0, 0, 8, good_frame), BLKIF_RSP_ERROR},
      {"beyond the disk", rw(BLKIF_OP_READ, 1, sectors - 4, 0, 7, good_frame), BLKIF_RSP_ERROR},
      {"sector overflow", rw(BLKIF_OP_READ, 1, ~0ull - 2, 0, 7, good_frame), BLKIF_RSP_ERROR},
      {"ungranted page", rw(BLKIF_OP_WRITE, 1, 0, 0, 7, kGuestGrants - 2), BLKIF_RSP_ERROR},
      {"grant out of range", rw(BLKIF_OP_READ, 1, 0, 0, 7, 0xfffffff0u), BLKIF_RSP_ERROR},
      {"indirect above the advertised", too_many_bytes, BLKIF_RSP_ERROR},
      {"discard not advertised", discard_bytes, BLKIF_RSP_EOPNOTSUPP},
  };
  for (const Case& c : cases) {
    auto response = queues_[0]->RunRaw(c.bytes);
    ASSERT_TRUE(response.ok()) << c.what << ": " << response.status();
    EXPECT_EQ(response->status, c.status) << c.what;
    uint64_t id = 0;
    std::memcpy(&id, c.bytes.data() + 8, 8);
    EXPECT_EQ(response->id, id) << c.what;
  }
  // Good requests still complete on the same queue.
  VerifiedIo(*queues_[0], 0, 8, 3, false, 5);

  // Queue 1: req_prod a whole ring ahead of what was answered.
  queues_[1]->PublishBogusReqProd(queues_[1]->ring_size() + 5);
  ASSERT_TRUE(testing::WaitFor([&] {
    return ReadWholeFile(controller_->log_path()).find("queue 1 stopped") != std::string::npos;
  }));
  // Queue 0, the worker and the control channel carry on.
  VerifiedIo(*queues_[0], 1000, 8, 2, false, 6);
  v1::Device device = GetDevice();
  EXPECT_EQ(device.status().worker_pid(), worker_pid);
  EXPECT_EQ(device.status().state(), v1::DEVICE_STATE_CONNECTED);
  EXPECT_GT(Ops(GetStats(), "write"), 0u);
  ASSERT_TRUE(Detach().ok());
  EXPECT_THAT(ReadWholeFile(controller_->log_path()), HasSubstr(" 0 still mapped"));
}

// The frontend closes and comes back: Closing/Closed, then InitWait and a new connection.
TEST_F(XenBackendE2eTest, FrontendReconnects) {
  StartAll();
  if (HasFatalFailure()) return;
  ASSERT_TRUE(Attach(Spec(1, 1, true)).ok());
  ConnectFrontend("x86_64-abi", true, 1, 1);
  if (HasFatalFailure()) return;
  VerifiedIo(*queues_[0], 0, 8, 4, false, 1);
  ASSERT_TRUE(blkfront_->Disconnect().ok());  // fails if the backend still maps the ring
  EXPECT_TRUE(queues_[0]->RevokePersistentGrants());
  ASSERT_TRUE(testing::WaitFor(
      [&] { return GetDevice().status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND; }));
  queues_.clear();
  // A new frontend instance: Initialising, and the backend offers InitWait again.
  ASSERT_TRUE(guest_platform_->xenstore().Write(kFrontend + "/state", "1", 0).ok());
  ConnectFrontend("x86_32-abi", true, 1, 1);
  if (HasFatalFailure()) return;
  VerifiedIo(*queues_[0], 0, 8, 4, false, 2);
  ASSERT_TRUE(
      testing::WaitFor([&] { return GetDevice().status().state() == v1::DEVICE_STATE_CONNECTED; }));
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
  VerifiedIo(*queues_[0], 0, 32, 4, false, 1, 32);   // 128 pages in flight, cap 16
  VerifiedIo(*queues_[0], 0, 32, 1, false, 2, 4);    // small working set: hits
  VerifiedIo(*queues_[0], 4096, 8, 20, true, 3, 8);  // indirect, above the cap per request
  if (HasFatalFailure()) return;
  ASSERT_TRUE(Detach().ok());
  const std::string log = ReadWholeFile(controller_->log_path());
  EXPECT_THAT(log, HasSubstr(" 0 still mapped"));
  // Also catches sanitizer reports at exit (ASan/LSan exit codes).
  EXPECT_THAT(log, HasSubstr("worker exited with status 0"));
  EXPECT_THAT(log, ::testing::Not(HasSubstr(" 0 persistent evictions")));
  EXPECT_THAT(log, HasSubstr(" persistent evictions"));
  EXPECT_TRUE(queues_[0]->RevokePersistentGrants());
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
