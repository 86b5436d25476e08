// Unit tests for WorkerProcess::Adopt (controller/worker_process.cc) against a fake worker: a
// thread that listens on a unix socket and plays the worker's side of the Hello exchange. The
// fake worker claims the test's own pid, so the pidfd that Adopt opens refers to a live process.

#include "controller/worker_process.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/frame_channel.h"
#include "common/unix_socket.h"
#include "gtest/gtest.h"

namespace blockplane::controller {
namespace {

constexpr char kDevice[] = "vol-1";
constexpr uint64_t kGeneration = 7;

internal::WorkerStatus Status(uint64_t generation, internal::WorkerState state) {
  internal::WorkerStatus status;
  status.set_device_id(kDevice);
  status.set_generation(generation);
  status.set_pid(::getpid());
  status.set_state(state);
  return status;
}

// A fake worker serving one connection: it sends `early_events` events (as a restarted worker
// whose frontend re-attached at once does), then answers the Hello with `reply_status`, or
// closes the connection without answering when `answer` is false.
class FakeWorker {
 public:
  FakeWorker(int early_events, internal::WorkerStatus reply_status, bool answer = true) {
    char dir_template[] = "/tmp/worker_process_test.XXXXXX";
    dir_ = ::mkdtemp(dir_template);
    path_ = dir_ + "/worker.sock";
    absl::StatusOr<common::UniqueFd> listener = common::ListenUnix(path_);
    EXPECT_TRUE(listener.ok()) << listener.status();
    listener_ = std::move(*listener);
    thread_ = std::thread([this, early_events, reply_status, answer] {
      pollfd p{listener_.get(), POLLIN, 0};
      if (::poll(&p, 1, 10000) != 1) return;
      common::UniqueFd conn(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn) return;
      for (int i = 0; i < early_events; ++i) {
        internal::WorkerMessage event;
        *event.mutable_event()->mutable_status() =
            Status(kGeneration, internal::WORKER_STATE_CONNECTED);
        event.mutable_event()->set_reason("frontend connected");
        if (!common::WriteFrame(conn.get(), event).ok()) return;
      }
      common::FrameReader reader;
      absl::StatusOr<std::string> frame = common::ReadFrameBlocking(conn.get(), reader, 10000);
      internal::ControlRequest request;
      if (!frame.ok() || !request.ParseFromString(*frame)) return;
      hello_received_ = request.has_hello();
      if (!answer) return;
      internal::WorkerMessage reply;
      reply.mutable_response()->set_id(request.id());
      *reply.mutable_response()->mutable_status() = reply_status;
      common::WriteFrame(conn.get(), reply).IgnoreError();
      // Keep the connection open until the controller side closes it.
      char byte;
      pollfd c{conn.get(), POLLIN, 0};
      while (::poll(&c, 1, 10000) == 1 && ::read(conn.get(), &byte, 1) > 0) {
      }
    });
  }
  ~FakeWorker() {
    thread_.join();
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
  }
  const std::string& path() const { return path_; }
  bool hello_received() const { return hello_received_; }

 private:
  std::string dir_;
  std::string path_;
  common::UniqueFd listener_;
  std::thread thread_;
  bool hello_received_ = false;
};

TEST(WorkerProcessAdoptTest, AdoptsAWorkerThatAnswersHello) {
  FakeWorker worker(0, Status(kGeneration, internal::WORKER_STATE_CONNECTED));
  absl::StatusOr<std::unique_ptr<WorkerProcess>> adopted =
      WorkerProcess::Adopt(::getpid(), worker.path(), kDevice, kGeneration);
  ASSERT_TRUE(adopted.ok()) << adopted.status();
  EXPECT_EQ((*adopted)->pid(), ::getpid());
  EXPECT_TRUE((*adopted)->adopted());
  EXPECT_EQ((*adopted)->initial_status().state(), internal::WORKER_STATE_CONNECTED);
  adopted->reset();
  EXPECT_TRUE(worker.hello_received());
}

// The race: a worker sends events (here "frontend connected") before its Hello reply. They are
// superseded by the reply's status; the adoption must not take them for a failed Hello.
TEST(WorkerProcessAdoptTest, SkipsEventsSentBeforeTheHelloReply) {
  for (int events : {1, 3}) {
    SCOPED_TRACE(absl::StrCat(events, " early events"));
    FakeWorker worker(events, Status(kGeneration, internal::WORKER_STATE_DRAINED));
    absl::StatusOr<std::unique_ptr<WorkerProcess>> adopted =
        WorkerProcess::Adopt(::getpid(), worker.path(), kDevice, kGeneration);
    ASSERT_TRUE(adopted.ok()) << adopted.status();
    // The status comes from the reply, not from the earlier event (CONNECTED).
    EXPECT_EQ((*adopted)->initial_status().state(), internal::WORKER_STATE_DRAINED);
    EXPECT_EQ((*adopted)->initial_status().generation(), kGeneration);
  }
}

// Skipping events must not weaken the identity check: the reply still decides.
TEST(WorkerProcessAdoptTest, RefusesAnotherGenerationAfterEarlyEvents) {
  FakeWorker worker(1, Status(kGeneration + 1, internal::WORKER_STATE_CONNECTED));
  absl::StatusOr<std::unique_ptr<WorkerProcess>> adopted =
      WorkerProcess::Adopt(::getpid(), worker.path(), kDevice, kGeneration);
  ASSERT_FALSE(adopted.ok());
  EXPECT_EQ(adopted.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(adopted.status().message().find("generation 8"), std::string::npos) << adopted.status();
}

TEST(WorkerProcessAdoptTest, RefusesAWorkerThatSendsOnlyEventsAndCloses) {
  FakeWorker worker(2, Status(kGeneration, internal::WORKER_STATE_CONNECTED), /*answer=*/false);
  absl::StatusOr<std::unique_ptr<WorkerProcess>> adopted =
      WorkerProcess::Adopt(::getpid(), worker.path(), kDevice, kGeneration);
  ASSERT_FALSE(adopted.ok());
  EXPECT_EQ(adopted.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(adopted.status().message().find("did not answer Hello"), std::string::npos)
      << adopted.status();
}

}  // namespace
}  // namespace blockplane::controller
