#pragma once

// bpctl's command line: global options, one subcommand per DeviceService RPC, and the request it
// sends. Parsing is pure (no I/O, no environment access) so that it can be unit tested; main()
// passes the environment's defaults in ParseDefaults.

#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "blockplane/v1/device.pb.h"

namespace blockplane::controller::cli {

// Process exit codes. Usage errors are told apart from server errors so scripts can tell "I called
// bpctl wrong" from "the controller said no".
inline constexpr int kExitOk = 0;
inline constexpr int kExitServerError = 1;
inline constexpr int kExitUsage = 2;

inline constexpr char kDefaultSocket[] = "/run/blockplane/blockplane.sock";
inline constexpr absl::Duration kDefaultDeadline = absl::Seconds(30);

struct ParseDefaults {
  // From $BLOCKPLANE_SOCKET when set, else kDefaultSocket.
  std::string socket = kDefaultSocket;
};

struct GlobalOptions {
  std::string socket;
  // host:port; when set, used instead of the socket.
  std::string address;
  // Mutual TLS over --address (blockplaned --tls-*): the CA that signed the server's certificate,
  // and this client's certificate chain and key (PEM files). All three or none.
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  absl::Duration deadline = kDefaultDeadline;
  // Whether --deadline was given (watch has no deadline unless it was).
  bool deadline_set = false;
  bool json = false;
};

// The request of each subcommand, in the order of the Command enum below.
using Request =
    std::variant<v1::AttachDeviceRequest, v1::DrainDeviceRequest, v1::ResumeDeviceRequest,
                 v1::DetachDeviceRequest, v1::ResizeDeviceRequest, v1::GetDeviceRequest,
                 v1::ListDevicesRequest, v1::WatchDevicesRequest, v1::GetDeviceStatsRequest>;

struct Invocation {
  GlobalOptions global;
  // Set when --help (or `help`) was asked for: print it to stdout and exit 0, send nothing.
  std::optional<std::string> help;
  Request request;
};

// Parses argv[1..] (without the program name). A usage error is an InvalidArgument status whose
// message is meant for the user ("attach: --path is required"); the caller prints it with a hint to
// run --help and exits with kExitUsage.
absl::StatusOr<Invocation> ParseCommandLine(const std::vector<std::string>& args,
                                            const ParseDefaults& defaults);

// The name of the subcommand whose request `request` holds ("attach", ...).
absl::string_view CommandName(const Request& request);

// The overview printed by `bpctl --help`.
std::string GeneralHelp();

}  // namespace blockplane::controller::cli
