// Unit tests for controller/registry.h on a database in a temp dir; raw sqlite3 checks the file.

#include "controller/registry.h"

#include <sqlite3.h>
#include <stdlib.h>

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"

namespace blockplane::controller {
namespace {

namespace fs = std::filesystem;
using google::protobuf::util::MessageDifferencer;

constexpr char kXenDevice[] = R"pb(
  spec {
    backend {
      path: "/srv/images/vm1.img"
      format: IMAGE_FORMAT_RAW
      cache: CACHE_MODE_WRITEBACK
      read_only: true
      discard: DISCARD_MODE_UNMAP
      detect_zeroes: DETECT_ZEROES_UNMAP
      logical_block_size: 4096
      error_policy: ERROR_POLICY_STOP
    }
    xen {
      domid: 12
      virtual_device: "xvdb1"
      max_queues: 8
      max_ring_page_order: 3
      persistent_grants: false
      max_indirect_segments: 0
      disable_indirect: true
    }
  }
  status {
    state: DEVICE_STATE_CONNECTED
    size_bytes: 1099511627776
    worker_pid: 4242
    worker_generation: 17
    metrics_endpoint: "127.0.0.1:9101"
    last_error: "worker exited with status 3"
    restart_count: 2
    created_at { seconds: 1700000000 nanos: 123456789 }
    state_changed_at { seconds: 1700000100 nanos: 999999999 }
    highest_written_offset: 536870912
  }
)pb";

constexpr char kVhostDevice[] = R"pb(
  spec {
    backend {
      path: "/srv/images/vm2.img"
      format: IMAGE_FORMAT_RAW
      cache: CACHE_MODE_NONE
      discard: DISCARD_MODE_IGNORE
      detect_zeroes: DETECT_ZEROES_OFF
      logical_block_size: 512
      error_policy: ERROR_POLICY_REPORT
    }
    vhost_user { socket_path: "/run/vm2.sock" num_queues: 4 queue_size: 1024 }
  }
  status {
    state: DEVICE_STATE_DRAINED
    size_bytes: 4096
    worker_pid: 77
    worker_generation: 18446744073709551615
    highest_written_offset: 4096
    created_at { seconds: 1 nanos: 1 }
    state_changed_at { seconds: 2 }
  }
)pb";

v1::Device ParseDevice(const char* text, const std::string& id) {
  v1::Device d;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &d)) << text;
  d.set_id(id);
  return d;
}

v1::Device XenDevice(const std::string& id) { return ParseDevice(kXenDevice, id); }
v1::Device VhostDevice(const std::string& id) { return ParseDevice(kVhostDevice, id); }

// A device in state `state` with only what a new device has.
v1::Device MinimalDevice(const std::string& id, v1::DeviceState state) {
  v1::Device d = VhostDevice(id);
  d.mutable_status()->set_state(state);
  return d;
}

class RegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char name[] = "/tmp/blockplane-registry-XXXXXX";
    ASSERT_NE(mkdtemp(name), nullptr);
    dir_ = name;
    path_ = (dir_ / "registry.db").string();
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
    EXPECT_FALSE(ec) << ec.message();
  }

  std::unique_ptr<Registry> OpenOrDie() {
    absl::StatusOr<std::unique_ptr<Registry>> r = Registry::Open(path_);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? std::move(r).value() : nullptr;
  }

  // Runs `sql` on its own connection; returns the first column of the first row ("" if none).
  std::string RawQuery(const std::string& sql) {
    sqlite3* db = nullptr;
    EXPECT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    sqlite3_stmt* stmt = nullptr;
    std::string result;
    EXPECT_EQ(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr), SQLITE_OK)
        << sql << ": " << sqlite3_errmsg(db);
    int rc = sqlite3_step(stmt);
    EXPECT_TRUE(rc == SQLITE_ROW || rc == SQLITE_DONE) << sql << ": " << sqlite3_errmsg(db);
    if (rc == SQLITE_ROW && sqlite3_column_text(stmt, 0) != nullptr) {
      result = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
    }
    sqlite3_finalize(stmt);
    sqlite3_close(db);
    return result;
  }

  void RawExec(const std::string& sql) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    char* err = nullptr;
    EXPECT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err), SQLITE_OK)
        << sql << ": " << (err ? err : "");
    sqlite3_free(err);
    sqlite3_close(db);
  }

  std::vector<v1::Device> LoadAllOrDie(Registry& registry) {
    absl::StatusOr<std::vector<v1::Device>> all = registry.LoadAll();
    EXPECT_TRUE(all.ok()) << all.status();
    return all.ok() ? *std::move(all) : std::vector<v1::Device>{};
  }

  std::vector<Registry::Transition> TransitionsOrDie(Registry& registry, const std::string& id) {
    absl::StatusOr<std::vector<Registry::Transition>> t = registry.Transitions(id);
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *std::move(t) : std::vector<Registry::Transition>{};
  }

  fs::path dir_;
  std::string path_;
};

TEST_F(RegistryTest, EmptyRegistry) {
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  EXPECT_TRUE(LoadAllOrDie(*registry).empty());
  EXPECT_TRUE(TransitionsOrDie(*registry, "vm1").empty());
}

TEST_F(RegistryTest, PutLoadAllRoundTripsEveryPersistedField) {
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  const v1::Device xen = XenDevice("vm1");
  const v1::Device vhost = VhostDevice("vm2");
  ASSERT_TRUE(registry->Put(xen, v1::DEVICE_STATE_UNSPECIFIED, "attach").ok());
  ASSERT_TRUE(registry->Put(vhost, v1::DEVICE_STATE_UNSPECIFIED, "attach").ok());

  std::vector<v1::Device> all = LoadAllOrDie(*registry);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_TRUE(MessageDifferencer::Equals(all[0], xen)) << all[0].DebugString() << "\nwant\n"
                                                       << xen.DebugString();
  EXPECT_TRUE(MessageDifferencer::Equals(all[1], vhost)) << all[1].DebugString() << "\nwant\n"
                                                         << vhost.DebugString();
  // Field presence of the optional field survives, false is not read back as unset.
  ASSERT_TRUE(all[0].spec().xen().has_persistent_grants());
  EXPECT_FALSE(all[0].spec().xen().persistent_grants());
  EXPECT_TRUE(all[1].spec().has_vhost_user());
  EXPECT_FALSE(all[1].spec().has_xen());
}

TEST_F(RegistryTest, EmptyXenFrontendStaysSet) {
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  v1::Device d = XenDevice("vm1");
  d.mutable_spec()->mutable_xen()->Clear();
  ASSERT_TRUE(registry->Put(d, v1::DEVICE_STATE_CONNECTED, "").ok());
  std::vector<v1::Device> all = LoadAllOrDie(*registry);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_TRUE(all[0].spec().has_xen());
  EXPECT_FALSE(all[0].spec().has_vhost_user());
}

TEST_F(RegistryTest, PutReplaces) {
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  v1::Device d = XenDevice("vm1");
  ASSERT_TRUE(registry->Put(d, v1::DEVICE_STATE_UNSPECIFIED, "attach").ok());
  d.mutable_status()->set_size_bytes(8192);
  d.mutable_status()->set_worker_pid(99);
  d.mutable_status()->clear_last_error();
  ASSERT_TRUE(registry->Put(d, v1::DEVICE_STATE_CONNECTED, "resize").ok());
  std::vector<v1::Device> all = LoadAllOrDie(*registry);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_TRUE(MessageDifferencer::Equals(all[0], d)) << all[0].DebugString();
}

TEST_F(RegistryTest, LoadAllIsSortedById) {
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  for (const char* id : {"vm3", "a-0", "vm10", "vm1", "0disk", "b.x"}) {
    ASSERT_TRUE(registry
                    ->Put(MinimalDevice(id, v1::DEVICE_STATE_ATTACHING),
                          v1::DEVICE_STATE_UNSPECIFIED, "attach")
                    .ok());
  }
  std::vector<std::string> ids;
  for (const v1::Device& d : LoadAllOrDie(*registry)) ids.push_back(d.id());
  EXPECT_EQ(ids, (std::vector<std::string>{"0disk", "a-0", "b.x", "vm1", "vm10", "vm3"}));
}

TEST_F(RegistryTest, PutWithStateChangeLogsTransition) {
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  ASSERT_TRUE(registry
                  ->Put(MinimalDevice("vm1", v1::DEVICE_STATE_ATTACHING),
                        v1::DEVICE_STATE_UNSPECIFIED, "AttachDevice")
                  .ok());
  ASSERT_TRUE(registry
                  ->Put(MinimalDevice("vm1", v1::DEVICE_STATE_WAITING_FOR_FRONTEND),
                        v1::DEVICE_STATE_ATTACHING, "worker started")
                  .ok());
  ASSERT_TRUE(registry
                  ->Put(MinimalDevice("vm1", v1::DEVICE_STATE_CONNECTED),
                        v1::DEVICE_STATE_WAITING_FOR_FRONTEND, "frontend connected")
                  .ok());
  // Another device's transitions are not mixed in.
  ASSERT_TRUE(registry
                  ->Put(MinimalDevice("vm2", v1::DEVICE_STATE_ATTACHING),
                        v1::DEVICE_STATE_UNSPECIFIED, "other")
                  .ok());

  std::vector<Registry::Transition> t = TransitionsOrDie(*registry, "vm1");
  ASSERT_EQ(t.size(), 3u);
  EXPECT_EQ(t[0].device_id, "vm1");
  EXPECT_EQ(t[0].from, v1::DEVICE_STATE_UNSPECIFIED);
  EXPECT_EQ(t[0].to, v1::DEVICE_STATE_ATTACHING);
  EXPECT_EQ(t[0].reason, "AttachDevice");
  EXPECT_EQ(t[1].from, v1::DEVICE_STATE_ATTACHING);
  EXPECT_EQ(t[1].to, v1::DEVICE_STATE_WAITING_FOR_FRONTEND);
  EXPECT_EQ(t[1].reason, "worker started");
  EXPECT_EQ(t[2].from, v1::DEVICE_STATE_WAITING_FOR_FRONTEND);
  EXPECT_EQ(t[2].to, v1::DEVICE_STATE_CONNECTED);
  EXPECT_EQ(t[2].reason, "frontend connected");
  for (const Registry::Transition& tr : t) EXPECT_GT(tr.at_unix_ns, 0);

  std::vector<Registry::Transition> other = TransitionsOrDie(*registry, "vm2");
  ASSERT_EQ(other.size(), 1u);
  EXPECT_EQ(other[0].reason, "other");
}

TEST_F(RegistryTest, PutWithoutStateChangeLogsNothing) {
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  v1::Device d = MinimalDevice("vm1", v1::DEVICE_STATE_CONNECTED);
  ASSERT_TRUE(registry->Put(d, v1::DEVICE_STATE_WAITING_FOR_FRONTEND, "connected").ok());
  d.mutable_status()->set_size_bytes(1 << 30);
  ASSERT_TRUE(registry->Put(d, v1::DEVICE_STATE_CONNECTED, "resized").ok());
  ASSERT_TRUE(registry->Put(d, v1::DEVICE_STATE_CONNECTED, "again").ok());
  std::vector<Registry::Transition> t = TransitionsOrDie(*registry, "vm1");
  ASSERT_EQ(t.size(), 1u);
  EXPECT_EQ(t[0].reason, "connected");
  EXPECT_EQ(RawQuery("SELECT COUNT(*) FROM transitions"), "1");
}

TEST_F(RegistryTest, DeleteRemovesAndLogsTransition) {
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  ASSERT_TRUE(registry
                  ->Put(MinimalDevice("vm1", v1::DEVICE_STATE_DETACHING),
                        v1::DEVICE_STATE_UNSPECIFIED, "attach")
                  .ok());
  ASSERT_TRUE(registry
                  ->Put(MinimalDevice("vm2", v1::DEVICE_STATE_CONNECTED),
                        v1::DEVICE_STATE_UNSPECIFIED, "attach")
                  .ok());
  ASSERT_TRUE(registry->Delete("vm1", v1::DEVICE_STATE_DETACHING, "DetachDevice").ok());

  std::vector<v1::Device> all = LoadAllOrDie(*registry);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].id(), "vm2");

  std::vector<Registry::Transition> t = TransitionsOrDie(*registry, "vm1");
  ASSERT_EQ(t.size(), 2u);
  EXPECT_EQ(t[1].from, v1::DEVICE_STATE_DETACHING);
  EXPECT_EQ(t[1].to, v1::DEVICE_STATE_UNSPECIFIED);
  EXPECT_EQ(t[1].reason, "DetachDevice");
}

TEST_F(RegistryTest, ReopenSeesTheData) {
  const v1::Device xen = XenDevice("vm1");
  const v1::Device vhost = VhostDevice("vm2");
  {
    std::unique_ptr<Registry> registry = OpenOrDie();
    ASSERT_NE(registry, nullptr);
    ASSERT_TRUE(registry->Put(xen, v1::DEVICE_STATE_UNSPECIFIED, "attach xen").ok());
    ASSERT_TRUE(registry->Put(vhost, v1::DEVICE_STATE_UNSPECIFIED, "attach vhost").ok());
    ASSERT_TRUE(registry
                    ->Put(MinimalDevice("vm3", v1::DEVICE_STATE_ATTACHING),
                          v1::DEVICE_STATE_UNSPECIFIED, "attach")
                    .ok());
    ASSERT_TRUE(registry->Delete("vm3", v1::DEVICE_STATE_ATTACHING, "detach").ok());
  }
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  std::vector<v1::Device> all = LoadAllOrDie(*registry);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_TRUE(MessageDifferencer::Equals(all[0], xen)) << all[0].DebugString();
  EXPECT_TRUE(MessageDifferencer::Equals(all[1], vhost)) << all[1].DebugString();
  std::vector<Registry::Transition> t = TransitionsOrDie(*registry, "vm1");
  ASSERT_EQ(t.size(), 1u);
  EXPECT_EQ(t[0].reason, "attach xen");
  EXPECT_EQ(TransitionsOrDie(*registry, "vm3").size(), 2u);
  // Reopening does not add a second schema_version row.
  EXPECT_EQ(RawQuery("SELECT COUNT(*) FROM meta WHERE key='schema_version'"), "1");
}

TEST_F(RegistryTest, DataIsVisibleToAnotherConnectionRightAfterPut) {
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  ASSERT_TRUE(registry
                  ->Put(MinimalDevice("vm1", v1::DEVICE_STATE_CONNECTED),
                        v1::DEVICE_STATE_UNSPECIFIED, "attach")
                  .ok());
  EXPECT_EQ(RawQuery("SELECT id FROM devices"), "vm1");
  EXPECT_EQ(RawQuery("SELECT state FROM devices WHERE id='vm1'"),
            std::to_string(v1::DEVICE_STATE_CONNECTED));
}

TEST_F(RegistryTest, UsesWalMode) {
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  EXPECT_EQ(RawQuery("PRAGMA journal_mode"), "wal");
  EXPECT_EQ(RawQuery("SELECT value FROM meta WHERE key='schema_version'"), "1");
}

TEST_F(RegistryTest, RefusesNewerSchema) {
  RawExec(
      "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
      "INSERT INTO meta(key, value) VALUES('schema_version', '2');");
  absl::StatusOr<std::unique_ptr<Registry>> r = Registry::Open(path_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), path_)) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "schema version 2")) << r.status();
  // The newer version is left as it was.
  EXPECT_EQ(RawQuery("SELECT value FROM meta WHERE key='schema_version'"), "2");
}

TEST_F(RegistryTest, AcceptsCurrentSchemaWrittenByHand) {
  RawExec(
      "CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
      "INSERT INTO meta(key, value) VALUES('schema_version', '1');");
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  EXPECT_TRUE(LoadAllOrDie(*registry).empty());
}

TEST_F(RegistryTest, MissingDirectory) {
  std::string path = (dir_ / "no-such-dir" / "registry.db").string();
  absl::StatusOr<std::unique_ptr<Registry>> r = Registry::Open(path);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(absl::StrContains(r.status().message(), path)) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "unable to open")) << r.status();
  EXPECT_FALSE(fs::exists(dir_ / "no-such-dir"));
}

TEST_F(RegistryTest, UndecodableSpecIsDataLoss) {
  {
    std::unique_ptr<Registry> registry = OpenOrDie();
    ASSERT_NE(registry, nullptr);
    ASSERT_TRUE(registry
                    ->Put(MinimalDevice("vm1", v1::DEVICE_STATE_CONNECTED),
                          v1::DEVICE_STATE_UNSPECIFIED, "attach")
                    .ok());
  }
  RawExec("UPDATE devices SET spec_json = '{not json' WHERE id = 'vm1'");
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  absl::StatusOr<std::vector<v1::Device>> all = registry->LoadAll();
  ASSERT_FALSE(all.ok());
  EXPECT_EQ(all.status().code(), absl::StatusCode::kDataLoss) << all.status();
  EXPECT_TRUE(absl::StrContains(all.status().message(), "vm1")) << all.status();
}

TEST_F(RegistryTest, UnknownStoredStateLoadsAsFailed) {
  {
    std::unique_ptr<Registry> registry = OpenOrDie();
    ASSERT_NE(registry, nullptr);
    ASSERT_TRUE(registry
                    ->Put(MinimalDevice("vm1", v1::DEVICE_STATE_CONNECTED),
                          v1::DEVICE_STATE_UNSPECIFIED, "attach")
                    .ok());
  }
  RawExec("UPDATE devices SET state = 42 WHERE id = 'vm1'");
  std::unique_ptr<Registry> registry = OpenOrDie();
  ASSERT_NE(registry, nullptr);
  std::vector<v1::Device> all = LoadAllOrDie(*registry);
  ASSERT_EQ(all.size(), 1u);
  EXPECT_EQ(all[0].status().state(), v1::DEVICE_STATE_FAILED);
}

}  // namespace
}  // namespace blockplane::controller
