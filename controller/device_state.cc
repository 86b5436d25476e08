#include "controller/device_state.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace blockplane::controller {

using v1::DeviceState;

bool IsAllowedTransition(DeviceState from, DeviceState to) {
  if (from == to) return true;
  switch (to) {
    case v1::DEVICE_STATE_DETACHING:
      return true;
    case v1::DEVICE_STATE_FAILED:
      return from != v1::DEVICE_STATE_DETACHING;
    case v1::DEVICE_STATE_ATTACHING:
      return from != v1::DEVICE_STATE_DETACHING;
    case v1::DEVICE_STATE_WAITING_FOR_FRONTEND:
    case v1::DEVICE_STATE_CONNECTED:
      return from == v1::DEVICE_STATE_ATTACHING || from == v1::DEVICE_STATE_WAITING_FOR_FRONTEND ||
             from == v1::DEVICE_STATE_CONNECTED || from == v1::DEVICE_STATE_DRAINING ||
             from == v1::DEVICE_STATE_DRAINED;
    case v1::DEVICE_STATE_DRAINING:
      return from == v1::DEVICE_STATE_ATTACHING || from == v1::DEVICE_STATE_WAITING_FOR_FRONTEND ||
             from == v1::DEVICE_STATE_CONNECTED;
    case v1::DEVICE_STATE_DRAINED:
      return from == v1::DEVICE_STATE_ATTACHING || from == v1::DEVICE_STATE_WAITING_FOR_FRONTEND ||
             from == v1::DEVICE_STATE_CONNECTED || from == v1::DEVICE_STATE_DRAINING;
    default:
      return false;
  }
}

std::string StateName(DeviceState state) {
  std::string name = v1::DeviceState_Name(state);
  constexpr absl::string_view kPrefix = "DEVICE_STATE_";
  if (absl::StartsWith(name, kPrefix)) name = name.substr(kPrefix.size());
  return name.empty() ? absl::StrCat(static_cast<int>(state)) : name;
}

absl::Status CheckOperationAllowed(Operation op, const std::string& device_id, DeviceState state) {
  auto refuse = [&](absl::string_view what) {
    return absl::FailedPreconditionError(
        absl::StrCat("device_id: device ", device_id, " is ", StateName(state), "; ", what));
  };
  switch (op) {
    case Operation::kDrain:
      if (state == v1::DEVICE_STATE_WAITING_FOR_FRONTEND || state == v1::DEVICE_STATE_CONNECTED ||
          state == v1::DEVICE_STATE_DRAINING || state == v1::DEVICE_STATE_DRAINED) {
        return absl::OkStatus();
      }
      return refuse("only a serving device (WAITING_FOR_FRONTEND or CONNECTED) can be drained");
    case Operation::kResume:
      if (state == v1::DEVICE_STATE_DRAINING || state == v1::DEVICE_STATE_DRAINED ||
          state == v1::DEVICE_STATE_FAILED) {
        return absl::OkStatus();
      }
      return refuse("only a DRAINING, DRAINED or FAILED device can be resumed");
    case Operation::kResize:
      if (state == v1::DEVICE_STATE_WAITING_FOR_FRONTEND || state == v1::DEVICE_STATE_CONNECTED ||
          state == v1::DEVICE_STATE_DRAINING || state == v1::DEVICE_STATE_DRAINED) {
        return absl::OkStatus();
      }
      return refuse("a device can be resized only while its worker is serving it");
    case Operation::kStats:
      if (state == v1::DEVICE_STATE_ATTACHING || state == v1::DEVICE_STATE_FAILED ||
          state == v1::DEVICE_STATE_DETACHING) {
        return refuse("it has no running worker to report statistics");
      }
      return absl::OkStatus();
  }
  return absl::OkStatus();
}

DeviceState FromWorkerState(internal::WorkerState state) {
  switch (state) {
    case internal::WORKER_STATE_WAITING_FOR_FRONTEND:
      return v1::DEVICE_STATE_WAITING_FOR_FRONTEND;
    case internal::WORKER_STATE_CONNECTED:
      return v1::DEVICE_STATE_CONNECTED;
    case internal::WORKER_STATE_DRAINING:
      return v1::DEVICE_STATE_DRAINING;
    case internal::WORKER_STATE_DRAINED:
      return v1::DEVICE_STATE_DRAINED;
    case internal::WORKER_STATE_STOPPING:
      return v1::DEVICE_STATE_DETACHING;
    case internal::WORKER_STATE_FAILED:
      return v1::DEVICE_STATE_FAILED;
    default:
      return v1::DEVICE_STATE_ATTACHING;
  }
}

}  // namespace blockplane::controller
