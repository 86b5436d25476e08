#include "controller/cli/command_line.h"

#include <algorithm>
#include <map>
#include <span>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "controller/cli/values.h"

namespace blockplane::controller::cli {
namespace {

struct FlagSpec {
  absl::string_view name;  // without the leading "--"
  // Placeholder of the value in help ("PATH"); empty for a switch (--force, --force=false).
  absl::string_view value;
  absl::string_view help;
  bool repeatable = false;
};

// Flag values as given, by flag name; a switch given without "=..." holds "true".
class ParsedFlags {
 public:
  void Add(absl::string_view name, std::string value) {
    values_[std::string(name)].push_back(std::move(value));
  }
  bool Has(absl::string_view name) const { return values_.find(name) != values_.end(); }
  // The last value given (a later flag overrides an earlier one).
  const std::string* Get(absl::string_view name) const {
    auto it = values_.find(name);
    return it == values_.end() ? nullptr : &it->second.back();
  }
  const std::vector<std::string>& GetAll(absl::string_view name) const {
    static const std::vector<std::string> kEmpty;
    auto it = values_.find(name);
    return it == values_.end() ? kEmpty : it->second;
  }

 private:
  std::map<std::string, std::vector<std::string>, std::less<>> values_;
};

struct Parsed {
  std::vector<std::string> positionals;
  ParsedFlags flags;
};

struct CommandSpec {
  absl::string_view name;
  absl::string_view usage;    // after "bpctl "
  absl::string_view summary;  // one line, for the overview
  absl::string_view description;
  // Number of positional arguments accepted.
  size_t min_positionals;
  size_t max_positionals;
  std::vector<FlagSpec> flags;
  absl::StatusOr<Request> (*build)(const Parsed&);
};

const std::vector<FlagSpec>& GlobalFlags() {
  static const auto* flags = new std::vector<FlagSpec>{
      {"socket", "PATH",
       "unix socket of blockplaned (default $BLOCKPLANE_SOCKET, else "
       "/run/blockplane/blockplane.sock)"},
      {"address", "HOST:PORT", "connect over TCP instead of the unix socket"},
      {"tls-ca", "FILE", "with --address: mutual TLS; the CA (PEM) that signed the server"},
      {"tls-cert", "FILE", "with --address: this client's certificate chain (PEM)"},
      {"tls-key", "FILE", "with --address: this client's private key (PEM)"},
      {"deadline", "DURATION",
       "deadline of the call (default 30s; watch runs until interrupted unless given)"},
      {"json", "", "print the response as JSON (protobuf JSON mapping; watch: one line per event)"},
      {"help", "", "show help"},
  };
  return *flags;
}

// Wraps a value parser so that its error names the flag: "--cache: invalid cache mode ...".
template <typename T>
absl::StatusOr<T> FlagValue(absl::string_view flag, absl::StatusOr<T> parsed) {
  if (parsed.ok()) return parsed;
  return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", parsed.status().message()));
}

// Sets `*field` from the flag when it was given; returns the parse error otherwise.
template <typename T, typename Field, typename Parser>
absl::Status SetIfGiven(const ParsedFlags& flags, absl::string_view name, Parser parse,
                        Field* field) {
  const std::string* text = flags.Get(name);
  if (text == nullptr) return absl::OkStatus();
  absl::StatusOr<T> value = FlagValue<T>(name, parse(*text));
  if (!value.ok()) return value.status();
  *field = *value;
  return absl::OkStatus();
}

void SetDuration(absl::Duration d, google::protobuf::Duration* out) {
  const int64_t seconds = absl::ToInt64Seconds(d);
  out->set_seconds(seconds);
  out->set_nanos(static_cast<int32_t>(absl::ToInt64Nanoseconds(d - absl::Seconds(seconds))));
}

// Sets request->timeout from --timeout; leaves it unset (the server default) when not given.
template <typename Request>
absl::Status SetTimeout(const ParsedFlags& flags, Request* request) {
  const std::string* text = flags.Get("timeout");
  if (text == nullptr) return absl::OkStatus();
  absl::StatusOr<absl::Duration> d = FlagValue("timeout", ParseDuration(*text));
  if (!d.ok()) return d.status();
  SetDuration(*d, request->mutable_timeout());
  return absl::OkStatus();
}

#define BP_RETURN_IF_ERROR(expr)       \
  do {                                 \
    absl::Status status_ = (expr);     \
    if (!status_.ok()) return status_; \
  } while (false)

bool AnyGiven(const ParsedFlags& flags, absl::string_view prefix, const CommandSpec& spec);

const CommandSpec& AttachSpec();

absl::StatusOr<Request> BuildAttach(const Parsed& parsed) {
  const ParsedFlags& f = parsed.flags;
  v1::AttachDeviceRequest request;
  request.set_device_id(parsed.positionals[0]);
  v1::BackendSpec* backend = request.mutable_spec()->mutable_backend();
  const std::string* path = f.Get("path");
  const bool null = f.Has("null-size");
  if (path == nullptr && !null) {
    return absl::InvalidArgumentError("--path is required (or --null-size for a null backend)");
  }
  if (path != nullptr && null) {
    return absl::InvalidArgumentError(
        "--path and --null-size are exclusive: a device has one backend");
  }
  if (f.Has("read-zeroes") && !null) {
    return absl::InvalidArgumentError("--read-zeroes needs --null-size");
  }
  if (f.Has("null-completion") && !null) {
    return absl::InvalidArgumentError("--null-completion needs --null-size");
  }
  if (path != nullptr) backend->set_path(*path);
  if (null) {
    v1::NullBackendSpec* n = backend->mutable_null();
    uint64_t size = 0;
    BP_RETURN_IF_ERROR(SetIfGiven<uint64_t>(f, "null-size", ParseSize, &size));
    n->set_size_bytes(size);
    bool read_zeroes = false;
    BP_RETURN_IF_ERROR(SetIfGiven<bool>(f, "read-zeroes", ParseBool, &read_zeroes));
    n->set_read_zeroes(read_zeroes);
    v1::NullCompletion completion = v1::NULL_COMPLETION_UNSPECIFIED;
    BP_RETURN_IF_ERROR(
        SetIfGiven<v1::NullCompletion>(f, "null-completion", ParseNullCompletion, &completion));
    n->set_completion(completion);
  }
  v1::ImageFormat format = v1::IMAGE_FORMAT_UNSPECIFIED;
  BP_RETURN_IF_ERROR(SetIfGiven<v1::ImageFormat>(f, "format", ParseImageFormat, &format));
  backend->set_format(format);
  v1::CacheMode cache = v1::CACHE_MODE_UNSPECIFIED;
  BP_RETURN_IF_ERROR(SetIfGiven<v1::CacheMode>(f, "cache", ParseCacheMode, &cache));
  backend->set_cache(cache);
  bool read_only = false;
  BP_RETURN_IF_ERROR(SetIfGiven<bool>(f, "read-only", ParseBool, &read_only));
  backend->set_read_only(read_only);
  v1::DiscardMode discard = v1::DISCARD_MODE_UNSPECIFIED;
  BP_RETURN_IF_ERROR(SetIfGiven<v1::DiscardMode>(f, "discard", ParseDiscardMode, &discard));
  backend->set_discard(discard);
  v1::DetectZeroes detect_zeroes = v1::DETECT_ZEROES_UNSPECIFIED;
  BP_RETURN_IF_ERROR(
      SetIfGiven<v1::DetectZeroes>(f, "detect-zeroes", ParseDetectZeroes, &detect_zeroes));
  backend->set_detect_zeroes(detect_zeroes);
  uint32_t lbs = 0;
  BP_RETURN_IF_ERROR(SetIfGiven<uint32_t>(f, "lbs", ParseLogicalBlockSize, &lbs));
  backend->set_logical_block_size(lbs);
  v1::ErrorPolicy error_policy = v1::ERROR_POLICY_UNSPECIFIED;
  BP_RETURN_IF_ERROR(
      SetIfGiven<v1::ErrorPolicy>(f, "error-policy", ParseErrorPolicy, &error_policy));
  backend->set_error_policy(error_policy);

  const bool xen = AnyGiven(f, "xen-", AttachSpec());
  const bool vhost = AnyGiven(f, "vhost-", AttachSpec());
  if (xen && vhost) {
    return absl::InvalidArgumentError(
        "--xen-* and --vhost-* flags are exclusive: a device has one frontend");
  }
  if (!xen && !vhost) {
    return absl::InvalidArgumentError(
        "a frontend is required: --xen-domid N --xen-vdev DEV, or --vhost-socket PATH");
  }
  if (xen) {
    v1::XenFrontend* x = request.mutable_spec()->mutable_xen();
    uint32_t n = 0;
    BP_RETURN_IF_ERROR(SetIfGiven<uint32_t>(f, "xen-domid", ParseUint32, &n));
    x->set_domid(n);
    if (const std::string* vdev = f.Get("xen-vdev")) x->set_virtual_device(*vdev);
    n = 0;
    BP_RETURN_IF_ERROR(SetIfGiven<uint32_t>(f, "xen-max-queues", ParseUint32, &n));
    x->set_max_queues(n);
    n = 0;
    BP_RETURN_IF_ERROR(SetIfGiven<uint32_t>(f, "xen-max-ring-page-order", ParseUint32, &n));
    x->set_max_ring_page_order(n);
    if (f.Has("xen-persistent-grants")) {
      bool b = true;
      BP_RETURN_IF_ERROR(SetIfGiven<bool>(f, "xen-persistent-grants", ParseBool, &b));
      x->set_persistent_grants(b);
    }
    n = 0;
    BP_RETURN_IF_ERROR(SetIfGiven<uint32_t>(f, "xen-max-indirect-segments", ParseUint32, &n));
    x->set_max_indirect_segments(n);
    bool disable_indirect = false;
    BP_RETURN_IF_ERROR(SetIfGiven<bool>(f, "xen-disable-indirect", ParseBool, &disable_indirect));
    x->set_disable_indirect(disable_indirect);
    if (f.Has("xen-poll-us")) {
      n = 0;
      BP_RETURN_IF_ERROR(SetIfGiven<uint32_t>(f, "xen-poll-us", ParseUint32, &n));
      x->set_poll_us(n);
    }
  } else {
    v1::VhostUserFrontend* v = request.mutable_spec()->mutable_vhost_user();
    if (const std::string* socket = f.Get("vhost-socket")) v->set_socket_path(*socket);
    uint32_t n = 0;
    BP_RETURN_IF_ERROR(SetIfGiven<uint32_t>(f, "vhost-queues", ParseUint32, &n));
    v->set_num_queues(n);
    n = 0;
    BP_RETURN_IF_ERROR(SetIfGiven<uint32_t>(f, "vhost-queue-size", ParseUint32, &n));
    v->set_queue_size(n);
  }
  return request;
}

absl::StatusOr<Request> BuildDrain(const Parsed& parsed) {
  v1::DrainDeviceRequest request;
  request.set_device_id(parsed.positionals[0]);
  BP_RETURN_IF_ERROR(SetTimeout(parsed.flags, &request));
  return request;
}

absl::StatusOr<Request> BuildResume(const Parsed& parsed) {
  v1::ResumeDeviceRequest request;
  request.set_device_id(parsed.positionals[0]);
  return request;
}

absl::StatusOr<Request> BuildDetach(const Parsed& parsed) {
  v1::DetachDeviceRequest request;
  request.set_device_id(parsed.positionals[0]);
  bool force = false;
  BP_RETURN_IF_ERROR(SetIfGiven<bool>(parsed.flags, "force", ParseBool, &force));
  request.set_force(force);
  BP_RETURN_IF_ERROR(SetTimeout(parsed.flags, &request));
  return request;
}

absl::StatusOr<Request> BuildResize(const Parsed& parsed) {
  v1::ResizeDeviceRequest request;
  request.set_device_id(parsed.positionals[0]);
  if (!parsed.flags.Has("size")) return absl::InvalidArgumentError("--size is required");
  uint64_t size = 0;
  BP_RETURN_IF_ERROR(SetIfGiven<uint64_t>(parsed.flags, "size", ParseSize, &size));
  request.set_new_size_bytes(size);
  bool allow_shrink = false;
  BP_RETURN_IF_ERROR(SetIfGiven<bool>(parsed.flags, "allow-shrink", ParseBool, &allow_shrink));
  request.set_allow_shrink(allow_shrink);
  return request;
}

absl::StatusOr<Request> BuildGet(const Parsed& parsed) {
  v1::GetDeviceRequest request;
  request.set_device_id(parsed.positionals[0]);
  return request;
}

absl::StatusOr<Request> BuildList(const Parsed& parsed) {
  v1::ListDevicesRequest request;
  for (const std::string& value : parsed.flags.GetAll("state")) {
    for (absl::string_view name : absl::StrSplit(value, ',', absl::SkipEmpty())) {
      absl::StatusOr<v1::DeviceState> state = FlagValue("state", ParseDeviceState(name));
      if (!state.ok()) return state.status();
      request.add_states(*state);
    }
  }
  v1::FrontendKind kind = v1::FRONTEND_KIND_UNSPECIFIED;
  BP_RETURN_IF_ERROR(
      SetIfGiven<v1::FrontendKind>(parsed.flags, "frontend", ParseFrontendKind, &kind));
  request.set_frontend_kind(kind);
  int32_t page_size = 0;
  BP_RETURN_IF_ERROR(
      SetIfGiven<int32_t>(parsed.flags, "page-size", ParseNonNegativeInt32, &page_size));
  request.set_page_size(page_size);
  return request;
}

absl::StatusOr<Request> BuildWatch(const Parsed& parsed) {
  v1::WatchDevicesRequest request;
  if (!parsed.positionals.empty()) request.set_device_id(parsed.positionals[0]);
  return request;
}

absl::StatusOr<Request> BuildStats(const Parsed& parsed) {
  v1::GetDeviceStatsRequest request;
  request.set_device_id(parsed.positionals[0]);
  return request;
}

// In the order of the Request variant.
const std::vector<CommandSpec>& Commands() {
  static const auto* commands = new std::vector<CommandSpec>{
      {"attach",
       "attach ID (--path PATH | --null-size SIZE) (--xen-domid N --xen-vdev DEV | "
       "--vhost-socket PATH) [flags]",
       "create a device and start its worker",
       "Creates device ID backed by PATH and starts its worker. Idempotent: attaching an existing\n"
       "ID with the same spec returns the device; another spec fails with ALREADY_EXISTS.\n"
       "Exactly one backend: a file (--path) or a null backend that stores nothing (--null-size,\n"
       "for benchmarks of the stack above the disk). Exactly one frontend: Xen (--xen-*) or\n"
       "vhost-user (--vhost-*).",
       1,
       1,
       {
           {"path", "PATH", "absolute path of the backing file or block device"},
           {"null-size", "SIZE",
            "null backend of this size instead of a file (1G, 512M, bytes); writes are dropped"},
           {"read-zeroes", "", "null backend: reads return zeroes (default: buffers untouched)"},
           {"null-completion", "nop|deferred",
            "null backend: complete through an io_uring NOP (default) or on the next loop pass "
            "without a kernel call (like QEMU's null-co)"},
           {"format", "FORMAT", "image format: raw (default raw)"},
           {"cache", "MODE", "none|writeback|writethrough (default none)"},
           {"read-only", "", "export the device read-only"},
           {"discard", "MODE", "ignore|unmap (default ignore)"},
           {"detect-zeroes", "MODE", "off|on|unmap (default off)"},
           {"lbs", "BYTES", "logical block size: 512|4096 (default 512)"},
           {"error-policy", "POLICY", "report|stop (default report)"},
           {"xen-domid", "N", "Xen guest domain id, 1..32751"},
           {"xen-vdev", "DEV",
            "virtual device: a name (xvda, xvdb1, hda, sdb) or a number (51712)"},
           {"xen-max-queues", "N", "queues offered to the frontend (0 = 4, at most 16)"},
           {"xen-max-ring-page-order", "N", "log2 of ring pages, 0..4"},
           {"xen-persistent-grants", "",
            "offer persistent grants (default true; =false to disable)"},
           {"xen-max-indirect-segments", "N",
            "segments per indirect request (0 = 32, at most 256)"},
           {"xen-disable-indirect", "", "do not offer indirect requests"},
           {"xen-poll-us", "N",
            "busy-poll the rings for N us after the last request (0 = no polling; default: the "
            "controller's --xen-poll-us)"},
           {"vhost-socket", "PATH", "absolute path of the vhost-user socket the worker listens on"},
           {"vhost-queues", "N", "virtqueues (0 = 1, at most 64)"},
           {"vhost-queue-size", "N", "virtqueue size, a power of two 64..32768 (0 = 256)"},
       },
       BuildAttach},
      {"drain",
       "drain ID [--timeout DURATION]",
       "stop admitting guest I/O and wait for in-flight I/O",
       "Stops admitting new guest I/O, waits for in-flight I/O and flushes. Fails with\n"
       "DEADLINE_EXCEEDED (naming the in-flight count) if --timeout ends first; the device then\n"
       "stays draining and becomes drained on its own. Draining a drained device is a no-op.",
       1,
       1,
       {{"timeout", "DURATION", "how long to wait for in-flight I/O (default 30s on the server)"}},
       BuildDrain},
      {"resume",
       "resume ID",
       "release queued guest I/O of a draining or drained device",
       "Releases queued guest I/O of a draining or drained device, in order. Fails with\n"
       "FAILED_PRECONDITION in any other state.",
       1,
       1,
       {},
       BuildResume},
      {"detach",
       "detach ID [--force] [--timeout DURATION]",
       "drain, stop the worker and remove the device",
       "Drains the device, stops its worker and removes it. With --force the worker is killed\n"
       "without draining (in-flight guest I/O is lost to the guest). NOT_FOUND for an unknown ID.",
       1,
       1,
       {{"force", "", "kill the worker without draining"},
        {"timeout", "DURATION", "drain timeout when not forced (default 30s on the server)"}},
       BuildDetach},
      {"resize",
       "resize ID --size SIZE [--allow-shrink]",
       "grow (or shrink) the backing file",
       "Sets the device size to SIZE (bytes, or with a K, M, G, T suffix: 2G, 1536M). The size\n"
       "must be a positive multiple of the logical block size. Shrinking needs --allow-shrink and\n"
       "is refused below the highest offset the guest ever wrote.",
       1,
       1,
       {{"size", "SIZE", "new size, e.g. 10G (required)"},
        {"allow-shrink", "", "allow a size below the current one"}},
       BuildResize},
      {"get",
       "get ID",
       "show one device",
       "Shows the spec and status of device ID.",
       1,
       1,
       {},
       BuildGet},
      {"list",
       "list [--state STATE]... [--frontend KIND] [--page-size N]",
       "list devices",
       "Lists devices sorted by id, following every page. STATE is one of attaching,\n"
       "waiting-for-frontend, connected, draining, drained, detaching, failed (repeat the flag or\n"
       "separate with commas to match any of them); KIND is xen or vhost-user.",
       0,
       0,
       {{"state", "STATE", "only devices in this state (repeatable)", true},
        {"frontend", "KIND", "only devices with this frontend: xen|vhost-user"},
        {"page-size", "N", "devices per request (0 = server default 100, at most 1000)"}},
       BuildList},
      {"watch",
       "watch [ID]",
       "stream device changes",
       "Prints a snapshot of the devices (or of device ID), then one line per change, until\n"
       "interrupted (Ctrl-C) or until --deadline if given; both end with exit status 0.",
       0,
       1,
       {},
       BuildWatch},
      {"stats",
       "stats ID",
       "show per-operation I/O accounting",
       "Shows the worker's per-operation counters of device ID.",
       1,
       1,
       {},
       BuildStats},
  };
  return *commands;
}

const CommandSpec& AttachSpec() { return Commands()[0]; }

bool AnyGiven(const ParsedFlags& flags, absl::string_view prefix, const CommandSpec& spec) {
  for (const FlagSpec& flag : spec.flags) {
    if (absl::StartsWith(flag.name, prefix) && flags.Has(flag.name)) return true;
  }
  return false;
}

const CommandSpec* FindCommand(absl::string_view name) {
  for (const CommandSpec& spec : Commands()) {
    if (spec.name == name) return &spec;
  }
  return nullptr;
}

const FlagSpec* FindFlag(std::span<const FlagSpec> flags, absl::string_view name) {
  for (const FlagSpec& flag : flags) {
    if (flag.name == name) return &flag;
  }
  return nullptr;
}

void AppendFlagHelp(std::span<const FlagSpec> flags, std::string* out) {
  size_t width = 0;
  std::vector<std::string> heads;
  for (const FlagSpec& flag : flags) {
    heads.push_back(absl::StrCat("--", flag.name, flag.value.empty() ? "" : " ", flag.value));
    width = std::max(width, heads.back().size());
  }
  for (size_t i = 0; i < flags.size(); ++i) {
    absl::StrAppend(out, "  ", heads[i], std::string(width - heads[i].size() + 2, ' '),
                    flags[i].help, "\n");
  }
}

std::string CommandHelp(const CommandSpec& spec) {
  std::string out = absl::StrCat("Usage: bpctl ", spec.usage, "\n\n", spec.description, "\n");
  if (!spec.flags.empty()) {
    absl::StrAppend(&out, "\nFlags:\n");
    AppendFlagHelp(spec.flags, &out);
  }
  absl::StrAppend(&out, "\nGlobal flags:\n");
  AppendFlagHelp(GlobalFlags(), &out);
  return out;
}

}  // namespace

std::string GeneralHelp() {
  std::string out =
      "Usage: bpctl [global flags] COMMAND [ARGS] [flags]\n\n"
      "Manages the block devices of blockplaned over its gRPC API.\n\nCommands:\n";
  for (const CommandSpec& spec : Commands()) {
    absl::StrAppend(&out, "  ", spec.name, std::string(9 - spec.name.size(), ' '), spec.summary,
                    "\n");
  }
  absl::StrAppend(&out, "\nGlobal flags (accepted before or after the command):\n");
  AppendFlagHelp(GlobalFlags(), &out);
  absl::StrAppend(&out,
                  "\nSizes take K, M, G, T suffixes (binary: 1K = 1024). Durations: 30s, 500ms, "
                  "2m.\nExit status: 0 success, 1 error from the server or the connection (printed "
                  "as CODE: message), 2 usage error.\nRun 'bpctl COMMAND --help' for the flags of "
                  "a command.\n");
  return out;
}

absl::string_view CommandName(const Request& request) { return Commands()[request.index()].name; }

absl::StatusOr<Invocation> ParseCommandLine(const std::vector<std::string>& args,
                                            const ParseDefaults& defaults) {
  Invocation invocation;
  invocation.global.socket = defaults.socket;
  const CommandSpec* command = nullptr;
  bool help = false;
  bool socket_given = false;
  bool only_positionals = false;
  Parsed parsed;
  ParsedFlags global;

  const auto usage = [&](absl::string_view message) {
    return absl::InvalidArgumentError(
        command == nullptr ? std::string(message) : absl::StrCat(command->name, ": ", message));
  };

  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    const bool is_flag = !only_positionals && arg.size() > 1 && arg[0] == '-';
    if (!is_flag) {
      if (command == nullptr) {
        if (arg == "help") {
          help = true;
          continue;
        }
        command = FindCommand(arg);
        if (command == nullptr) {
          return absl::InvalidArgumentError(absl::StrCat("unknown command \"", arg, "\""));
        }
      } else {
        parsed.positionals.push_back(arg);
      }
      continue;
    }
    if (arg == "--") {
      only_positionals = true;
      continue;
    }
    if (arg == "-h") {
      help = true;
      continue;
    }
    if (!absl::StartsWith(arg, "--")) {
      return usage(absl::StrCat("unknown flag ", arg, " (flags start with --)"));
    }
    absl::string_view body = absl::string_view(arg).substr(2);
    std::optional<std::string> inline_value;
    if (const size_t eq = body.find('='); eq != absl::string_view::npos) {
      inline_value = std::string(body.substr(eq + 1));
      body = body.substr(0, eq);
    }
    if (body == "logical-block-size") body = "lbs";
    const FlagSpec* flag = FindFlag(GlobalFlags(), body);
    ParsedFlags* target = &global;
    if (flag == nullptr && command != nullptr) {
      flag = FindFlag(command->flags, body);
      target = &parsed.flags;
    }
    if (flag == nullptr) {
      if (command == nullptr && FindFlag(AttachSpec().flags, body) != nullptr) {
        return usage(absl::StrCat("flag --", body, " goes after the command"));
      }
      return usage(absl::StrCat("unknown flag --", body));
    }
    std::string value;
    if (flag->value.empty()) {
      value = inline_value.value_or("true");
    } else if (inline_value.has_value()) {
      value = *inline_value;
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return usage(absl::StrCat("flag --", body, " needs a value (", flag->value, ")"));
    }
    if (!flag->repeatable && target->Has(flag->name) && *target->Get(flag->name) != value) {
      return usage(absl::StrCat("flag --", body, " given twice with different values"));
    }
    if (flag->name == "help") {
      absl::StatusOr<bool> b = FlagValue("help", ParseBool(value));
      if (!b.ok()) return usage(b.status().message());
      help = help || *b;
      continue;
    }
    target->Add(flag->name, std::move(value));
  }

  if (help) {
    // `bpctl help attach`: the first positional names the command.
    if (command == nullptr)
      invocation.help = GeneralHelp();
    else
      invocation.help = CommandHelp(*command);
    return invocation;
  }
  if (command == nullptr) {
    return absl::InvalidArgumentError(
        "missing command (attach, drain, resume, detach, resize, "
        "get, list, watch, stats)");
  }

  if (const std::string* socket = global.Get("socket")) {
    if (socket->empty()) return usage("--socket: must not be empty");
    invocation.global.socket = *socket;
    socket_given = true;
  }
  if (const std::string* address = global.Get("address")) {
    if (address->empty()) return usage("--address: must not be empty");
    if (socket_given) return usage("--socket and --address are exclusive");
    invocation.global.address = *address;
  }
  int tls_flags = 0;
  for (auto [flag, field] : {std::pair{"tls-ca", &invocation.global.tls_ca_file},
                             std::pair{"tls-cert", &invocation.global.tls_cert_file},
                             std::pair{"tls-key", &invocation.global.tls_key_file}}) {
    if (const std::string* file = global.Get(flag)) {
      if (file->empty()) return usage(absl::StrCat("--", flag, ": must not be empty"));
      *field = *file;
      ++tls_flags;
    }
  }
  if (tls_flags != 0 && tls_flags != 3) {
    return usage("--tls-ca, --tls-cert and --tls-key go together (mutual TLS needs all three)");
  }
  if (tls_flags == 3 && invocation.global.address.empty()) {
    return usage("--tls-* need --address HOST:PORT (the unix socket does not use TLS)");
  }
  if (const std::string* deadline = global.Get("deadline")) {
    absl::StatusOr<absl::Duration> d = FlagValue("deadline", ParseDuration(*deadline));
    if (!d.ok()) return usage(d.status().message());
    if (*d <= absl::ZeroDuration()) return usage("--deadline: must be positive");
    invocation.global.deadline = *d;
    invocation.global.deadline_set = true;
  }
  if (const std::string* json = global.Get("json")) {
    absl::StatusOr<bool> b = FlagValue("json", ParseBool(*json));
    if (!b.ok()) return usage(b.status().message());
    invocation.global.json = *b;
  }

  if (parsed.positionals.size() < command->min_positionals) {
    return usage("missing device ID");
  }
  if (parsed.positionals.size() > command->max_positionals) {
    return usage(
        absl::StrCat("unexpected argument \"", parsed.positionals[command->max_positionals], "\""));
  }
  absl::StatusOr<Request> request = command->build(parsed);
  if (!request.ok()) return usage(request.status().message());
  invocation.request = *std::move(request);
  return invocation;
}

}  // namespace blockplane::controller::cli
