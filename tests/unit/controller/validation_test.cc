// Unit tests for controller/validation.h: device ids, Xen virtual-device names, spec checks and
// defaults, the backing-file checks (on a temp dir) and resize checks.

#include "controller/validation.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"

namespace blockplane::controller {
namespace {

namespace fs = std::filesystem;
using google::protobuf::util::MessageDifferencer;

// The status is `code` and its message starts with "<field>: ".
::testing::AssertionResult HasCodeAndField(const absl::Status& status, absl::StatusCode code,
                                           absl::string_view field) {
  if (status.code() != code) {
    return ::testing::AssertionFailure()
           << "code is " << absl::StatusCodeToString(status.code()) << ", want "
           << absl::StatusCodeToString(code) << " (" << status << ")";
  }
  if (!absl::StartsWith(status.message(), absl::StrCat(field, ": "))) {
    return ::testing::AssertionFailure()
           << "message \"" << status.message() << "\" does not start with \"" << field << ": \"";
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult IsInvalid(const absl::Status& status, absl::string_view field) {
  return HasCodeAndField(status, absl::StatusCode::kInvalidArgument, field);
}

template <typename Message>
Message Parse(const std::string& text) {
  Message m;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &m)) << text;
  return m;
}

v1::DeviceSpec XenSpec() {
  return Parse<v1::DeviceSpec>(R"pb(
    backend { path: "/srv/images/vm1.img" }
    xen { domid: 7 virtual_device: "xvda" }
  )pb");
}

v1::DeviceSpec VhostSpec() {
  return Parse<v1::DeviceSpec>(R"pb(
    backend { path: "/srv/images/vm1.img" }
    vhost_user { socket_path: "/run/blockplane/vm1.sock" }
  )pb");
}

// ---------------------------------------------------------------------------------------------
// ValidateDeviceId

TEST(ValidateDeviceIdTest, AcceptsValidIds) {
  for (const std::string& id :
       {std::string("a"), std::string("0"), std::string("vm1-disk0"), std::string("vm.disk_0"),
        std::string("9abc.def-ghi_jkl"), std::string(kMaxDeviceIdLength, 'z')}) {
    EXPECT_TRUE(ValidateDeviceId(id).ok()) << id << ": " << ValidateDeviceId(id);
  }
}

TEST(ValidateDeviceIdTest, RejectsEmpty) {
  EXPECT_TRUE(IsInvalid(ValidateDeviceId(""), "device_id"));
}

TEST(ValidateDeviceIdTest, RejectsTooLong) {
  absl::Status s = ValidateDeviceId(std::string(kMaxDeviceIdLength + 1, 'a'));
  EXPECT_TRUE(IsInvalid(s, "device_id"));
  EXPECT_TRUE(absl::StrContains(s.message(), "65")) << s;
}

TEST(ValidateDeviceIdTest, RejectsBadCharacters) {
  for (const char* id :
       {"Vm1", "vmA", "vm/1", "../x", "vm 1", "vm:1", "vm\n", "vm\xc3\xa9", "a+b", "a@b"}) {
    EXPECT_TRUE(IsInvalid(ValidateDeviceId(id), "device_id")) << id;
  }
  // A NUL inside the id is not a terminator.
  EXPECT_TRUE(IsInvalid(ValidateDeviceId(absl::string_view("vm\0x", 4)), "device_id"));
}

TEST(ValidateDeviceIdTest, RejectsBadFirstCharacter) {
  for (const char* id : {".vm", "-vm", "_vm", "..", "."}) {
    EXPECT_TRUE(IsInvalid(ValidateDeviceId(id), "device_id")) << id;
  }
}

TEST(ValidateDeviceIdTest, NamesTheGivenField) {
  EXPECT_TRUE(IsInvalid(ValidateDeviceId("", "request.id"), "request.id"));
}

// ---------------------------------------------------------------------------------------------
// ParseXenVirtualDevice, with the numbers of Xen's docs/misc/vbd-interface.txt.

TEST(ParseXenVirtualDeviceTest, XvdUpTo15) {
  EXPECT_EQ(ParseXenVirtualDevice("xvda").value_or(0), 51712u);  // 202 << 8
  EXPECT_EQ(ParseXenVirtualDevice("xvdb").value_or(0), 51728u);
  EXPECT_EQ(ParseXenVirtualDevice("xvda1").value_or(0), 51713u);
  EXPECT_EQ(ParseXenVirtualDevice("xvdb3").value_or(0), (202u << 8) | (1u << 4) | 3u);
  EXPECT_EQ(ParseXenVirtualDevice("xvdp15").value_or(0), (202u << 8) | (15u << 4) | 15u);
  EXPECT_EQ(ParseXenVirtualDevice("xvdp15").value_or(0), 51967u);
}

TEST(ParseXenVirtualDeviceTest, XvdExtendedForm) {
  EXPECT_EQ(ParseXenVirtualDevice("xvdq").value_or(0), (1u << 28) | (16u << 8));
  EXPECT_EQ(ParseXenVirtualDevice("xvdz").value_or(0), (1u << 28) | (25u << 8));
  EXPECT_EQ(ParseXenVirtualDevice("xvdaa").value_or(0), (1u << 28) | (26u << 8));
  EXPECT_EQ(ParseXenVirtualDevice("xvdab").value_or(0), (1u << 28) | (27u << 8));
  EXPECT_EQ(ParseXenVirtualDevice("xvdba").value_or(0), (1u << 28) | (52u << 8));
  EXPECT_EQ(ParseXenVirtualDevice("xvdq1").value_or(0), (1u << 28) | (16u << 8) | 1u);
  // A disk below 16 with a partition of 16 or more needs the extended form too.
  EXPECT_EQ(ParseXenVirtualDevice("xvda16").value_or(0), (1u << 28) | 16u);
  EXPECT_EQ(ParseXenVirtualDevice("xvdb255").value_or(0), (1u << 28) | (1u << 8) | 255u);
}

TEST(ParseXenVirtualDeviceTest, Ide) {
  EXPECT_EQ(ParseXenVirtualDevice("hda").value_or(0), 768u);   // 3 << 8
  EXPECT_EQ(ParseXenVirtualDevice("hdb").value_or(0), 832u);   // 3 << 8 | 1 << 6
  EXPECT_EQ(ParseXenVirtualDevice("hdc").value_or(0), 5632u);  // 22 << 8
  EXPECT_EQ(ParseXenVirtualDevice("hdd").value_or(0), (22u << 8) | (1u << 6));
  EXPECT_EQ(ParseXenVirtualDevice("hda1").value_or(0), 769u);
  EXPECT_EQ(ParseXenVirtualDevice("hdb63").value_or(0), 832u + 63u);
}

TEST(ParseXenVirtualDeviceTest, Scsi) {
  EXPECT_EQ(ParseXenVirtualDevice("sda").value_or(0), 2048u);  // 8 << 8
  EXPECT_EQ(ParseXenVirtualDevice("sdb1").value_or(0), 2065u);
  EXPECT_EQ(ParseXenVirtualDevice("sdp15").value_or(0), (8u << 8) | (15u << 4) | 15u);
}

TEST(ParseXenVirtualDeviceTest, Numbers) {
  EXPECT_EQ(ParseXenVirtualDevice("51712").value_or(0), 51712u);
  EXPECT_EQ(ParseXenVirtualDevice("1").value_or(0), 1u);
  EXPECT_EQ(ParseXenVirtualDevice("268439552").value_or(0), 268439552u);
}

TEST(ParseXenVirtualDeviceTest, Rejects) {
  for (const char* text :
       {"",       "xvd",     "0",      "007",   "xvdA",  "hdu",         "sdq",      "sda16",
        "foo",    "xvda256", "xvda01", "hd",    "sd",    "hdaa",        "sdaa",     "hda64",
        "51712a", "-1",      "xvd1",   " xvda", "xvda ", "99999999999", "536870912"}) {
    absl::StatusOr<uint32_t> v = ParseXenVirtualDevice(text);
    EXPECT_FALSE(v.ok()) << "\"" << text << "\" parsed as " << *v;
    if (!v.ok()) {
      EXPECT_TRUE(IsInvalid(v.status(), "spec.xen.virtual_device")) << text;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// ValidateSpec

TEST(ValidateSpecTest, GoodSpecsPass) {
  EXPECT_TRUE(ValidateSpec(XenSpec()).ok()) << ValidateSpec(XenSpec());
  EXPECT_TRUE(ValidateSpec(VhostSpec()).ok()) << ValidateSpec(VhostSpec());

  auto full_xen = Parse<v1::DeviceSpec>(R"pb(
    backend {
      path: "/srv/images/vm1.img"
      format: IMAGE_FORMAT_RAW
      cache: CACHE_MODE_WRITETHROUGH
      read_only: true
      discard: DISCARD_MODE_UNMAP
      detect_zeroes: DETECT_ZEROES_UNMAP
      logical_block_size: 4096
      error_policy: ERROR_POLICY_STOP
    }
    xen {
      domid: 32751
      virtual_device: "51712"
      max_queues: 16
      max_ring_page_order: 4
      persistent_grants: false
      max_indirect_segments: 256
    }
  )pb");
  EXPECT_TRUE(ValidateSpec(full_xen).ok()) << ValidateSpec(full_xen);

  auto full_vhost = Parse<v1::DeviceSpec>(R"pb(
    backend { path: "/srv/images/vm1.img" logical_block_size: 512 }
    vhost_user { socket_path: "/run/vm1.sock" num_queues: 64 queue_size: 32768 }
  )pb");
  EXPECT_TRUE(ValidateSpec(full_vhost).ok()) << ValidateSpec(full_vhost);

  v1::DeviceSpec min_vhost = VhostSpec();
  min_vhost.mutable_vhost_user()->set_queue_size(64);
  EXPECT_TRUE(ValidateSpec(min_vhost).ok()) << ValidateSpec(min_vhost);

  v1::DeviceSpec domid1 = XenSpec();
  domid1.mutable_xen()->set_domid(1);
  EXPECT_TRUE(ValidateSpec(domid1).ok()) << ValidateSpec(domid1);
}

TEST(ValidateSpecTest, Frontends) {
  v1::DeviceSpec both = XenSpec();
  *both.mutable_vhost_user() = VhostSpec().vhost_user();
  EXPECT_TRUE(IsInvalid(ValidateSpec(both), "spec"));

  v1::DeviceSpec neither = XenSpec();
  neither.clear_xen();
  EXPECT_TRUE(IsInvalid(ValidateSpec(neither), "spec"));
}

TEST(ValidateSpecTest, Backend) {
  v1::DeviceSpec no_backend = XenSpec();
  no_backend.clear_backend();
  EXPECT_TRUE(IsInvalid(ValidateSpec(no_backend), "spec.backend"));

  v1::DeviceSpec spec = XenSpec();
  spec.mutable_backend()->set_path("");
  EXPECT_TRUE(IsInvalid(ValidateSpec(spec), "spec.backend.path"));
  spec.mutable_backend()->set_path("images/vm1.img");
  EXPECT_TRUE(IsInvalid(ValidateSpec(spec), "spec.backend.path"));
  spec.mutable_backend()->set_path(std::string("/srv/a\0b", 8));
  EXPECT_TRUE(IsInvalid(ValidateSpec(spec), "spec.backend.path"));
}

v1::DeviceSpec NullXenSpec(uint64_t size = uint64_t{1} << 30) {
  v1::DeviceSpec spec = XenSpec();
  spec.mutable_backend()->clear_path();
  spec.mutable_backend()->mutable_null()->set_size_bytes(size);
  return spec;
}

TEST(ValidateSpecTest, NullBackend) {
  EXPECT_TRUE(ValidateSpec(NullXenSpec()).ok()) << ValidateSpec(NullXenSpec());
  v1::DeviceSpec spec = NullXenSpec();
  spec.mutable_backend()->mutable_null()->set_read_zeroes(true);
  spec.mutable_backend()->set_logical_block_size(4096);
  EXPECT_TRUE(ValidateSpec(spec).ok()) << ValidateSpec(spec);
  EXPECT_TRUE(ValidateSpec(NullXenSpec(512)).ok());
  EXPECT_TRUE(ValidateSpec(NullXenSpec(kMaxNullBackendSize)).ok());

  // Both a path and null.
  spec = NullXenSpec();
  spec.mutable_backend()->set_path("/srv/images/vm1.img");
  absl::Status s = ValidateSpec(spec);
  EXPECT_TRUE(IsInvalid(s, "spec.backend")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "exactly one of path and null")) << s;
  // Neither: the path is what is missing, and the message points at null too.
  spec = NullXenSpec();
  spec.mutable_backend()->clear_null();
  s = ValidateSpec(spec);
  EXPECT_TRUE(IsInvalid(s, "spec.backend.path")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "spec.backend.null")) << s;

  EXPECT_TRUE(IsInvalid(ValidateSpec(NullXenSpec(0)), "spec.backend.null.size_bytes"));
  s = ValidateSpec(NullXenSpec((uint64_t{1} << 30) + 1));
  EXPECT_TRUE(IsInvalid(s, "spec.backend.null.size_bytes")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "512")) << s;
  spec = NullXenSpec((uint64_t{1} << 30) + 512);
  spec.mutable_backend()->set_logical_block_size(4096);
  s = ValidateSpec(spec);
  EXPECT_TRUE(IsInvalid(s, "spec.backend.null.size_bytes")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "4096")) << s;
  EXPECT_TRUE(IsInvalid(ValidateSpec(NullXenSpec(kMaxNullBackendSize + 512)),
                        "spec.backend.null.size_bytes"));
  // Both completions are valid; a value the API does not define is refused, naming the field.
  spec = NullXenSpec();
  spec.mutable_backend()->mutable_null()->set_completion(v1::NULL_COMPLETION_DEFERRED);
  EXPECT_TRUE(ValidateSpec(spec).ok()) << ValidateSpec(spec);
  spec.mutable_backend()->mutable_null()->set_completion(v1::NULL_COMPLETION_NOP);
  EXPECT_TRUE(ValidateSpec(spec).ok()) << ValidateSpec(spec);
  spec.mutable_backend()->mutable_null()->set_completion(v1::NullCompletion(3));
  s = ValidateSpec(spec);
  EXPECT_TRUE(IsInvalid(s, "spec.backend.null.completion")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "unknown value")) << s;
  // An empty null message is set: its size is what is wrong.
  spec = NullXenSpec();
  spec.mutable_backend()->mutable_null()->Clear();
  EXPECT_TRUE(IsInvalid(ValidateSpec(spec), "spec.backend.null.size_bytes"));
}

TEST(ValidateSpecTest, UnknownEnumValues) {
  struct Case {
    const char* field;
    void (*set)(v1::BackendSpec*);
  };
  const Case cases[] = {
      {"spec.backend.format", [](v1::BackendSpec* b) { b->set_format(v1::ImageFormat(2)); }},
      {"spec.backend.cache", [](v1::BackendSpec* b) { b->set_cache(v1::CacheMode(99)); }},
      {"spec.backend.cache", [](v1::BackendSpec* b) { b->set_cache(v1::CacheMode(-1)); }},
      {"spec.backend.discard", [](v1::BackendSpec* b) { b->set_discard(v1::DiscardMode(3)); }},
      {"spec.backend.detect_zeroes",
       [](v1::BackendSpec* b) { b->set_detect_zeroes(v1::DetectZeroes(4)); }},
      {"spec.backend.error_policy",
       [](v1::BackendSpec* b) { b->set_error_policy(v1::ErrorPolicy(3)); }},
  };
  for (const Case& c : cases) {
    v1::DeviceSpec spec = XenSpec();
    c.set(spec.mutable_backend());
    absl::Status s = ValidateSpec(spec);
    EXPECT_TRUE(IsInvalid(s, c.field));
    EXPECT_TRUE(absl::StrContains(s.message(), "unknown value")) << s;
  }
}

TEST(ValidateSpecTest, XenPollUs) {
  v1::DeviceSpec spec = XenSpec();
  EXPECT_TRUE(ValidateSpec(spec).ok());  // unset: the controller's default
  for (uint32_t us : {0u, 1u, 1000u, kMaxXenPollUs}) {
    spec.mutable_xen()->set_poll_us(us);
    EXPECT_TRUE(ValidateSpec(spec).ok()) << us;
  }
  spec.mutable_xen()->set_poll_us(kMaxXenPollUs + 1);
  absl::Status s = ValidateSpec(spec);
  EXPECT_TRUE(IsInvalid(s, "spec.xen.poll_us")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "10000000")) << s;
}

TEST(ValidateSpecTest, LogicalBlockSize) {
  for (uint32_t lbs : {1u, 256u, 1024u, 2048u, 8192u, 513u}) {
    v1::DeviceSpec spec = XenSpec();
    spec.mutable_backend()->set_logical_block_size(lbs);
    EXPECT_TRUE(IsInvalid(ValidateSpec(spec), "spec.backend.logical_block_size")) << lbs;
  }
  for (uint32_t lbs : {0u, 512u, 4096u}) {
    v1::DeviceSpec spec = XenSpec();
    spec.mutable_backend()->set_logical_block_size(lbs);
    EXPECT_TRUE(ValidateSpec(spec).ok()) << lbs;
  }
}

TEST(ValidateSpecTest, DetectZeroesUnmapNeedsDiscardUnmap) {
  v1::DeviceSpec spec = XenSpec();
  spec.mutable_backend()->set_detect_zeroes(v1::DETECT_ZEROES_UNMAP);
  EXPECT_TRUE(IsInvalid(ValidateSpec(spec), "spec.backend.detect_zeroes"));
  spec.mutable_backend()->set_discard(v1::DISCARD_MODE_IGNORE);
  EXPECT_TRUE(IsInvalid(ValidateSpec(spec), "spec.backend.detect_zeroes"));
  spec.mutable_backend()->set_discard(v1::DISCARD_MODE_UNMAP);
  EXPECT_TRUE(ValidateSpec(spec).ok()) << ValidateSpec(spec);
  // detect_zeroes on (without unmap) does not need discard.
  spec.mutable_backend()->set_detect_zeroes(v1::DETECT_ZEROES_ON);
  spec.mutable_backend()->set_discard(v1::DISCARD_MODE_IGNORE);
  EXPECT_TRUE(ValidateSpec(spec).ok()) << ValidateSpec(spec);
}

TEST(ValidateSpecTest, XenLimits) {
  struct Case {
    const char* field;
    void (*set)(v1::XenFrontend*);
  };
  const Case cases[] = {
      {"spec.xen.domid", [](v1::XenFrontend* x) { x->set_domid(0); }},
      {"spec.xen.domid", [](v1::XenFrontend* x) { x->set_domid(32752); }},
      {"spec.xen.domid", [](v1::XenFrontend* x) { x->set_domid(0x7FF0); }},  // DOMID_SELF
      {"spec.xen.virtual_device", [](v1::XenFrontend* x) { x->set_virtual_device(""); }},
      {"spec.xen.virtual_device", [](v1::XenFrontend* x) { x->set_virtual_device("vda"); }},
      {"spec.xen.max_queues", [](v1::XenFrontend* x) { x->set_max_queues(17); }},
      {"spec.xen.max_ring_page_order", [](v1::XenFrontend* x) { x->set_max_ring_page_order(5); }},
      {"spec.xen.max_indirect_segments",
       [](v1::XenFrontend* x) { x->set_max_indirect_segments(257); }},
  };
  for (const Case& c : cases) {
    v1::DeviceSpec spec = XenSpec();
    c.set(spec.mutable_xen());
    EXPECT_TRUE(IsInvalid(ValidateSpec(spec), c.field)) << spec.ShortDebugString();
  }
}

TEST(ValidateSpecTest, VhostUserLimits) {
  struct Case {
    const char* field;
    std::string socket_path;
    uint32_t num_queues;
    uint32_t queue_size;
  };
  const std::string long_path = "/" + std::string(107, 's');  // 108 bytes
  const Case cases[] = {
      {"spec.vhost_user.socket_path", "", 0, 0},
      {"spec.vhost_user.socket_path", "run/vm1.sock", 0, 0},
      {"spec.vhost_user.socket_path", "./vm1.sock", 0, 0},
      {"spec.vhost_user.socket_path", long_path, 0, 0},
      {"spec.vhost_user.num_queues", "/run/vm1.sock", 65, 0},
      {"spec.vhost_user.queue_size", "/run/vm1.sock", 0, 100},
      {"spec.vhost_user.queue_size", "/run/vm1.sock", 0, 32},
      {"spec.vhost_user.queue_size", "/run/vm1.sock", 0, 65536},
      {"spec.vhost_user.queue_size", "/run/vm1.sock", 0, 1},
  };
  for (const Case& c : cases) {
    v1::DeviceSpec spec = VhostSpec();
    spec.mutable_vhost_user()->set_socket_path(c.socket_path);
    spec.mutable_vhost_user()->set_num_queues(c.num_queues);
    spec.mutable_vhost_user()->set_queue_size(c.queue_size);
    EXPECT_TRUE(IsInvalid(ValidateSpec(spec), c.field)) << spec.ShortDebugString();
  }
  // 107 bytes is the longest path sun_path can hold with its NUL.
  v1::DeviceSpec spec = VhostSpec();
  spec.mutable_vhost_user()->set_socket_path("/" + std::string(106, 's'));
  EXPECT_TRUE(ValidateSpec(spec).ok()) << ValidateSpec(spec);
}

// ---------------------------------------------------------------------------------------------
// NormalizeSpec

TEST(NormalizeSpecTest, WritesOutXenDefaults) {
  v1::DeviceSpec n = NormalizeSpec(XenSpec());
  const v1::BackendSpec& b = n.backend();
  EXPECT_EQ(b.path(), "/srv/images/vm1.img");
  EXPECT_EQ(b.format(), v1::IMAGE_FORMAT_RAW);
  EXPECT_EQ(b.cache(), v1::CACHE_MODE_NONE);
  EXPECT_FALSE(b.read_only());
  EXPECT_EQ(b.discard(), v1::DISCARD_MODE_IGNORE);
  EXPECT_EQ(b.detect_zeroes(), v1::DETECT_ZEROES_OFF);
  EXPECT_EQ(b.logical_block_size(), 512u);
  EXPECT_EQ(b.error_policy(), v1::ERROR_POLICY_REPORT);
  ASSERT_TRUE(n.has_xen());
  EXPECT_FALSE(n.has_vhost_user());
  const v1::XenFrontend& x = n.xen();
  EXPECT_EQ(x.domid(), 7u);
  EXPECT_EQ(x.virtual_device(), "xvda");
  EXPECT_EQ(x.max_queues(), 4u);
  EXPECT_EQ(x.max_ring_page_order(), 0u);
  EXPECT_TRUE(x.has_persistent_grants());
  EXPECT_TRUE(x.persistent_grants());
  EXPECT_EQ(x.max_indirect_segments(), 32u);
  EXPECT_FALSE(x.disable_indirect());
}

TEST(NormalizeSpecTest, WritesOutVhostUserDefaults) {
  v1::DeviceSpec n = NormalizeSpec(VhostSpec());
  EXPECT_EQ(n.backend().logical_block_size(), 512u);
  EXPECT_EQ(n.backend().cache(), v1::CACHE_MODE_NONE);
  ASSERT_TRUE(n.has_vhost_user());
  EXPECT_FALSE(n.has_xen());
  EXPECT_EQ(n.vhost_user().socket_path(), "/run/blockplane/vm1.sock");
  EXPECT_EQ(n.vhost_user().num_queues(), 1u);
  EXPECT_EQ(n.vhost_user().queue_size(), 256u);
}

TEST(NormalizeSpecTest, KeepsExplicitValues) {
  auto spec = Parse<v1::DeviceSpec>(R"pb(
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
      domid: 9
      virtual_device: "xvdb"
      max_queues: 8
      max_ring_page_order: 3
      persistent_grants: false
      max_indirect_segments: 64
    }
  )pb");
  EXPECT_TRUE(MessageDifferencer::Equals(NormalizeSpec(spec), spec))
      << NormalizeSpec(spec).ShortDebugString();

  auto vhost = Parse<v1::DeviceSpec>(R"pb(
    backend { path: "/srv/images/vm1.img" }
    vhost_user { socket_path: "/run/vm1.sock" num_queues: 4 queue_size: 1024 }
  )pb");
  v1::DeviceSpec n = NormalizeSpec(vhost);
  EXPECT_EQ(n.vhost_user().num_queues(), 4u);
  EXPECT_EQ(n.vhost_user().queue_size(), 1024u);
}

TEST(NormalizeSpecTest, DisableIndirectMeansZeroSegments) {
  v1::DeviceSpec spec = XenSpec();
  spec.mutable_xen()->set_disable_indirect(true);
  EXPECT_EQ(NormalizeSpec(spec).xen().max_indirect_segments(), 0u);
  spec.mutable_xen()->set_max_indirect_segments(64);
  EXPECT_EQ(NormalizeSpec(spec).xen().max_indirect_segments(), 0u);
  EXPECT_TRUE(NormalizeSpec(spec).xen().disable_indirect());
}

TEST(NormalizeSpecTest, NormalizesPaths) {
  v1::DeviceSpec spec = VhostSpec();
  spec.mutable_backend()->set_path("/srv//images/./old/../vm1.img");
  spec.mutable_vhost_user()->set_socket_path("/run//blockplane/./x/../vm1.sock");
  v1::DeviceSpec n = NormalizeSpec(spec);
  EXPECT_EQ(n.backend().path(), "/srv/images/vm1.img");
  EXPECT_EQ(n.vhost_user().socket_path(), "/run/blockplane/vm1.sock");
}

TEST(NormalizeSpecTest, SameDeviceComparesEqual) {
  v1::DeviceSpec implicit = XenSpec();
  v1::DeviceSpec explicit_defaults = XenSpec();
  explicit_defaults.mutable_backend()->set_path("/srv/images/./vm1.img");
  explicit_defaults.mutable_backend()->set_cache(v1::CACHE_MODE_NONE);
  explicit_defaults.mutable_backend()->set_logical_block_size(512);
  explicit_defaults.mutable_xen()->set_max_queues(4);
  explicit_defaults.mutable_xen()->set_persistent_grants(true);
  explicit_defaults.mutable_xen()->set_max_indirect_segments(32);
  EXPECT_FALSE(MessageDifferencer::Equals(implicit, explicit_defaults));
  EXPECT_TRUE(
      MessageDifferencer::Equals(NormalizeSpec(implicit), NormalizeSpec(explicit_defaults)));
}

TEST(NormalizeSpecTest, IsIdempotent) {
  std::vector<v1::DeviceSpec> specs = {XenSpec(), VhostSpec()};
  v1::DeviceSpec s = XenSpec();
  s.mutable_xen()->set_disable_indirect(true);
  s.mutable_backend()->set_path("/srv/images/../images//vm1.img");
  specs.push_back(s);
  s = XenSpec();
  s.mutable_xen()->set_persistent_grants(false);
  s.mutable_xen()->set_max_indirect_segments(7);
  s.mutable_backend()->set_logical_block_size(4096);
  specs.push_back(s);
  s = VhostSpec();
  s.mutable_vhost_user()->set_socket_path("/run/./a//b/../vm.sock");
  s.mutable_vhost_user()->set_queue_size(128);
  specs.push_back(s);
  specs.push_back(NullXenSpec());
  for (const v1::DeviceSpec& spec : specs) {
    v1::DeviceSpec once = NormalizeSpec(spec);
    v1::DeviceSpec twice = NormalizeSpec(once);
    EXPECT_TRUE(MessageDifferencer::Equals(once, twice)) << once.ShortDebugString() << "\nvs\n"
                                                         << twice.ShortDebugString();
    EXPECT_TRUE(ValidateSpec(once).ok()) << ValidateSpec(once);
  }
}

// ---------------------------------------------------------------------------------------------
// InspectBacking, on a temp dir:
//   <tmp>/root/       the backing root
//   <tmp>/root2/      a sibling whose name starts with the root's name
//   <tmp>/outside/    not a root

class InspectBackingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char name[] = "/tmp/blockplane-inspect-XXXXXX";
    ASSERT_NE(mkdtemp(name), nullptr);
    tmp_ = fs::canonical(name);
    root_ = tmp_ / "root";
    outside_ = tmp_ / "outside";
    fs::create_directory(root_);
    fs::create_directory(tmp_ / "root2");
    fs::create_directory(outside_);
  }
  void TearDown() override {
    if (!tmp_.empty()) {
      // Give back write permission in case a test removed it, so remove_all works as non-root.
      std::error_code ec;
      fs::permissions(root_, fs::perms::owner_all, fs::perm_options::add, ec);
      fs::remove_all(tmp_, ec);
      EXPECT_FALSE(ec) << ec.message();
    }
  }

  static std::string MakeFile(const fs::path& path, uint64_t size) {
    int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0644);
    EXPECT_GE(fd, 0) << path;
    EXPECT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0);
    close(fd);
    return path.string();
  }

  static v1::BackendSpec Backend(const std::string& path, uint32_t lbs = 0,
                                 bool read_only = false) {
    v1::BackendSpec b;
    b.set_path(path);
    b.set_logical_block_size(lbs);
    b.set_read_only(read_only);
    return b;
  }

  std::vector<std::string> Roots() const { return {root_.string()}; }

  fs::path tmp_, root_, outside_;
};

TEST_F(InspectBackingTest, GoodFileReturnsSizeAndResolvedPath) {
  std::string path = MakeFile(root_ / "disk.img", 1 << 20);
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend(path), Roots());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size_bytes, uint64_t{1} << 20);
  EXPECT_EQ(info->resolved_path, path);
  EXPECT_FALSE(info->is_block_device);
}

TEST_F(InspectBackingTest, ResolvesSymlinksAndDotsInsideTheRoot) {
  fs::create_directory(root_ / "sub");
  std::string target = MakeFile(root_ / "sub" / "disk.img", 8192);
  fs::create_symlink(target, root_ / "link.img");
  absl::StatusOr<BackingInfo> info =
      InspectBacking(Backend((root_ / "link.img").string()), Roots());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->resolved_path, target);
  EXPECT_EQ(info->size_bytes, 8192u);

  info = InspectBacking(Backend((root_ / "sub" / ".." / "sub" / "disk.img").string()), Roots());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->resolved_path, target);
}

TEST_F(InspectBackingTest, NoRootsConfigured) {
  std::string path = MakeFile(root_ / "disk.img", 4096);
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend(path), {});
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(IsInvalid(info.status(), "spec.backend.path"));
  EXPECT_TRUE(absl::StrContains(info.status().message(), "--backing-root")) << info.status();
}

TEST_F(InspectBackingTest, OutsideTheRoots) {
  std::string path = MakeFile(outside_ / "disk.img", 4096);
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend(path), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(IsInvalid(info.status(), "spec.backend.path"));
  EXPECT_TRUE(absl::StrContains(info.status().message(), root_.string())) << info.status();
}

TEST_F(InspectBackingTest, SiblingWithTheRootAsNamePrefixIsOutside) {
  std::string path = MakeFile(tmp_ / "root2" / "disk.img", 4096);
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend(path), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(IsInvalid(info.status(), "spec.backend.path"));
}

TEST_F(InspectBackingTest, DotDotEscapingTheRoot) {
  MakeFile(outside_ / "disk.img", 4096);
  std::string path = (root_ / ".." / "outside" / "disk.img").string();
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend(path), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(IsInvalid(info.status(), "spec.backend.path"));
}

TEST_F(InspectBackingTest, SymlinkInsideTheRootPointingOutsideIsRefused) {
  std::string target = MakeFile(outside_ / "disk.img", 4096);
  fs::create_symlink(target, root_ / "escape.img");
  absl::StatusOr<BackingInfo> info =
      InspectBacking(Backend((root_ / "escape.img").string()), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(IsInvalid(info.status(), "spec.backend.path"));
  EXPECT_TRUE(absl::StrContains(info.status().message(), target)) << info.status();

  // The same through a symlinked directory.
  fs::create_directory_symlink(outside_, root_ / "escape-dir");
  info = InspectBacking(Backend((root_ / "escape-dir" / "disk.img").string()), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(IsInvalid(info.status(), "spec.backend.path"));
}

TEST_F(InspectBackingTest, MissingFile) {
  std::string path = (root_ / "missing.img").string();
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend(path), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(
      HasCodeAndField(info.status(), absl::StatusCode::kFailedPrecondition, "spec.backend.path"));
  EXPECT_TRUE(absl::StrContains(info.status().message(), path)) << info.status();
}

TEST_F(InspectBackingTest, Directory) {
  fs::create_directory(root_ / "dir");
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend((root_ / "dir").string()), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(
      HasCodeAndField(info.status(), absl::StatusCode::kFailedPrecondition, "spec.backend.path"));
  EXPECT_TRUE(absl::StrContains(info.status().message(), "directory")) << info.status();
}

TEST_F(InspectBackingTest, NotARegularFile) {
  ASSERT_EQ(mkfifo((root_ / "fifo").c_str(), 0600), 0);
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend((root_ / "fifo").string()), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(
      HasCodeAndField(info.status(), absl::StatusCode::kFailedPrecondition, "spec.backend.path"));
}

TEST_F(InspectBackingTest, EmptyFile) {
  std::string path = MakeFile(root_ / "empty.img", 0);
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend(path), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(
      HasCodeAndField(info.status(), absl::StatusCode::kFailedPrecondition, "spec.backend.path"));
  EXPECT_TRUE(absl::StrContains(info.status().message(), "empty")) << info.status();
}

TEST_F(InspectBackingTest, SizeNotAMultipleOfTheLogicalBlockSize) {
  std::string odd = MakeFile(root_ / "odd.img", 1000);
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend(odd), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(
      HasCodeAndField(info.status(), absl::StatusCode::kFailedPrecondition, "spec.backend.path"));
  EXPECT_TRUE(absl::StrContains(info.status().message(), "512")) << info.status();

  std::string sectors = MakeFile(root_ / "sectors.img", 3 * 512);
  EXPECT_TRUE(InspectBacking(Backend(sectors, 512), Roots()).ok());
  info = InspectBacking(Backend(sectors, 4096), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(
      HasCodeAndField(info.status(), absl::StatusCode::kFailedPrecondition, "spec.backend.path"));
  EXPECT_TRUE(absl::StrContains(info.status().message(), "4096")) << info.status();

  std::string blocks = MakeFile(root_ / "blocks.img", 3 * 4096);
  info = InspectBacking(Backend(blocks, 4096), Roots());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size_bytes, 3u * 4096);
}

TEST_F(InspectBackingTest, ReadOnlyFileWithReadOnly) {
  std::string path = MakeFile(root_ / "ro.img", 4096);
  ASSERT_EQ(chmod(path.c_str(), 0444), 0);
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend(path, 0, /*read_only=*/true), Roots());
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size_bytes, 4096u);
}

TEST_F(InspectBackingTest, ReadOnlyFileWithoutReadOnly) {
  if (geteuid() == 0) GTEST_SKIP() << "root may write to a 0444 file";
  std::string path = MakeFile(root_ / "ro.img", 4096);
  ASSERT_EQ(chmod(path.c_str(), 0444), 0);
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend(path), Roots());
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(
      HasCodeAndField(info.status(), absl::StatusCode::kFailedPrecondition, "spec.backend.path"));
}

TEST_F(InspectBackingTest, RootWithTrailingSlash) {
  std::string path = MakeFile(root_ / "disk.img", 4096);
  absl::StatusOr<BackingInfo> info = InspectBacking(Backend(path), {root_.string() + "/"});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->resolved_path, path);

  // Still component-wise: the sibling root2/ is not under root/.
  std::string sibling = MakeFile(tmp_ / "root2" / "disk.img", 4096);
  info = InspectBacking(Backend(sibling), {root_.string() + "/"});
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(IsInvalid(info.status(), "spec.backend.path"));

  // The root itself is a directory, not outside the roots.
  info = InspectBacking(Backend(root_.string()), {root_.string() + "/"});
  ASSERT_FALSE(info.ok());
  EXPECT_TRUE(
      HasCodeAndField(info.status(), absl::StatusCode::kFailedPrecondition, "spec.backend.path"));
}

TEST_F(InspectBackingTest, AnyOfSeveralRoots) {
  std::string path = MakeFile(outside_ / "disk.img", 4096);
  absl::StatusOr<BackingInfo> info =
      InspectBacking(Backend(path), {root_.string(), outside_.string()});
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->resolved_path, path);
}

// ---------------------------------------------------------------------------------------------
// ValidateResize

v1::Device ResizableDevice(uint32_t lbs = 512, bool read_only = false) {
  v1::Device d;
  d.set_id("vm1");
  *d.mutable_spec() = NormalizeSpec(XenSpec());
  d.mutable_spec()->mutable_backend()->set_logical_block_size(lbs);
  d.mutable_spec()->mutable_backend()->set_read_only(read_only);
  d.mutable_status()->set_state(v1::DEVICE_STATE_CONNECTED);
  d.mutable_status()->set_size_bytes(1 << 20);
  d.mutable_status()->set_highest_written_offset(512 << 10);
  return d;
}

v1::ResizeDeviceRequest Resize(uint64_t size, bool allow_shrink = false) {
  v1::ResizeDeviceRequest r;
  r.set_device_id("vm1");
  r.set_new_size_bytes(size);
  r.set_allow_shrink(allow_shrink);
  return r;
}

TEST(ValidateResizeTest, GrowIsOk) {
  EXPECT_TRUE(ValidateResize(ResizableDevice(), Resize(2 << 20)).ok());
  EXPECT_TRUE(ValidateResize(ResizableDevice(), Resize((1 << 20) + 512)).ok());
  EXPECT_TRUE(ValidateResize(ResizableDevice(4096), Resize(2 << 20)).ok());
  EXPECT_TRUE(ValidateResize(ResizableDevice(), Resize(uint64_t{1} << 40)).ok());
}

TEST(ValidateResizeTest, Zero) {
  EXPECT_TRUE(IsInvalid(ValidateResize(ResizableDevice(), Resize(0)), "new_size_bytes"));
  EXPECT_TRUE(IsInvalid(ValidateResize(ResizableDevice(), Resize(0, true)), "new_size_bytes"));
}

TEST(ValidateResizeTest, Unaligned) {
  EXPECT_TRUE(
      IsInvalid(ValidateResize(ResizableDevice(), Resize((2 << 20) + 1)), "new_size_bytes"));
  absl::Status s = ValidateResize(ResizableDevice(4096), Resize((2 << 20) + 512));
  EXPECT_TRUE(IsInvalid(s, "new_size_bytes"));
  EXPECT_TRUE(absl::StrContains(s.message(), "4096")) << s;
}

TEST(ValidateResizeTest, TooLarge) {
  EXPECT_TRUE(IsInvalid(ValidateResize(ResizableDevice(), Resize((uint64_t{1} << 62) + 4096)),
                        "new_size_bytes"));
}

TEST(ValidateResizeTest, ShrinkNeedsAllowShrink) {
  absl::Status s = ValidateResize(ResizableDevice(), Resize(768 << 10));
  EXPECT_TRUE(IsInvalid(s, "new_size_bytes"));
  EXPECT_TRUE(absl::StrContains(s.message(), "allow_shrink")) << s;
  EXPECT_TRUE(ValidateResize(ResizableDevice(), Resize(768 << 10, true)).ok());
  // Down to exactly the highest written offset loses nothing.
  EXPECT_TRUE(ValidateResize(ResizableDevice(), Resize(512 << 10, true)).ok());
}

TEST(ValidateResizeTest, ShrinkBelowHighestWrittenOffset) {
  absl::Status s = ValidateResize(ResizableDevice(), Resize(256 << 10, true));
  EXPECT_TRUE(HasCodeAndField(s, absl::StatusCode::kFailedPrecondition, "new_size_bytes"));
  EXPECT_TRUE(absl::StrContains(s.message(), absl::StrCat(512 << 10))) << s;
  s = ValidateResize(ResizableDevice(), Resize((512 << 10) - 512, true));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
}

TEST(ValidateResizeTest, NullBackend) {
  v1::Device d = ResizableDevice();
  d.mutable_spec()->mutable_backend()->clear_path();
  d.mutable_spec()->mutable_backend()->mutable_null()->set_size_bytes(1 << 20);
  EXPECT_TRUE(ValidateResize(d, Resize(2 << 20)).ok());
  EXPECT_TRUE(ValidateResize(d, Resize(kMaxNullBackendSize)).ok());
  absl::Status s = ValidateResize(d, Resize(kMaxNullBackendSize + 512));
  EXPECT_TRUE(IsInvalid(s, "new_size_bytes")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "null backend")) << s;
  // The other checks hold as for files.
  EXPECT_TRUE(IsInvalid(ValidateResize(d, Resize(768 << 10)), "new_size_bytes"));
  EXPECT_EQ(ValidateResize(d, Resize(256 << 10, true)).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(NormalizeSpecTest, NullBackendKeepsItsFields) {
  v1::DeviceSpec spec = NullXenSpec(uint64_t{1} << 30);
  spec.mutable_backend()->mutable_null()->set_read_zeroes(true);
  v1::DeviceSpec n = NormalizeSpec(spec);
  EXPECT_TRUE(n.backend().has_null());
  EXPECT_EQ(n.backend().null().size_bytes(), uint64_t{1} << 30);
  EXPECT_TRUE(n.backend().null().read_zeroes());
  EXPECT_EQ(n.backend().path(), "");
  EXPECT_EQ(n.backend().logical_block_size(), 512u);
  EXPECT_EQ(n.backend().cache(), v1::CACHE_MODE_NONE);
  // Unspecified completion is spelled out as the default; an explicit one is kept.
  EXPECT_EQ(n.backend().null().completion(), v1::NULL_COMPLETION_NOP);
  spec.mutable_backend()->mutable_null()->set_completion(v1::NULL_COMPLETION_DEFERRED);
  EXPECT_EQ(NormalizeSpec(spec).backend().null().completion(), v1::NULL_COMPLETION_DEFERRED);
  // A file backend gets no null message from normalisation.
  EXPECT_FALSE(NormalizeSpec(XenSpec()).backend().has_null());
}

TEST(ValidateResizeTest, ReadOnlyDevice) {
  absl::Status s = ValidateResize(ResizableDevice(512, /*read_only=*/true), Resize(2 << 20));
  EXPECT_TRUE(HasCodeAndField(s, absl::StatusCode::kFailedPrecondition, "device_id"));
  EXPECT_TRUE(absl::StrContains(s.message(), "vm1")) << s;
}

}  // namespace
}  // namespace blockplane::controller

namespace blockplane::controller {
namespace {

TEST(XenVirtualDeviceNameTest, NamesRoundTripThroughNumbers) {
  for (const char* name : {"xvda", "xvdb", "xvda1", "xvdp15", "xvdq", "xvdz", "xvdaa", "xvdq3"}) {
    absl::StatusOr<uint32_t> number = ParseXenVirtualDevice(name);
    ASSERT_TRUE(number.ok()) << name;
    EXPECT_EQ(XenVirtualDeviceName(*number), name);
  }
  EXPECT_EQ(XenVirtualDeviceName(768), "768");  // hda stays numeric: no xvd name
}

TEST(NormalizeSpecTest, XenVirtualDeviceNumberAndNameNormaliseAlike) {
  v1::DeviceSpec by_number, by_name, ide;
  for (auto* spec : {&by_number, &by_name, &ide}) {
    spec->mutable_backend()->set_path("/srv/d.img");
    spec->mutable_xen()->set_domid(3);
  }
  by_number.mutable_xen()->set_virtual_device("51712");
  by_name.mutable_xen()->set_virtual_device("xvda");
  ide.mutable_xen()->set_virtual_device("hdc");
  EXPECT_EQ(NormalizeSpec(by_number).xen().virtual_device(), "xvda");
  EXPECT_EQ(NormalizeSpec(by_number).SerializeAsString(),
            NormalizeSpec(by_name).SerializeAsString());
  EXPECT_EQ(NormalizeSpec(ide).xen().virtual_device(), "hdc");
}

}  // namespace
}  // namespace blockplane::controller
