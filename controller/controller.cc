#include "controller/controller.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/pem_file.h"
#include "controller/metrics/api_metrics_interceptor.h"
#include "grpc/health/v1/health.pb.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"

namespace blockplane::controller {
namespace {

std::string DefaultWorkerBinary() {
  char self[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return "blockplane-worker";
  self[n] = '\0';
  return (std::filesystem::path(self).parent_path() / "blockplane-worker").string();
}

// A socket file left by a controller that died is removed; one that answers belongs to a live
// controller and is an error.
absl::Status PrepareSocketPath(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("--socket: cannot create the folder of ", path, ": ", ec.message()));
  }
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("--socket: ", path, " is too long"));
  }
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return absl::OkStatus();
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("--socket: ", path, " exists and is not a socket"));
  }
  memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  common::UniqueFd fd(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("--socket: another blockplaned is serving on ", path));
  }
  unlink(path.c_str());
  return absl::OkStatus();
}

// Every device, page by page (for /metrics and /sd).
// Mutual TLS for the TCP listener (--tls-*), or plaintext without them.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> TcpCredentials(
    const ControllerOptions& options) {
  if (options.tls_cert_file.empty()) return grpc::InsecureServerCredentials();
  absl::StatusOr<std::string> cert = common::ReadPemFile("--tls-cert", options.tls_cert_file);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = common::ReadPemFile("--tls-key", options.tls_key_file);
  if (!key.ok()) return key.status();
  absl::StatusOr<std::string> ca =
      common::ReadPemFile("--tls-client-ca", options.tls_client_ca_file);
  if (!ca.ok()) return ca.status();
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_root_certs = *ca;
  ssl.pem_key_cert_pairs.push_back({*key, *cert});
  return grpc::SslServerCredentials(ssl);
}

std::vector<v1::Device> AllDevices(DeviceManager* manager) {
  std::vector<v1::Device> out;
  v1::ListDevicesRequest request;
  request.set_page_size(1000);
  for (;;) {
    absl::StatusOr<v1::ListDevicesResponse> page = manager->List(request);
    if (!page.ok()) break;
    for (v1::Device& d : *page->mutable_devices()) out.push_back(std::move(d));
    if (page->next_page_token().empty()) break;
    request.set_page_token(page->next_page_token());
  }
  return out;
}

}  // namespace

Controller::Controller(ControllerOptions options) : options_(std::move(options)) {}

Controller::~Controller() { Shutdown(); }

absl::Status Controller::Start() {
  std::error_code ec;
  std::filesystem::create_directories(options_.state_dir, ec);
  if (ec) {
    return absl::FailedPreconditionError(
        absl::StrCat("--state-dir: cannot create ", options_.state_dir, ": ", ec.message()));
  }
  // One controller per state dir: two would both adopt and restart the same workers.
  state_lock_.Reset(
      open((options_.state_dir + "/lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  if (!state_lock_ || flock(state_lock_.get(), LOCK_EX | LOCK_NB) != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("--state-dir: ", options_.state_dir, " is in use by another blockplaned"));
  }
  absl::StatusOr<std::unique_ptr<Registry>> registry =
      Registry::Open(options_.state_dir + "/registry.db");
  if (!registry.ok()) return registry.status();
  registry_ = std::move(*registry);

  ManagerOptions m;
  m.state_dir = options_.state_dir;
  m.backing_roots = options_.backing_roots;
  m.spawn.worker_binary =
      options_.worker_binary.empty() ? DefaultWorkerBinary() : options_.worker_binary;
  m.spawn.log_level = options_.log_level;
  m.max_restarts = options_.max_restarts;
  m.restart_window = std::chrono::seconds(options_.restart_window_seconds);
  m.metrics_host = options_.metrics_host;
  if (!options_.metrics_listen.empty()) {
    metrics_ = std::make_unique<ControllerMetrics>();
    m.metrics = metrics_.get();
  }
  m.xen_platform = options_.xen_platform;
  m.xen_run_dir = options_.xen_run_dir;
  m.xen_grant_copy = options_.xen_grant_copy;
  m.xen_max_persistent_grants = options_.xen_max_persistent_grants;
  m.xen_poll_us = options_.xen_poll_us;
  if (access(m.spawn.worker_binary.c_str(), X_OK) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("--worker-binary: ", m.spawn.worker_binary,
                                                      " is not executable: ", strerror(errno)));
  }
  if (options_.backing_roots.empty()) {
    BP_LOG(Warning) << "no --backing-root given: every attach will be refused until one is set";
  }
  manager_ = std::make_unique<DeviceManager>(m, registry_.get());
  if (absl::Status s = manager_->Start(); !s.ok()) return s;

  if (absl::Status s = PrepareSocketPath(options_.socket_path); !s.ok()) return s;
  grpc::EnableDefaultHealthCheckService(true);
  // Links the health descriptor in (see proto/grpc/health/v1/health.proto) so that reflection
  // can describe the health service gRPC serves.
  grpc::health::v1::HealthCheckRequest::descriptor();
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  service_ = std::make_unique<DeviceService>(manager_.get());
  grpc::ServerBuilder builder;
  builder.AddListeningPort("unix:" + options_.socket_path, grpc::InsecureServerCredentials());
  if (!options_.listen_tcp.empty()) {
    absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> credentials = TcpCredentials(options_);
    if (!credentials.ok()) return credentials.status();
    builder.AddListeningPort(options_.listen_tcp, *credentials, &tcp_port_);
  }
  builder.RegisterService(service_.get());
  if (metrics_) {
    std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
    creators.push_back(std::make_unique<ApiMetricsInterceptorFactory>(metrics_.get()));
    builder.experimental().SetInterceptorCreators(std::move(creators));
  }
  if (options_.enable_self_test_io) {
    diagnostics_ = std::make_unique<DiagnosticsService>(manager_.get());
    builder.RegisterService(diagnostics_.get());
    BP_LOG(Warning) << "--enable-self-test-io: Diagnostics/SelfTestIo can overwrite device data";
  }
  // Sync-server pollers notice shutdown only when their completion-queue wait times out; the
  // default (1 s) made every shutdown take seconds.
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::CQ_TIMEOUT_MSEC, 50);
  // The socket gets mode 0660: the API is for root and the socket's group.
  mode_t old_umask = umask(0117);
  server_ = builder.BuildAndStart();
  umask(old_umask);
  if (!server_) {
    return absl::UnavailableError(absl::StrCat("cannot listen on unix:", options_.socket_path,
                                               options_.listen_tcp.empty() ? "" : " or ",
                                               options_.listen_tcp));
  }
  server_->GetHealthCheckService()->SetServingStatus(true);
  if (metrics_) {
    DeviceManager* manager = manager_.get();
    absl::StatusOr<std::unique_ptr<MetricsServer>> metrics_server = MetricsServer::Start(
        options_.metrics_listen, metrics_.get(), [manager] { return AllDevices(manager); });
    if (!metrics_server.ok()) return metrics_server.status();
    metrics_server_ = std::move(*metrics_server);
    BP_LOG(Info) << "metrics on http://" << metrics_server_->endpoint()
                 << "/metrics, Prometheus service discovery on http://"
                 << metrics_server_->endpoint() << "/sd";
  }
  BP_LOG(Info) << "serving on unix:" << options_.socket_path
               << (options_.listen_tcp.empty()
                       ? ""
                       : absl::StrCat(" and tcp port ", tcp_port_,
                                      options_.tls_cert_file.empty()
                                          ? " (plaintext)"
                                          : " (mutual TLS: clients need a certificate from "
                                            "--tls-client-ca)"))
               << " state-dir=" << options_.state_dir;
  return absl::OkStatus();
}

void Controller::Shutdown() {
  metrics_server_.reset();  // it lists the manager's devices
  if (server_) {
    server_->GetHealthCheckService()->SetServingStatus(false);
    // Watch streams would otherwise run until the deadline; unary calls get up to 2 s to finish.
    if (manager_) manager_->CloseWatches();
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    BP_LOG(Debug) << "API server stopped accepting calls";
    server_->Wait();
    server_.reset();
    BP_LOG(Debug) << "API server stopped";
  }
  if (manager_) {
    manager_->Shutdown(options_.stop_workers_on_exit, std::chrono::seconds(30));
    manager_.reset();
    BP_LOG(Debug) << "device monitors stopped";
  }
  service_.reset();
  diagnostics_.reset();
  registry_.reset();
}

}  // namespace blockplane::controller
