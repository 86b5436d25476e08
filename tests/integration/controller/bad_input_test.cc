// Malformed and conflicting requests against a real blockplaned: each must fail with the exact gRPC
// code, a message that starts with the path of the offending field, and leave the registry (the
// API's view and registry.db's devices and transitions tables) and the backing files untouched.

#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "blockplane/v1/device.grpc.pb.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "tests/integration/controller/fixture.h"

namespace blockplane::testing {
namespace {

using google::protobuf::util::MessageDifferencer;
using Stub = v1::DeviceService::Stub;

constexpr uint64_t kDiskSize = 64 << 20;

std::chrono::system_clock::time_point Deadline() {
  return std::chrono::system_clock::now() + std::chrono::seconds(20);
}

// Rows of a table of registry.db as text, in primary-key order.
std::string DumpTable(const std::string& db_path, const std::string& query) {
  sqlite3* db = nullptr;
  std::string out;
  if (sqlite3_open_v2(db_path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) != SQLITE_OK) {
    ADD_FAILURE() << "cannot open " << db_path << ": " << sqlite3_errmsg(db);
    sqlite3_close(db);
    return out;
  }
  sqlite3_stmt* statement = nullptr;
  if (sqlite3_prepare_v2(db, query.c_str(), -1, &statement, nullptr) != SQLITE_OK) {
    ADD_FAILURE() << query << ": " << sqlite3_errmsg(db);
    sqlite3_close(db);
    return out;
  }
  int rc;
  while ((rc = sqlite3_step(statement)) == SQLITE_ROW) {
    std::vector<std::string> cells;
    for (int i = 0; i < sqlite3_column_count(statement); ++i) {
      const unsigned char* text = sqlite3_column_text(statement, i);
      cells.push_back(text == nullptr ? "NULL" : reinterpret_cast<const char*>(text));
    }
    absl::StrAppend(&out, absl::StrJoin(cells, "|"), "\n");
  }
  EXPECT_EQ(rc, SQLITE_DONE) << sqlite3_errmsg(db);
  sqlite3_finalize(statement);
  sqlite3_close(db);
  return out;
}

// Everything a refused request must leave as it was.
struct Snapshot {
  v1::ListDevicesResponse devices;
  std::string devices_table;
  std::string transitions_table;
  std::map<std::string, int64_t> file_sizes;  // every file under the temp dir
};

// One malformed request: `call` sends it and returns the server's status.
struct BadRequest {
  std::string name;
  std::function<grpc::Status(Stub&)> call;
  grpc::StatusCode code;
  // The message must start with "<field>: ".
  std::string field;
};

v1::DeviceSpec WithBackend(v1::DeviceSpec spec, const std::function<void(v1::BackendSpec*)>& f) {
  f(spec.mutable_backend());
  return spec;
}

v1::DeviceSpec WithXen(v1::DeviceSpec spec, const std::function<void(v1::XenFrontend*)>& f) {
  f(spec.mutable_xen());
  return spec;
}

v1::DeviceSpec WithVhost(v1::DeviceSpec spec,
                         const std::function<void(v1::VhostUserFrontend*)>& f) {
  f(spec.mutable_vhost_user());
  return spec;
}

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(controller_.Start());
    xen_disk_ = controller_.CreateDisk("xen.img", kDiskSize);
    vhost_disk_ = controller_.CreateDisk("vhost.img", kDiskSize);
    free_disk_ = controller_.CreateDisk("free.img", kDiskSize);
    empty_disk_ = controller_.CreateDisk("empty.img", 0);
    odd_disk_ = controller_.CreateDisk("odd.img", 1000);
    directory_ = controller_.disks_dir() + "/a-directory";
    std::filesystem::create_directory(directory_);
    // A file outside the backing root, and a symlink inside the root that points to it.
    outside_ = controller_.dir() + "/outside.img";
    { std::ofstream create(outside_); }
    ASSERT_EQ(::truncate(outside_.c_str(), kDiskSize), 0);
    symlink_ = controller_.disks_dir() + "/link.img";
    std::filesystem::create_symlink(outside_, symlink_);
    vhost_socket_ = controller_.dir() + "/vhost-existing.sock";

    // Two healthy devices, for conflicts and for operations in the wrong state.
    v1::AttachDeviceRequest xen;
    xen.set_device_id("dev-xen");
    *xen.mutable_spec() = testing::XenSpec(xen_disk_, 5, "xvda");
    xen.mutable_spec()->mutable_backend()->set_cache(v1::CACHE_MODE_WRITEBACK);
    ASSERT_NO_FATAL_FAILURE(Attach(xen));
    v1::AttachDeviceRequest vhost;
    vhost.set_device_id("dev-vhost");
    vhost.mutable_spec()->mutable_backend()->set_path(vhost_disk_);
    vhost.mutable_spec()->mutable_backend()->set_logical_block_size(4096);
    vhost.mutable_spec()->mutable_vhost_user()->set_socket_path(vhost_socket_);
    ASSERT_NO_FATAL_FAILURE(Attach(vhost));
  }

  void Attach(const v1::AttachDeviceRequest& request) {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    v1::Device device;
    grpc::Status status = controller_.stub().AttachDevice(&context, request, &device);
    ASSERT_TRUE(status.ok()) << request.device_id() << ": " << status.error_message();
    // Settled: no state change may happen while the bad requests run.
    ASSERT_TRUE(WaitFor([&] {
      return GetState(request.device_id()) == v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
    })) << request.device_id()
        << " did not reach WAITING_FOR_FRONTEND";
  }

  v1::DeviceState GetState(const std::string& id) {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    v1::GetDeviceRequest request;
    request.set_device_id(id);
    v1::Device device;
    if (!controller_.stub().GetDevice(&context, request, &device).ok()) {
      return v1::DEVICE_STATE_UNSPECIFIED;
    }
    return device.status().state();
  }

  Snapshot TakeSnapshot() {
    Snapshot snapshot;
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    v1::ListDevicesRequest request;
    grpc::Status status = controller_.stub().ListDevices(&context, request, &snapshot.devices);
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(snapshot.devices.next_page_token(), "");
    const std::string db = controller_.state_dir() + "/registry.db";
    snapshot.devices_table = DumpTable(db, "SELECT * FROM devices ORDER BY id");
    snapshot.transitions_table = DumpTable(db, "SELECT * FROM transitions ORDER BY seq");
    for (const auto& entry : std::filesystem::recursive_directory_iterator(controller_.dir())) {
      if (entry.is_regular_file() && !entry.is_symlink() &&
          entry.path().filename() != "blockplaned.log" &&
          !absl::StartsWith(entry.path().filename().string(), "registry.db")) {
        snapshot.file_sizes[entry.path().string()] = static_cast<int64_t>(entry.file_size());
      }
    }
    return snapshot;
  }

  static void ExpectSame(const Snapshot& before, const Snapshot& after) {
    EXPECT_TRUE(MessageDifferencer::Equals(before.devices, after.devices))
        << "ListDevices before:\n"
        << before.devices.DebugString() << "after:\n"
        << after.devices.DebugString();
    EXPECT_EQ(before.devices_table, after.devices_table) << "registry.db devices table changed";
    EXPECT_EQ(before.transitions_table, after.transitions_table)
        << "registry.db transitions table changed";
    EXPECT_EQ(before.file_sizes, after.file_sizes) << "a file was created, removed or resized";
  }

  std::vector<BadRequest> Cases();

  ControllerProcess controller_;
  std::string xen_disk_, vhost_disk_, free_disk_, empty_disk_, odd_disk_, directory_, outside_,
      symlink_, vhost_socket_;
};

// --- request senders ------------------------------------------------------------------------

std::function<grpc::Status(Stub&)> AttachCall(const std::string& id,
                                              std::optional<v1::DeviceSpec> spec) {
  return [id, spec](Stub& stub) {
    v1::AttachDeviceRequest request;
    request.set_device_id(id);
    if (spec.has_value()) *request.mutable_spec() = *spec;
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    v1::Device device;
    return stub.AttachDevice(&context, request, &device);
  };
}

template <typename Request, typename Response>
std::function<grpc::Status(Stub&)> UnaryCall(grpc::Status (Stub::*method)(grpc::ClientContext*,
                                                                          const Request&,
                                                                          Response*),
                                             Request request) {
  return [method, request](Stub& stub) {
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    Response response;
    return (stub.*method)(&context, request, &response);
  };
}

std::function<grpc::Status(Stub&)> WatchCall(const std::string& id) {
  return [id](Stub& stub) {
    v1::WatchDevicesRequest request;
    request.set_device_id(id);
    grpc::ClientContext context;
    context.set_deadline(Deadline());
    std::unique_ptr<grpc::ClientReader<v1::DeviceEvent>> reader =
        stub.WatchDevices(&context, request);
    v1::DeviceEvent event;
    int events = 0;
    while (reader->Read(&event)) {
      // An error status must come before any event; cancel a stream that was accepted.
      if (++events == 1) context.TryCancel();
    }
    return reader->Finish();
  };
}

template <typename Request>
Request WithId(const std::string& id) {
  Request request;
  request.set_device_id(id);
  return request;
}

v1::ResizeDeviceRequest Resize(const std::string& id, uint64_t size, bool allow_shrink = false) {
  v1::ResizeDeviceRequest request;
  request.set_device_id(id);
  request.set_new_size_bytes(size);
  request.set_allow_shrink(allow_shrink);
  return request;
}

v1::ListDevicesRequest List(const std::function<void(v1::ListDevicesRequest*)>& f) {
  v1::ListDevicesRequest request;
  f(&request);
  return request;
}

std::vector<BadRequest> BadInputTest::Cases() {
  using grpc::StatusCode;
  const StatusCode kInvalid = StatusCode::INVALID_ARGUMENT;
  const StatusCode kNotFound = StatusCode::NOT_FOUND;
  const StatusCode kExists = StatusCode::ALREADY_EXISTS;
  const StatusCode kPrecondition = StatusCode::FAILED_PRECONDITION;
  // A spec that would be accepted for a new id: every case changes one thing.
  const v1::DeviceSpec good = testing::XenSpec(free_disk_, 7, "xvdb");
  v1::DeviceSpec good_vhost;
  good_vhost.mutable_backend()->set_path(free_disk_);
  good_vhost.mutable_vhost_user()->set_socket_path(controller_.dir() + "/new.sock");
  const auto backend = [&](const std::function<void(v1::BackendSpec*)>& f) {
    return WithBackend(good, f);
  };
  const auto xen = [&](const std::function<void(v1::XenFrontend*)>& f) { return WithXen(good, f); };
  const auto vhost = [&](const std::function<void(v1::VhostUserFrontend*)>& f) {
    return WithVhost(good_vhost, f);
  };
  const auto path = [&](const std::string& p) {
    return backend([p](v1::BackendSpec* b) { b->set_path(p); });
  };

  std::vector<BadRequest> cases = {
      // --- device ids
      {"empty id", AttachCall("", good), kInvalid, "device_id"},
      {"upper-case id", AttachCall("Dev0", good), kInvalid, "device_id"},
      {"65-character id", AttachCall(std::string(65, 'a'), good), kInvalid, "device_id"},
      {"id starting with a dash", AttachCall("-dev", good), kInvalid, "device_id"},
      {"id starting with a dot", AttachCall(".dev", good), kInvalid, "device_id"},
      {"id with a slash", AttachCall("a/b", good), kInvalid, "device_id"},
      {"id with a space", AttachCall("a b", good), kInvalid, "device_id"},
      {"id with a NUL", AttachCall(std::string("a\0b", 3), good), kInvalid, "device_id"},
      // --- spec and backend
      {"no spec", AttachCall("new", std::nullopt), kInvalid, "spec"},
      {"empty path", AttachCall("new", path("")), kInvalid, "spec.backend.path"},
      {"relative path", AttachCall("new", path("disks/free.img")), kInvalid, "spec.backend.path"},
      {"path outside the backing roots", AttachCall("new", path(outside_)), kInvalid,
       "spec.backend.path"},
      {"path escaping the root with ..",
       AttachCall("new", path(controller_.disks_dir() + "/../outside.img")), kInvalid,
       "spec.backend.path"},
      {"symlink in the root to a file outside", AttachCall("new", path(symlink_)), kInvalid,
       "spec.backend.path"},
      {"system file", AttachCall("new", path("/etc/passwd")), kInvalid, "spec.backend.path"},
      {"missing file", AttachCall("new", path(controller_.disks_dir() + "/missing.img")),
       kPrecondition, "spec.backend.path"},
      {"directory as backing", AttachCall("new", path(directory_)), kPrecondition,
       "spec.backend.path"},
      {"empty backing file", AttachCall("new", path(empty_disk_)), kPrecondition,
       "spec.backend.path"},
      {"backing size not a multiple of the block size", AttachCall("new", path(odd_disk_)),
       kPrecondition, "spec.backend.path"},
      {"backing file of another device",
       AttachCall("new", WithXen(path(xen_disk_), [](v1::XenFrontend* x) { x->set_domid(9); })),
       kPrecondition, "spec.backend.path"},
      {"unknown format", AttachCall("new", backend([](v1::BackendSpec* b) {
                                      b->set_format(static_cast<v1::ImageFormat>(3));
                                    })),
       kInvalid, "spec.backend.format"},
      {"unknown cache mode", AttachCall("new", backend([](v1::BackendSpec* b) {
                                          b->set_cache(static_cast<v1::CacheMode>(99));
                                        })),
       kInvalid, "spec.backend.cache"},
      {"unknown discard mode", AttachCall("new", backend([](v1::BackendSpec* b) {
                                            b->set_discard(static_cast<v1::DiscardMode>(7));
                                          })),
       kInvalid, "spec.backend.discard"},
      {"unknown detect_zeroes",
       AttachCall("new", backend([](v1::BackendSpec* b) {
                    b->set_detect_zeroes(static_cast<v1::DetectZeroes>(42));
                  })),
       kInvalid, "spec.backend.detect_zeroes"},
      {"unknown error policy", AttachCall("new", backend([](v1::BackendSpec* b) {
                                            b->set_error_policy(static_cast<v1::ErrorPolicy>(-1));
                                          })),
       kInvalid, "spec.backend.error_policy"},
      {"logical block size 1024",
       AttachCall("new", backend([](v1::BackendSpec* b) { b->set_logical_block_size(1024); })),
       kInvalid, "spec.backend.logical_block_size"},
      {"detect_zeroes unmap without discard unmap",
       AttachCall("new", backend([](v1::BackendSpec* b) {
                    b->set_detect_zeroes(v1::DETECT_ZEROES_UNMAP);
                  })),
       kInvalid, "spec.backend.detect_zeroes"},
      // --- null backend (spec.backend.null)
      {"both a path and a null backend", AttachCall("new", backend([](v1::BackendSpec* b) {
                                                      b->mutable_null()->set_size_bytes(uint64_t{1}
                                                                                        << 30);
                                                    })),
       kInvalid, "spec.backend"},
      {"neither a path nor a null backend",
       AttachCall("new", backend([](v1::BackendSpec* b) { b->clear_path(); })), kInvalid,
       "spec.backend.path"},
      {"null backend of size 0", AttachCall("new", backend([](v1::BackendSpec* b) {
                                              b->clear_path();
                                              b->mutable_null()->set_size_bytes(0);
                                            })),
       kInvalid, "spec.backend.null.size_bytes"},
      {"null backend size not a multiple of 512",
       AttachCall("new", backend([](v1::BackendSpec* b) {
                    b->clear_path();
                    b->mutable_null()->set_size_bytes((uint64_t{1} << 30) + 100);
                  })),
       kInvalid, "spec.backend.null.size_bytes"},
      {"null backend size not a multiple of a 4096-byte block",
       AttachCall("new", backend([](v1::BackendSpec* b) {
                    b->clear_path();
                    b->set_logical_block_size(4096);
                    b->mutable_null()->set_size_bytes((uint64_t{1} << 30) + 512);
                  })),
       kInvalid, "spec.backend.null.size_bytes"},
      {"null backend above 1 PiB",
       AttachCall("new", backend([](v1::BackendSpec* b) {
                    b->clear_path();
                    b->mutable_null()->set_size_bytes((uint64_t{1} << 50) + 4096);
                  })),
       kInvalid, "spec.backend.null.size_bytes"},
      // --- frontends
      {"both frontends",
       AttachCall("new", WithVhost(good,
                                   [&](v1::VhostUserFrontend* v) {
                                     v->set_socket_path(controller_.dir() + "/both.sock");
                                   })),
       kInvalid, "spec"},
      {"no frontend",
       AttachCall("new", WithBackend(v1::DeviceSpec(),
                                     [&](v1::BackendSpec* b) { b->set_path(free_disk_); })),
       kInvalid, "spec"},
      {"domid 0", AttachCall("new", xen([](v1::XenFrontend* x) { x->set_domid(0); })), kInvalid,
       "spec.xen.domid"},
      {"domid 32752", AttachCall("new", xen([](v1::XenFrontend* x) { x->set_domid(32752); })),
       kInvalid, "spec.xen.domid"},
      {"domid 2^32-1",
       AttachCall("new", xen([](v1::XenFrontend* x) { x->set_domid(4294967295u); })), kInvalid,
       "spec.xen.domid"},
      {"empty virtual device",
       AttachCall("new", xen([](v1::XenFrontend* x) { x->set_virtual_device(""); })), kInvalid,
       "spec.xen.virtual_device"},
      {"virtual device without a disk",
       AttachCall("new", xen([](v1::XenFrontend* x) { x->set_virtual_device("xvd"); })), kInvalid,
       "spec.xen.virtual_device"},
      {"virtual device of an unknown kind",
       AttachCall("new", xen([](v1::XenFrontend* x) { x->set_virtual_device("floppy"); })),
       kInvalid, "spec.xen.virtual_device"},
      {"IDE disk beyond hdt",
       AttachCall("new", xen([](v1::XenFrontend* x) { x->set_virtual_device("hdz"); })), kInvalid,
       "spec.xen.virtual_device"},
      {"virtual device number 0",
       AttachCall("new", xen([](v1::XenFrontend* x) { x->set_virtual_device("0"); })), kInvalid,
       "spec.xen.virtual_device"},
      {"xen max_queues 17",
       AttachCall("new", xen([](v1::XenFrontend* x) { x->set_max_queues(17); })), kInvalid,
       "spec.xen.max_queues"},
      {"xen max_ring_page_order 5",
       AttachCall("new", xen([](v1::XenFrontend* x) { x->set_max_ring_page_order(5); })), kInvalid,
       "spec.xen.max_ring_page_order"},
      {"xen max_indirect_segments 257",
       AttachCall("new", xen([](v1::XenFrontend* x) { x->set_max_indirect_segments(257); })),
       kInvalid, "spec.xen.max_indirect_segments"},
      {"vhost socket relative path",
       AttachCall("new", vhost([](v1::VhostUserFrontend* v) { v->set_socket_path("vm.sock"); })),
       kInvalid, "spec.vhost_user.socket_path"},
      {"vhost socket empty",
       AttachCall("new", vhost([](v1::VhostUserFrontend* v) { v->set_socket_path(""); })), kInvalid,
       "spec.vhost_user.socket_path"},
      {"vhost socket path longer than sun_path",
       AttachCall("new", vhost([](v1::VhostUserFrontend* v) {
                    v->set_socket_path("/tmp/" + std::string(120, 's') + ".sock");
                  })),
       kInvalid, "spec.vhost_user.socket_path"},
      {"vhost queue_size not a power of two",
       AttachCall("new", vhost([](v1::VhostUserFrontend* v) { v->set_queue_size(100); })), kInvalid,
       "spec.vhost_user.queue_size"},
      {"vhost queue_size 32",
       AttachCall("new", vhost([](v1::VhostUserFrontend* v) { v->set_queue_size(32); })), kInvalid,
       "spec.vhost_user.queue_size"},
      {"vhost queue_size 65536",
       AttachCall("new", vhost([](v1::VhostUserFrontend* v) { v->set_queue_size(65536); })),
       kInvalid, "spec.vhost_user.queue_size"},
      {"vhost num_queues 65",
       AttachCall("new", vhost([](v1::VhostUserFrontend* v) { v->set_num_queues(65); })), kInvalid,
       "spec.vhost_user.num_queues"},
      // --- conflicts with existing devices
      {"existing id with another spec",
       AttachCall("dev-xen", testing::XenSpec(xen_disk_, 5, "xvda")), kExists, "device_id"},
      {"existing id with another frontend",
       AttachCall("dev-vhost", WithBackend(good,
                                           [&](v1::BackendSpec* b) {
                                             b->set_path(vhost_disk_);
                                             b->set_logical_block_size(4096);
                                           })),
       kExists, "device_id"},
      {"xen (domid, vdev) of another device, by number",
       AttachCall("new", xen([](v1::XenFrontend* x) {
                    x->set_domid(5);
                    x->set_virtual_device("51712");  // xvda
                  })),
       kExists, "spec.xen.virtual_device"},
      {"vhost socket of another device", AttachCall("new", vhost([&](v1::VhostUserFrontend* v) {
                                                      v->set_socket_path(vhost_socket_);
                                                    })),
       kExists, "spec.vhost_user.socket_path"},
      // --- operations on unknown or malformed ids
      {"get unknown", UnaryCall(&Stub::GetDevice, WithId<v1::GetDeviceRequest>("nope")), kNotFound,
       "device_id"},
      {"drain unknown", UnaryCall(&Stub::DrainDevice, WithId<v1::DrainDeviceRequest>("nope")),
       kNotFound, "device_id"},
      {"resume unknown", UnaryCall(&Stub::ResumeDevice, WithId<v1::ResumeDeviceRequest>("nope")),
       kNotFound, "device_id"},
      {"detach unknown", UnaryCall(&Stub::DetachDevice, WithId<v1::DetachDeviceRequest>("nope")),
       kNotFound, "device_id"},
      {"resize unknown", UnaryCall(&Stub::ResizeDevice, Resize("nope", kDiskSize * 2)), kNotFound,
       "device_id"},
      {"stats unknown", UnaryCall(&Stub::GetDeviceStats, WithId<v1::GetDeviceStatsRequest>("nope")),
       kNotFound, "device_id"},
      {"watch unknown", WatchCall("nope"), kNotFound, "device_id"},
      {"get malformed id", UnaryCall(&Stub::GetDevice, WithId<v1::GetDeviceRequest>("NOPE")),
       kInvalid, "device_id"},
      {"detach empty id", UnaryCall(&Stub::DetachDevice, WithId<v1::DetachDeviceRequest>("")),
       kInvalid, "device_id"},
      {"drain malformed id",
       UnaryCall(&Stub::DrainDevice, WithId<v1::DrainDeviceRequest>("dev xen")), kInvalid,
       "device_id"},
      {"watch malformed id", WatchCall("../x"), kInvalid, "device_id"},
      // --- resize
      {"resize to 0", UnaryCall(&Stub::ResizeDevice, Resize("dev-xen", 0)), kInvalid,
       "new_size_bytes"},
      {"resize unaligned to 512", UnaryCall(&Stub::ResizeDevice, Resize("dev-xen", 1000000)),
       kInvalid, "new_size_bytes"},
      {"resize unaligned to 4096",
       UnaryCall(&Stub::ResizeDevice, Resize("dev-vhost", kDiskSize + 512)), kInvalid,
       "new_size_bytes"},
      {"shrink without allow_shrink",
       UnaryCall(&Stub::ResizeDevice, Resize("dev-xen", kDiskSize / 2)), kInvalid,
       "new_size_bytes"},
      {"resize to 2^63", UnaryCall(&Stub::ResizeDevice, Resize("dev-xen", uint64_t{1} << 63)),
       kInvalid, "new_size_bytes"},
      // --- state
      {"resume a device that is not drained",
       UnaryCall(&Stub::ResumeDevice, WithId<v1::ResumeDeviceRequest>("dev-xen")), kPrecondition,
       "device_id"},
      {"drain with a negative timeout",
       UnaryCall(&Stub::DrainDevice,
                 [] {
                   v1::DrainDeviceRequest r;
                   r.set_device_id("dev-xen");
                   r.mutable_timeout()->set_seconds(-1);
                   return r;
                 }()),
       kInvalid, "timeout"},
      {"detach with a negative timeout",
       UnaryCall(&Stub::DetachDevice,
                 [] {
                   v1::DetachDeviceRequest r;
                   r.set_device_id("dev-xen");
                   r.mutable_timeout()->set_nanos(-5);
                   return r;
                 }()),
       kInvalid, "timeout"},
      // --- list
      {"page_size -1", UnaryCall(&Stub::ListDevices, List([](auto* r) { r->set_page_size(-1); })),
       kInvalid, "page_size"},
      {"page_size 1001",
       UnaryCall(&Stub::ListDevices, List([](auto* r) { r->set_page_size(1001); })), kInvalid,
       "page_size"},
      {"page_token not base64",
       UnaryCall(&Stub::ListDevices, List([](auto* r) { r->set_page_token("!!not a token"); })),
       kInvalid, "page_token"},
      {"page_token of the wrong shape",
       UnaryCall(&Stub::ListDevices, List([](auto* r) { r->set_page_token("YWJjZGVm"); })),
       kInvalid, "page_token"},
      {"unknown state filter", UnaryCall(&Stub::ListDevices, List([](auto* r) {
         r->add_states(static_cast<v1::DeviceState>(99));
       })),
       kInvalid, "states"},
      {"UNSPECIFIED state filter", UnaryCall(&Stub::ListDevices, List([](auto* r) {
         r->add_states(v1::DEVICE_STATE_UNSPECIFIED);
       })),
       kInvalid, "states"},
      {"unknown frontend kind", UnaryCall(&Stub::ListDevices, List([](auto* r) {
         r->set_frontend_kind(static_cast<v1::FrontendKind>(9));
       })),
       kInvalid, "frontend_kind"},
  };
  return cases;
}

TEST_F(BadInputTest, EveryMalformedRequestIsRefusedAndChangesNothing) {
  const std::vector<BadRequest> cases = Cases();
  ASSERT_GE(cases.size(), 30u);
  const Snapshot initial = TakeSnapshot();
  ASSERT_EQ(initial.devices.devices_size(), 2);
  ASSERT_NE(initial.devices_table, "");
  ASSERT_NE(initial.transitions_table, "");
  Snapshot before = initial;
  for (const BadRequest& c : cases) {
    SCOPED_TRACE(c.name);
    const grpc::Status status = c.call(controller_.stub());
    EXPECT_EQ(status.error_code(), c.code)
        << c.name << ": got " << status.error_code() << " \"" << status.error_message() << "\"";
    EXPECT_TRUE(absl::StartsWith(status.error_message(), c.field + ": "))
        << c.name << ": message does not start with \"" << c.field
        << ": \": " << status.error_message();
    const Snapshot after = TakeSnapshot();
    ExpectSame(before, after);
    before = after;
  }
  ExpectSame(initial, TakeSnapshot());
}

// The same refusals through bpctl: the server's code and message, exit status 1; usage errors
// never reach the server and exit 2.
TEST_F(BadInputTest, BpctlReportsRefusalsWithTheServersCodeAndMessage) {
  const Snapshot before = TakeSnapshot();

  CommandResult result = controller_.Bpctl({"get", "nope"});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_EQ(result.err, "bpctl: NOT_FOUND: device_id: no device \"nope\"\n");
  EXPECT_EQ(result.out, "");

  result = controller_.Bpctl(
      {"attach", "new", "--path", "relative.img", "--xen-domid", "7", "--xen-vdev", "xvdb"});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_TRUE(absl::StartsWith(result.err, "bpctl: INVALID_ARGUMENT: spec.backend.path: "))
      << result.err;

  result = controller_.Bpctl(
      {"attach", "new", "--path", free_disk_, "--xen-domid", "32752", "--xen-vdev", "xvdb"});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_TRUE(absl::StartsWith(result.err, "bpctl: INVALID_ARGUMENT: spec.xen.domid: "))
      << result.err;

  result = controller_.Bpctl({"resize", "dev-xen", "--size", "32M"});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_TRUE(absl::StartsWith(result.err, "bpctl: INVALID_ARGUMENT: new_size_bytes: "))
      << result.err;

  result = controller_.Bpctl({"resume", "dev-vhost"});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_TRUE(absl::StartsWith(result.err, "bpctl: FAILED_PRECONDITION: device_id: "))
      << result.err;

  result = controller_.Bpctl({"attach", "new", "--path", free_disk_, "--cache", "99", "--xen-domid",
                              "7", "--xen-vdev", "xvdb"});
  EXPECT_EQ(result.exit_code, 2);
  EXPECT_TRUE(absl::StartsWith(result.err, "bpctl: attach: --cache: invalid cache mode \"99\""))
      << result.err;

  result = controller_.Bpctl({"resize", "dev-xen", "--size", "lots"});
  EXPECT_EQ(result.exit_code, 2);

  ExpectSame(before, TakeSnapshot());
}

}  // namespace
}  // namespace blockplane::testing
