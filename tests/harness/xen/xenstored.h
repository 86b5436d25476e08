#pragma once

// The emulated xenstored: serves the real xs_wire protocol (xen/io/xs_wire.h) on unix stream
// sockets, so that the real libxenstore (XENSTORED_PATH=<socket>) and the xenstore-* tools work
// against it.
//
// Identity: every listening socket belongs to one domain. Connections accepted on the dom0 socket
// act as dom0 (full access, like the toolstack on the real socket); a guest's socket, created when
// the guest is introduced (XS_INTRODUCE, the analogue of handing xenstored the guest's ring) and
// removed on XS_RELEASE, makes its connections act as that guest, with xenstored's permission
// rules.
//
// Supported: READ, WRITE, MKDIR, RM, DIRECTORY, DIRECTORY_PART, GET_PERMS, SET_PERMS, WATCH (fires
// once on registration, then on changes at or below the path; special "@introduceDomain" and
// "@releaseDomain"), UNWATCH, RESET_WATCHES, TRANSACTION_START/END (optimistic, EAGAIN on
// conflict), GET_DOMAIN_PATH, INTRODUCE, RELEASE, IS_DOMAIN_INTRODUCED. Anything else gets an
// XS_ERROR "EINVAL" (CONTROL: "ENOSYS"). Errors are XS_ERROR replies carrying the errno name.
//
// Threading: everything runs on the PollLoop's thread.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/unique_fd.h"
#include "tests/harness/xen/poll_loop.h"
#include "tests/harness/xen/xenstore_tree.h"

namespace blockplane::harness {

class Xenstored {
 public:
  // Called on XS_INTRODUCE / XS_RELEASE from dom0 with the domain id; the owner creates or removes
  // the guest's socket (AddDomainSocket / RemoveDomainSocket) and may refuse with an errno.
  struct DomainHooks {
    std::function<int(DomainId)> introduce;
    std::function<int(DomainId)> release;
  };

  explicit Xenstored(PollLoop* loop);
  ~Xenstored();
  Xenstored(const Xenstored&) = delete;
  Xenstored& operator=(const Xenstored&) = delete;

  void set_domain_hooks(DomainHooks hooks) { hooks_ = std::move(hooks); }

  // Listens on `socket_path` (created, replacing a stale file) for connections acting as `domid`.
  absl::Status AddDomainSocket(DomainId domid, const std::string& socket_path);
  // Stops listening for `domid`, closes its connections and drops their watches and transactions.
  void RemoveDomainSocket(DomainId domid);
  bool IsIntroduced(DomainId domid) const { return listeners_.count(domid) != 0 && domid != 0; }

  // Direct access for the host (setup of /local/domain/<id>); changes made here fire watches.
  int WriteAsDom0(const std::string& path, std::string_view value);
  int SetPermsAsDom0(const std::string& path, const XsPermList& perms);
  int RemoveAsDom0(const std::string& path);
  void FireSpecialWatch(const std::string& name);  // "@introduceDomain", "@releaseDomain"

  XsStore& store() { return store_; }
  size_t connection_count() const { return connections_.size(); }

 private:
  struct Watch {
    std::string given_path;  // as the client sent it (relative or absolute or "@...")
    std::string abs_path;
    std::string token;
  };
  struct Connection {
    uint64_t id = 0;
    DomainId domid = 0;
    common::UniqueFd fd;
    std::string in;
    std::string out;
    std::vector<Watch> watches;
    bool overflowed = false;  // stopped reading; closed by CloseDoomed()
  };
  struct Listener {
    common::UniqueFd fd;
    std::string path;
  };

  void Accept(DomainId domid, int listen_fd);
  void OnConnectionEvent(uint64_t id, uint32_t events);
  void CloseConnection(uint64_t id);
  // Closes connections marked while handling another one (never the one being handled mid-way).
  void CloseDoomed();
  void HandleMessage(Connection& conn, uint32_t type, uint32_t req_id, uint32_t tx_id,
                     std::string_view payload);
  void Reply(Connection& conn, uint32_t type, uint32_t req_id, uint32_t tx_id,
             std::string_view payload);
  void ReplyError(Connection& conn, uint32_t req_id, uint32_t tx_id, int error);
  void QueueWatchEvent(Connection& conn, const std::string& path, const std::string& token);
  void Flush(Connection& conn);
  void FireChanges(const std::vector<XsChange>& changes);
  // Resolves a client path (relative to the domain's home, or absolute) into `abs`; EINVAL if bad.
  static int Canonicalize(DomainId domid, std::string_view path, std::string* abs);

  PollLoop* loop_;
  XsStore store_;
  DomainHooks hooks_;
  std::map<DomainId, Listener> listeners_;
  std::map<uint64_t, std::unique_ptr<Connection>> connections_;
  uint64_t next_connection_id_ = 1;
  std::vector<uint64_t> doomed_;
};

}  // namespace blockplane::harness
