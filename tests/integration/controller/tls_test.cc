// The API over TCP (--listen-tcp): plaintext, and with mutual TLS (--tls-cert, --tls-key,
// --tls-client-ca), against bpctl (--address, --tls-*) and a gRPC client. Certificates come from
// the openssl command line tool at test time: a CA, a server certificate for 127.0.0.1 and
// localhost, a client certificate from the same CA, and a client certificate from another CA.

#include <filesystem>
#include <fstream>
#include <memory>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "blockplane/v1/device.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/integration/controller/fixture.h"

namespace blockplane::testing {
namespace {

std::string Slurp(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// The TCP port the controller logged ("... and tcp port N ..."), or 0.
int LoggedTcpPort(const ControllerProcess& controller) {
  std::smatch match;
  const std::string log = Slurp(controller.log_path());
  static const std::regex kPort("tcp port ([0-9]+)");
  return std::regex_search(log, match, kPort) ? std::stoi(match[1].str()) : 0;
}

// A CA, and certificates it signed, in a temp dir.
class Certificates {
 public:
  Certificates() {
    char tmpl[] = "/tmp/bp-tls.XXXXXX";
    EXPECT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  ~Certificates() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // NAME.key and NAME.crt: a self-signed CA.
  void MakeCa(const std::string& name) {
    Openssl({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", Path(name + ".key"), "-out", Path(name + ".crt"), "-subj", "/CN=" + name,
             "-days", "2"});
  }
  // NAME.key and NAME.crt, signed by CA; `san` is the subjectAltName (empty for a client).
  void MakeSigned(const std::string& name, const std::string& ca, const std::string& san) {
    Openssl({"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
             Path(name + ".key"), "-out", Path(name + ".csr"), "-subj", "/CN=" + name});
    std::ofstream(Path(name + ".ext"))
        << (san.empty() ? "extendedKeyUsage=clientAuth\n"
                        : "subjectAltName=" + san + "\nextendedKeyUsage=serverAuth\n");
    Openssl({"x509", "-req", "-in", Path(name + ".csr"), "-CA", Path(ca + ".crt"), "-CAkey",
             Path(ca + ".key"), "-CAcreateserial", "-out", Path(name + ".crt"), "-days", "2",
             "-extfile", Path(name + ".ext")});
  }

 private:
  void Openssl(std::vector<std::string> args) {
    args.insert(args.begin(), "/usr/bin/openssl");
    CommandResult r = RunCommand(args);
    ASSERT_EQ(r.exit_code, 0) << "openssl " << args[1] << ": " << r.err;
  }
  std::string dir_;
};

class TcpApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(std::filesystem::exists("/usr/bin/openssl"))
        << "openssl is installed by scripts/install-deps.sh";
    ASSERT_NO_FATAL_FAILURE(certs_.MakeCa("ca"));
    ASSERT_NO_FATAL_FAILURE(certs_.MakeSigned("server", "ca", "IP:127.0.0.1,DNS:localhost"));
    ASSERT_NO_FATAL_FAILURE(certs_.MakeSigned("operator", "ca", ""));
    ASSERT_NO_FATAL_FAILURE(certs_.MakeCa("other-ca"));
    ASSERT_NO_FATAL_FAILURE(certs_.MakeSigned("intruder", "other-ca", ""));
  }

  // Starts a controller on 127.0.0.1:<free port>, with mutual TLS when `tls`.
  void StartController(bool tls) {
    std::vector<std::string> flags = {"--listen-tcp=127.0.0.1:0"};
    if (tls) {
      flags.insert(flags.end(), {"--tls-cert=" + certs_.Path("server.crt"),
                                 "--tls-key=" + certs_.Path("server.key"),
                                 "--tls-client-ca=" + certs_.Path("ca.crt")});
    }
    controller_ = std::make_unique<ControllerProcess>(flags);
    ASSERT_NO_FATAL_FAILURE(controller_->Start());
    // The controller logs the port just after its server answers health checks, which is what
    // Start() waits for.
    WaitFor([&] { return (port_ = LoggedTcpPort(*controller_)) > 0; });
    ASSERT_GT(port_, 0) << Slurp(controller_->log_path());
    address_ = "127.0.0.1:" + std::to_string(port_);
  }

  // bpctl list over TCP, with `client`'s certificate and key (and the server's CA) unless empty.
  CommandResult ListOverTcp(const std::string& client, const std::string& ca = "ca") {
    std::vector<std::string> args = {BinaryPath("bpctl"), "--address", address_, "--deadline",
                                     "5s"};
    if (!client.empty()) {
      args.insert(args.end(),
                  {"--tls-ca", certs_.Path(ca + ".crt"), "--tls-cert", certs_.Path(client + ".crt"),
                   "--tls-key", certs_.Path(client + ".key")});
    }
    args.push_back("list");
    return RunCommand(args);
  }

  Certificates certs_;
  std::unique_ptr<ControllerProcess> controller_;
  int port_ = 0;
  std::string address_;
};

TEST_F(TcpApiTest, PlaintextListenerServesBpctl) {
  StartController(/*tls=*/false);
  if (HasFatalFailure()) return;
  EXPECT_TRUE(absl::StrContains(Slurp(controller_->log_path()), "(plaintext)"));
  CommandResult r = ListOverTcp("");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "No devices.\n");
}

TEST_F(TcpApiTest, MutualTlsServesOnlyClientsWithACertificateFromTheClientCa) {
  StartController(/*tls=*/true);
  if (HasFatalFailure()) return;
  EXPECT_TRUE(absl::StrContains(Slurp(controller_->log_path()), "(mutual TLS"));

  // A client with a certificate from the CA: served, the same devices as on the unix socket.
  const std::string disk = controller_->CreateDisk("disk0.img", 64 << 20);
  CommandResult attached = controller_->Bpctl(
      {"attach", "d0", "--path", disk, "--vhost-socket", controller_->dir() + "/d0.sock"});
  ASSERT_EQ(attached.exit_code, 0) << attached.err;
  CommandResult ok = ListOverTcp("operator");
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_TRUE(absl::StrContains(ok.out, "d0")) << ok.out;

  // No certificate, a plaintext client, a certificate from another CA, and a client that does
  // not trust the server's CA: all refused before any call reaches the service.
  CommandResult plaintext = ListOverTcp("");
  EXPECT_EQ(plaintext.exit_code, 1);
  EXPECT_TRUE(absl::StartsWith(plaintext.err, "bpctl: UNAVAILABLE: ")) << plaintext.err;
  CommandResult intruder = ListOverTcp("intruder");
  EXPECT_EQ(intruder.exit_code, 1);
  EXPECT_TRUE(absl::StartsWith(intruder.err, "bpctl: UNAVAILABLE: ")) << intruder.err;
  CommandResult distrustful = ListOverTcp("operator", "other-ca");
  EXPECT_EQ(distrustful.exit_code, 1);
  EXPECT_TRUE(absl::StartsWith(distrustful.err, "bpctl: UNAVAILABLE: ")) << distrustful.err;

  // A gRPC client that trusts the server but shows no certificate of its own.
  grpc::SslCredentialsOptions server_only;
  server_only.pem_root_certs = Slurp(certs_.Path("ca.crt"));
  auto stub =
      v1::DeviceService::NewStub(grpc::CreateChannel(address_, grpc::SslCredentials(server_only)));
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  v1::ListDevicesRequest request;
  v1::ListDevicesResponse response;
  grpc::Status status = stub->ListDevices(&context, request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();

  // The unix socket is unaffected.
  CommandResult local = controller_->Bpctl({"list"});
  EXPECT_EQ(local.exit_code, 0) << local.err;
  EXPECT_TRUE(absl::StrContains(local.out, "d0"));
}

TEST_F(TcpApiTest, UnreadableCertificateStopsTheStartWithTheFlagNamed) {
  char tmpl[] = "/tmp/bp-tls-start.XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  CommandResult r = RunCommand(
      {BinaryPath("blockplaned"), "--socket=" + dir + "/api.sock", "--state-dir=" + dir + "/state",
       "--listen-tcp=127.0.0.1:0", "--tls-cert=" + certs_.Path("server.crt"),
       "--tls-key=" + dir + "/missing.key", "--tls-client-ca=" + certs_.Path("ca.crt")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(r.err, "--tls-key: cannot read " + dir + "/missing.key")) << r.err;
  // A file that is not PEM.
  std::ofstream(dir + "/junk.pem") << "not a certificate\n";
  r = RunCommand(
      {BinaryPath("blockplaned"), "--socket=" + dir + "/api.sock", "--state-dir=" + dir + "/state",
       "--listen-tcp=127.0.0.1:0", "--tls-cert=" + certs_.Path("server.crt"),
       "--tls-key=" + certs_.Path("server.key"), "--tls-client-ca=" + dir + "/junk.pem"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(r.err, "--tls-client-ca: " + dir + "/junk.pem holds no PEM block"))
      << r.err;
  // Flags that do not go together are refused before anything starts.
  r = RunCommand({BinaryPath("blockplaned"), "--socket=" + dir + "/api.sock",
                  "--state-dir=" + dir + "/state", "--listen-tcp=127.0.0.1:0",
                  "--tls-cert=" + certs_.Path("server.crt")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(r.err, "--tls-cert, --tls-key and --tls-client-ca go together"))
      << r.err;
  r = RunCommand({BinaryPath("blockplaned"), "--socket=" + dir + "/api.sock",
                  "--state-dir=" + dir + "/state", "--tls-cert=" + certs_.Path("server.crt"),
                  "--tls-key=" + certs_.Path("server.key"),
                  "--tls-client-ca=" + certs_.Path("ca.crt")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(absl::StrContains(r.err, "give --listen-tcp=HOST:PORT too")) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir + "/api.sock"));
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

}  // namespace
}  // namespace blockplane::testing
