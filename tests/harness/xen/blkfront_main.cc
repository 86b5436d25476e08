// bp-blkfront: the userspace blkfront as a program. Acts as guest domain N of a running
// bp-xenhost, connects to the vbd the toolstack (the controller, or a test) created for it, runs
// a workload and/or the hostile probes, disconnects, and prints one JSON object on stdout.
// Usage and the JSON fields: tests/harness/xen/README.md, "Driving I/O".
//
// Exit code: 0 when everything passed; 1 when a verify or hostile check failed or the run could
// not complete (the JSON then carries "error"); 2 for bad flags.

#include <signal.h>

#include <charconv>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

#include "common/logging.h"
#include "common/xen/xen_platform.h"
#include "tests/harness/xen/blkfront.h"
#include "tests/harness/xen/guest_domain.h"
#include "tests/harness/xen/workload.h"

namespace {

using namespace blockplane;

constexpr char kUsage[] =
    "usage: bp-blkfront --run-dir DIR --domid N [--vdev xvda|NUMBER]\n"
    "  handshake: [--protocol native|x86_32-abi|x86_64-abi] [--persistent-grants on|off]\n"
    "             [--indirect N] [--ring-page-order N] [--queues N] [--timeout-ms MS]\n"
    "  workload:  [--workload randread|randwrite|randrw|seqread|seqwrite] [--bs BYTES[k|m]]\n"
    "             [--iodepth N] (--runtime SECONDS | --ops N) [--rwmix-read PCT]\n"
    "             [--flush-every N] [--discard-every N] [--barrier-every N] [--verify]\n"
    "             [--assume-zeroed] [--then-read] [--offset-sectors N] [--size-sectors N]\n"
    "             [--seed N] [--poll]\n"
    "  hostile:   [--hostile] [--hostile-sector N]\n"
    "  memory:    [--first-frame N] [--first-ref N]   (guest frames/refs used, from these)\n"
    "  [--log-level LEVEL]\n";

struct Flags {
  std::string run_dir;
  uint32_t domid = 0;
  harness::BlkfrontOptions front;
  harness::WorkloadOptions workload;
  bool run_workload = false;
  bool hostile = false;
  harness::HostileOptions hostile_options;
};

int Usage(const std::string& why) {
  std::fprintf(stderr, "bp-blkfront: %s\n%s", why.c_str(), kUsage);
  return 2;
}

template <typename T>
bool ParseInt(std::string_view text, T* out) {
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), *out);
  return ec == std::errc() && end == text.data() + text.size() && !text.empty();
}

// "4096", "4k", "1m" (binary units).
bool ParseBytes(std::string_view text, uint32_t* out) {
  uint64_t scale = 1;
  if (!text.empty() && (text.back() == 'k' || text.back() == 'K')) scale = 1024;
  if (!text.empty() && (text.back() == 'm' || text.back() == 'M')) scale = 1024 * 1024;
  if (scale != 1) text.remove_suffix(1);
  uint64_t value = 0;
  if (!ParseInt(text, &value) || value * scale > UINT32_MAX) return false;
  *out = static_cast<uint32_t>(value * scale);
  return true;
}

// xvdX -> 202 << 8 | (X - 'a') << 4 (Linux's xen-blkfront numbering for xvd, < 16 disks).
bool ParseVdev(std::string_view text, uint32_t* devid) {
  if (ParseInt(text, devid)) return true;
  if (text.size() == 4 && text.substr(0, 3) == "xvd" && text[3] >= 'a' && text[3] <= 'p') {
    *devid = (202u << 8) | (uint32_t(text[3] - 'a') << 4);
    return true;
  }
  return false;
}

// Returns 0 on success, else the exit code after printing why.
int ParseFlags(int argc, char** argv, Flags* f) {
  uint64_t runtime_s = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    // Flags without a value.
    if (arg == "--verify") {
      f->workload.verify = true;
      continue;
    }
    if (arg == "--assume-zeroed") {
      f->workload.assume_zeroed = true;
      continue;
    }
    if (arg == "--then-read") {
      f->workload.read_back = true;
      continue;
    }
    if (arg == "--hostile") {
      f->hostile = true;
      continue;
    }
    if (arg == "--poll") {
      f->workload.poll = true;
      continue;
    }
    if (i + 1 >= argc) return Usage(arg + " needs a value");
    const std::string value = argv[++i];
    bool ok = true;
    if (arg == "--run-dir") {
      f->run_dir = value;
    } else if (arg == "--domid") {
      ok = ParseInt(value, &f->domid) && f->domid > 0 && f->domid < 0x7ff0;
    } else if (arg == "--vdev") {
      ok = ParseVdev(value, &f->front.devid);
    } else if (arg == "--protocol") {
      ok = value == "native" || value == "x86_32-abi" || value == "x86_64-abi";
      f->front.protocol = value;
    } else if (arg == "--persistent-grants") {
      ok = value == "on" || value == "off";
      f->front.persistent_grants = value == "on";
    } else if (arg == "--indirect") {
      ok = ParseInt(value, &f->front.max_indirect_segments);
    } else if (arg == "--ring-page-order") {
      ok = ParseInt(value, &f->front.ring_page_order) && f->front.ring_page_order <= 4;
    } else if (arg == "--queues") {
      ok = ParseInt(value, &f->front.num_queues) && f->front.num_queues >= 1 &&
           f->front.num_queues <= 64;
    } else if (arg == "--timeout-ms") {
      ok = ParseInt(value, &f->front.timeout_ms) && f->front.timeout_ms > 0;
      f->workload.timeout_ms = f->front.timeout_ms;
      f->hostile_options.timeout_ms = f->front.timeout_ms;
    } else if (arg == "--workload") {
      harness::WorkloadOptions& w = f->workload;
      if (value == "randread" || value == "randwrite" || value == "randrw") {
        w.random = true;
      } else if (value == "seqread" || value == "seqwrite") {
        w.random = false;
      } else {
        ok = false;
      }
      if (value.ends_with("read")) w.read_percent = 100;
      if (value.ends_with("write")) w.read_percent = 0;
      if (value == "randrw") w.read_percent = 50;
    } else if (arg == "--bs") {
      ok = ParseBytes(value, &f->workload.block_bytes) && f->workload.block_bytes > 0 &&
           f->workload.block_bytes % 512 == 0;
    } else if (arg == "--iodepth") {
      ok = ParseInt(value, &f->workload.iodepth) && f->workload.iodepth >= 1;
    } else if (arg == "--runtime") {
      ok = ParseInt(value, &runtime_s) && runtime_s > 0;
      f->workload.runtime_ms = runtime_s * 1000;
      f->run_workload = true;
    } else if (arg == "--ops") {
      ok = ParseInt(value, &f->workload.ops) && f->workload.ops > 0;
      f->run_workload = true;
    } else if (arg == "--rwmix-read") {
      ok = ParseInt(value, &f->workload.read_percent) && f->workload.read_percent <= 100;
    } else if (arg == "--flush-every") {
      ok = ParseInt(value, &f->workload.flush_every);
    } else if (arg == "--discard-every") {
      ok = ParseInt(value, &f->workload.discard_every);
    } else if (arg == "--barrier-every") {
      ok = ParseInt(value, &f->workload.barrier_every);
    } else if (arg == "--offset-sectors") {
      ok = ParseInt(value, &f->workload.first_sector);
    } else if (arg == "--size-sectors") {
      ok = ParseInt(value, &f->workload.sectors);
    } else if (arg == "--seed") {
      ok = ParseInt(value, &f->workload.seed);
    } else if (arg == "--hostile-sector") {
      ok = ParseInt(value, &f->hostile_options.good_sector);
    } else if (arg == "--first-frame") {
      uint32_t frame = 0;
      ok = ParseInt(value, &frame);
      f->front.first_ring_frame = frame;
    } else if (arg == "--first-ref") {
      uint32_t ref = 0;
      ok = ParseInt(value, &ref);
      f->front.first_ring_ref = ref;
    } else if (arg == "--log-level") {
      common::LogLevel level;
      ok = common::ParseLogLevel(value, &level);
      if (ok) common::SetMinLogLevel(level);
    } else {
      return Usage("unknown flag " + arg);
    }
    if (!ok) return Usage("bad value for " + arg + ": '" + value + "'");
  }
  if (f->run_dir.empty() || f->domid == 0) return Usage("--run-dir and --domid are required");
  if (f->workload.ops && f->workload.runtime_ms) return Usage("give --ops or --runtime, not both");
  if (!f->run_workload && !f->hostile)
    return Usage("nothing to do: give --ops, --runtime or --hostile");
  return 0;
}

std::string JsonWithError(std::string json, const absl::Status& status) {
  if (status.ok()) return json;
  std::string message(status.ToString());
  std::string escaped;
  for (char c : message) {
    if (c == '"' || c == '\\') escaped += '\\';
    escaped += (static_cast<unsigned char>(c) < 0x20) ? ' ' : c;
  }
  json.insert(1, "\"error\":\"" + escaped + "\",");
  return json;
}

}  // namespace

int main(int argc, char** argv) {
  common::SetLogComponent("bp-blkfront");
  signal(SIGPIPE, SIG_IGN);
  Flags flags;
  if (int code = ParseFlags(argc, argv, &flags); code != 0) return code;
  // Slots: the queue depth spread over the queues (hostile needs two per queue), each holding
  // one block (hostile probes need one page).
  const uint32_t queues = flags.front.num_queues;
  flags.front.slots_per_queue =
      std::max<uint32_t>((flags.workload.iodepth + queues - 1) / queues, flags.hostile ? 2 : 1);
  flags.front.max_request_bytes = std::max<uint32_t>(flags.workload.block_bytes, 4096);

  auto platform = common::xen::CreateEmulatedXenPlatform(common::xen::EmulatedXenOptions{
      flags.run_dir, static_cast<common::xen::DomainId>(flags.domid)});
  if (!platform.ok()) {
    std::fprintf(stderr, "bp-blkfront: %s\n", platform.status().ToString().c_str());
    return 1;
  }
  auto guest =
      harness::GuestDomain::Connect(flags.run_dir, static_cast<common::xen::DomainId>(flags.domid));
  if (!guest.ok()) {
    std::fprintf(stderr, "bp-blkfront: %s\n", guest.status().ToString().c_str());
    return 1;
  }
  harness::Blkfront front(platform->get(), guest->get(), flags.front);
  if (absl::Status status = front.Connect(); !status.ok()) {
    std::fprintf(stderr, "bp-blkfront: connect: %s\n", status.ToString().c_str());
    return 1;
  }
  harness::WorkloadResult result;
  absl::Status status;
  if (flags.hostile) status = harness::RunHostile(front, flags.hostile_options, result);
  if (status.ok() && flags.run_workload) {
    status = harness::RunWorkload(front, flags.workload, result);
  }
  std::string json = JsonWithError(result.ToJson(front), status);
  absl::Status closed = front.Disconnect();
  if (!closed.ok()) {
    std::fprintf(stderr, "bp-blkfront: disconnect: %s\n", closed.ToString().c_str());
  }
  std::printf("%s\n", json.c_str());
  std::fflush(stdout);
  return status.ok() && closed.ok() && result.ok() ? 0 : 1;
}
