#include "controller/cli/output.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "controller/cli/values.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/time_util.h"

namespace blockplane::controller::cli {
namespace {

const char* YesNo(bool b) { return b ? "yes" : "no"; }

// A number, or its documented default when zero: "0" -> "4 (default)".
std::string OrDefault(uint64_t value, absl::string_view default_text) {
  if (value == 0) return absl::StrCat("default(", default_text, ")");
  return absl::StrCat(value);
}

std::string SizeWithBytes(uint64_t bytes) {
  return absl::StrCat(FormatSize(bytes), " (", bytes, " bytes)");
}

}  // namespace

std::string FormatTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      absl::StrAppend(&line, row[i]);
      if (i + 1 < row.size()) line.append(widths[i] - row[i].size() + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    absl::StrAppend(&out, line, "\n");
  }
  return out;
}

std::string FormatJson(const google::protobuf::Message& message, bool multiline) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = multiline;
  options.always_print_primitive_fields = true;
  std::string out;
  const auto status = google::protobuf::util::MessageToJsonString(message, &out, options);
  if (!status.ok()) {
    // Only possible for messages with Any fields of unknown types, which the API does not use.
    return absl::StrCat("{\"error\": \"cannot print as JSON: ", status.ToString(), "\"}\n");
  }
  if (out.empty() || out.back() != '\n') out.push_back('\n');
  return out;
}

std::string FormatTimestamp(const google::protobuf::Timestamp& timestamp) {
  if (timestamp.seconds() == 0 && timestamp.nanos() == 0) return "-";
  const absl::Time time =
      absl::FromUnixSeconds(timestamp.seconds()) + absl::Nanoseconds(timestamp.nanos());
  return absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", time, absl::UTCTimeZone());
}

std::string FrontendSummary(const v1::DeviceSpec& spec) {
  if (spec.has_xen()) {
    return absl::StrCat("xen domid=", spec.xen().domid(), " vdev=", spec.xen().virtual_device());
  }
  if (spec.has_vhost_user()) return absl::StrCat("vhost-user ", spec.vhost_user().socket_path());
  return "none";
}

namespace {

// The file, or "null" (with "read-zeroes" and "deferred" when set) for a null backend.
std::string BackingSummary(const v1::BackendSpec& backend) {
  if (!backend.has_null()) return backend.path();
  std::string summary = "null";
  if (backend.null().read_zeroes()) summary += " read-zeroes";
  if (backend.null().completion() == v1::NULL_COMPLETION_DEFERRED) summary += " deferred";
  return summary;
}

}  // namespace

std::string FormatDevice(const v1::Device& device) {
  const v1::DeviceSpec& spec = device.spec();
  const v1::BackendSpec& backend = spec.backend();
  const v1::DeviceStatus& status = device.status();
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"id:", device.id()});
  rows.push_back({"state:", absl::StrCat(DeviceStateName(status.state()), " (since ",
                                         FormatTimestamp(status.state_changed_at()), ")")});
  rows.push_back({"size:", SizeWithBytes(status.size_bytes())});
  rows.push_back({"backing:", BackingSummary(backend)});
  rows.push_back(
      {"backend:",
       absl::StrCat("format=", ImageFormatName(backend.format()), " cache=",
                    CacheModeName(backend.cache()), " read-only=", YesNo(backend.read_only()),
                    " discard=", DiscardModeName(backend.discard()),
                    " detect-zeroes=", DetectZeroesName(backend.detect_zeroes()),
                    " lbs=", backend.logical_block_size() == 0 ? 512 : backend.logical_block_size(),
                    " error-policy=", ErrorPolicyName(backend.error_policy()))});
  if (spec.has_xen()) {
    const v1::XenFrontend& xen = spec.xen();
    rows.push_back(
        {"frontend:",
         absl::StrCat(FrontendSummary(spec), " max-queues=", OrDefault(xen.max_queues(), "4"),
                      " max-ring-page-order=", xen.max_ring_page_order(), " persistent-grants=",
                      YesNo(!xen.has_persistent_grants() || xen.persistent_grants()),
                      " max-indirect-segments=",
                      xen.disable_indirect() && xen.max_indirect_segments() == 0
                          ? std::string("off")
                          : OrDefault(xen.max_indirect_segments(), "32"),
                      " poll-us=",
                      xen.has_poll_us() ? std::to_string(xen.poll_us()) : std::string("default"))});
    const v1::FrontendStatus& fs = status.frontend();
    rows.push_back(
        {"xenbus:",
         absl::StrCat("backend=", fs.xen_backend_state().empty() ? "-" : fs.xen_backend_state(),
                      " frontend=", fs.xen_frontend_state().empty() ? "-" : fs.xen_frontend_state(),
                      " queues=", fs.num_queues(),
                      " protocol=", fs.protocol().empty() ? "-" : fs.protocol(),
                      " persistent-grants=", YesNo(fs.persistent_grants()))});
  } else if (spec.has_vhost_user()) {
    const v1::VhostUserFrontend& vhost = spec.vhost_user();
    rows.push_back(
        {"frontend:",
         absl::StrCat(FrontendSummary(spec), " queues=", OrDefault(vhost.num_queues(), "1"),
                      " queue-size=", OrDefault(vhost.queue_size(), "256"))});
    if (status.frontend().num_queues() != 0) {
      rows.push_back({"negotiated:", absl::StrCat("queues=", status.frontend().num_queues())});
    }
  } else {
    rows.push_back({"frontend:", "none"});
  }
  rows.push_back({"worker:", absl::StrCat("pid=", status.worker_pid(),
                                          " generation=", status.worker_generation(),
                                          " restarts=", status.restart_count())});
  if (!status.metrics_endpoint().empty()) rows.push_back({"metrics:", status.metrics_endpoint()});
  rows.push_back({"highest written:", SizeWithBytes(status.highest_written_offset())});
  rows.push_back({"created:", FormatTimestamp(status.created_at())});
  if (!status.last_error().empty()) rows.push_back({"last error:", status.last_error()});
  return FormatTable(rows);
}

std::string FormatDeviceTable(const std::vector<v1::Device>& devices) {
  if (devices.empty()) return "No devices.\n";
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"ID", "STATE", "SIZE", "PID", "GEN", "FRONTEND", "BACKING"});
  for (const v1::Device& device : devices) {
    const v1::DeviceStatus& status = device.status();
    rows.push_back({device.id(), DeviceStateName(status.state()), FormatSize(status.size_bytes()),
                    status.worker_pid() == 0 ? "-" : absl::StrCat(status.worker_pid()),
                    absl::StrCat(status.worker_generation()), FrontendSummary(device.spec()),
                    BackingSummary(device.spec().backend())});
  }
  return FormatTable(rows);
}

std::string FormatStats(const v1::DeviceStats& stats) {
  // The block layer's own work, only what happened.
  const v1::BlockLayerStats& b = stats.block_layer();
  std::vector<std::string> work;
  auto count = [&](uint64_t n, const char* what) {
    if (n != 0) work.push_back(absl::StrCat(n, " ", what));
  };
  count(b.flushes_skipped(), "flushes skipped");
  count(b.read_modify_writes(), "read-modify-writes");
  count(b.bounced(), "bounced");
  count(b.split(), "split");
  count(b.serialising_waits(), "serialising waits");
  count(b.zero_writes_detected(), "zero writes detected");
  count(b.write_zeroes_fallbacks(), "write-zeroes fallbacks");
  count(b.error_stops(), "error stops");
  if (b.discard_withdrawn()) work.push_back("discard withdrawn");
  if (b.write_zeroes_withdrawn()) work.push_back("write-zeroes withdrawn");
  std::string out = FormatTable({
      {"device:", stats.device_id()},
      {"size:", SizeWithBytes(stats.size_bytes())},
      {"in flight:", absl::StrCat(stats.in_flight())},
      {"highest written:", SizeWithBytes(stats.highest_written_offset())},
      {"idle:", absl::FormatDuration(
                    absl::Trunc(absl::Nanoseconds(stats.idle_ns()), absl::Milliseconds(1)))},
      {"worker generation:", absl::StrCat(stats.worker_generation())},
      {"worker loop:",
       absl::StrCat(stats.loop().passes(), " passes, ", stats.loop().sleeps(), " slept, ",
                    stats.loop().sqes_submitted(), " SQEs in ", stats.loop().submit_calls(),
                    " submits, ", stats.loop().completions(), " completions")},
      {"block layer:", work.empty() ? std::string("-") : absl::StrJoin(work, ", ")},
  });
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"OP", "OPERATIONS", "BYTES", "FAILED", "INVALID", "AVG LATENCY"});
  for (const v1::OpStats& op : stats.ops()) {
    std::string average = "-";
    if (op.operations() != 0) {
      average = absl::FormatDuration(absl::Trunc(
          absl::Nanoseconds(op.total_time_ns() / op.operations()), absl::Microseconds(1)));
    }
    rows.push_back({op.op(), absl::StrCat(op.operations()), FormatSize(op.bytes()),
                    absl::StrCat(op.failed()), absl::StrCat(op.invalid()), average});
  }
  absl::StrAppend(&out, "\n", FormatTable(rows));
  return out;
}

std::string FormatEvent(const v1::DeviceEvent& event) {
  std::vector<std::string> parts = {FormatTimestamp(event.time()),
                                    absl::StrCat("rev=", event.revision()),
                                    EventKindName(event.kind())};
  if (event.has_device()) {
    const v1::Device& device = event.device();
    parts.push_back(device.id());
    std::string state = DeviceStateName(device.status().state());
    if (event.kind() == v1::DeviceEvent::KIND_STATE_CHANGED) {
      state = absl::StrCat(DeviceStateName(event.previous_state()), "->", state);
    }
    parts.push_back(state);
    parts.push_back(absl::StrCat("size=", FormatSize(device.status().size_bytes())));
    parts.push_back(absl::StrCat("pid=", device.status().worker_pid()));
    parts.push_back(absl::StrCat("gen=", device.status().worker_generation()));
    if (!device.status().last_error().empty()) {
      parts.push_back(absl::StrCat("error=\"", device.status().last_error(), "\""));
    }
  }
  return absl::StrCat(absl::StrJoin(parts, " "), "\n");
}

}  // namespace blockplane::controller::cli
