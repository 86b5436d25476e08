#include "controller/options.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace blockplane::controller {

std::string ControllerUsage() {
  return R"(Usage: blockplaned [FLAGS]

The blockplane controller: serves the DeviceService gRPC API (plus grpc.health.v1 and server
reflection), persists devices in SQLite, and runs one blockplane-worker process per device.

Flags:
  --socket=PATH             unix socket for the API, mode 0660
                            (default /run/blockplane/blockplane.sock)
  --listen-tcp=HOST:PORT    also serve the API on TCP. Port 0 picks a free port (logged).
                            Plaintext unless --tls-* are given: without them, bind to loopback
                            or a trusted network only
  --tls-cert=FILE           mutual TLS on --listen-tcp: the server's certificate chain (PEM)
  --tls-key=FILE            its private key (PEM)
  --tls-client-ca=FILE      CA certificates (PEM) that a client's certificate must chain to;
                            clients without one are refused
  --state-dir=DIR           registry.db and worker control sockets (default /var/lib/blockplane)
  --backing-root=DIR        backing files and block devices must lie under DIR (repeatable);
                            with none, every attach is refused
  --worker-binary=PATH      worker executable (default: blockplane-worker next to blockplaned)
  --stop-workers-on-exit    on SIGTERM/SIGINT, drain and stop every worker (default: leave them
                            serving; the next blockplaned re-adopts them)
  --max-restarts=N          a device is FAILED after more than N worker crashes within the
                            restart window (default 5)
  --restart-window=SECONDS  (default 60)
  --metrics-host=HOST       workers serve /metrics on HOST with a kernel-chosen port
                            (default: no worker metrics endpoint)
  --metrics-listen=HOST:PORT  the controller serves /metrics and Prometheus HTTP service
                            discovery (/sd) there; port 0: the kernel picks (logged)
  --enable-self-test-io     serve blockplane.internal.Diagnostics/SelfTestIo, which runs test
                            I/O through a device's worker (overwrites data; tests, diagnostics)
  --xen-platform=KIND       none (default: no xenstore writes; Xen devices are served by the
                            block layer only), host (a Xen dom0 or driver domain: libxenstore,
                            gntdev, evtchn) or emulated (the test harness's bp-xenhost)
  --xen-run-dir=DIR         with --xen-platform=emulated: bp-xenhost's --run-dir (its dom0
                            xenstored socket is DIR/xenstored, XENSTORED_PATH for xenstore-*)
  --xen-grant-copy          copy data pages with grant copy instead of mapping them (no
                            persistent grants are offered then)
  --xen-max-persistent-grants=N  persistent grants a Xen device keeps mapped per queue, least
                            recently used released first (default 1056, as blkback)
  --xen-poll-us=N           workers busy-poll each Xen ring for N microseconds after its last
                            request before asking the frontend for a kick (default 0: no
                            polling; polling trades a core for latency); the default for
                            devices whose spec.xen.poll_us is unset
  --log-level=LEVEL         debug, info, warning or error (default info)
  --help                    this text
)";
}

absl::StatusOr<ControllerOptions> ParseControllerFlags(int argc, char** argv) {
  ControllerOptions o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string name = arg, value;
    bool has_value = false;
    if (size_t eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
      has_value = true;
    }
    auto need = [&]() -> absl::Status {
      if (has_value) return absl::OkStatus();
      if (i + 1 < argc) {
        value = argv[++i];
        return absl::OkStatus();
      }
      return absl::InvalidArgumentError(absl::StrCat(name, " needs a value"));
    };
    auto number = [&](int* out, int min) -> absl::Status {
      if (absl::Status s = need(); !s.ok()) return s;
      if (!absl::SimpleAtoi(value, out) || *out < min) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, ": \"", value, "\" is not a whole number >= ", min));
      }
      return absl::OkStatus();
    };
    absl::Status s;
    if (name == "--help" || name == "-h") {
      o.help = true;
    } else if (name == "--stop-workers-on-exit") {
      o.stop_workers_on_exit = true;
    } else if (name == "--socket") {
      if ((s = need()).ok()) o.socket_path = value;
    } else if (name == "--listen-tcp") {
      if ((s = need()).ok()) o.listen_tcp = value;
    } else if (name == "--tls-cert") {
      if ((s = need()).ok()) o.tls_cert_file = value;
    } else if (name == "--tls-key") {
      if ((s = need()).ok()) o.tls_key_file = value;
    } else if (name == "--tls-client-ca") {
      if ((s = need()).ok()) o.tls_client_ca_file = value;
    } else if (name == "--state-dir") {
      if ((s = need()).ok()) o.state_dir = value;
    } else if (name == "--backing-root") {
      if ((s = need()).ok()) {
        if (value.empty() || value[0] != '/') {
          s = absl::InvalidArgumentError(
              absl::StrCat("--backing-root: \"", value, "\" must be an absolute path"));
        } else {
          o.backing_roots.emplace_back(value);
        }
      }
    } else if (name == "--worker-binary") {
      if ((s = need()).ok()) o.worker_binary = value;
    } else if (name == "--log-level") {
      common::LogLevel level;
      if ((s = need()).ok()) {
        if (!common::ParseLogLevel(value, &level)) {
          s = absl::InvalidArgumentError(absl::StrCat("--log-level: unknown level \"", value,
                                                      "\"; use debug, info, warning or error"));
        } else {
          o.log_level = value;
        }
      }
    } else if (name == "--max-restarts") {
      s = number(&o.max_restarts, 0);
    } else if (name == "--restart-window") {
      s = number(&o.restart_window_seconds, 1);
    } else if (name == "--metrics-host") {
      if ((s = need()).ok()) o.metrics_host = value;
    } else if (name == "--xen-platform") {
      if ((s = need()).ok()) {
        if (value != "none" && value != "host" && value != "emulated") {
          s = absl::InvalidArgumentError(absl::StrCat("--xen-platform: unknown platform \"", value,
                                                      "\"; use none, host or emulated"));
        } else {
          o.xen_platform = value;
        }
      }
    } else if (name == "--xen-run-dir") {
      if ((s = need()).ok()) o.xen_run_dir = value;
    } else if (name == "--xen-grant-copy") {
      o.xen_grant_copy = true;
    } else if (name == "--xen-max-persistent-grants") {
      s = number(&o.xen_max_persistent_grants, 1);
    } else if (name == "--xen-poll-us") {
      s = number(&o.xen_poll_us, 0);
      if (s.ok() && o.xen_poll_us > 10'000'000) {
        s = absl::InvalidArgumentError(
            absl::StrCat(name, ": \"", value, "\" is above 10000000 (10 s)"));
      }
    } else if (name == "--metrics-listen") {
      if ((s = need()).ok()) o.metrics_listen = value;
    } else if (name == "--enable-self-test-io") {
      o.enable_self_test_io = true;
    } else {
      s = absl::InvalidArgumentError(
          absl::StrCat("unknown flag \"", arg, "\"; see blockplaned --help"));
    }
    if (!s.ok()) return s;
  }
  if (o.socket_path.empty() || o.socket_path[0] != '/') {
    return absl::InvalidArgumentError("--socket must be an absolute path");
  }
  if (o.xen_platform == "emulated" && (o.xen_run_dir.empty() || o.xen_run_dir[0] != '/')) {
    return absl::InvalidArgumentError(
        "--xen-platform=emulated needs --xen-run-dir=DIR, an absolute path");
  }
  if (o.state_dir.empty() || o.state_dir[0] != '/') {
    return absl::InvalidArgumentError("--state-dir must be an absolute path");
  }
  const int tls_files =
      !o.tls_cert_file.empty() + !o.tls_key_file.empty() + !o.tls_client_ca_file.empty();
  if (tls_files != 0 && tls_files != 3) {
    return absl::InvalidArgumentError(
        "--tls-cert, --tls-key and --tls-client-ca go together (mutual TLS needs all three)");
  }
  if (tls_files == 3 && o.listen_tcp.empty()) {
    return absl::InvalidArgumentError(
        "--tls-* secure the TCP listener: give --listen-tcp=HOST:PORT too (the unix socket is "
        "guarded by its file mode)");
  }
  return o;
}

}  // namespace blockplane::controller
