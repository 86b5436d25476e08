#include "worker/block/open_block_device.h"

namespace blockplane::worker {

absl::StatusOr<std::unique_ptr<BlockDevice>> OpenBlockDevice(common::EventLoop* loop,
                                                             const std::string& path,
                                                             OpenBlockDeviceOptions options) {
  UringBackend::Options backend_options;
  backend_options.cache = options.cache;
  backend_options.read_only = options.device.read_only;
  absl::StatusOr<std::unique_ptr<UringBackend>> backend =
      UringBackend::Open(loop, path, backend_options);
  if (!backend.ok()) return backend.status();
  return BlockDevice::Create(loop, std::move(backend).value(), std::move(options.device));
}

}  // namespace blockplane::worker
