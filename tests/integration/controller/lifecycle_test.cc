// End-to-end tests of blockplaned with real processes: the controller, its workers, and bpctl.
#include <signal.h>
#include <sys/stat.h>

#include <filesystem>
#include <thread>

#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "tests/integration/controller/fixture.h"

namespace blockplane::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

grpc::Status Attach(ControllerProcess& c, const std::string& id, const v1::DeviceSpec& spec,
                    v1::Device* out) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::AttachDeviceRequest req;
  req.set_device_id(id);
  *req.mutable_spec() = spec;
  return c.stub().AttachDevice(&ctx, req, out);
}

v1::Device Get(ControllerProcess& c, const std::string& id, grpc::StatusCode expect = grpc::OK) {
  grpc::ClientContext ctx;
  v1::GetDeviceRequest req;
  req.set_device_id(id);
  v1::Device out;
  grpc::Status s = c.stub().GetDevice(&ctx, req, &out);
  EXPECT_EQ(s.error_code(), expect) << s.error_message();
  return out;
}

v1::DeviceState StateOf(ControllerProcess& c, const std::string& id) {
  return Get(c, id).status().state();
}

class LifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_NO_FATAL_FAILURE(controller_.Start()); }
  ControllerProcess controller_;
};

TEST_F(LifecycleTest, AttachResizeDrainResumeDetachThroughGrpc) {
  std::string disk = controller_.CreateDisk("d0.img", 64 * kMiB);
  v1::Device device;
  ASSERT_TRUE(Attach(controller_, "dev0", XenSpec(disk), &device).ok());
  EXPECT_EQ(device.id(), "dev0");
  EXPECT_EQ(device.status().state(), v1::DEVICE_STATE_WAITING_FOR_FRONTEND);
  EXPECT_EQ(device.status().size_bytes(), 64 * kMiB);
  EXPECT_EQ(device.status().worker_generation(), 1u);
  EXPECT_TRUE(ProcessAlive(device.status().worker_pid()));
  // Defaults are written out.
  EXPECT_EQ(device.spec().backend().cache(), v1::CACHE_MODE_NONE);
  EXPECT_EQ(device.spec().backend().logical_block_size(), 512u);
  EXPECT_EQ(device.spec().xen().max_queues(), 4u);
  EXPECT_TRUE(device.spec().xen().persistent_grants());

  {
    grpc::ClientContext ctx;
    v1::ListDevicesRequest req;
    v1::ListDevicesResponse resp;
    ASSERT_TRUE(controller_.stub().ListDevices(&ctx, req, &resp).ok());
    ASSERT_EQ(resp.devices_size(), 1);
    EXPECT_EQ(resp.devices(0).id(), "dev0");
  }
  {
    grpc::ClientContext ctx;
    v1::ResizeDeviceRequest req;
    req.set_device_id("dev0");
    req.set_new_size_bytes(128 * kMiB);
    v1::Device out;
    grpc::Status s = controller_.stub().ResizeDevice(&ctx, req, &out);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(out.status().size_bytes(), 128 * kMiB);
    struct stat st;
    ASSERT_EQ(stat(disk.c_str(), &st), 0);
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), 128 * kMiB);
  }
  {
    v1::Device out;
    grpc::Status s = testing::DrainDevice(controller_, "dev0", &out);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(out.status().state(), v1::DEVICE_STATE_DRAINED);
  }
  {
    v1::Device out;
    grpc::Status s = testing::ResumeDevice(controller_, "dev0", &out);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(out.status().state(), v1::DEVICE_STATE_WAITING_FOR_FRONTEND);
  }
  {
    grpc::ClientContext ctx;
    v1::GetDeviceStatsRequest req;
    req.set_device_id("dev0");
    v1::DeviceStats stats;
    grpc::Status s = controller_.stub().GetDeviceStats(&ctx, req, &stats);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_EQ(stats.device_id(), "dev0");
    EXPECT_EQ(stats.size_bytes(), 128 * kMiB);
  }
  pid_t worker = device.status().worker_pid();
  {
    grpc::ClientContext ctx;
    v1::DetachDeviceRequest req;
    req.set_device_id("dev0");
    v1::DetachDeviceResponse out;
    grpc::Status s = controller_.stub().DetachDevice(&ctx, req, &out);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  Get(controller_, "dev0", grpc::NOT_FOUND);
  EXPECT_TRUE(WaitFor([&] { return !ProcessAlive(worker); }));
  EXPECT_FALSE(std::filesystem::exists(controller_.state_dir() + "/workers/dev0.sock"));
}

TEST_F(LifecycleTest, AttachIsIdempotentAndRefusesAnotherSpecForTheSameId) {
  std::string disk = controller_.CreateDisk("d0.img", 16 * kMiB);
  v1::Device first, again;
  ASSERT_TRUE(Attach(controller_, "dev0", XenSpec(disk), &first).ok());
  // Same spec, with a default spelled out: the same device, the same worker.
  v1::DeviceSpec same = XenSpec(disk);
  same.mutable_backend()->set_cache(v1::CACHE_MODE_NONE);
  grpc::Status s = Attach(controller_, "dev0", same, &again);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(again.status().worker_pid(), first.status().worker_pid());

  v1::DeviceSpec other = XenSpec(disk);
  other.mutable_backend()->set_cache(v1::CACHE_MODE_WRITEBACK);
  v1::Device ignored;
  s = Attach(controller_, "dev0", other, &ignored);
  EXPECT_EQ(s.error_code(), grpc::ALREADY_EXISTS);
  EXPECT_NE(s.error_message().find("device_id"), std::string::npos) << s.error_message();
  EXPECT_EQ(Get(controller_, "dev0").spec().backend().cache(), v1::CACHE_MODE_NONE);
}

// A device stored by an older controller, whose normalisation spelled out fewer defaults (here:
// before spec.backend.null.completion existed), is still the same device for a retried attach of
// the same request: the stored spec is normalised again before the comparison.
TEST_F(LifecycleTest, AttachStaysIdempotentForASpecStoredBeforeANewDefault) {
  v1::DeviceSpec spec = XenSpec("");
  spec.mutable_backend()->clear_path();
  spec.mutable_backend()->mutable_null()->set_size_bytes(16 * kMiB);
  v1::Device first;
  ASSERT_TRUE(Attach(controller_, "n0", spec, &first).ok());
  ASSERT_EQ(first.spec().backend().null().completion(), v1::NULL_COMPLETION_NOP);
  controller_.Stop(SIGTERM);
  // What an older controller would have stored: no completion field.
  const std::string db = controller_.state_dir() + "/registry.db";
  CommandResult updated = RunCommand({"/usr/bin/sqlite3", db,
                                      "UPDATE devices SET spec_json = replace(spec_json, "
                                      "',\"completion\":\"NULL_COMPLETION_NOP\"', "
                                      "'') WHERE id = 'n0'; SELECT changes();"});
  ASSERT_EQ(updated.exit_code, 0) << updated.err;
  ASSERT_EQ(updated.out, "1\n");
  ASSERT_NO_FATAL_FAILURE(controller_.Start());
  ASSERT_EQ(Get(controller_, "n0").spec().backend().null().completion(),
            v1::NULL_COMPLETION_UNSPECIFIED)
      << "the stored spec must really be the old one for this test";

  v1::Device again;
  grpc::Status s = Attach(controller_, "n0", spec, &again);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(again.status().worker_pid(), first.status().worker_pid());
  // A real difference is still one.
  v1::DeviceSpec deferred = spec;
  deferred.mutable_backend()->mutable_null()->set_completion(v1::NULL_COMPLETION_DEFERRED);
  s = Attach(controller_, "n0", deferred, &again);
  EXPECT_EQ(s.error_code(), grpc::ALREADY_EXISTS) << s.error_message();
  EXPECT_NE(s.error_message().find("completion"), std::string::npos) << s.error_message();
}

TEST_F(LifecycleTest, KilledWorkerIsRestartedWithANewGeneration) {
  std::string disk = controller_.CreateDisk("d0.img", 16 * kMiB);
  v1::Device device;
  ASSERT_TRUE(Attach(controller_, "dev0", XenSpec(disk), &device).ok());
  pid_t first = device.status().worker_pid();
  ASSERT_EQ(::kill(first, SIGKILL), 0);
  ASSERT_TRUE(WaitFor([&] {
    v1::Device d = Get(controller_, "dev0");
    return d.status().worker_generation() == 2 &&
           d.status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
  }));
  v1::Device after = Get(controller_, "dev0");
  EXPECT_NE(after.status().worker_pid(), first);
  EXPECT_TRUE(ProcessAlive(after.status().worker_pid()));
  EXPECT_EQ(after.status().restart_count(), 1u);
  EXPECT_NE(after.status().last_error().find("signal 9"), std::string::npos)
      << after.status().last_error();
}

TEST_F(LifecycleTest, DrainedDeviceStaysDrainedAcrossAWorkerCrash) {
  std::string disk = controller_.CreateDisk("d0.img", 16 * kMiB);
  v1::Device device;
  ASSERT_TRUE(Attach(controller_, "dev0", XenSpec(disk), &device).ok());
  ASSERT_EQ(controller_.Bpctl({"drain", "dev0"}).exit_code, 0);
  ASSERT_EQ(::kill(device.status().worker_pid(), SIGKILL), 0);
  ASSERT_TRUE(WaitFor([&] {
    v1::Device d = Get(controller_, "dev0");
    return d.status().worker_generation() == 2 && d.status().state() == v1::DEVICE_STATE_DRAINED;
  })) << v1::DeviceState_Name(StateOf(controller_, "dev0"));
}

TEST(LifecycleFailureTest, DeviceFailsAfterTooManyCrashesAndResumeRetries) {
  ControllerProcess controller({"--max-restarts=1"});
  ASSERT_NO_FATAL_FAILURE(controller.Start());
  std::string disk = controller.CreateDisk("d0.img", 16 * kMiB);
  v1::Device device;
  ASSERT_TRUE(Attach(controller, "dev0", XenSpec(disk), &device).ok());
  ASSERT_EQ(::kill(device.status().worker_pid(), SIGKILL), 0);
  ASSERT_TRUE(WaitFor([&] { return Get(controller, "dev0").status().worker_generation() == 2; }));
  ASSERT_TRUE(WaitFor([&] { return ProcessAlive(Get(controller, "dev0").status().worker_pid()); }));
  ASSERT_EQ(::kill(Get(controller, "dev0").status().worker_pid(), SIGKILL), 0);
  ASSERT_TRUE(WaitFor([&] { return StateOf(controller, "dev0") == v1::DEVICE_STATE_FAILED; }));
  v1::Device failed = Get(controller, "dev0");
  EXPECT_NE(failed.status().last_error().find("not restarting"), std::string::npos)
      << failed.status().last_error();
  EXPECT_EQ(failed.status().worker_pid(), 0);

  // Stats and drain are refused with a reason; resume starts a fresh worker.
  CommandResult stats = controller.Bpctl({"stats", "dev0"});
  EXPECT_NE(stats.exit_code, 0);
  EXPECT_NE(stats.err.find("FAILED_PRECONDITION"), std::string::npos) << stats.err;
  CommandResult resume = controller.Bpctl({"resume", "dev0"});
  EXPECT_EQ(resume.exit_code, 0) << resume.err;
  ASSERT_TRUE(WaitFor(
      [&] { return StateOf(controller, "dev0") == v1::DEVICE_STATE_WAITING_FOR_FRONTEND; }));
  EXPECT_EQ(Get(controller, "dev0").status().worker_generation(), 3u);
}

TEST_F(LifecycleTest, ControllerKill9KeepsWorkersAndReadoptsThem) {
  std::string d0 = controller_.CreateDisk("d0.img", 16 * kMiB);
  std::string d1 = controller_.CreateDisk("d1.img", 16 * kMiB);
  v1::Device a, b;
  ASSERT_TRUE(Attach(controller_, "dev-a", XenSpec(d0, 5, "xvda"), &a).ok());
  ASSERT_TRUE(Attach(controller_, "dev-b", XenSpec(d1, 5, "xvdb"), &b).ok());
  ASSERT_EQ(controller_.Bpctl({"drain", "dev-b"}).exit_code, 0);

  controller_.Stop(SIGKILL);
  EXPECT_TRUE(ProcessAlive(a.status().worker_pid()));
  EXPECT_TRUE(ProcessAlive(b.status().worker_pid()));

  ASSERT_NO_FATAL_FAILURE(controller_.Start());
  v1::Device a2 = Get(controller_, "dev-a");
  v1::Device b2 = Get(controller_, "dev-b");
  EXPECT_EQ(a2.status().worker_pid(), a.status().worker_pid());
  EXPECT_EQ(b2.status().worker_pid(), b.status().worker_pid());
  EXPECT_EQ(a2.status().worker_generation(), 1u);
  EXPECT_EQ(a2.status().state(), v1::DEVICE_STATE_WAITING_FOR_FRONTEND);
  EXPECT_EQ(b2.status().state(), v1::DEVICE_STATE_DRAINED);

  // The re-adopted workers are fully controllable.
  CommandResult resume = controller_.Bpctl({"resume", "dev-b"});
  EXPECT_EQ(resume.exit_code, 0) << resume.err;
  EXPECT_EQ(StateOf(controller_, "dev-b"), v1::DEVICE_STATE_WAITING_FOR_FRONTEND);
  // ... and still supervised: a crash after adoption is noticed and repaired.
  ASSERT_EQ(::kill(a.status().worker_pid(), SIGKILL), 0);
  EXPECT_TRUE(WaitFor([&] {
    v1::Device d = Get(controller_, "dev-a");
    return d.status().worker_generation() == 2 &&
           d.status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
  }));
}

TEST_F(LifecycleTest, ControllerRestartRespawnsAWorkerThatDiedMeanwhile) {
  std::string d0 = controller_.CreateDisk("d0.img", 16 * kMiB);
  std::string d1 = controller_.CreateDisk("d1.img", 16 * kMiB);
  v1::Device a, b;
  ASSERT_TRUE(Attach(controller_, "dev-a", XenSpec(d0, 5, "xvda"), &a).ok());
  ASSERT_TRUE(Attach(controller_, "dev-b", XenSpec(d1, 5, "xvdb"), &b).ok());
  controller_.Stop(SIGKILL);
  ASSERT_EQ(::kill(b.status().worker_pid(), SIGKILL), 0);
  ASSERT_TRUE(WaitFor([&] { return !ProcessAlive(b.status().worker_pid()); }));

  ASSERT_NO_FATAL_FAILURE(controller_.Start());
  EXPECT_EQ(Get(controller_, "dev-a").status().worker_pid(), a.status().worker_pid());
  ASSERT_TRUE(WaitFor([&] {
    v1::Device d = Get(controller_, "dev-b");
    return d.status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND &&
           d.status().worker_generation() == 2;
  }));
  v1::Device b2 = Get(controller_, "dev-b");
  EXPECT_NE(b2.status().worker_pid(), b.status().worker_pid());
  EXPECT_TRUE(ProcessAlive(b2.status().worker_pid()));
}

TEST_F(LifecycleTest, SigtermLeavesWorkersServing) {
  std::string disk = controller_.CreateDisk("d0.img", 16 * kMiB);
  v1::Device device;
  ASSERT_TRUE(Attach(controller_, "dev0", XenSpec(disk), &device).ok());
  controller_.Stop(SIGTERM);
  EXPECT_TRUE(ProcessAlive(device.status().worker_pid()));
  ASSERT_NO_FATAL_FAILURE(controller_.Start());
  EXPECT_EQ(Get(controller_, "dev0").status().worker_pid(), device.status().worker_pid());
}

TEST(LifecycleStopWorkersTest, StopWorkersOnExitStopsThemAndTheNextControllerRespawns) {
  ControllerProcess controller({"--stop-workers-on-exit"});
  ASSERT_NO_FATAL_FAILURE(controller.Start());
  std::string disk = controller.CreateDisk("d0.img", 16 * kMiB);
  v1::Device device;
  ASSERT_TRUE(Attach(controller, "dev0", XenSpec(disk), &device).ok());
  controller.Stop(SIGTERM);
  EXPECT_TRUE(WaitFor([&] { return !ProcessAlive(device.status().worker_pid()); }));
  ASSERT_NO_FATAL_FAILURE(controller.Start());
  ASSERT_TRUE(WaitFor([&] {
    v1::Device d = Get(controller, "dev0");
    return d.status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND &&
           d.status().worker_generation() == 2;
  }));
}

TEST_F(LifecycleTest, SecondControllerOnTheSameStateDirIsRefused) {
  CommandResult second = RunCommand(
      {BinaryPath("blockplaned"), "--socket=" + controller_.dir() + "/other.sock",
       "--state-dir=" + controller_.state_dir(), "--backing-root=" + controller_.disks_dir(),
       "--worker-binary=" + BinaryPath("blockplane-worker")});
  EXPECT_EQ(second.exit_code, 1);
  EXPECT_NE(second.err.find("in use by another blockplaned"), std::string::npos) << second.err;
}

TEST_F(LifecycleTest, WatchStartsWithASnapshotThenStreamsChanges) {
  std::string d0 = controller_.CreateDisk("d0.img", 16 * kMiB);
  std::string d1 = controller_.CreateDisk("d1.img", 16 * kMiB);
  v1::Device existing;
  ASSERT_TRUE(Attach(controller_, "dev-a", XenSpec(d0, 5, "xvda"), &existing).ok());

  grpc::ClientContext ctx;
  v1::WatchDevicesRequest req;
  std::unique_ptr<grpc::ClientReader<v1::DeviceEvent>> reader =
      controller_.stub().WatchDevices(&ctx, req);
  v1::DeviceEvent event;
  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.kind(), v1::DeviceEvent::KIND_SNAPSHOT);
  EXPECT_EQ(event.device().id(), "dev-a");
  ASSERT_TRUE(reader->Read(&event));
  EXPECT_EQ(event.kind(), v1::DeviceEvent::KIND_SNAPSHOT_COMPLETE);

  std::thread actions([&] {
    v1::Device b;
    EXPECT_TRUE(Attach(controller_, "dev-b", XenSpec(d1, 5, "xvdb"), &b).ok());
    EXPECT_EQ(controller_.Bpctl({"drain", "dev-b"}).exit_code, 0);
    EXPECT_EQ(controller_.Bpctl({"detach", "dev-b"}).exit_code, 0);
  });
  std::vector<std::string> seen;
  uint64_t last_revision = 0;
  while (reader->Read(&event)) {
    EXPECT_GT(event.revision(), last_revision);
    last_revision = event.revision();
    if (event.device().id() != "dev-b") continue;
    std::string what = v1::DeviceEvent::Kind_Name(event.kind());
    if (event.kind() == v1::DeviceEvent::KIND_STATE_CHANGED) {
      what += ":" + v1::DeviceState_Name(event.device().status().state());
    }
    seen.push_back(what);
    if (event.kind() == v1::DeviceEvent::KIND_DETACHED) break;
  }
  actions.join();
  ctx.TryCancel();
  auto has = [&](const std::string& s) {
    return std::find(seen.begin(), seen.end(), s) != seen.end();
  };
  EXPECT_EQ(seen.front(), "KIND_ATTACHED");
  EXPECT_TRUE(has("KIND_STATE_CHANGED:DEVICE_STATE_WAITING_FOR_FRONTEND"));
  EXPECT_TRUE(has("KIND_STATE_CHANGED:DEVICE_STATE_DRAINED"));
  EXPECT_TRUE(has("KIND_STATE_CHANGED:DEVICE_STATE_DETACHING"));
  EXPECT_EQ(seen.back(), "KIND_DETACHED");
}

TEST_F(LifecycleTest, BpctlDrivesTheWholeLifecycle) {
  std::string disk = controller_.CreateDisk("d0.img", 32 * kMiB);
  CommandResult r = controller_.Bpctl(
      {"attach", "dev0", "--path", disk, "--xen-domid", "7", "--xen-vdev", "xvdb"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("dev0"), std::string::npos);

  r = controller_.Bpctl({"--json", "list"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  v1::ListDevicesResponse listed;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(r.out, &listed).ok()) << r.out;
  ASSERT_EQ(listed.devices_size(), 1);
  EXPECT_EQ(listed.devices(0).spec().xen().domid(), 7u);

  r = controller_.Bpctl({"resize", "dev0", "--size", "64M"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Get(controller_, "dev0").status().size_bytes(), 64 * kMiB);

  r = controller_.Bpctl({"resize", "dev0", "--size", "32M"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("INVALID_ARGUMENT"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("allow_shrink"), std::string::npos) << r.err;

  r = controller_.Bpctl({"resize", "dev0", "--size", "32M", "--allow-shrink"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Get(controller_, "dev0").status().size_bytes(), 32 * kMiB);

  r = controller_.Bpctl({"drain", "dev0"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(StateOf(controller_, "dev0"), v1::DEVICE_STATE_DRAINED);
  r = controller_.Bpctl({"resume", "dev0"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = controller_.Bpctl({"--json", "stats", "dev0"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  v1::DeviceStats stats;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(r.out, &stats).ok()) << r.out;
  EXPECT_EQ(stats.size_bytes(), 32 * kMiB);

  r = controller_.Bpctl({"get", "nope"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("NOT_FOUND"), std::string::npos) << r.err;

  r = controller_.Bpctl({"detach", "dev0"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = controller_.Bpctl({"list"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out.find("dev0"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace blockplane::testing

namespace blockplane::testing {
namespace {

// Worker control sockets live under the state dir; a deep state dir must not run into the
// 107-byte limit of unix socket paths.
TEST(LifecycleLongPathTest, DeepStateDirAndLongDeviceIdWork) {
  std::string deep =
      "/tmp/bpt-deep-" + std::to_string(getpid()) + "/" + std::string(60, 'd') + "/state";
  ControllerProcess controller({"--state-dir=" + deep});
  ASSERT_NO_FATAL_FAILURE(controller.Start());
  std::string id(64, 'x');
  std::string disk = controller.CreateDisk("d0.img", 16 * kMiB);
  v1::Device device;
  grpc::Status s = Attach(controller, id, XenSpec(disk), &device);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(device.status().state(), v1::DEVICE_STATE_WAITING_FOR_FRONTEND);
  EXPECT_EQ(controller.Bpctl({"drain", id}).exit_code, 0);
  controller.Stop(SIGKILL);
  ASSERT_NO_FATAL_FAILURE(controller.Start());
  EXPECT_EQ(Get(controller, id).status().worker_pid(), device.status().worker_pid());
  EXPECT_EQ(controller.Bpctl({"detach", id}).exit_code, 0);
  std::error_code ec;
  std::filesystem::remove_all("/tmp/bpt-deep-" + std::to_string(getpid()), ec);
}

}  // namespace
}  // namespace blockplane::testing
