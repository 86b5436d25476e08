#pragma once

// Helpers for tests that drive the emulated Xen host: hermetic temp dirs, running the real
// xenstore-* tools against a given xenstored socket, starting bp-xenhost or a host in this
// process, and moving exact bytes through a connected Blkfront. Test-only; not used by the daemon.

#include <stdint.h>
#include <sys/types.h>

#include <atomic>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/xen/xen_platform.h"
#include "tests/harness/xen/blkfront.h"
#include "tests/harness/xen/guest_domain.h"
#include "tests/harness/xen/xen_host.h"

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

// An emulated Xen host running in this process, on its own thread, with one guest domain, and the
// handles tests use: dom0's and the guest's XenPlatform and the guest's memory.
struct InProcessXen {
  std::unique_ptr<XenHost> host;
  std::unique_ptr<common::xen::XenPlatform> dom0;
  std::unique_ptr<common::xen::XenPlatform> guest_platform;
  std::unique_ptr<GuestDomain> guest;

  InProcessXen() = default;
  InProcessXen(InProcessXen&&) = default;
  InProcessXen& operator=(InProcessXen&&) = default;
  ~InProcessXen() { (void)Stop(); }
  // Closes the handles (the guest's first), then stops the host's thread and returns what its
  // loop returned. Later calls do nothing and return OK.
  absl::Status Stop();
};

// Creates the host in `run_dir` (which must exist) with guest `guest_domid` of `pages` pages and
// `grant_entries` grant entries, starts its thread and opens the handles.
absl::StatusOr<InProcessXen> StartInProcessXen(const std::string& run_dir,
                                               common::xen::DomainId guest_domid, uint32_t pages,
                                               uint32_t grant_entries);

// One request for RunGuestRequests(). Data goes through the slot buffer the request gets:
// `write_data` (write, barrier) is copied in before the request is enqueued, `read_data` (read)
// is copied out after the response, whatever its status. Each, when not empty, must be
// request.nr_sectors * 512 bytes.
struct GuestIo {
  uint32_t queue = 0;
  BlkfrontRequest request{};
  std::span<const uint8_t> write_data{};
  std::span<uint8_t> read_data{};
  // Reads: fill the request's part of the slot buffer with 0xee first, so that what an earlier
  // request left in the guest's frames cannot pass for data the backend wrote. Off for tests
  // that check that the backend left the frames alone.
  bool scrub_read_buffer = true;
};

// Counts for a thread that watches RunGuestRequests() running on another one.
struct GuestIoProgress {
  std::atomic<uint64_t> pushed{0};     // requests made visible to the backend
  std::atomic<uint64_t> completed{0};  // responses taken
};

// Runs `ios` on `front` (connected, owned by the calling thread) with at most `depth` in flight
// per queue, each queue's requests in their order, every queue at once; pushes each queue once
// per pass and sleeps on the event channels only when nothing completed. Returns one completion
// per request, in request order (`slot` says which slot buffer it used). An error if a request
// cannot be enqueued or no response arrives within `timeout_ms`; a response the Blkfront drops as
// bogus (counters().bogus_responses) ends in that timeout.
absl::StatusOr<std::vector<BlkfrontCompletion>> RunGuestRequests(
    Blkfront& front, std::span<const GuestIo> ios, uint32_t depth, int timeout_ms = 20000,
    GuestIoProgress* progress = nullptr);

// After the backend has let go of the device (detached, or Closed), ends the guest's access to
// every slot page of `front` (its persistent grant pool); false if the backend still maps one.
bool RevokeSlotGrants(const Blkfront& front, GuestDomain& guest);

}  // namespace blockplane::harness
