#include "common/xen/xenbus.h"

namespace blockplane::common::xen {

const char* XenbusStateName(XenbusState state) {
  switch (state) {
    case XenbusState::kInitialising:
      return "Initialising";
    case XenbusState::kInitWait:
      return "InitWait";
    case XenbusState::kInitialised:
      return "Initialised";
    case XenbusState::kConnected:
      return "Connected";
    case XenbusState::kClosing:
      return "Closing";
    case XenbusState::kClosed:
      return "Closed";
    case XenbusState::kReconfiguring:
      return "Reconfiguring";
    case XenbusState::kReconfigured:
      return "Reconfigured";
    case XenbusState::kUnknown:
    default:
      return "Unknown";
  }
}

}  // namespace blockplane::common::xen
