#include "controller/registry.h"

#include <time.h>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/json_util.h"

namespace blockplane::controller {
namespace {

constexpr int kSchemaVersion = 1;

constexpr const char* kSchema = R"sql(
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices(
  id TEXT PRIMARY KEY,
  spec_json TEXT NOT NULL,
  state INTEGER NOT NULL,
  size_bytes INTEGER NOT NULL,
  worker_pid INTEGER NOT NULL,
  worker_generation INTEGER NOT NULL,
  last_error TEXT NOT NULL,
  restart_count INTEGER NOT NULL,
  highest_written_offset INTEGER NOT NULL,
  metrics_endpoint TEXT NOT NULL,
  created_at_ns INTEGER NOT NULL,
  state_changed_at_ns INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS transitions(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  device_id TEXT NOT NULL,
  from_state INTEGER NOT NULL,
  to_state INTEGER NOT NULL,
  reason TEXT NOT NULL,
  at_ns INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS transitions_by_device ON transitions(device_id, seq);
)sql";

int64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

int64_t ToNs(const google::protobuf::Timestamp& t) { return t.seconds() * 1000000000 + t.nanos(); }

google::protobuf::Timestamp FromNs(int64_t ns) {
  google::protobuf::Timestamp t;
  t.set_seconds(ns / 1000000000);
  t.set_nanos(static_cast<int32_t>(ns % 1000000000));
  return t;
}

// Finalizes a statement on scope exit.
class Statement {
 public:
  Statement(sqlite3* db, const char* sql) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  bool ok() const { return rc_ == SQLITE_OK; }
  sqlite3_stmt* get() { return stmt_; }
  void Text(int i, const std::string& s) {
    sqlite3_bind_text(stmt_, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
  }
  void Int(int i, int64_t v) { sqlite3_bind_int64(stmt_, i, v); }

 private:
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
};

absl::Status SqliteError(sqlite3* db, absl::string_view what) {
  return absl::InternalError(absl::StrCat("registry: ", what, ": ", sqlite3_errmsg(db)));
}

std::string ColumnText(sqlite3_stmt* s, int i) {
  const unsigned char* t = sqlite3_column_text(s, i);
  return t ? reinterpret_cast<const char*>(t) : "";
}

}  // namespace

absl::StatusOr<std::unique_ptr<Registry>> Registry::Open(const std::string& path) {
  sqlite3* db = nullptr;
  int rc =
      sqlite3_open_v2(path.c_str(), &db,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr);
  if (rc != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::UnavailableError(absl::StrCat("registry: cannot open ", path, ": ", msg));
  }
  std::unique_ptr<Registry> registry(new Registry(db));
  sqlite3_busy_timeout(db, 5000);
  for (const char* pragma :
       {"PRAGMA journal_mode=WAL;", "PRAGMA synchronous=FULL;", "PRAGMA foreign_keys=ON;"}) {
    if (absl::Status s = registry->Exec(pragma); !s.ok()) return s;
  }
  if (absl::Status s = registry->Exec(kSchema); !s.ok()) return s;

  Statement version(db, "SELECT value FROM meta WHERE key='schema_version'");
  if (!version.ok()) return SqliteError(db, "schema");
  if (sqlite3_step(version.get()) == SQLITE_ROW) {
    int found = sqlite3_column_int(version.get(), 0);
    if (found > kSchemaVersion) {
      return absl::FailedPreconditionError(absl::StrCat(
          "registry: ", path, " has schema version ", found, "; this blockplaned knows up to ",
          kSchemaVersion, " (downgrade is not supported)"));
    }
  } else {
    if (absl::Status s =
            registry->Exec(absl::StrCat("INSERT INTO meta(key, value) VALUES('schema_version', '",
                                        kSchemaVersion, "')")
                               .c_str());
        !s.ok())
      return s;
  }
  return registry;
}

Registry::~Registry() { sqlite3_close(db_); }

absl::Status Registry::Exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    return absl::InternalError(absl::StrCat("registry: ", msg));
  }
  return absl::OkStatus();
}

absl::Status Registry::LogTransition(const std::string& id, v1::DeviceState from,
                                     v1::DeviceState to, const std::string& reason) {
  Statement st(db_,
               "INSERT INTO transitions(device_id, from_state, to_state, reason, at_ns) "
               "VALUES(?1, ?2, ?3, ?4, ?5)");
  if (!st.ok()) return SqliteError(db_, "log transition");
  st.Text(1, id);
  st.Int(2, from);
  st.Int(3, to);
  st.Text(4, reason);
  st.Int(5, NowNs());
  if (sqlite3_step(st.get()) != SQLITE_DONE) return SqliteError(db_, "log transition");
  return absl::OkStatus();
}

absl::Status Registry::Put(const v1::Device& device, v1::DeviceState previous_state,
                           const std::string& reason) {
  std::string spec_json;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(device.spec(), &spec_json, options).ok()) {
    return absl::InternalError("registry: cannot encode spec");
  }
  std::lock_guard lock(mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
  auto rollback = [&](absl::Status s) {
    Exec("ROLLBACK").IgnoreError();
    return s;
  };
  {
    Statement st(db_,
                 "INSERT OR REPLACE INTO devices(id, spec_json, state, size_bytes, worker_pid, "
                 "worker_generation, last_error, restart_count, highest_written_offset, "
                 "metrics_endpoint, created_at_ns, state_changed_at_ns) "
                 "VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)");
    if (!st.ok()) return rollback(SqliteError(db_, "put"));
    const v1::DeviceStatus& s = device.status();
    st.Text(1, device.id());
    st.Text(2, spec_json);
    st.Int(3, s.state());
    st.Int(4, static_cast<int64_t>(s.size_bytes()));
    st.Int(5, s.worker_pid());
    st.Int(6, static_cast<int64_t>(s.worker_generation()));
    st.Text(7, s.last_error());
    st.Int(8, s.restart_count());
    st.Int(9, static_cast<int64_t>(s.highest_written_offset()));
    st.Text(10, s.metrics_endpoint());
    st.Int(11, ToNs(s.created_at()));
    st.Int(12, ToNs(s.state_changed_at()));
    if (sqlite3_step(st.get()) != SQLITE_DONE) return rollback(SqliteError(db_, "put"));
  }
  if (previous_state != device.status().state()) {
    if (absl::Status s =
            LogTransition(device.id(), previous_state, device.status().state(), reason);
        !s.ok())
      return rollback(s);
  }
  if (absl::Status s = Exec("COMMIT"); !s.ok()) {
    // A failed COMMIT (disk full, I/O error) leaves the transaction open: end it.
    Exec("ROLLBACK").IgnoreError();
    return s;
  }
  return absl::OkStatus();
}

absl::Status Registry::Delete(const std::string& device_id, v1::DeviceState previous_state,
                              const std::string& reason) {
  std::lock_guard lock(mu_);
  if (absl::Status s = Exec("BEGIN IMMEDIATE"); !s.ok()) return s;
  Statement st(db_, "DELETE FROM devices WHERE id = ?1");
  if (!st.ok()) {
    Exec("ROLLBACK").IgnoreError();
    return SqliteError(db_, "delete");
  }
  st.Text(1, device_id);
  if (sqlite3_step(st.get()) != SQLITE_DONE) {
    Exec("ROLLBACK").IgnoreError();
    return SqliteError(db_, "delete");
  }
  if (absl::Status s =
          LogTransition(device_id, previous_state, v1::DEVICE_STATE_UNSPECIFIED, reason);
      !s.ok()) {
    Exec("ROLLBACK").IgnoreError();
    return s;
  }
  if (absl::Status s = Exec("COMMIT"); !s.ok()) {
    // A failed COMMIT (disk full, I/O error) leaves the transaction open: end it.
    Exec("ROLLBACK").IgnoreError();
    return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::Device>> Registry::LoadAll() {
  std::lock_guard lock(mu_);
  Statement st(db_,
               "SELECT id, spec_json, state, size_bytes, worker_pid, worker_generation, "
               "last_error, restart_count, highest_written_offset, metrics_endpoint, "
               "created_at_ns, state_changed_at_ns FROM devices ORDER BY id");
  if (!st.ok()) return SqliteError(db_, "load");
  std::vector<v1::Device> devices;
  int rc;
  while ((rc = sqlite3_step(st.get())) == SQLITE_ROW) {
    sqlite3_stmt* s = st.get();
    v1::Device d;
    d.set_id(ColumnText(s, 0));
    if (!google::protobuf::util::JsonStringToMessage(ColumnText(s, 1), d.mutable_spec()).ok()) {
      return absl::DataLossError(
          absl::StrCat("registry: the spec of device ", d.id(), " cannot be decoded"));
    }
    v1::DeviceStatus* status = d.mutable_status();
    int state = sqlite3_column_int(s, 2);
    status->set_state(v1::DeviceState_IsValid(state) ? static_cast<v1::DeviceState>(state)
                                                     : v1::DEVICE_STATE_FAILED);
    status->set_size_bytes(static_cast<uint64_t>(sqlite3_column_int64(s, 3)));
    status->set_worker_pid(sqlite3_column_int(s, 4));
    status->set_worker_generation(static_cast<uint64_t>(sqlite3_column_int64(s, 5)));
    status->set_last_error(ColumnText(s, 6));
    status->set_restart_count(static_cast<uint32_t>(sqlite3_column_int(s, 7)));
    status->set_highest_written_offset(static_cast<uint64_t>(sqlite3_column_int64(s, 8)));
    status->set_metrics_endpoint(ColumnText(s, 9));
    *status->mutable_created_at() = FromNs(sqlite3_column_int64(s, 10));
    *status->mutable_state_changed_at() = FromNs(sqlite3_column_int64(s, 11));
    devices.push_back(std::move(d));
  }
  if (rc != SQLITE_DONE) return SqliteError(db_, "load");
  return devices;
}

absl::StatusOr<std::vector<Registry::Transition>> Registry::Transitions(
    const std::string& device_id) {
  std::lock_guard lock(mu_);
  Statement st(db_,
               "SELECT device_id, from_state, to_state, reason, at_ns FROM transitions "
               "WHERE device_id = ?1 ORDER BY seq");
  if (!st.ok()) return SqliteError(db_, "transitions");
  st.Text(1, device_id);
  std::vector<Transition> out;
  int rc;
  while ((rc = sqlite3_step(st.get())) == SQLITE_ROW) {
    Transition t;
    t.device_id = ColumnText(st.get(), 0);
    t.from = static_cast<v1::DeviceState>(sqlite3_column_int(st.get(), 1));
    t.to = static_cast<v1::DeviceState>(sqlite3_column_int(st.get(), 2));
    t.reason = ColumnText(st.get(), 3);
    t.at_unix_ns = sqlite3_column_int64(st.get(), 4);
    out.push_back(std::move(t));
  }
  if (rc != SQLITE_DONE) return SqliteError(db_, "transitions");
  return out;
}

}  // namespace blockplane::controller
