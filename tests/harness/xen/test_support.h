#pragma once

// Helpers for tests that drive the emulated Xen host: hermetic temp dirs and running the real
// xenstore-* tools against a given xenstored socket. Test-only; not used by the daemon.

#include <sys/types.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace blockplane::harness {

// Creates a fresh directory under $TMPDIR (or /tmp) and removes it, recursively, on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct CommandResult {
  int exit_code = -1;  // -1 if the process could not run or was killed
  std::string out;
  std::string err;
};

// Runs argv[0] (searched in PATH) with XENSTORED_PATH=<xenstored_path> added to the environment,
// collects stdout and stderr, and waits at most `timeout_ms` before killing it.
CommandResult RunXenstoreTool(const std::vector<std::string>& argv,
                              const std::string& xenstored_path, int timeout_ms = 10000);

// Starts the bp-xenhost daemon (`binary`) on `run_dir` with one guest (`domain_spec`, as for
// --domain: "ID[:PAGES[:GRANTS]]") and waits (bounded, 20 s) until it prints "READY <run_dir>".
// Returns its pid (the caller stops it with SIGTERM and reaps it), or an error saying what it
// printed instead.
absl::StatusOr<pid_t> SpawnXenHost(const std::string& binary, const std::string& run_dir,
                                   const std::string& domain_spec);

}  // namespace blockplane::harness
