#pragma once

// Human-readable and JSON renderings of DeviceService responses. Pure functions returning text
// that ends with a newline (except FormatTable on no rows, which returns "").

#include <string>
#include <vector>

#include "blockplane/v1/device.pb.h"
#include "google/protobuf/message.h"
#include "google/protobuf/timestamp.pb.h"

namespace blockplane::controller::cli {

// Rows of cells, the first row being the header; columns padded to the widest cell and separated
// by two spaces; no trailing spaces.
std::string FormatTable(const std::vector<std::vector<std::string>>& rows);

// The protobuf JSON mapping (lowerCamelCase names, enums by name, every field printed including
// zero values so scripts need no defaults). `multiline` pretty-prints; otherwise one line.
std::string FormatJson(const google::protobuf::Message& message, bool multiline);

// RFC 3339 in UTC ("2026-11-21T23:10:00Z"); "-" for an unset (zero) timestamp.
std::string FormatTimestamp(const google::protobuf::Timestamp& timestamp);

// "xen domid=5 vdev=xvda" / "vhost-user /run/vm.sock" / "none": the short frontend description
// used in tables.
std::string FrontendSummary(const v1::DeviceSpec& spec);

// `get` and the single-device answers: "key: value" lines.
std::string FormatDevice(const v1::Device& device);

// `list`: one row per device; "No devices." when empty.
std::string FormatDeviceTable(const std::vector<v1::Device>& devices);

// `stats`: a summary and a table of operations.
std::string FormatStats(const v1::DeviceStats& stats);

// `watch`: one line per event.
std::string FormatEvent(const v1::DeviceEvent& event);

}  // namespace blockplane::controller::cli
