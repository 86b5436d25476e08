#pragma once

#include <sqlite3.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "blockplane/v1/device.pb.h"

namespace blockplane::controller {

// Durable record of every device: its spec and the status fields that must survive a controller
// restart (state, size, worker pid and generation, last error, highest written offset), plus a log
// of state transitions. SQLite in WAL mode with synchronous=FULL: a write returns only once it is
// durable, so the API answers only after the change is persisted.
//
// Thread-safe (one internal mutex); every method is one SQLite transaction.
class Registry {
 public:
  // Opens or creates the database at `path` and migrates its schema.
  static absl::StatusOr<std::unique_ptr<Registry>> Open(const std::string& path);
  ~Registry();

  // Inserts or replaces the device. When `previous_state` differs from the device's state, the
  // transition is logged with `reason` in the same transaction.
  absl::Status Put(const v1::Device& device, v1::DeviceState previous_state,
                   const std::string& reason);
  absl::Status Delete(const std::string& device_id, v1::DeviceState previous_state,
                      const std::string& reason);
  // All devices, sorted by id.
  absl::StatusOr<std::vector<v1::Device>> LoadAll();

  struct Transition {
    std::string device_id;
    v1::DeviceState from = v1::DEVICE_STATE_UNSPECIFIED;
    v1::DeviceState to = v1::DEVICE_STATE_UNSPECIFIED;  // UNSPECIFIED: removed
    std::string reason;
    int64_t at_unix_ns = 0;
  };
  absl::StatusOr<std::vector<Transition>> Transitions(const std::string& device_id);

 private:
  explicit Registry(sqlite3* db) : db_(db) {}
  absl::Status Exec(const char* sql);
  absl::Status LogTransition(const std::string& id, v1::DeviceState from, v1::DeviceState to,
                             const std::string& reason);

  std::mutex mu_;
  sqlite3* db_;
};

}  // namespace blockplane::controller
