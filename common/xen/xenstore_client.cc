#include "common/xen/xenstore_client.h"

#include <errno.h>
#include <stdlib.h>

#include <cstring>
#include <mutex>
#include <optional>

extern "C" {
#include <xenstore.h>
}

namespace blockplane::common::xen {
namespace {

struct XsCloser {
  void operator()(xs_handle* handle) const { xs_close(handle); }
};

std::string PathString(std::string_view path) { return std::string(path); }

class LibXenStore final : public XenStore {
 public:
  explicit LibXenStore(xs_handle* handle) : handle_(handle) {}

  absl::StatusOr<std::string> Read(std::string_view path, TransactionId tx) override {
    std::string p = PathString(path);
    unsigned int len = 0;
    void* value = xs_read(handle_.get(), tx, p.c_str(), &len);
    if (!value) return ErrnoToStatus(errno, "xenstore read " + p);
    std::string result(static_cast<char*>(value), len);
    free(value);
    return result;
  }

  absl::Status Write(std::string_view path, std::string_view value, TransactionId tx) override {
    std::string p = PathString(path);
    if (!xs_write(handle_.get(), tx, p.c_str(), value.data(), value.size())) {
      return ErrnoToStatus(errno, "xenstore write " + p);
    }
    return absl::OkStatus();
  }

  absl::Status Mkdir(std::string_view path, TransactionId tx) override {
    std::string p = PathString(path);
    if (!xs_mkdir(handle_.get(), tx, p.c_str())) return ErrnoToStatus(errno, "xenstore mkdir " + p);
    return absl::OkStatus();
  }

  absl::Status Remove(std::string_view path, TransactionId tx) override {
    std::string p = PathString(path);
    if (!xs_rm(handle_.get(), tx, p.c_str())) return ErrnoToStatus(errno, "xenstore rm " + p);
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<std::string>> Directory(std::string_view path,
                                                     TransactionId tx) override {
    std::string p = PathString(path);
    unsigned int num = 0;
    char** entries = xs_directory(handle_.get(), tx, p.c_str(), &num);
    if (!entries) return ErrnoToStatus(errno, "xenstore directory " + p);
    std::vector<std::string> result(entries, entries + num);
    free(entries);
    return result;
  }

  absl::StatusOr<std::vector<XenStorePermission>> GetPermissions(std::string_view path,
                                                                 TransactionId tx) override {
    std::string p = PathString(path);
    unsigned int num = 0;
    xs_permissions* perms = xs_get_permissions(handle_.get(), tx, p.c_str(), &num);
    if (!perms) return ErrnoToStatus(errno, "xenstore get perms " + p);
    std::vector<XenStorePermission> result;
    for (unsigned int i = 0; i < num; ++i) {
      XenStorePermission perm;
      perm.domid = static_cast<DomainId>(perms[i].id);
      bool read = perms[i].perms & XS_PERM_READ;
      bool write = perms[i].perms & XS_PERM_WRITE;
      perm.access = read && write ? XenStorePermission::Access::kBoth
                    : read        ? XenStorePermission::Access::kRead
                    : write       ? XenStorePermission::Access::kWrite
                                  : XenStorePermission::Access::kNone;
      result.push_back(perm);
    }
    free(perms);
    return result;
  }

  absl::Status SetPermissions(std::string_view path,
                              std::span<const XenStorePermission> permissions,
                              TransactionId tx) override {
    std::string p = PathString(path);
    std::vector<xs_permissions> perms;
    for (const XenStorePermission& permission : permissions) {
      xs_permissions entry{};
      entry.id = permission.domid;
      switch (permission.access) {
        case XenStorePermission::Access::kNone:
          entry.perms = XS_PERM_NONE;
          break;
        case XenStorePermission::Access::kRead:
          entry.perms = XS_PERM_READ;
          break;
        case XenStorePermission::Access::kWrite:
          entry.perms = XS_PERM_WRITE;
          break;
        case XenStorePermission::Access::kBoth:
          entry.perms = XS_PERM_READ | XS_PERM_WRITE;
          break;
      }
      perms.push_back(entry);
    }
    if (!xs_set_permissions(handle_.get(), tx, p.c_str(), perms.data(),
                            static_cast<unsigned>(perms.size()))) {
      return ErrnoToStatus(errno, "xenstore set perms " + p);
    }
    return absl::OkStatus();
  }

  absl::Status Watch(std::string_view path, std::string_view token) override {
    (void)WatchFd();  // create the event pipe before the first event can arrive
    std::string p = PathString(path);
    std::string t(token);
    if (!xs_watch(handle_.get(), p.c_str(), t.c_str())) {
      return ErrnoToStatus(errno, "xenstore watch " + p);
    }
    return absl::OkStatus();
  }

  absl::Status Unwatch(std::string_view path, std::string_view token) override {
    std::string p = PathString(path);
    std::string t(token);
    if (!xs_unwatch(handle_.get(), p.c_str(), t.c_str())) {
      return ErrnoToStatus(errno, "xenstore unwatch " + p);
    }
    return absl::OkStatus();
  }

  int WatchFd() override { return xs_fileno(handle_.get()); }

  absl::StatusOr<std::vector<XenStoreWatchEvent>> ReadWatchEvents() override {
    std::vector<XenStoreWatchEvent> events;
    while (char** event = xs_check_watch(handle_.get())) {
      events.push_back(XenStoreWatchEvent{event[XS_WATCH_PATH], event[XS_WATCH_TOKEN]});
      free(event);
    }
    if (errno != EAGAIN) return ErrnoToStatus(errno, "xenstore check watch");
    return events;
  }

  absl::StatusOr<TransactionId> StartTransaction() override {
    xs_transaction_t tx = xs_transaction_start(handle_.get());
    if (tx == XBT_NULL) return ErrnoToStatus(errno, "xenstore transaction start");
    return tx;
  }

  absl::Status EndTransaction(TransactionId tx, bool abort) override {
    if (!xs_transaction_end(handle_.get(), tx, abort)) {
      return ErrnoToStatus(errno, "xenstore transaction end");
    }
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<xs_handle, XsCloser> handle_;
};

std::mutex& EnvMutex() {
  static std::mutex* mutex = new std::mutex;
  return *mutex;
}

}  // namespace

absl::StatusOr<std::unique_ptr<XenStore>> OpenLibXenStore(const std::string& socket_path) {
  xs_handle* handle = nullptr;
  int error = 0;
  if (socket_path.empty()) {
    handle = xs_open(0);
    error = errno;
  } else {
    std::lock_guard<std::mutex> lock(EnvMutex());
    const char* previous = getenv("XENSTORED_PATH");
    std::optional<std::string> saved;
    if (previous) saved = previous;
    setenv("XENSTORED_PATH", socket_path.c_str(), 1);
    handle = xs_open(XS_OPEN_SOCKETONLY);
    error = errno;
    if (saved) {
      setenv("XENSTORED_PATH", saved->c_str(), 1);
    } else {
      unsetenv("XENSTORED_PATH");
    }
  }
  if (!handle) {
    return ErrnoToStatus(error, "cannot connect to xenstored" +
                                    (socket_path.empty() ? std::string() : " at " + socket_path));
  }
  return std::make_unique<LibXenStore>(handle);
}

}  // namespace blockplane::common::xen
