#pragma once

// XenbusState (xen/io/xenbus.h): the states both ends of a PV device publish in xenstore. One
// definition for the backends and the test harness's frontends.

namespace blockplane::common::xen {

enum class XenbusState : int {
  kUnknown = 0,
  kInitialising = 1,
  kInitWait = 2,
  kInitialised = 3,
  kConnected = 4,
  kClosing = 5,
  kClosed = 6,
  kReconfiguring = 7,
  kReconfigured = 8,
};

// "Unknown", "Initialising", "InitWait", ... (the names xenbus uses); "Unknown" for values
// outside the enum.
const char* XenbusStateName(XenbusState state);

}  // namespace blockplane::common::xen
