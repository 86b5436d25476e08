#pragma once

// XenStore on the real libxenstore, shared by the host and emulated platforms (they differ only in
// which xenstored they reach). xenstore_client.cc is the only file that includes <xenstore.h>.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/xen/xen_platform.h"

namespace blockplane::common::xen {

// Empty `socket_path`: libxenstore's default (the local xenstored socket, else /dev/xen/xenbus).
// Otherwise connects to that unix socket: libxenstore only takes a path from the XENSTORED_PATH
// environment variable, so it is set around xs_open() under a process-wide mutex. Callers that
// read XENSTORED_PATH concurrently from other threads must not rely on its value meanwhile.
absl::StatusOr<std::unique_ptr<XenStore>> OpenLibXenStore(const std::string& socket_path);

}  // namespace blockplane::common::xen
