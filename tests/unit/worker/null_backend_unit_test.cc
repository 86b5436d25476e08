// NullBackend: what each completion mode costs the loop (a ring NOP, or nothing), and what it
// does to the buffers; and the loop-event result mapping of BackendCompletion it relies on.

#include <errno.h>
#include <sys/uio.h>

#include <cstring>
#include <memory>

#include "gtest/gtest.h"
#include "tests/unit/worker/test_util.h"
#include "worker/backend/null_backend.h"

namespace blockplane::worker {
namespace {

using testing::AlignedBuffer;
using testing::MakeLoop;
using testing::Waiter;

struct Result {
  uint64_t sqes = 0;  // SQEs the loop sent to the kernel for the request
  int passes = 0;     // loop passes until the completion ran
  int result = 1;
};

// Reads one 4 KiB block filled with 0xAB through a backend in `completion` mode.
Result ReadOnce(NullBackend::Completion completion, bool zero_reads, AlignedBuffer& buffer) {
  std::unique_ptr<common::EventLoop> loop = MakeLoop();
  NullBackend::Options options;
  options.completion = completion;
  options.zero_reads = zero_reads;
  NullBackend backend(loop.get(), options);
  std::memset(buffer.data(), 0xAB, buffer.size());
  const uint64_t sqes_before = loop->counters().sqes_submitted;
  Waiter waiter;
  const iovec iov = buffer.iov();
  backend.Read(0, &iov, 1, &waiter);
  EXPECT_FALSE(waiter.done) << "completed inside the submitting call";
  Result r;
  while (!waiter.done && r.passes < 100) {
    loop->RunOnce(/*block=*/false);
    ++r.passes;
  }
  EXPECT_TRUE(waiter.done);
  r.sqes = loop->counters().sqes_submitted - sqes_before;
  r.result = waiter.result;
  return r;
}

TEST(NullBackendTest, NopCompletionGoesThroughTheRing) {
  AlignedBuffer buffer(4096);
  Result r = ReadOnce(NullBackend::Completion::kNop, /*zero_reads=*/false, buffer);
  EXPECT_EQ(r.result, 0);
  EXPECT_EQ(r.sqes, 1u) << "one NOP per request";
  EXPECT_GE(r.passes, 2) << "submitted at the end of one pass, reaped on a later one";
  EXPECT_EQ(buffer.data()[0], 0xAB) << "without zero_reads the buffer is left alone";
  EXPECT_EQ(buffer.data()[4095], 0xAB);
}

TEST(NullBackendTest, DeferredCompletionMakesNoKernelCall) {
  AlignedBuffer buffer(4096);
  Result r = ReadOnce(NullBackend::Completion::kDeferred, /*zero_reads=*/true, buffer);
  EXPECT_EQ(r.result, 0);
  EXPECT_EQ(r.sqes, 0u) << "deferred completion must not touch the ring";
  EXPECT_EQ(r.passes, 1) << "completes on the next pass";
  for (size_t i = 0; i < buffer.size(); ++i) ASSERT_EQ(buffer.data()[i], 0) << i;
}

TEST(NullBackendTest, EveryOperationCompletesInBothModes) {
  for (auto completion : {NullBackend::Completion::kNop, NullBackend::Completion::kDeferred}) {
    std::unique_ptr<common::EventLoop> loop = MakeLoop();
    NullBackend::Options options;
    options.completion = completion;
    NullBackend backend(loop.get(), options);
    AlignedBuffer buffer(8192);
    const iovec iov = buffer.iov();
    Waiter write, flush, discard, zeroes;
    backend.Write(4096, &iov, 1, 0, &write);
    backend.Flush(&flush);
    backend.Discard(0, 1 << 20, &discard);
    backend.WriteZeroes(0, 1 << 20, 0, &zeroes);
    for (int i = 0; i < 100 && !(write.done && flush.done && discard.done && zeroes.done); ++i) {
      loop->RunOnce(/*block=*/false);
    }
    for (const Waiter* w : {&write, &flush, &discard, &zeroes}) {
      EXPECT_TRUE(w->done) << static_cast<int>(completion);
      EXPECT_EQ(w->result, 0) << static_cast<int>(completion);
    }
  }
}

// A BackendCompletion handed to the loop as its own event handler (what the null backend does)
// gets the event's result as a backend result: negative stays, anything else is success.
TEST(BackendCompletionTest, LoopEventResultBecomesTheBackendResult) {
  std::unique_ptr<common::EventLoop> loop = MakeLoop();
  Waiter bytes, error, zero;
  loop->Defer(&bytes, 4096);
  loop->Defer(&error, -EIO);
  loop->Defer(&zero, 0);
  loop->RunOnce(/*block=*/false);
  ASSERT_TRUE(bytes.done && error.done && zero.done);
  EXPECT_EQ(bytes.result, 0);
  EXPECT_EQ(error.result, -EIO);
  EXPECT_EQ(zero.result, 0);
}

}  // namespace
}  // namespace blockplane::worker
