// Unit tests for controller/device_state.h: the transition table, which operations each state
// allows, the worker-state mapping and state names.

#include "controller/device_state.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace blockplane::controller {
namespace {

using v1::DeviceState;

constexpr DeviceState kUnspecified = v1::DEVICE_STATE_UNSPECIFIED;
constexpr DeviceState kAttaching = v1::DEVICE_STATE_ATTACHING;
constexpr DeviceState kWaiting = v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
constexpr DeviceState kConnected = v1::DEVICE_STATE_CONNECTED;
constexpr DeviceState kDraining = v1::DEVICE_STATE_DRAINING;
constexpr DeviceState kDrained = v1::DEVICE_STATE_DRAINED;
constexpr DeviceState kDetaching = v1::DEVICE_STATE_DETACHING;
constexpr DeviceState kFailed = v1::DEVICE_STATE_FAILED;

// The states a device can be in (UNSPECIFIED only means "removed" in transitions).
const std::vector<DeviceState> kDeviceStates = {kAttaching, kWaiting,   kConnected, kDraining,
                                                kDrained,   kDetaching, kFailed};

std::string Edge(DeviceState from, DeviceState to) {
  return absl::StrCat(StateName(from), " -> ", StateName(to));
}

// ---------------------------------------------------------------------------------------------
// IsAllowedTransition

TEST(IsAllowedTransitionTest, EveryEdgeOfTheHeaderComment) {
  const std::vector<std::pair<DeviceState, DeviceState>> edges = {
      // ATTACHING -> WAITING_FOR_FRONTEND <-> CONNECTED
      {kAttaching, kWaiting},
      {kWaiting, kConnected},
      {kConnected, kWaiting},
      // WAITING_FOR_FRONTEND | CONNECTED -> DRAINING -> DRAINED
      {kWaiting, kDraining},
      {kConnected, kDraining},
      {kDraining, kDrained},
      // DRAINING | DRAINED -(resume)-> WAITING_FOR_FRONTEND | CONNECTED
      {kDraining, kWaiting},
      {kDraining, kConnected},
      {kDrained, kWaiting},
      {kDrained, kConnected},
      // FAILED -(resume)-> ATTACHING
      {kFailed, kAttaching},
      // any with a worker -> ATTACHING when the worker died and is being restarted
      {kWaiting, kAttaching},
      {kConnected, kAttaching},
      {kDraining, kAttaching},
      {kDrained, kAttaching},
  };
  for (const auto& [from, to] : edges) {
    EXPECT_TRUE(IsAllowedTransition(from, to)) << Edge(from, to);
  }
}

TEST(IsAllowedTransitionTest, AnyToDetaching) {
  for (DeviceState from : kDeviceStates) {
    EXPECT_TRUE(IsAllowedTransition(from, kDetaching)) << Edge(from, kDetaching);
  }
}

TEST(IsAllowedTransitionTest, AnyButDetachingToFailed) {
  for (DeviceState from : kDeviceStates) {
    EXPECT_EQ(IsAllowedTransition(from, kFailed), from != kDetaching) << Edge(from, kFailed);
  }
}

TEST(IsAllowedTransitionTest, StayingInAStateIsAllowed) {
  for (DeviceState s : kDeviceStates) EXPECT_TRUE(IsAllowedTransition(s, s)) << Edge(s, s);
}

// Edges the worker protocol produces besides the header's diagram: a drain with nothing in flight
// (and error_policy STOP pausing on an I/O error) reports DRAINED at once, and a worker restarted
// or re-adopted while ATTACHING reports whatever state it is in.
TEST(IsAllowedTransitionTest, ShortcutsReportedByTheWorker) {
  EXPECT_TRUE(IsAllowedTransition(kWaiting, kDrained));
  EXPECT_TRUE(IsAllowedTransition(kConnected, kDrained));
  EXPECT_TRUE(IsAllowedTransition(kAttaching, kConnected));
  EXPECT_TRUE(IsAllowedTransition(kAttaching, kDraining));
  EXPECT_TRUE(IsAllowedTransition(kAttaching, kDrained));
}

TEST(IsAllowedTransitionTest, ForbiddenEdges) {
  const std::vector<std::pair<DeviceState, DeviceState>> forbidden = {
      // Draining again needs a resume first.
      {kDrained, kDraining},
      // DETACHING only ends in removal.
      {kDetaching, kAttaching},
      {kDetaching, kWaiting},
      {kDetaching, kConnected},
      {kDetaching, kDraining},
      {kDetaching, kDrained},
      {kDetaching, kFailed},
      // FAILED leaves only through ATTACHING (resume) or DETACHING.
      {kFailed, kWaiting},
      {kFailed, kConnected},
      {kFailed, kDraining},
      {kFailed, kDrained},
      // Removal is Registry::Delete, not a transition; a device never comes from nowhere serving.
      {kWaiting, kUnspecified},
      {kConnected, kUnspecified},
      {kFailed, kUnspecified},
      {kDetaching, kUnspecified},
      {kUnspecified, kWaiting},
      {kUnspecified, kConnected},
      {kUnspecified, kDraining},
      {kUnspecified, kDrained},
      // Unknown values.
      {kConnected, DeviceState(42)},
      {DeviceState(42), kConnected},
  };
  for (const auto& [from, to] : forbidden) {
    EXPECT_FALSE(IsAllowedTransition(from, to)) << Edge(from, to);
  }
}

// ---------------------------------------------------------------------------------------------
// CheckOperationAllowed

std::string OperationName(Operation op) {
  switch (op) {
    case Operation::kDrain:
      return "drain";
    case Operation::kResume:
      return "resume";
    case Operation::kResize:
      return "resize";
    case Operation::kStats:
      return "stats";
  }
  return "?";
}

struct OperationCase {
  Operation op;
  DeviceState state;
  bool allowed;
};

TEST(CheckOperationAllowedTest, EveryOperationInEveryState) {
  const std::vector<OperationCase> cases = {
      // Drain: serving states; draining a DRAINING or DRAINED device is a no-op.
      {Operation::kDrain, kUnspecified, false},
      {Operation::kDrain, kAttaching, false},
      {Operation::kDrain, kWaiting, true},
      {Operation::kDrain, kConnected, true},
      {Operation::kDrain, kDraining, true},
      {Operation::kDrain, kDrained, true},
      {Operation::kDrain, kDetaching, false},
      {Operation::kDrain, kFailed, false},
      // Resume: DRAINING, DRAINED, and FAILED (-> ATTACHING).
      {Operation::kResume, kUnspecified, false},
      {Operation::kResume, kAttaching, false},
      {Operation::kResume, kWaiting, false},
      {Operation::kResume, kConnected, false},
      {Operation::kResume, kDraining, true},
      {Operation::kResume, kDrained, true},
      {Operation::kResume, kDetaching, false},
      {Operation::kResume, kFailed, true},
      // Resize: only while the worker serves the device.
      {Operation::kResize, kUnspecified, false},
      {Operation::kResize, kAttaching, false},
      {Operation::kResize, kWaiting, true},
      {Operation::kResize, kConnected, true},
      {Operation::kResize, kDraining, true},
      {Operation::kResize, kDrained, true},
      {Operation::kResize, kDetaching, false},
      {Operation::kResize, kFailed, false},
      // Stats: needs a running worker. (UNSPECIFIED is left out: Stats refuses by a deny-list,
      // and a device is never UNSPECIFIED; without a worker the call fails as UNAVAILABLE.)
      {Operation::kStats, kAttaching, false},
      {Operation::kStats, kWaiting, true},
      {Operation::kStats, kConnected, true},
      {Operation::kStats, kDraining, true},
      {Operation::kStats, kDrained, true},
      {Operation::kStats, kDetaching, false},
      {Operation::kStats, kFailed, false},
  };
  for (const OperationCase& c : cases) {
    SCOPED_TRACE(absl::StrCat(OperationName(c.op), " in ", StateName(c.state)));
    absl::Status s = CheckOperationAllowed(c.op, "vm-42", c.state);
    if (c.allowed) {
      EXPECT_TRUE(s.ok()) << s;
      continue;
    }
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_TRUE(absl::StartsWith(s.message(), "device_id: ")) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "vm-42")) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), StateName(c.state))) << s;
  }
}

TEST(CheckOperationAllowedTest, CoversEveryOperationAndDeviceState) {
  // Guards the table above against a state or operation being added without a row.
  for (Operation op :
       {Operation::kDrain, Operation::kResume, Operation::kResize, Operation::kStats}) {
    for (DeviceState state : kDeviceStates) {
      absl::Status s = CheckOperationAllowed(op, "vm1", state);
      EXPECT_TRUE(s.ok() || s.code() == absl::StatusCode::kFailedPrecondition)
          << OperationName(op) << " in " << StateName(state) << ": " << s;
    }
  }
  EXPECT_EQ(kDeviceStates.size() + 1, static_cast<size_t>(v1::DeviceState_ARRAYSIZE));
}

// ---------------------------------------------------------------------------------------------
// FromWorkerState

TEST(FromWorkerStateTest, Mapping) {
  EXPECT_EQ(FromWorkerState(internal::WORKER_STATE_WAITING_FOR_FRONTEND), kWaiting);
  EXPECT_EQ(FromWorkerState(internal::WORKER_STATE_CONNECTED), kConnected);
  EXPECT_EQ(FromWorkerState(internal::WORKER_STATE_DRAINING), kDraining);
  EXPECT_EQ(FromWorkerState(internal::WORKER_STATE_DRAINED), kDrained);
  EXPECT_EQ(FromWorkerState(internal::WORKER_STATE_STOPPING), kDetaching);
  EXPECT_EQ(FromWorkerState(internal::WORKER_STATE_FAILED), kFailed);
  // A worker that has not said what it is doing yet is still starting.
  EXPECT_EQ(FromWorkerState(internal::WORKER_STATE_UNSPECIFIED), kAttaching);
  EXPECT_EQ(FromWorkerState(internal::WorkerState(99)), kAttaching);
}

// ---------------------------------------------------------------------------------------------
// StateName

TEST(StateNameTest, StripsThePrefix) {
  EXPECT_EQ(StateName(kUnspecified), "UNSPECIFIED");
  EXPECT_EQ(StateName(kAttaching), "ATTACHING");
  EXPECT_EQ(StateName(kWaiting), "WAITING_FOR_FRONTEND");
  EXPECT_EQ(StateName(kConnected), "CONNECTED");
  EXPECT_EQ(StateName(kDraining), "DRAINING");
  EXPECT_EQ(StateName(kDrained), "DRAINED");
  EXPECT_EQ(StateName(kDetaching), "DETACHING");
  EXPECT_EQ(StateName(kFailed), "FAILED");
}

TEST(StateNameTest, UnknownValueIsItsNumber) { EXPECT_EQ(StateName(DeviceState(42)), "42"); }

}  // namespace
}  // namespace blockplane::controller
