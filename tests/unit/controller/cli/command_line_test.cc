#include "controller/cli/command_line.h"

#include "absl/strings/match.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"

namespace blockplane::controller::cli {
namespace {

using google::protobuf::util::MessageDifferencer;

absl::StatusOr<Invocation> Parse(std::vector<std::string> args, ParseDefaults defaults = {}) {
  return ParseCommandLine(args, defaults);
}

template <typename T>
T FromText(const std::string& text) {
  T message;
  EXPECT_TRUE(google::protobuf::TextFormat::ParseFromString(text, &message)) << text;
  return message;
}

template <typename T>
void ExpectRequest(const absl::StatusOr<Invocation>& invocation, const std::string& expected) {
  ASSERT_TRUE(invocation.ok()) << invocation.status();
  ASSERT_FALSE(invocation->help.has_value());
  const T* request = std::get_if<T>(&invocation->request);
  ASSERT_NE(request, nullptr) << "wrong request type, command " << CommandName(invocation->request);
  const T want = FromText<T>(expected);
  EXPECT_TRUE(MessageDifferencer::Equals(*request, want)) << "got:\n"
                                                          << request->DebugString() << "want:\n"
                                                          << want.DebugString();
}

// The usage error of `args`, which must fail.
std::string UsageError(std::vector<std::string> args) {
  const auto invocation = Parse(std::move(args));
  EXPECT_FALSE(invocation.ok());
  if (invocation.ok()) return "";
  EXPECT_EQ(invocation.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(invocation.status().message());
}

TEST(CommandLineTest, AttachXenWithEveryFlag) {
  ExpectRequest<v1::AttachDeviceRequest>(Parse({"attach",
                                                "dev0",
                                                "--path",
                                                "/srv/disk.img",
                                                "--format=raw",
                                                "--cache",
                                                "writeback",
                                                "--read-only",
                                                "--discard",
                                                "unmap",
                                                "--detect-zeroes",
                                                "unmap",
                                                "--lbs",
                                                "4096",
                                                "--error-policy",
                                                "stop",
                                                "--xen-domid",
                                                "5",
                                                "--xen-vdev",
                                                "xvda",
                                                "--xen-max-queues",
                                                "8",
                                                "--xen-max-ring-page-order",
                                                "2",
                                                "--xen-persistent-grants=false",
                                                "--xen-max-indirect-segments",
                                                "64",
                                                "--xen-disable-indirect",
                                                "--xen-poll-us",
                                                "250"}),
                                         R"pb(device_id: "dev0"
                                              spec {
                                                backend {
                                                  path: "/srv/disk.img"
                                                  format: IMAGE_FORMAT_RAW
                                                  cache: CACHE_MODE_WRITEBACK
                                                  read_only: true
                                                  discard: DISCARD_MODE_UNMAP
                                                  detect_zeroes: DETECT_ZEROES_UNMAP
                                                  logical_block_size: 4096
                                                  error_policy: ERROR_POLICY_STOP
                                                }
                                                xen {
                                                  domid: 5
                                                  virtual_device: "xvda"
                                                  max_queues: 8
                                                  max_ring_page_order: 2
                                                  persistent_grants: false
                                                  max_indirect_segments: 64
                                                  disable_indirect: true
                                                  poll_us: 250
                                                }
                                              })pb");
}

TEST(CommandLineTest, AttachDefaultsLeaveFieldsUnsetForTheServer) {
  const auto invocation =
      Parse({"attach", "dev0", "--path", "/srv/d", "--xen-domid", "5", "--xen-vdev", "51712"});
  ExpectRequest<v1::AttachDeviceRequest>(invocation,
                                         R"pb(device_id: "dev0"
                                              spec {
                                                backend { path: "/srv/d" }
                                                xen { domid: 5 virtual_device: "51712" }
                                              })pb");
  // persistent_grants is optional: absent means the server default (true).
  EXPECT_FALSE(
      std::get<v1::AttachDeviceRequest>(invocation->request).spec().xen().has_persistent_grants());
  // So is poll_us: absent means the controller's --xen-poll-us; an explicit 0 turns polling off.
  EXPECT_FALSE(std::get<v1::AttachDeviceRequest>(invocation->request).spec().xen().has_poll_us());
  const auto no_poll = Parse({"attach", "dev0", "--path", "/srv/d", "--xen-domid", "5",
                              "--xen-vdev", "51712", "--xen-poll-us", "0"});
  ASSERT_TRUE(no_poll.ok()) << no_poll.status();
  EXPECT_TRUE(std::get<v1::AttachDeviceRequest>(no_poll->request).spec().xen().has_poll_us());
}

TEST(CommandLineTest, AttachNullBackend) {
  ExpectRequest<v1::AttachDeviceRequest>(
      Parse({"attach", "bench", "--null-size", "1G", "--read-zeroes", "--xen-domid", "5",
             "--xen-vdev", "xvda"}),
      R"pb(device_id: "bench"
           spec {
             backend { null { size_bytes: 1073741824 read_zeroes: true } }
             xen { domid: 5 virtual_device: "xvda" }
           })pb");
  ExpectRequest<v1::AttachDeviceRequest>(
      Parse({"attach", "bench", "--null-size", "1G", "--null-completion", "deferred", "--xen-domid",
             "5", "--xen-vdev", "xvda"}),
      R"pb(device_id: "bench"
           spec {
             backend { null { size_bytes: 1073741824 completion: NULL_COMPLETION_DEFERRED } }
             xen { domid: 5 virtual_device: "xvda" }
           })pb");
  // Without --read-zeroes; a size of 0 is the server's to refuse (it names the field).
  ExpectRequest<v1::AttachDeviceRequest>(
      Parse({"attach", "bench", "--null-size=0", "--vhost-socket", "/run/b.sock"}),
      R"pb(device_id: "bench"
           spec {
             backend { null {} }
             vhost_user { socket_path: "/run/b.sock" }
           })pb");
}

TEST(CommandLineTest, AttachVhostUser) {
  ExpectRequest<v1::AttachDeviceRequest>(
      Parse({"attach", "vm1.disk0", "--path=/srv/vm1.img", "--vhost-socket", "/run/vm1.sock",
             "--vhost-queues", "4", "--vhost-queue-size", "1024", "--cache", "none",
             "--logical-block-size", "512"}),
      R"pb(device_id: "vm1.disk0"
           spec {
             backend { path: "/srv/vm1.img" cache: CACHE_MODE_NONE logical_block_size: 512 }
             vhost_user { socket_path: "/run/vm1.sock" num_queues: 4 queue_size: 1024 }
           })pb");
}

TEST(CommandLineTest, AttachPassesValuesTheServerValidates) {
  // Ranges (domid 1..32751, queue sizes, id syntax, relative paths) are the server's to judge, so
  // its message is the one the user sees.
  ExpectRequest<v1::AttachDeviceRequest>(
      Parse({"attach", "Bad ID", "--path", "rel/path", "--xen-domid", "0", "--xen-vdev", "zz"}),
      R"pb(device_id: "Bad ID"
           spec {
             backend { path: "rel/path" }
             xen { domid: 0 virtual_device: "zz" }
           })pb");
}

TEST(CommandLineTest, AttachUsageErrors) {
  EXPECT_EQ(UsageError({"attach", "dev0", "--xen-domid", "1", "--xen-vdev", "xvda"}),
            "attach: --path is required (or --null-size for a null backend)");
  EXPECT_EQ(UsageError({"attach", "d", "--path", "/p", "--null-size", "1G", "--xen-domid", "1",
                        "--xen-vdev", "xvda"}),
            "attach: --path and --null-size are exclusive: a device has one backend");
  EXPECT_EQ(UsageError({"attach", "d", "--path", "/p", "--read-zeroes", "--vhost-socket", "/s"}),
            "attach: --read-zeroes needs --null-size");
  EXPECT_EQ(UsageError({"attach", "d", "--path", "/p", "--null-completion", "deferred",
                        "--vhost-socket", "/s"}),
            "attach: --null-completion needs --null-size");
  EXPECT_TRUE(absl::StartsWith(UsageError({"attach", "d", "--null-size", "1G", "--null-completion",
                                           "soon", "--vhost-socket", "/s"}),
                               "attach: --null-completion: "))
      << UsageError({"attach", "d", "--null-size", "1G", "--null-completion", "soon",
                     "--vhost-socket", "/s"});
  EXPECT_TRUE(
      absl::StartsWith(UsageError({"attach", "d", "--null-size", "lots", "--vhost-socket", "/s"}),
                       "attach: --null-size: invalid size"));
  EXPECT_EQ(UsageError({"attach", "dev0", "--path", "/p"}),
            "attach: a frontend is required: --xen-domid N --xen-vdev DEV, or --vhost-socket PATH");
  EXPECT_EQ(
      UsageError({"attach", "dev0", "--path", "/p", "--xen-domid", "1", "--vhost-socket", "/s"}),
      "attach: --xen-* and --vhost-* flags are exclusive: a device has one frontend");
  EXPECT_EQ(UsageError({"attach", "--path", "/p", "--vhost-socket", "/s"}),
            "attach: missing device ID");
  EXPECT_EQ(UsageError({"attach", "a", "b", "--path", "/p", "--vhost-socket", "/s"}),
            "attach: unexpected argument \"b\"");
  EXPECT_EQ(UsageError({"attach", "d", "--path", "/p", "--vhost-socket", "/s", "--cache", "99"}),
            "attach: --cache: invalid cache mode \"99\" (one of: none, writeback, writethrough)");
  EXPECT_EQ(UsageError({"attach", "d", "--path", "/p", "--vhost-socket", "/s", "--lbs", "1024"}),
            "attach: --lbs: invalid logical block size \"1024\" (one of: 512, 4096)");
  EXPECT_EQ(UsageError({"attach", "d", "--path", "/p", "--xen-domid", "-1"}),
            "attach: --xen-domid: invalid number \"-1\" (expected 0..4294967295)");
  EXPECT_EQ(UsageError({"attach", "d", "--path", "/p", "--vhost-socket", "/s", "--read-only=x"}),
            "attach: --read-only: invalid boolean \"x\" (one of: true, false)");
  EXPECT_EQ(UsageError({"attach", "d", "--path"}), "attach: flag --path needs a value (PATH)");
  EXPECT_EQ(UsageError({"attach", "d", "--path", "/a", "--path", "/b", "--vhost-socket", "/s"}),
            "attach: flag --path given twice with different values");
  EXPECT_EQ(UsageError({"attach", "d", "--bogus"}), "attach: unknown flag --bogus");
  EXPECT_EQ(UsageError({"attach", "d", "-p", "/x"}),
            "attach: unknown flag -p (flags start with --)");
  // Flags of one command are not accepted by another.
  EXPECT_EQ(UsageError({"get", "d", "--force"}), "get: unknown flag --force");
}

TEST(CommandLineTest, OtherCommandsBuildTheirRequests) {
  ExpectRequest<v1::DrainDeviceRequest>(Parse({"drain", "d", "--timeout", "1m30s"}),
                                        R"pb(device_id: "d"
                                             timeout { seconds: 90 })pb");
  ExpectRequest<v1::DrainDeviceRequest>(Parse({"drain", "d", "--timeout=250ms"}),
                                        R"pb(device_id: "d"
                                             timeout { nanos: 250000000 })pb");
  ExpectRequest<v1::DrainDeviceRequest>(Parse({"drain", "d"}), R"pb(device_id: "d")pb");
  ExpectRequest<v1::ResumeDeviceRequest>(Parse({"resume", "d"}), R"pb(device_id: "d")pb");
  ExpectRequest<v1::DetachDeviceRequest>(Parse({"detach", "d", "--force"}), R"pb(device_id: "d"
                                                                                 force: true)pb");
  ExpectRequest<v1::DetachDeviceRequest>(Parse({"detach", "d", "--timeout", "5"}),
                                         R"pb(device_id: "d"
                                              timeout { seconds: 5 })pb");
  ExpectRequest<v1::ResizeDeviceRequest>(Parse({"resize", "d", "--size", "2G"}),
                                         R"pb(device_id: "d" new_size_bytes: 2147483648)pb");
  ExpectRequest<v1::ResizeDeviceRequest>(
      Parse({"resize", "d", "--size=512M", "--allow-shrink"}),
      R"pb(device_id: "d" new_size_bytes: 536870912 allow_shrink: true)pb");
  ExpectRequest<v1::GetDeviceRequest>(Parse({"get", "d"}), R"pb(device_id: "d")pb");
  ExpectRequest<v1::GetDeviceStatsRequest>(Parse({"stats", "d"}), R"pb(device_id: "d")pb");
  ExpectRequest<v1::WatchDevicesRequest>(Parse({"watch"}), "");
  ExpectRequest<v1::WatchDevicesRequest>(Parse({"watch", "d"}), R"pb(device_id: "d")pb");
  ExpectRequest<v1::ListDevicesRequest>(Parse({"list"}), "");
  ExpectRequest<v1::ListDevicesRequest>(
      Parse({"list", "--state", "connected", "--state=drained,failed", "--frontend", "xen",
             "--page-size", "7"}),
      R"pb(states: [ DEVICE_STATE_CONNECTED, DEVICE_STATE_DRAINED, DEVICE_STATE_FAILED ]
           frontend_kind: FRONTEND_KIND_XEN
           page_size: 7)pb");
}

TEST(CommandLineTest, OtherCommandsUsageErrors) {
  EXPECT_EQ(UsageError({"resize", "d"}), "resize: --size is required");
  EXPECT_EQ(UsageError({"resize", "d", "--size", "2X"}),
            "resize: --size: invalid size \"2X\": unknown unit (use K, M, G, T, P or E)");
  EXPECT_EQ(UsageError({"drain", "d", "--timeout", "-1s"}),
            "drain: --timeout: invalid duration \"-1s\": must be finite and not negative");
  EXPECT_EQ(UsageError({"list", "--frontend", "scsi"}),
            "list: --frontend: invalid frontend kind \"scsi\" (one of: xen, vhost-user)");
  EXPECT_EQ(UsageError({"list", "--page-size", "-3"}),
            "list: --page-size: invalid number \"-3\" (expected 0..2147483647)");
  EXPECT_EQ(UsageError({"list", "extra"}), "list: unexpected argument \"extra\"");
  EXPECT_EQ(UsageError({"get"}), "get: missing device ID");
  EXPECT_EQ(UsageError({"watch", "a", "b"}), "watch: unexpected argument \"b\"");
  EXPECT_EQ(UsageError({}),
            "missing command (attach, drain, resume, detach, resize, get, list, watch, stats)");
  EXPECT_EQ(UsageError({"frobnicate"}), "unknown command \"frobnicate\"");
  EXPECT_EQ(UsageError({"--path", "/x", "attach"}), "flag --path goes after the command");
}

TEST(CommandLineTest, GlobalFlagsAnywhereWithDefaults) {
  auto invocation = Parse({"get", "d"}, ParseDefaults{.socket = "/tmp/env.sock"});
  ASSERT_TRUE(invocation.ok());
  EXPECT_EQ(invocation->global.socket, "/tmp/env.sock");
  EXPECT_EQ(invocation->global.address, "");
  EXPECT_EQ(invocation->global.deadline, absl::Seconds(30));
  EXPECT_FALSE(invocation->global.deadline_set);
  EXPECT_FALSE(invocation->global.json);

  invocation = Parse({"--socket", "/a.sock", "get", "d", "--json", "--deadline=2m"},
                     ParseDefaults{.socket = "/tmp/env.sock"});
  ASSERT_TRUE(invocation.ok()) << invocation.status();
  EXPECT_EQ(invocation->global.socket, "/a.sock");
  EXPECT_EQ(invocation->global.deadline, absl::Minutes(2));
  EXPECT_TRUE(invocation->global.deadline_set);
  EXPECT_TRUE(invocation->global.json);

  invocation = Parse({"list", "--address", "127.0.0.1:7000"});
  ASSERT_TRUE(invocation.ok());
  EXPECT_EQ(invocation->global.address, "127.0.0.1:7000");
  EXPECT_EQ(invocation->global.socket, kDefaultSocket);

  EXPECT_EQ(UsageError({"list", "--socket", "/a", "--address", "h:1"}),
            "list: --socket and --address are exclusive");
  EXPECT_EQ(UsageError({"list", "--deadline", "0s"}), "list: --deadline: must be positive");
  EXPECT_EQ(UsageError({"list", "--deadline", "soon"}),
            "list: --deadline: invalid duration \"soon\" (examples: 30s, 500ms, 2m, 1h30m)");
  EXPECT_EQ(UsageError({"list", "--socket="}), "list: --socket: must not be empty");

  // Mutual TLS: the three files together, over --address only.
  invocation = Parse({"list", "--address", "h:1", "--tls-ca", "/ca.pem", "--tls-cert", "/c.pem",
                      "--tls-key", "/k.pem"});
  ASSERT_TRUE(invocation.ok()) << invocation.status();
  EXPECT_EQ(invocation->global.tls_ca_file, "/ca.pem");
  EXPECT_EQ(invocation->global.tls_cert_file, "/c.pem");
  EXPECT_EQ(invocation->global.tls_key_file, "/k.pem");
  EXPECT_EQ(UsageError({"list", "--address", "h:1", "--tls-ca", "/ca.pem"}),
            "list: --tls-ca, --tls-cert and --tls-key go together (mutual TLS needs all three)");
  EXPECT_EQ(UsageError({"list", "--tls-ca", "/a", "--tls-cert", "/c", "--tls-key", "/k"}),
            "list: --tls-* need --address HOST:PORT (the unix socket does not use TLS)");
  EXPECT_EQ(
      UsageError({"list", "--address", "h:1", "--tls-ca=", "--tls-cert", "/c", "--tls-key", "/k"}),
      "list: --tls-ca: must not be empty");
}

TEST(CommandLineTest, DoubleDashEndsFlags) {
  ExpectRequest<v1::GetDeviceRequest>(Parse({"get", "--", "--odd"}), R"pb(device_id: "--odd")pb");
}

TEST(CommandLineTest, HelpEverywhere) {
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"--help"}, {"-h"}, {"help"}}) {
    const auto invocation = Parse(args);
    ASSERT_TRUE(invocation.ok());
    ASSERT_TRUE(invocation->help.has_value());
    EXPECT_EQ(*invocation->help, GeneralHelp());
  }
  for (const char* command :
       {"attach", "drain", "resume", "detach", "resize", "get", "list", "watch", "stats"}) {
    for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
             {command, "--help"}, {"help", command}, {"--help", command}, {command, "x", "-h"}}) {
      const auto invocation = Parse(args);
      ASSERT_TRUE(invocation.ok()) << command;
      ASSERT_TRUE(invocation->help.has_value());
      EXPECT_TRUE(absl::StartsWith(*invocation->help, absl::StrCat("Usage: bpctl ", command)))
          << *invocation->help;
      EXPECT_TRUE(absl::StrContains(*invocation->help, "--socket PATH")) << command;
    }
    EXPECT_TRUE(absl::StrContains(GeneralHelp(), absl::StrCat("  ", command, " "))) << command;
  }
  // Help of attach documents every spec flag.
  const std::string attach_help = *Parse({"attach", "--help"})->help;
  for (const char* flag :
       {"--path", "--format", "--cache", "--read-only", "--discard", "--detect-zeroes", "--lbs",
        "--error-policy", "--xen-domid", "--xen-vdev", "--xen-max-queues",
        "--xen-max-ring-page-order", "--xen-persistent-grants", "--xen-max-indirect-segments",
        "--xen-disable-indirect", "--xen-poll-us", "--vhost-socket", "--vhost-queues",
        "--vhost-queue-size"}) {
    EXPECT_TRUE(absl::StrContains(attach_help, flag)) << flag;
  }
  // --help wins over otherwise invalid input, like a missing --path.
  EXPECT_TRUE(Parse({"attach", "--help", "--cache", "x"}).ok());
}

TEST(CommandLineTest, CommandNamesMatchRequestTypes) {
  EXPECT_EQ(CommandName(v1::AttachDeviceRequest()), "attach");
  EXPECT_EQ(CommandName(v1::DrainDeviceRequest()), "drain");
  EXPECT_EQ(CommandName(v1::ResumeDeviceRequest()), "resume");
  EXPECT_EQ(CommandName(v1::DetachDeviceRequest()), "detach");
  EXPECT_EQ(CommandName(v1::ResizeDeviceRequest()), "resize");
  EXPECT_EQ(CommandName(v1::GetDeviceRequest()), "get");
  EXPECT_EQ(CommandName(v1::ListDevicesRequest()), "list");
  EXPECT_EQ(CommandName(v1::WatchDevicesRequest()), "watch");
  EXPECT_EQ(CommandName(v1::GetDeviceStatsRequest()), "stats");
}

}  // namespace
}  // namespace blockplane::controller::cli
