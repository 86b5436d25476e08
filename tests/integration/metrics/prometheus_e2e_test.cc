// End to end with a real Prometheus (Debian's `prometheus`): the deploy config, pointed at a test
// controller's /sd with 1 s intervals, finds the worker; a known workload through the worker's
// self-test I/O path shows up as exact byte counters; after kill -9 of the worker the counters
// continue from where they were, in the same series, with no reset as Prometheus sees it.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_replace.h"
#include "google/protobuf/struct.pb.h"
#include "google/protobuf/util/json_util.h"
#include "gtest/gtest.h"
#include "tests/integration/metrics/metrics_fixture.h"

extern char** environ;

namespace blockplane::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

// A loopback port nobody listens on right now (Prometheus cannot be told to pick one).
int FreeLoopbackPort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return 0;
  }
  close(fd);
  return ntohs(addr.sin_port);
}

std::string UrlEncode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (isalnum(c) || c == '_' || c == '-' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      char buf[4];
      snprintf(buf, sizeof(buf), "%%%02X", c);
      out += buf;
    }
  }
  return out;
}

// Debian's prometheus on 127.0.0.1:<port>, storage in a temp dir; stopped (SIGTERM, then
// SIGKILL) when destroyed.
class PrometheusProcess {
 public:
  PrometheusProcess(const std::string& config, const std::string& dir) {
    port_ = FreeLoopbackPort();
    address_ = "127.0.0.1:" + std::to_string(port_);
    log_ = dir + "/prometheus.log";
    std::vector<std::string> args = {"/usr/bin/prometheus", "--config.file=" + config,
                                     "--storage.tsdb.path=" + dir + "/data",
                                     "--web.listen-address=" + address_, "--log.level=warn"};
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    if (posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&actions);
  }
  ~PrometheusProcess() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    bool exited = WaitFor([&] { return waitpid(pid_, nullptr, WNOHANG) == pid_; }, 10000);
    if (!exited) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  bool started() const { return pid_ > 0 && port_ > 0; }
  const std::string& address() const { return address_; }
  std::string log() const { return ReadFile(log_); }

  // Waits (bounded) until Prometheus answers /-/ready.
  bool WaitReady() {
    return WaitFor(
        [&] {
          std::string body;
          return HttpGetStatus(address_, "/-/ready", &body) == 200;
        },
        30000);
  }

  // The values of an instant query's result vector (one per series); empty on any error.
  std::vector<double> Query(const std::string& promql) {
    std::string body;
    if (HttpGetStatus(address_, "/api/v1/query?query=" + UrlEncode(promql), &body) != 200) {
      return {};
    }
    google::protobuf::Struct response;
    if (!google::protobuf::util::JsonStringToMessage(body, &response).ok()) return {};
    std::vector<double> out;
    const auto& result =
        response.fields().at("data").struct_value().fields().at("result").list_value();
    for (const auto& series : result.values()) {
      const auto& value = series.struct_value().fields().at("value").list_value();
      out.push_back(std::strtod(value.values(1).string_value().c_str(), nullptr));
    }
    return out;
  }

  // Polls `promql` (bounded) until it returns exactly one series equal to `want`.
  bool WaitForValue(const std::string& promql, double want, std::vector<double>* last) {
    return WaitFor(
        [&] {
          *last = Query(promql);
          return last->size() == 1 && (*last)[0] == want;
        },
        30000);
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::string address_, log_;
};

std::string CheckMetricsAt(const std::string& endpoint, const std::string& dir) {
  return PromtoolCheckMetrics(HttpGet(endpoint, "/metrics"), dir);
}

TEST(PrometheusEndToEndTest, ScrapedCountersMatchTheWorkloadAndSurviveAWorkerKill) {
  if (!std::filesystem::exists("/usr/bin/prometheus")) {
    GTEST_SKIP() << "Debian's prometheus is not installed";
  }
  ControllerProcess controller(
      {"--enable-self-test-io", "--metrics-host=127.0.0.1", "--metrics-listen=127.0.0.1:0"});
  controller.Start();
  const std::string controller_endpoint = ControllerMetricsEndpoint(controller);
  ASSERT_FALSE(controller_endpoint.empty());

  // The deploy config, pointed at this controller, with 1 s intervals.
  const std::string deploy = std::string(BLOCKPLANE_SOURCE_DIR) + "/deploy/prometheus";
  const std::string prom_dir = controller.dir() + "/prometheus";
  std::filesystem::create_directories(prom_dir);
  std::string config = ReadFile(deploy + "/prometheus.yml");
  ASSERT_NE(config.find("127.0.0.1:9477/sd"), std::string::npos);
  config = absl::StrReplaceAll(config, {{"127.0.0.1:9477", controller_endpoint}, {"15s", "1s"}});
  WriteFile(prom_dir + "/prometheus.yml", config);
  WriteFile(prom_dir + "/rules.yml", ReadFile(deploy + "/rules.yml"));
  CommandResult check =
      RunCommand({"/usr/bin/promtool", "check", "config", prom_dir + "/prometheus.yml"});
  ASSERT_EQ(check.exit_code, 0) << check.out << check.err;

  PrometheusProcess prometheus(prom_dir + "/prometheus.yml", prom_dir);
  ASSERT_TRUE(prometheus.started());
  ASSERT_TRUE(prometheus.WaitReady()) << prometheus.log();

  v1::Device device = AttachTestDevice(controller, "dev0", 8 * kMiB);
  RunSelfTestIo(controller, "dev0", 50, 4096, /*write=*/true);
  RunSelfTestIo(controller, "dev0", 20, 8192, /*write=*/false);
  EXPECT_EQ(CheckMetricsAt(device.status().metrics_endpoint(), controller.dir()), "");
  EXPECT_EQ(CheckMetricsAt(controller_endpoint, controller.dir()), "");

  const std::string written = R"(blockplane_device_bytes_total{device="dev0",op="write"})";
  const std::string read = R"(blockplane_device_bytes_total{device="dev0",op="read"})";
  std::vector<double> last;
  EXPECT_TRUE(prometheus.WaitForValue(written, 50 * 4096, &last))
      << (last.empty() ? -1 : last[0]) << "\n"
      << prometheus.log();
  EXPECT_TRUE(prometheus.WaitForValue(read, 20 * 8192, &last)) << (last.empty() ? -1 : last[0]);
  // The labels from service discovery are on the series.
  EXPECT_TRUE(prometheus.WaitForValue(
      R"(count(blockplane_device_operations_total{device="dev0",frontend="xen",domid="5",op="write",job="blockplane-workers"}))",
      1, &last));
  EXPECT_TRUE(prometheus.WaitForValue(
      R"(blockplane_controller_devices{job="blockplane-controller",state="waiting_for_frontend"})",
      1, &last));

  // kill -9 the worker; the next generation continues the counters.
  ASSERT_EQ(::kill(device.status().worker_pid(), SIGKILL), 0);
  v1::Device restarted;
  ASSERT_TRUE(WaitFor([&] {
    restarted = GetDevice(controller, "dev0");
    return restarted.status().worker_generation() == 2 &&
           !restarted.status().metrics_endpoint().empty() &&
           restarted.status().state() == v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
  }));
  RunSelfTestIo(controller, "dev0", 10, 4096, /*write=*/true);
  EXPECT_EQ(CheckMetricsAt(restarted.status().metrics_endpoint(), controller.dir()), "");
  // Generation 2 scraped (the new target came from /sd), and the bytes kept growing from where
  // they were: 50 + 10 writes of 4 KiB, reads unchanged.
  EXPECT_TRUE(
      prometheus.WaitForValue(R"(blockplane_device_worker_generation{device="dev0"})", 2, &last));
  EXPECT_TRUE(prometheus.WaitForValue(written, 60 * 4096, &last)) << (last.empty() ? -1 : last[0]);
  EXPECT_TRUE(prometheus.WaitForValue(read, 20 * 8192, &last)) << (last.empty() ? -1 : last[0]);
  // One series throughout, never reset as Prometheus sees it.
  EXPECT_TRUE(prometheus.WaitForValue("resets(" + written + "[5m])", 0, &last));
  EXPECT_TRUE(prometheus.WaitForValue(
      R"(blockplane_controller_worker_restarts_total{job="blockplane-controller"})", 1, &last));
  EXPECT_EQ(CheckMetricsAt(controller_endpoint, controller.dir()), "");
}

TEST(DeployTest, PrometheusConfigAndRulesPassPromtool) {
  const std::string deploy = std::string(BLOCKPLANE_SOURCE_DIR) + "/deploy";
  CommandResult config =
      RunCommand({"/usr/bin/promtool", "check", "config", deploy + "/prometheus/prometheus.yml"});
  EXPECT_EQ(config.exit_code, 0) << config.out << config.err;
  CommandResult rules =
      RunCommand({"/usr/bin/promtool", "check", "rules", deploy + "/prometheus/rules.yml"});
  EXPECT_EQ(rules.exit_code, 0) << rules.out << rules.err;
  EXPECT_NE(rules.out.find("5 rules found"), std::string::npos) << rules.out;
}

TEST(DeployTest, GrafanaDashboardIsJsonAndUsesOnlyDocumentedMetrics) {
  const std::string source = BLOCKPLANE_SOURCE_DIR;
  std::string dashboard = ReadFile(source + "/deploy/grafana/blockplane.json");
  google::protobuf::Struct parsed;
  ASSERT_TRUE(google::protobuf::util::JsonStringToMessage(dashboard, &parsed).ok());
  ASSERT_GT(parsed.fields().at("panels").list_value().values_size(), 4);
  std::string docs = ReadFile(source + "/docs/metrics.md");
  for (const char* metric :
       {"blockplane_device_operations_total", "blockplane_device_bytes_total",
        "blockplane_device_latency_seconds_bucket", "blockplane_device_failed_total",
        "blockplane_device_in_flight_requests", "blockplane_device_ring_requests_total",
        "blockplane_device_ring_full_stalls_total", "blockplane_device_invalid_requests_total"}) {
    EXPECT_NE(dashboard.find(metric), std::string::npos) << metric;
    std::string base = absl::StrReplaceAll(metric, {{"_bucket", ""}});
    EXPECT_NE(docs.find(base), std::string::npos) << base;
  }
}

}  // namespace
}  // namespace blockplane::testing
