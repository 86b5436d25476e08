#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "blockplane/internal/worker.pb.h"
#include "blockplane/v1/device.pb.h"

namespace blockplane::controller {

// The device state machine (docs/architecture.md):
//
//   ATTACHING -> WAITING_FOR_FRONTEND <-> CONNECTED
//   WAITING_FOR_FRONTEND | CONNECTED -> DRAINING -> DRAINED
//   DRAINING | DRAINED -(resume)-> WAITING_FOR_FRONTEND | CONNECTED
//   any -> DETACHING -> (removed);   any but DETACHING -> FAILED;   FAILED -(resume)-> ATTACHING
//   any with a worker -> ATTACHING when the worker died and is being restarted
bool IsAllowedTransition(v1::DeviceState from, v1::DeviceState to);

enum class Operation { kDrain, kResume, kResize, kStats };

// OK if `op` may run on a device in `state`, else FAILED_PRECONDITION saying why.
absl::Status CheckOperationAllowed(Operation op, const std::string& device_id,
                                   v1::DeviceState state);

// The device state a worker's self-reported state corresponds to.
v1::DeviceState FromWorkerState(internal::WorkerState state);

// "CONNECTED" for DEVICE_STATE_CONNECTED: the short name people see.
std::string StateName(v1::DeviceState state);

}  // namespace blockplane::controller
