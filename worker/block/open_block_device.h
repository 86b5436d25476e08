#pragma once

// The one call the worker makes to serve a file or block device: opens `path` with a
// UringBackend on `loop` and puts a BlockDevice over it.
//
//   auto device = OpenBlockDevice(loop, "/var/lib/vm/disk.img",
//                                 {.cache = CacheMode::kNone,
//                                  .device = {.logical_block_size = 512,
//                                             .read_only = false,
//                                             .discard = DiscardMode::kUnmap,
//                                             .detect_zeroes = DetectZeroes::kOff,
//                                             .error_policy = ErrorPolicy::kReport}});
//   if (!device.ok()) -> fail the attach with device.status()
//   (*device)->Submit(request, completion);      // data path, loop thread
//   (*device)->Drain(cb); (*device)->Resume();   // control, loop thread
//   (*device)->Resize(bytes);                    // grows the file, then tell the guest
//   (*device)->Stats();                          // any thread (for /metrics)
//
// Loop thread only (Open registers the file with the loop's ring). Errors: NotFound /
// PermissionDenied from open(2), FailedPrecondition when cache=none is not supported by the file
// system, InvalidArgument for a bad logical block size.

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "common/event_loop.h"
#include "worker/backend/uring_backend.h"
#include "worker/block/block_device.h"

namespace blockplane::worker {

struct OpenBlockDeviceOptions {
  CacheMode cache = CacheMode::kNone;
  BlockDeviceOptions device;  // device.read_only also opens the file read-only
};

absl::StatusOr<std::unique_ptr<BlockDevice>> OpenBlockDevice(common::EventLoop* loop,
                                                             const std::string& path,
                                                             OpenBlockDeviceOptions options);

}  // namespace blockplane::worker
