#include "worker/worker.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/unix_socket.h"
#include "worker/backend/null_backend.h"
#include "worker/backend/uring_backend.h"

namespace blockplane::worker {
namespace {

BlockDeviceOptions ToBlockOptions(const blockplane::v1::BackendSpec& spec) {
  BlockDeviceOptions o;
  o.logical_block_size = spec.logical_block_size() == 0 ? 512 : spec.logical_block_size();
  o.read_only = spec.read_only();
  o.discard = spec.discard() == blockplane::v1::DISCARD_MODE_UNMAP ? DiscardMode::kUnmap
                                                                   : DiscardMode::kIgnore;
  switch (spec.detect_zeroes()) {
    case blockplane::v1::DETECT_ZEROES_ON:
      o.detect_zeroes = DetectZeroes::kOn;
      break;
    case blockplane::v1::DETECT_ZEROES_UNMAP:
      o.detect_zeroes = DetectZeroes::kUnmap;
      break;
    default:
      o.detect_zeroes = DetectZeroes::kOff;
  }
  o.error_policy = spec.error_policy() == blockplane::v1::ERROR_POLICY_STOP ? ErrorPolicy::kStop
                                                                            : ErrorPolicy::kReport;
  return o;
}

CacheMode ToCacheMode(blockplane::v1::CacheMode mode) {
  switch (mode) {
    case blockplane::v1::CACHE_MODE_WRITEBACK:
      return CacheMode::kWriteback;
    case blockplane::v1::CACHE_MODE_WRITETHROUGH:
      return CacheMode::kWritethrough;
    default:
      return CacheMode::kNone;
  }
}

}  // namespace

Worker::Worker(internal::WorkerConfig config) : config_(std::move(config)) {}

Worker::~Worker() {
  if (loop_) {
    if (conn_watch_) loop_->RemoveFd(conn_watch_);
    if (listen_watch_) loop_->RemoveFd(listen_watch_);
    if (signal_watch_) loop_->RemoveFd(signal_watch_);
  }
  exporter_.reset();
  blkif_.reset();
  device_.reset();
  if (listen_fd_) ::unlink(config_.control_socket().c_str());
}

absl::Status Worker::Init() {
  absl::StatusOr<std::unique_ptr<common::EventLoop>> loop = common::EventLoop::Create();
  if (!loop.ok()) return loop.status();
  loop_ = std::move(*loop);

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  sigprocmask(SIG_BLOCK, &signals, nullptr);
  signal_fd_.Reset(signalfd(-1, &signals, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!signal_fd_) return absl::InternalError(absl::StrCat("signalfd: ", strerror(errno)));
  signal_watch_ = loop_->AddFd(signal_fd_.get(), POLLIN, [this](uint32_t) { OnSignal(); });

  if (!config_.stats_segment().empty()) {
    absl::StatusOr<std::unique_ptr<StatsSegment>> segment =
        StatsSegment::Open(config_.stats_segment(), config_.device_id(), config_.generation());
    if (segment.ok()) {
      stats_segment_ = std::move(*segment);
    } else {
      // Serving matters more than counting: carry on with counters that start at zero.
      BP_LOG(Error) << segment.status().message() << "; counters restart from zero";
    }
  }

  const blockplane::v1::BackendSpec& spec = config_.spec().backend();
  absl::StatusOr<std::unique_ptr<Backend>> backend = OpenBackend();
  absl::StatusOr<std::unique_ptr<BlockDevice>> device =
      backend.ok()
          ? BlockDevice::Create(loop_.get(), std::move(*backend),
                                [&] {
                                  BlockDeviceOptions o = ToBlockOptions(spec);
                                  o.on_error_stop = [this](int error) { OnErrorStop(error); };
                                  if (stats_segment_) {
                                    o.counters = stats_segment_->block_ops();
                                    o.layer_counters = stats_segment_->block_layer();
                                  }
                                  return o;
                                }())
          : absl::StatusOr<std::unique_ptr<BlockDevice>>(backend.status());
  if (device.ok()) {
    device_ = std::move(*device);
  } else {
    bool direct = !spec.has_null() && (spec.cache() == blockplane::v1::CACHE_MODE_NONE ||
                                       spec.cache() == blockplane::v1::CACHE_MODE_UNSPECIFIED);
    open_error_ = absl::FailedPreconditionError(
        absl::StrCat("cannot open ", spec.has_null() ? "the null backend" : spec.path(), ": ",
                     device.status().message(),
                     direct ? " (cache mode none needs O_DIRECT; try cache writeback)" : ""));
    state_ = internal::WORKER_STATE_FAILED;
    exit_status_ = 1;
    BP_LOG(Error) << open_error_.message();
  }

  absl::StatusOr<common::UniqueFd> listener = common::ListenUnix(config_.control_socket(), 4);
  if (!listener.ok()) return listener.status();
  listen_fd_ = std::move(*listener);
  listen_watch_ = loop_->AddFd(listen_fd_.get(), POLLIN, [this](uint32_t) { OnAccept(); });
  BP_LOG(Info) << "serving device " << config_.device_id() << " generation " << config_.generation()
               << " size " << (device_ ? device_->capacity() : 0) << " control "
               << config_.control_socket();
  if (device_ && ServesXen()) {
    if (absl::Status xen = StartXen(); !xen.ok()) {
      // Reported to the controller's Hello like a backing store that cannot be opened.
      open_error_ = absl::FailedPreconditionError(xen.message());
      state_ = internal::WORKER_STATE_FAILED;
      exit_status_ = 1;
      blkif_.reset();
      BP_LOG(Error) << open_error_.message();
    }
  }
  StartMetrics();
  return absl::OkStatus();
}

void Worker::StartMetrics() {
  metrics_state_.store(state_, std::memory_order_relaxed);
  metrics_size_.store(device_ ? device_->capacity() : 0, std::memory_order_relaxed);
  if (config_.metrics_listen().empty() || !device_) return;
  const char* frontend = config_.spec().has_xen()          ? "xen"
                         : config_.spec().has_vhost_user() ? "vhost_user"
                                                           : "none";
  auto collector = std::make_shared<DeviceCollector>(config_.device_id(), frontend,
                                                     [this] { return MetricsSnapshot(); });
  absl::StatusOr<std::unique_ptr<WorkerExporter>> exporter =
      WorkerExporter::Start(config_.metrics_listen(), std::move(collector));
  if (!exporter.ok()) {
    BP_LOG(Error) << exporter.status().message();
    return;
  }
  exporter_ = std::move(*exporter);
  BP_LOG(Info) << "metrics on http://" << exporter_->endpoint() << "/metrics";
}

DeviceMetricsSnapshot Worker::MetricsSnapshot() const {
  DeviceMetricsSnapshot s;
  s.block = device_->Stats();
  s.size_bytes = metrics_size_.load(std::memory_order_relaxed);
  std::string name = internal::WorkerState_Name(
      static_cast<internal::WorkerState>(metrics_state_.load(std::memory_order_relaxed)));
  s.state = absl::AsciiStrToLower(name.substr(sizeof("WORKER_STATE_") - 1));
  s.generation = config_.generation();
  if (xen_counters_[0] != nullptr) {
    s.transport.resize(xen::kBlkifMaxQueues);
    for (uint32_t q = 0; q < xen::kBlkifMaxQueues; ++q) {
      const xen::BlkifCounters* x = xen_counters_[q];
      TransportMetricsSnapshot& t = s.transport[q];
      t.requests_taken = x->requests_taken.Get();
      t.responses = x->responses.Get();
      t.notifications_sent = x->notifications_sent.Get();
      t.notifications_received = x->notifications_received.Get();
      t.ring_full_stalls = x->ring_full_stalls.Get();
      t.broken_queues = x->broken_queues.Get();
      t.io_errors = x->io_errors.Get();
      for (size_t i = 0; i < xen::kInvalidReasonCount; ++i) {
        t.invalid.emplace_back(
            std::string(xen::InvalidReasonName(static_cast<xen::InvalidReason>(i))),
            x->invalid[i].Get());
      }
      t.grant_maps = x->grant_maps.Get();
      t.grant_map_failures = x->grant_map_failures.Get();
      t.grant_unmaps = x->grant_unmaps.Get();
      t.grant_copies = x->grant_copies.Get();
      t.grant_copy_failures = x->grant_copy_failures.Get();
      t.persistent_hits = x->persistent_hits.Get();
      t.persistent_misses = x->persistent_misses.Get();
      t.persistent_evictions = x->persistent_evictions.Get();
      t.requests_replayed = x->requests_replayed.Get();
    }
  }
  // The exporter's thread: EventLoop::counters() may be read from any thread.
  const common::EventLoop::Counters loop = loop_->counters();
  s.loop = {.passes = loop.passes,
            .sleeps = loop.sleeps,
            .submit_calls = loop.submit_calls,
            .sqes_submitted = loop.sqes_submitted,
            .completions = loop.completions};
  return s;
}

bool Worker::ServesXen() const {
  return config_.spec().has_xen() && !config_.xen_platform().empty() &&
         config_.xen_platform() != "none";
}

absl::StatusOr<std::unique_ptr<Backend>> Worker::OpenBackend() {
  const blockplane::v1::BackendSpec& spec = config_.spec().backend();
  if (spec.has_null()) {
    NullBackend::Options options;
    // The size the controller records (it follows resizes); the spec's for an older controller.
    options.capacity = config_.size_bytes() != 0 ? config_.size_bytes() : spec.null().size_bytes();
    options.zero_reads = spec.null().read_zeroes();
    options.completion = spec.null().completion() == blockplane::v1::NULL_COMPLETION_DEFERRED
                             ? NullBackend::Completion::kDeferred
                             : NullBackend::Completion::kNop;
    return std::make_unique<NullBackend>(loop_.get(), options);
  }
  UringBackend::Options options;
  options.cache = ToCacheMode(spec.cache());
  options.read_only = spec.read_only();
  absl::StatusOr<std::unique_ptr<UringBackend>> backend =
      UringBackend::Open(loop_.get(), spec.path(), options);
  if (!backend.ok()) return backend.status();
  return std::unique_ptr<Backend>(std::move(*backend));
}

absl::Status Worker::StartXen() {
  const std::string& kind = config_.xen_platform();
  absl::StatusOr<std::unique_ptr<common::xen::XenPlatform>> platform =
      absl::InvalidArgumentError(absl::StrCat("unknown Xen platform '", kind, "'"));
  if (kind == "host") {
    platform = common::xen::CreateHostXenPlatform();
  } else if (kind == "emulated") {
    common::xen::EmulatedXenOptions options;
    options.run_dir = config_.xen_run_dir();
    options.domid = 0;
    // Rings, persistent grants of every queue and per-request mappings.
    options.max_grants = 65536;
    platform = common::xen::CreateEmulatedXenPlatform(options);
  }
  if (!platform.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("Xen platform ", kind, ": ", platform.status().message()));
  }
  xen_ = std::move(*platform);
  const blockplane::v1::XenFrontend& x = config_.spec().xen();
  xen::BlkifBackendOptions options;
  options.frontend_domid = static_cast<common::xen::DomainId>(x.domid());
  options.devid = config_.xen_devid();
  options.backend_path = absl::StrCat("/local/domain/", xen_->domid(), "/backend/vbd/", x.domid(),
                                      "/", config_.xen_devid());
  options.max_queues = x.max_queues() == 0 ? 4 : x.max_queues();
  options.max_ring_page_order = x.max_ring_page_order();
  options.persistent_grants = !x.has_persistent_grants() || x.persistent_grants();
  options.max_indirect_segments =
      x.disable_indirect() ? 0 : (x.max_indirect_segments() == 0 ? 32 : x.max_indirect_segments());
  options.grant_mode = config_.xen_grant_copy() ? xen::GrantMode::kCopy : xen::GrantMode::kMap;
  if (config_.xen_max_persistent_grants() != 0) {
    options.max_persistent_grants = config_.xen_max_persistent_grants();
  }
  options.poll_ns = uint64_t{config_.xen_poll_us()} * 1000;
  static_assert(xen::kBlkifMaxQueues <= kStatsSegmentQueues);
  for (uint32_t q = 0; q < xen::kBlkifMaxQueues; ++q) {
    xen_counters_[q] =
        stats_segment_ ? stats_segment_->transport<xen::BlkifCounters>(q) : &own_xen_counters_[q];
  }
  options.counters = xen_counters_;
  if (!config_.xen_request_journal().empty()) {
    absl::StatusOr<std::unique_ptr<xen::BlkifJournal>> journal =
        xen::BlkifJournal::Open(config_.xen_request_journal());
    if (journal.ok()) {
      xen_journal_ = std::move(*journal);
      options.journal = xen_journal_.get();
    } else {
      // Serving matters more: without it a crash of this worker may lose the guest's requests.
      BP_LOG(Error) << journal.status().message()
                    << "; requests in flight at a crash of this worker will not be answered";
    }
  }
  xen::BlkifBackend::Callbacks callbacks;
  callbacks.on_connection_changed = [this](bool connected) { OnFrontendConnection(connected); };
  blkif_ = std::make_unique<xen::BlkifBackend>(loop_.get(), xen_.get(), device_.get(), options,
                                               std::move(callbacks));
  if (absl::Status started = blkif_->Start(); !started.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("blkif backend ", options.backend_path, ": ", started.message()));
  }
  return absl::OkStatus();
}

void Worker::OnFrontendConnection(bool connected) {
  frontend_connected_ = connected;
  if (state_ == internal::WORKER_STATE_WAITING_FOR_FRONTEND ||
      state_ == internal::WORKER_STATE_CONNECTED) {
    SetState(ServingState(), connected ? "frontend connected" : "frontend disconnected");
  } else {
    SendEvent(connected ? "frontend connected" : "frontend disconnected");
  }
}

void Worker::DetachFrontend(std::function<void()> done) {
  if (!blkif_) {
    done();
    return;
  }
  // Requests queued in a drained device must complete before their grants can be unmapped.
  if (state_ == internal::WORKER_STATE_DRAINING || state_ == internal::WORKER_STATE_DRAINED ||
      device_->Stats().quiesced) {
    (void)device_->Resume();
  }
  auto finished = std::make_shared<bool>(false);
  auto once = [finished, done](const char* how) {
    if (*finished) return;
    *finished = true;
    BP_LOG(Info) << "frontend detached (" << how << ")";
    done();
  };
  constexpr std::chrono::seconds kDetachTimeout{10};
  loop_->AddTimer(kDetachTimeout, [once] { once("timed out waiting for in-flight I/O"); });
  blkif_->Detach([this, once] {
    xen::BlkifBackendStats stats = blkif_->Stats();
    BP_LOG(Info) << "blkif: " << stats.requests_taken << " requests (" << stats.requests_replayed
                 << " replayed from the journal), " << stats.grant_maps << " pages mapped, "
                 << stats.grant_unmaps << " unmapped, " << stats.persistent_hits
                 << " persistent hits, " << stats.persistent_evictions << " persistent evictions, "
                 << blkif_->mapped_pages() << " still mapped";
    once("Closed");
  });
}

int Worker::Run() {
  loop_->Run();
  return exit_status_;
}

void Worker::OnSignal() {
  signalfd_siginfo info;
  while (::read(signal_fd_.get(), &info, sizeof(info)) == sizeof(info)) {
    BP_LOG(Info) << "received " << strsignal(static_cast<int>(info.ssi_signo)) << "; stopping";
    BeginStop(0, false);
  }
}

void Worker::OnAccept() {
  for (;;) {
    int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    // The controller restarted (or reconnected): the newest connection is the controller.
    CloseConnection();
    conn_fd_.Reset(fd);
    reader_ = common::FrameReader();
    conn_watch_ = loop_->AddFd(fd, POLLIN, [this](uint32_t revents) {
      absl::Status read = reader_.ReadAvailable(conn_fd_.get());
      for (;;) {
        absl::StatusOr<std::optional<std::string>> frame = reader_.NextFrame();
        if (!frame.ok() || !frame->has_value()) {
          if (!frame.ok()) read = frame.status();
          break;
        }
        internal::ControlRequest request;
        if (!request.ParseFromString(**frame)) {
          read = absl::DataLossError("undecodable control request");
          break;
        }
        HandleRequest(request);
        if (!conn_fd_) return;  // closed while handling
      }
      if (!read.ok()) {
        BP_LOG(Info) << "controller connection closed: " << read.message();
        CloseConnection();
      }
    });
  }
}

void Worker::CloseConnection() {
  if (conn_watch_) loop_->RemoveFd(conn_watch_);
  conn_watch_ = common::EventLoop::kInvalidFdWatch;
  conn_fd_.Reset();
}

internal::WorkerStatus Worker::Status() const {
  internal::WorkerStatus s;
  s.set_device_id(config_.device_id());
  s.set_generation(config_.generation());
  s.set_pid(getpid());
  s.set_state(state_);
  if (device_) {
    BlockDeviceStats stats = device_->Stats();
    s.set_size_bytes(device_->capacity());
    s.set_in_flight(stats.in_flight);
    s.set_highest_written_offset(stats.highest_written_offset);
  }
  if (exporter_) s.set_metrics_endpoint(exporter_->endpoint());
  if (!open_error_.ok()) s.set_error(std::string(open_error_.message()));
  if (!error_stop_.empty()) s.set_error(error_stop_);
  if (blkif_) {
    xen::BlkifFrontendInfo info = blkif_->FrontendInfo();
    blockplane::v1::FrontendStatus* f = s.mutable_frontend();
    f->set_xen_backend_state(xen::XenbusStateName(info.backend_state));
    f->set_xen_frontend_state(xen::XenbusStateName(info.frontend_state));
    f->set_num_queues(info.num_queues);
    f->set_protocol(info.protocol);
    f->set_persistent_grants(info.persistent_grants);
  }
  return s;
}

blockplane::v1::DeviceStats Worker::Stats() const {
  blockplane::v1::DeviceStats out;
  out.set_device_id(config_.device_id());
  out.set_worker_generation(config_.generation());
  if (!device_) return out;
  BlockDeviceStats stats = device_->Stats();
  for (int i = 0; i < kBlockOpCount; ++i) {
    const BlockOpStats& op = stats.ops[i];
    blockplane::v1::OpStats* o = out.add_ops();
    o->set_op(BlockOpName(static_cast<BlockOp>(i)));
    o->set_operations(op.ops);
    o->set_bytes(op.bytes);
    o->set_failed(op.failed);
    o->set_invalid(op.invalid);
    o->set_total_time_ns(op.total_time_ns);
  }
  out.set_in_flight(stats.in_flight);
  out.set_highest_written_offset(stats.highest_written_offset);
  out.set_idle_ns(stats.idle_ns);
  out.set_size_bytes(device_->capacity());
  const common::EventLoop::Counters c = loop_->counters();
  blockplane::v1::LoopStats* loop = out.mutable_loop();
  loop->set_passes(c.passes);
  loop->set_sleeps(c.sleeps);
  loop->set_submit_calls(c.submit_calls);
  loop->set_sqes_submitted(c.sqes_submitted);
  loop->set_completions(c.completions);
  blockplane::v1::BlockLayerStats* block = out.mutable_block_layer();
  block->set_flushes_skipped(stats.flushes_skipped);
  block->set_read_modify_writes(stats.rmw);
  block->set_bounced(stats.bounced);
  block->set_split(stats.split);
  block->set_serialising_waits(stats.serialising_waits);
  block->set_zero_writes_detected(stats.zero_writes_detected);
  block->set_write_zeroes_fallbacks(stats.write_zeroes_fallbacks);
  block->set_error_stops(stats.error_stops);
  block->set_discard_withdrawn(stats.discard_withdrawn != 0);
  block->set_write_zeroes_withdrawn(stats.write_zeroes_withdrawn != 0);
  return out;
}

internal::WorkerState Worker::ServingState() const {
  // CONNECTED while a frontend is attached (Xen; vhost-user later).
  return frontend_connected_ ? internal::WORKER_STATE_CONNECTED
                             : internal::WORKER_STATE_WAITING_FOR_FRONTEND;
}

void Worker::OnErrorStop(int error) {
  error_stop_ = absl::StrCat("I/O error (", strerror(-error),
                             ") with error policy stop: the device is paused and no request is "
                             "lost; fix the backing store and resume the device");
  BP_LOG(Error) << error_stop_;
  SetState(internal::WORKER_STATE_DRAINED, "paused on I/O error");
}

void Worker::Reply(uint64_t id, const absl::Status& status,
                   const internal::WorkerStatus* status_message,
                   const blockplane::v1::DeviceStats* stats) {
  if (!conn_fd_) return;
  internal::WorkerMessage message;
  internal::ControlResponse* response = message.mutable_response();
  response->set_id(id);
  response->set_code(static_cast<int>(status.code()));
  response->set_message(std::string(status.message()));
  *response->mutable_status() = status_message ? *status_message : Status();
  if (stats) *response->mutable_stats() = *stats;
  if (absl::Status s = common::WriteFrame(conn_fd_.get(), message); !s.ok()) {
    BP_LOG(Warning) << "reply to controller lost: " << s.message();
    CloseConnection();
  }
}

void Worker::SendEvent(const std::string& reason) {
  if (!conn_fd_) return;
  internal::WorkerMessage message;
  *message.mutable_event()->mutable_status() = Status();
  message.mutable_event()->set_reason(reason);
  if (!common::WriteFrame(conn_fd_.get(), message).ok()) CloseConnection();
}

void Worker::SetState(internal::WorkerState state, const std::string& reason) {
  if (state == state_) return;
  BP_LOG(Info) << internal::WorkerState_Name(state_) << " -> " << internal::WorkerState_Name(state)
               << " (" << reason << ")";
  state_ = state;
  metrics_state_.store(state, std::memory_order_relaxed);
  SendEvent(reason);
}

void Worker::BeginStop(uint64_t reply_id, bool force) {
  if (state_ == internal::WORKER_STATE_STOPPING) {  // a detach is already under way
    if (reply_id != 0) Reply(reply_id, absl::OkStatus());
    return;
  }
  const bool frontend = blkif_ != nullptr;
  SetState(internal::WORKER_STATE_STOPPING, force ? "stop (force)" : "stop");
  if (!frontend) {
    if (reply_id != 0) Reply(reply_id, absl::OkStatus());
    loop_->Stop();
    return;
  }
  // The frontend first: Closing, in-flight I/O completes, every grant unmapped, Closed.
  DetachFrontend([this, reply_id] {
    if (reply_id != 0) Reply(reply_id, absl::OkStatus());
    loop_->Stop();
  });
}

void Worker::HandleRequest(const internal::ControlRequest& request) {
  const uint64_t id = request.id();
  if (request.has_hello()) {
    Reply(id, open_error_);
    if (!open_error_.ok()) loop_->Stop();  // reported; nothing to serve
    return;
  }
  if (!open_error_.ok()) {
    Reply(id, open_error_);
    return;
  }
  switch (request.body_case()) {
    case internal::ControlRequest::kDrain:
      if (state_ == internal::WORKER_STATE_WAITING_FOR_FRONTEND ||
          state_ == internal::WORKER_STATE_CONNECTED) {
        SetState(internal::WORKER_STATE_DRAINING, "drain requested");
        device_->Drain([this](int result) {
          if (result != 0) {
            BP_LOG(Warning) << "flush at the end of the drain failed: " << strerror(-result);
          }
          if (state_ == internal::WORKER_STATE_DRAINING) {
            SetState(internal::WORKER_STATE_DRAINED, "drained");
          }
        });
      }
      Reply(id, absl::OkStatus());
      return;
    case internal::ControlRequest::kResume: {
      absl::Status resumed = absl::OkStatus();
      if (!error_stop_.empty()) {
        resumed = device_->ResumeAfterError();
        if (resumed.ok()) error_stop_.clear();
      } else if (state_ == internal::WORKER_STATE_DRAINING ||
                 state_ == internal::WORKER_STATE_DRAINED) {
        resumed = device_->Resume();
      }
      if (resumed.ok() &&
          (state_ == internal::WORKER_STATE_DRAINING || state_ == internal::WORKER_STATE_DRAINED)) {
        SetState(ServingState(), "resumed");
      }
      Reply(id, resumed);
      return;
    }
    case internal::ControlRequest::kResize: {
      absl::Status resized = device_->Resize(request.resize().size_bytes());
      if (resized.ok() && blkif_) resized = blkif_->Resize();
      metrics_size_.store(device_->capacity(), std::memory_order_relaxed);
      Reply(id, resized);
      if (resized.ok()) SendEvent("resized");
      return;
    }
    case internal::ControlRequest::kStop:
      BeginStop(id, request.stop().force());
      return;
    case internal::ControlRequest::kStats: {
      blockplane::v1::DeviceStats stats = Stats();
      Reply(id, absl::OkStatus(), nullptr, &stats);
      return;
    }
    case internal::ControlRequest::kSelfTestIo: {
      if (self_test_ && !self_test_->finished()) {
        Reply(id, absl::FailedPreconditionError("a self-test I/O run is already in progress"));
        return;
      }
      absl::StatusOr<std::unique_ptr<SelfTestIo>> run = SelfTestIo::Start(
          device_.get(), request.self_test_io(), [this, id](const SelfTestIo::Result& r) {
            blockplane::v1::DeviceStats stats = Stats();
            Reply(id,
                  r.failed == 0 ? absl::OkStatus()
                                : absl::InternalError(absl::StrCat(
                                      r.failed, " of ", r.completed,
                                      " requests failed, first: ", strerror(-r.first_error))),
                  nullptr, &stats);
          });
      if (!run.ok()) {
        Reply(id, run.status());
        return;
      }
      self_test_ = std::move(*run);
      return;
    }
    default:
      Reply(id, absl::InvalidArgumentError("unknown control request"));
  }
}

}  // namespace blockplane::worker
