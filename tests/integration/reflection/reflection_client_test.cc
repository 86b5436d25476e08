// Runs reflection_client.py (Debian's /usr/bin/python3, no .proto files, no generated code)
// against a real blockplaned started by the controller integration fixture.

#include <string>

#include "absl/strings/match.h"
#include "blockplane/v1/device.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/integration/controller/fixture.h"

namespace blockplane::testing {
namespace {

constexpr uint64_t kDiskSize = 64 << 20;

CommandResult RunClient(const ControllerProcess& controller, std::vector<std::string> args) {
  std::vector<std::string> argv = {"/usr/bin/python3", BLOCKPLANE_REFLECTION_CLIENT, "--socket",
                                   controller.socket_path()};
  argv.insert(argv.end(), args.begin(), args.end());
  return RunCommand(argv);
}

std::vector<std::string> ListIds(ControllerProcess& controller) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  v1::ListDevicesResponse response;
  grpc::Status status = controller.stub().ListDevices(&context, {}, &response);
  EXPECT_TRUE(status.ok()) << status.error_message();
  std::vector<std::string> ids;
  for (const v1::Device& device : response.devices()) ids.push_back(device.id());
  return ids;
}

// The client attaches two devices through reflection-built messages, lists them one page at a
// time, reads one back, and detaches them (see the checks in reflection_client.py).
TEST(ReflectionClientTest, AttachesListsAndDetachesThroughReflectionOnly) {
  ControllerProcess controller;
  ASSERT_NO_FATAL_FAILURE(controller.Start());
  const std::string a = controller.CreateDisk("a.img", kDiskSize);
  const std::string b = controller.CreateDisk("b.img", kDiskSize);

  CommandResult result =
      RunClient(controller, {"--attach-path", a, "--attach-path", b, "--vhost-socket-dir",
                             controller.dir(), "--expect-size", std::to_string(kDiskSize)});
  ASSERT_EQ(result.exit_code, 0) << "stdout:\n" << result.out << "stderr:\n" << result.err;
  EXPECT_TRUE(absl::StrContains(result.out, "blockplane.v1.DeviceService")) << result.out;
  EXPECT_TRUE(absl::StrContains(result.out, "grpc.health.v1.Health")) << result.out;
  EXPECT_TRUE(absl::StrContains(result.out, "grpc.reflection.v1alpha.ServerReflection"))
      << result.out;
  EXPECT_TRUE(absl::StrContains(result.out, "health: SERVING")) << result.out;
  EXPECT_TRUE(absl::StrContains(result.out, "devices after attach: ['reflection0', 'reflection1']"))
      << result.out;
  EXPECT_TRUE(absl::StrContains(result.out, "\nOK\n")) << result.out;
  // What the client detached is gone for the C++ client too.
  EXPECT_TRUE(ListIds(controller).empty());
}

// A device attached with the generated C++ stub shows up in the reflection client's ListDevices.
TEST(ReflectionClientTest, ListsADeviceAttachedByAnotherClient) {
  ControllerProcess controller;
  ASSERT_NO_FATAL_FAILURE(controller.Start());
  v1::AttachDeviceRequest request;
  request.set_device_id("seen-by-python");
  *request.mutable_spec() = XenSpec(controller.CreateDisk("c.img", kDiskSize), 3, "xvdc");
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  v1::Device device;
  grpc::Status status = controller.stub().AttachDevice(&context, request, &device);
  ASSERT_TRUE(status.ok()) << status.error_message();

  CommandResult result = RunClient(controller, {});
  ASSERT_EQ(result.exit_code, 0) << "stdout:\n" << result.out << "stderr:\n" << result.err;
  EXPECT_TRUE(absl::StrContains(result.out, "devices before: ['seen-by-python']")) << result.out;
  // The device printed as JSON, decoded with the reflected schema.
  EXPECT_TRUE(absl::StrContains(result.out, "\"virtualDevice\": \"xvdc\"")) << result.out;
  EXPECT_TRUE(absl::StrContains(result.out, "\"domid\": 3")) << result.out;
}

// The client fails (exit status 1) when there is no server; it does not hang.
TEST(ReflectionClientTest, FailsWithoutAServer) {
  ControllerProcess controller;  // never started: its socket does not exist
  CommandResult result = RunClient(controller, {"--timeout", "1"});
  EXPECT_EQ(result.exit_code, 1);
  EXPECT_TRUE(absl::StrContains(result.err, "reflection_client: FAILED: cannot connect"))
      << result.err;
}

}  // namespace
}  // namespace blockplane::testing
