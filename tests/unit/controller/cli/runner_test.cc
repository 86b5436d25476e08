#include "controller/cli/runner.h"

#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "blockplane/v1/device.grpc.pb.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "gtest/gtest.h"

namespace blockplane::controller::cli {
namespace cli = ::blockplane::controller::cli;
namespace {

// A DeviceService that answers from a fixed list of devices and records what it was asked.
class FakeDeviceService final : public v1::DeviceService::Service {
 public:
  explicit FakeDeviceService(int devices) {
    for (int i = 0; i < devices; ++i) {
      v1::Device device;
      device.set_id(absl::StrCat("dev", i));
      device.mutable_spec()->mutable_backend()->set_path(absl::StrCat("/srv/", i, ".img"));
      device.mutable_spec()->mutable_xen()->set_domid(i + 1);
      device.mutable_status()->set_state(v1::DEVICE_STATE_CONNECTED);
      device.mutable_status()->set_size_bytes(uint64_t{1} << 30);
      devices_.push_back(device);
    }
  }

  grpc::Status ListDevices(grpc::ServerContext*, const v1::ListDevicesRequest* request,
                           v1::ListDevicesResponse* response) override {
    absl::MutexLock lock(&mu_);
    list_requests_.push_back(*request);
    if (repeat_page_token_) {
      response->set_next_page_token("same");
      return grpc::Status::OK;
    }
    const size_t page_size = request->page_size() == 0 ? 2 : request->page_size();
    size_t start = 0;
    if (!request->page_token().empty()) start = std::stoul(request->page_token());
    for (size_t i = start; i < devices_.size() && i < start + page_size; ++i) {
      *response->add_devices() = devices_[i];
    }
    if (start + page_size < devices_.size()) {
      response->set_next_page_token(absl::StrCat(start + page_size));
    }
    return grpc::Status::OK;
  }

  grpc::Status GetDevice(grpc::ServerContext*, const v1::GetDeviceRequest* request,
                         v1::Device* response) override {
    for (const v1::Device& device : devices_) {
      if (device.id() == request->device_id()) {
        *response = device;
        return grpc::Status::OK;
      }
    }
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        absl::StrCat("device_id: no device \"", request->device_id(), "\""));
  }

  grpc::Status AttachDevice(grpc::ServerContext*, const v1::AttachDeviceRequest* request,
                            v1::Device* response) override {
    absl::MutexLock lock(&mu_);
    last_attach_ = *request;
    response->set_id(request->device_id());
    *response->mutable_spec() = request->spec();
    response->mutable_status()->set_state(v1::DEVICE_STATE_WAITING_FOR_FRONTEND);
    return grpc::Status::OK;
  }

  grpc::Status DrainDevice(grpc::ServerContext* context, const v1::DrainDeviceRequest* request,
                           v1::Device* response) override {
    absl::MutexLock lock(&mu_);
    drain_time_left_ = absl::FromChrono(context->deadline()) - absl::Now();
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "timeout: 3 requests still in flight");
  }

  grpc::Status DetachDevice(grpc::ServerContext*, const v1::DetachDeviceRequest* request,
                            v1::DetachDeviceResponse* response) override {
    response->set_device_id(request->device_id());
    return grpc::Status::OK;
  }

  grpc::Status ResizeDevice(grpc::ServerContext*, const v1::ResizeDeviceRequest* request,
                            v1::Device* response) override {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        "new_size_bytes: must be a multiple of 512");
  }

  grpc::Status GetDeviceStats(grpc::ServerContext*, const v1::GetDeviceStatsRequest* request,
                              v1::DeviceStats* response) override {
    response->set_device_id(request->device_id());
    response->set_in_flight(7);
    auto* op = response->add_ops();
    op->set_op("write");
    op->set_operations(2);
    return grpc::Status::OK;
  }

  // A snapshot of every device, then: the end of the stream, or for device_id "forever", the
  // callback, and waiting until the client cancels.
  grpc::Status WatchDevices(grpc::ServerContext* context, const v1::WatchDevicesRequest* request,
                            grpc::ServerWriter<v1::DeviceEvent>* writer) override {
    uint64_t revision = 1;
    for (const v1::Device& device : devices_) {
      v1::DeviceEvent event;
      event.set_kind(v1::DeviceEvent::KIND_SNAPSHOT);
      event.set_revision(revision++);
      *event.mutable_device() = device;
      writer->Write(event);
    }
    v1::DeviceEvent complete;
    complete.set_kind(v1::DeviceEvent::KIND_SNAPSHOT_COMPLETE);
    complete.set_revision(revision);
    writer->Write(complete);
    if (request->device_id() != "forever") return grpc::Status::OK;
    if (on_waiting_) on_waiting_();
    while (!context->IsCancelled()) absl::SleepFor(absl::Milliseconds(1));
    return grpc::Status::CANCELLED;
  }

  std::vector<v1::ListDevicesRequest> list_requests() {
    absl::MutexLock lock(&mu_);
    return list_requests_;
  }
  v1::AttachDeviceRequest last_attach() {
    absl::MutexLock lock(&mu_);
    return last_attach_;
  }
  absl::Duration drain_time_left() {
    absl::MutexLock lock(&mu_);
    return drain_time_left_;
  }
  void set_repeat_page_token() { repeat_page_token_ = true; }
  void set_on_waiting(std::function<void()> callback) { on_waiting_ = std::move(callback); }

 private:
  std::vector<v1::Device> devices_;
  bool repeat_page_token_ = false;
  std::function<void()> on_waiting_;
  absl::Mutex mu_;
  std::vector<v1::ListDevicesRequest> list_requests_;
  v1::AttachDeviceRequest last_attach_;
  absl::Duration drain_time_left_;
};

class RunnerTest : public ::testing::Test {
 protected:
  void StartServer(int devices) {
    service_ = std::make_unique<FakeDeviceService>(devices);
    grpc::ServerBuilder builder;
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }

  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown();
  }

  // Parses `args` as bpctl's command line and runs it against the fake service.
  int RunCommand(std::vector<std::string> args, CallCanceller* canceller = nullptr) {
    out_.str("");
    err_.str("");
    auto invocation = ParseCommandLine(args, ParseDefaults{});
    EXPECT_TRUE(invocation.ok()) << invocation.status();
    if (!invocation.ok()) return -1;
    return cli::Run(*invocation, server_->InProcessChannel(grpc::ChannelArguments()), out_, err_,
                    canceller);
  }

  std::unique_ptr<FakeDeviceService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::ostringstream out_;
  std::ostringstream err_;
};

TEST_F(RunnerTest, ListFollowsEveryPageKeepingTheFilter) {
  StartServer(5);
  ASSERT_EQ(RunCommand({"list", "--state", "connected", "--frontend", "xen"}), kExitOk)
      << err_.str();
  const std::string out = out_.str();
  EXPECT_TRUE(absl::StartsWith(out, "ID    STATE      SIZE  PID  GEN  FRONTEND")) << out;
  size_t previous = 0;
  for (int i = 0; i < 5; ++i) {
    const size_t at = out.find(absl::StrCat("\ndev", i, "  "));
    ASSERT_NE(at, std::string::npos) << i << "\n" << out;
    EXPECT_GT(at, previous) << "devices out of order";
    previous = at;
  }
  const auto requests = service_->list_requests();
  ASSERT_EQ(requests.size(), 3u);
  EXPECT_EQ(requests[0].page_token(), "");
  EXPECT_EQ(requests[1].page_token(), "2");
  EXPECT_EQ(requests[2].page_token(), "4");
  for (const auto& request : requests) {
    ASSERT_EQ(request.states_size(), 1);
    EXPECT_EQ(request.states(0), v1::DEVICE_STATE_CONNECTED);
    EXPECT_EQ(request.frontend_kind(), v1::FRONTEND_KIND_XEN);
  }
  EXPECT_EQ(err_.str(), "");
}

TEST_F(RunnerTest, ListJsonIsOneResponseWithEveryDevice) {
  StartServer(3);
  ASSERT_EQ(RunCommand({"list", "--json", "--page-size", "1"}), kExitOk) << err_.str();
  v1::ListDevicesResponse response;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(out_.str(), &response).ok())
      << out_.str();
  ASSERT_EQ(response.devices_size(), 3);
  EXPECT_EQ(response.devices(2).id(), "dev2");
  EXPECT_EQ(response.next_page_token(), "");
  EXPECT_EQ(service_->list_requests().size(), 3u);
}

TEST_F(RunnerTest, ListEmpty) {
  StartServer(0);
  ASSERT_EQ(RunCommand({"list"}), kExitOk);
  EXPECT_EQ(out_.str(), "No devices.\n");
}

TEST_F(RunnerTest, ListGivesUpOnARepeatedPageToken) {
  StartServer(1);
  service_->set_repeat_page_token();
  EXPECT_EQ(RunCommand({"list"}), kExitServerError);
  EXPECT_EQ(err_.str(), "bpctl: the server returned the same page token twice; giving up\n");
  EXPECT_EQ(service_->list_requests().size(), 2u);
}

TEST_F(RunnerTest, ServerErrorsPrintCodeAndMessageAndExitOne) {
  StartServer(1);
  EXPECT_EQ(RunCommand({"get", "nope"}), kExitServerError);
  EXPECT_EQ(err_.str(), "bpctl: NOT_FOUND: device_id: no device \"nope\"\n");
  EXPECT_EQ(out_.str(), "");
  EXPECT_EQ(RunCommand({"resize", "dev0", "--size", "1000"}), kExitServerError);
  EXPECT_EQ(err_.str(), "bpctl: INVALID_ARGUMENT: new_size_bytes: must be a multiple of 512\n");
}

TEST_F(RunnerTest, AttachSendsTheSpecAndPrintsTheDevice) {
  StartServer(0);
  ASSERT_EQ(RunCommand({"attach", "dev9", "--path", "/srv/9.img", "--vhost-socket", "/run/9.sock",
                        "--vhost-queue-size", "128"}),
            kExitOk)
      << err_.str();
  const v1::AttachDeviceRequest sent = service_->last_attach();
  EXPECT_EQ(sent.device_id(), "dev9");
  EXPECT_EQ(sent.spec().vhost_user().queue_size(), 128u);
  EXPECT_TRUE(absl::StrContains(out_.str(), "state:            waiting-for-frontend"))
      << out_.str();
  EXPECT_TRUE(absl::StrContains(out_.str(), "vhost-user /run/9.sock")) << out_.str();
}

TEST_F(RunnerTest, GetJson) {
  StartServer(2);
  ASSERT_EQ(RunCommand({"--json", "get", "dev1"}), kExitOk);
  v1::Device device;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(out_.str(), &device).ok());
  EXPECT_EQ(device.id(), "dev1");
  EXPECT_EQ(device.spec().xen().domid(), 2u);
}

TEST_F(RunnerTest, DrainDeadlineLeavesRoomForTheDrainTimeout) {
  StartServer(1);
  // The default 30 s deadline would end a 2-minute drain early; the call gets more.
  EXPECT_EQ(RunCommand({"drain", "dev0", "--timeout", "2m"}), kExitServerError);
  EXPECT_GT(service_->drain_time_left(), absl::Minutes(2));
  EXPECT_EQ(err_.str(), "bpctl: DEADLINE_EXCEEDED: timeout: 3 requests still in flight\n");
  // An explicit --deadline is obeyed.
  EXPECT_EQ(RunCommand({"drain", "dev0", "--timeout", "2m", "--deadline", "20s"}),
            kExitServerError);
  EXPECT_LT(service_->drain_time_left(), absl::Seconds(21));
  EXPECT_GT(service_->drain_time_left(), absl::ZeroDuration());
}

TEST_F(RunnerTest, DetachAndStats) {
  StartServer(1);
  ASSERT_EQ(RunCommand({"detach", "dev0", "--force"}), kExitOk);
  EXPECT_EQ(out_.str(), "Detached dev0.\n");
  ASSERT_EQ(RunCommand({"detach", "dev0", "--json"}), kExitOk);
  EXPECT_TRUE(absl::StrContains(out_.str(), "\"deviceId\": \"dev0\"")) << out_.str();
  ASSERT_EQ(RunCommand({"stats", "dev0"}), kExitOk);
  EXPECT_TRUE(absl::StrContains(out_.str(), "in flight:          7\n")) << out_.str();
  EXPECT_TRUE(absl::StrContains(out_.str(), "\nwrite  2 ")) << out_.str();
}

TEST_F(RunnerTest, WatchPrintsEventsUntilTheStreamEnds) {
  StartServer(2);
  ASSERT_EQ(RunCommand({"watch"}), kExitOk) << err_.str();
  EXPECT_EQ(out_.str(),
            "- rev=1 snapshot dev0 connected size=1G pid=0 gen=0\n"
            "- rev=2 snapshot dev1 connected size=1G pid=0 gen=0\n"
            "- rev=3 snapshot-complete\n");
  ASSERT_EQ(RunCommand({"watch", "--json"}), kExitOk);
  // JSON Lines: one compact object per event.
  std::istringstream lines(out_.str());
  std::string line;
  int count = 0;
  while (std::getline(lines, line)) {
    v1::DeviceEvent event;
    ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(line, &event).ok()) << line;
    EXPECT_EQ(event.revision(), static_cast<uint64_t>(++count));
  }
  EXPECT_EQ(count, 3);
}

TEST_F(RunnerTest, WatchEndsWithSuccessWhenCancelled) {
  StartServer(1);
  CallCanceller canceller;
  // The server cancels the client's call once it has sent the snapshot, as Ctrl-C would.
  service_->set_on_waiting([&canceller] { canceller.Cancel(); });
  EXPECT_EQ(RunCommand({"watch", "forever"}, &canceller), kExitOk) << err_.str();
  EXPECT_TRUE(canceller.cancelled());
  EXPECT_TRUE(absl::StrContains(out_.str(), "snapshot-complete")) << out_.str();
  EXPECT_EQ(err_.str(), "");
}

TEST_F(RunnerTest, CancelledBeforeTheCallStartsUnaryFails) {
  StartServer(1);
  CallCanceller canceller;
  canceller.Cancel();
  EXPECT_EQ(RunCommand({"get", "dev0"}, &canceller), kExitServerError);
  EXPECT_TRUE(absl::StartsWith(err_.str(), "bpctl: CANCELLED: ")) << err_.str();
}

TEST(RunnerConnectionTest, MissingSocketIsUnavailable) {
  auto invocation = ParseCommandLine({"get", "x", "--socket", "/nonexistent/bp.sock"}, {});
  ASSERT_TRUE(invocation.ok());
  std::ostringstream out, err;
  auto channel = MakeChannel(invocation->global);
  ASSERT_TRUE(channel.ok()) << channel.status();
  EXPECT_EQ(cli::Run(*invocation, *channel, out, err, nullptr), kExitServerError);
  EXPECT_TRUE(absl::StartsWith(err.str(), "bpctl: UNAVAILABLE: ")) << err.str();
  EXPECT_EQ(out.str(), "");
}

TEST(RunnerConnectionTest, UnreadableTlsFileIsNamed) {
  auto invocation =
      ParseCommandLine({"list", "--address", "127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem",
                        "--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"},
                       {});
  ASSERT_TRUE(invocation.ok()) << invocation.status();
  auto channel = MakeChannel(invocation->global);
  ASSERT_FALSE(channel.ok());
  EXPECT_EQ(channel.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(
      absl::StartsWith(channel.status().message(), "--tls-ca: cannot read /nonexistent/ca.pem: "))
      << channel.status();
}

TEST(StatusCodeNameTest, Names) {
  EXPECT_EQ(StatusCodeName(grpc::StatusCode::NOT_FOUND), "NOT_FOUND");
  EXPECT_EQ(StatusCodeName(grpc::StatusCode::FAILED_PRECONDITION), "FAILED_PRECONDITION");
  EXPECT_EQ(StatusCodeName(static_cast<grpc::StatusCode>(99)), "CODE_99");
}

}  // namespace
}  // namespace blockplane::controller::cli
