#pragma once

// Reads a PEM file named on a command line (TLS certificates and keys), for blockplaned's --tls-*
// and bpctl's --tls-* flags.

#include <string>

#include "absl/status/statusor.h"

namespace blockplane::common {

// The whole file at `path`. InvalidArgument naming `flag` (for example "--tls-key") and the path
// when it cannot be read or holds no PEM block.
absl::StatusOr<std::string> ReadPemFile(const std::string& flag, const std::string& path);

}  // namespace blockplane::common
