#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "controller/device_manager.h"

namespace blockplane::controller {

struct ControllerOptions {
  std::string socket_path = "/run/blockplane/blockplane.sock";
  std::string listen_tcp;  // host:port, empty: no TCP listener
  // Mutual TLS on the TCP listener: the server's certificate chain and key, and the CA that
  // client certificates must chain to (PEM files). All three or none; only with listen_tcp.
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_client_ca_file;
  std::string state_dir = "/var/lib/blockplane";
  std::vector<std::string> backing_roots;
  std::string worker_binary;  // default: blockplane-worker next to blockplaned
  bool stop_workers_on_exit = false;
  std::string log_level = "info";
  int max_restarts = 5;
  int restart_window_seconds = 60;
  std::string metrics_host;
  std::string metrics_listen;  // host:port of the controller's /metrics and /sd; empty: none
  bool enable_self_test_io = false;
  // Xen toolstack role: "none" (no xenstore writes; Xen devices get only the block layer),
  // "host" (libxen, dom0 / driver domain) or "emulated" (bp-xenhost under xen_run_dir).
  std::string xen_platform = "none";
  std::string xen_run_dir;
  bool xen_grant_copy = false;
  int xen_max_persistent_grants = 0;  // 0: the worker default (1056)
  int xen_poll_us = 0;                // 0: workers sleep until the frontend kicks
  bool help = false;
};

// Parses blockplaned's command line. INVALID_ARGUMENT names the bad flag.
absl::StatusOr<ControllerOptions> ParseControllerFlags(int argc, char** argv);
std::string ControllerUsage();

}  // namespace blockplane::controller
