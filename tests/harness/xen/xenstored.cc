#include "tests/harness/xen/xenstored.h"

#include <errno.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <xen/io/xs_wire.h>

#include <charconv>
#include <cstring>
#include <set>
#include <string_view>

#include "common/logging.h"

namespace blockplane::harness {
namespace {

constexpr size_t kHeaderSize = sizeof(xsd_sockmsg);
constexpr std::string_view kOk("OK\0", 3);
// A client that stops reading while watch events pile up is dropped, like xenstored does when a
// connection exceeds its output quota, instead of growing without bound.
constexpr size_t kMaxPendingOutput = 4 << 20;

const char* ErrnoName(int error) {
  for (const auto& entry : xsd_errors) {
    if (entry.errnum == error) return entry.errstring;
  }
  return "EINVAL";
}

// Splits a payload into its nul-terminated strings. A trailing part without a nul counts as a
// string too (libxenstore's WRITE sends the value without one).
std::vector<std::string_view> SplitPayload(std::string_view payload) {
  std::vector<std::string_view> parts;
  size_t start = 0;
  while (start < payload.size()) {
    size_t nul = payload.find('\0', start);
    if (nul == std::string_view::npos) {
      parts.push_back(payload.substr(start));
      break;
    }
    parts.push_back(payload.substr(start, nul - start));
    start = nul + 1;
  }
  return parts;
}

std::optional<uint32_t> ParseUint(std::string_view text) {
  uint32_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) return std::nullopt;
  return value;
}

std::string DomainPath(DomainId domid) { return "/local/domain/" + std::to_string(domid); }

}  // namespace

Xenstored::Xenstored(PollLoop* loop) : loop_(loop) {}

Xenstored::~Xenstored() {
  for (auto& [id, conn] : connections_) loop_->Remove(conn->fd.get());
  for (auto& [domid, listener] : listeners_) {
    loop_->Remove(listener.fd.get());
    ::unlink(listener.path.c_str());
  }
}

absl::Status Xenstored::AddDomainSocket(DomainId domid, const std::string& socket_path) {
  if (listeners_.count(domid)) return absl::AlreadyExistsError("domain already has a socket");
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError("socket path too long: " + socket_path);
  }
  std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size() + 1);
  common::UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return absl::InternalError(std::string("socket: ") + std::strerror(errno));
  ::unlink(socket_path.c_str());
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(fd.get(), 64) != 0) {
    return absl::InternalError("bind/listen " + socket_path + ": " + std::strerror(errno));
  }
  int raw = fd.get();
  if (absl::Status status =
          loop_->Add(raw, EPOLLIN, [this, domid, raw](uint32_t) { Accept(domid, raw); });
      !status.ok()) {
    return status;
  }
  listeners_[domid] = Listener{std::move(fd), socket_path};
  return absl::OkStatus();
}

void Xenstored::RemoveDomainSocket(DomainId domid) {
  auto it = listeners_.find(domid);
  if (it != listeners_.end()) {
    loop_->Remove(it->second.fd.get());
    ::unlink(it->second.path.c_str());
    listeners_.erase(it);
  }
  std::vector<uint64_t> doomed;
  for (auto& [id, conn] : connections_) {
    if (conn->domid == domid) doomed.push_back(id);
  }
  for (uint64_t id : doomed) CloseConnection(id);
}

void Xenstored::Accept(DomainId domid, int listen_fd) {
  while (true) {
    int raw = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (raw < 0) return;  // EAGAIN, or a transient error: the listener stays armed
    auto conn = std::make_unique<Connection>();
    conn->id = next_connection_id_++;
    conn->domid = domid;
    conn->fd.Reset(raw);
    uint64_t id = conn->id;
    if (!loop_->Add(raw, EPOLLIN, [this, id](uint32_t events) { OnConnectionEvent(id, events); })
             .ok()) {
      continue;  // conn closes its fd
    }
    connections_[id] = std::move(conn);
  }
}

void Xenstored::CloseConnection(uint64_t id) {
  auto it = connections_.find(id);
  if (it == connections_.end()) return;
  loop_->Remove(it->second->fd.get());
  store_.DropTransactionsOf(id);
  connections_.erase(it);
}

void Xenstored::CloseDoomed() {
  std::vector<uint64_t> doomed = std::move(doomed_);
  doomed_.clear();
  for (uint64_t id : doomed) CloseConnection(id);
}

void Xenstored::OnConnectionEvent(uint64_t id, uint32_t events) {
  auto it = connections_.find(id);
  if (it == connections_.end()) return;
  Connection& conn = *it->second;
  if (events & EPOLLOUT) Flush(conn);
  if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
    char buffer[8192];
    while (true) {
      ssize_t got = ::read(conn.fd.get(), buffer, sizeof(buffer));
      if (got > 0) {
        conn.in.append(buffer, static_cast<size_t>(got));
        continue;
      }
      if (got < 0 && (errno == EAGAIN || errno == EINTR)) break;
      CloseConnection(id);  // EOF or error
      return;
    }
    while (conn.in.size() >= kHeaderSize) {
      xsd_sockmsg header;
      std::memcpy(&header, conn.in.data(), kHeaderSize);
      if (header.len > XENSTORE_PAYLOAD_MAX) {
        // Like xenstored: an oversized message is a protocol violation; drop the client.
        BP_LOG(Warning) << "xenstored: connection " << id << " sent len=" << header.len;
        CloseConnection(id);
        return;
      }
      if (conn.in.size() < kHeaderSize + header.len) break;
      std::string payload = conn.in.substr(kHeaderSize, header.len);
      conn.in.erase(0, kHeaderSize + header.len);
      HandleMessage(conn, header.type, header.req_id, header.tx_id, payload);
      CloseDoomed();
      // The handler may have closed this connection (e.g. RELEASE of its own domain).
      if (!connections_.count(id)) return;
    }
  }
}

void Xenstored::Reply(Connection& conn, uint32_t type, uint32_t req_id, uint32_t tx_id,
                      std::string_view payload) {
  xsd_sockmsg header{type, req_id, tx_id, static_cast<uint32_t>(payload.size())};
  conn.out.append(reinterpret_cast<const char*>(&header), kHeaderSize);
  conn.out.append(payload);
  Flush(conn);
}

void Xenstored::ReplyError(Connection& conn, uint32_t req_id, uint32_t tx_id, int error) {
  std::string name = ErrnoName(error);
  name.push_back('\0');
  Reply(conn, XS_ERROR, req_id, tx_id, name);
}

void Xenstored::QueueWatchEvent(Connection& conn, const std::string& path,
                                const std::string& token) {
  if (conn.overflowed) return;
  if (conn.out.size() > kMaxPendingOutput) {
    BP_LOG(Warning) << "xenstored: connection " << conn.id << " (d" << conn.domid
                    << ") does not read its watch events; dropping it";
    conn.overflowed = true;
    doomed_.push_back(conn.id);
    return;
  }
  std::string payload = path;
  payload.push_back('\0');
  payload += token;
  payload.push_back('\0');
  Reply(conn, XS_WATCH_EVENT, 0, 0, payload);
}

void Xenstored::Flush(Connection& conn) {
  while (!conn.out.empty()) {
    ssize_t wrote = ::send(conn.fd.get(), conn.out.data(), conn.out.size(), MSG_NOSIGNAL);
    if (wrote > 0) {
      conn.out.erase(0, static_cast<size_t>(wrote));
      continue;
    }
    if (wrote < 0 && errno == EINTR) continue;
    break;  // EAGAIN (wait for EPOLLOUT) or a dead peer (EPOLLHUP/EOF will close it)
  }
  (void)loop_->Modify(conn.fd.get(), conn.out.empty() ? EPOLLIN : (EPOLLIN | EPOLLOUT));
}

int Xenstored::Canonicalize(DomainId domid, std::string_view path, std::string* abs) {
  if (path.empty()) return EINVAL;
  if (path[0] == '/') {
    *abs = std::string(path);
  } else {
    if (path.size() > 2048) return EINVAL;  // XENSTORE_REL_PATH_MAX
    *abs = DomainPath(domid) + "/" + std::string(path);
  }
  return IsValidAbsolutePath(*abs) ? 0 : EINVAL;
}

void Xenstored::FireChanges(const std::vector<XsChange>& changes) {
  for (auto& [id, conn_ptr] : connections_) {
    Connection& conn = *conn_ptr;
    std::set<std::pair<size_t, std::string>> sent;  // (watch index, event path): once per batch
    for (const XsChange& change : changes) {
      if (!XsTree::CanRead(conn.domid, change.perms)) continue;
      for (size_t i = 0; i < conn.watches.size(); ++i) {
        const Watch& watch = conn.watches[i];
        if (watch.abs_path.empty() || watch.abs_path[0] != '/') continue;  // special watch
        std::string event_path;
        if (IsPathAtOrBelow(change.path, watch.abs_path)) {
          event_path = change.path;
        } else if (change.removed && IsPathAtOrBelow(watch.abs_path, change.path)) {
          event_path = watch.abs_path;  // a watched node went away with its ancestor
        } else {
          continue;
        }
        // Relative watches hear relative paths, like xenstored's get_watch_path().
        if (watch.given_path[0] != '/') {
          std::string home = DomainPath(conn.domid) + "/";
          if (event_path.compare(0, home.size(), home) == 0) event_path.erase(0, home.size());
        }
        if (sent.emplace(i, event_path).second) QueueWatchEvent(conn, event_path, watch.token);
      }
    }
  }
}

void Xenstored::FireSpecialWatch(const std::string& name) {
  for (auto& [id, conn] : connections_) {
    for (const Watch& watch : conn->watches) {
      if (watch.abs_path == name) QueueWatchEvent(*conn, name, watch.token);
    }
  }
}

int Xenstored::WriteAsDom0(const std::string& path, std::string_view value) {
  std::vector<XsChange> changes;
  int error = store_.tree().Write(0, path, value, nullptr, &changes);
  FireChanges(changes);
  return error;
}

int Xenstored::SetPermsAsDom0(const std::string& path, const XsPermList& perms) {
  std::vector<XsChange> changes;
  int error = store_.tree().SetPerms(0, path, perms, nullptr, &changes);
  FireChanges(changes);
  return error;
}

int Xenstored::RemoveAsDom0(const std::string& path) {
  std::vector<XsChange> changes;
  int error = store_.tree().Remove(0, path, nullptr, &changes);
  FireChanges(changes);
  return error;
}

void Xenstored::HandleMessage(Connection& conn, uint32_t type, uint32_t req_id, uint32_t tx_id,
                              std::string_view payload) {
  std::vector<std::string_view> args = SplitPayload(payload);
  auto error_reply = [&](int error) { ReplyError(conn, req_id, tx_id, error); };
  auto ok_reply = [&]() { Reply(conn, type, req_id, tx_id, kOk); };

  // Operations on nodes run either on the store or inside the connection's transaction.
  XsTree* tree = &store_.tree();
  std::set<std::string>* read_set = nullptr;
  if (tx_id != 0 && type != XS_TRANSACTION_END && type != XS_WATCH && type != XS_UNWATCH) {
    tree = store_.TransactionTree(tx_id, conn.id);
    read_set = store_.TransactionReadSet(tx_id, conn.id);
    if (!tree) return error_reply(ENOENT);
  }
  auto publish = [&](const std::vector<XsChange>& changes) {
    if (tx_id != 0) {
      store_.RecordTransactionChanges(tx_id, changes);
    } else {
      FireChanges(changes);
    }
  };
  std::string path;
  auto need_path = [&]() -> int {
    if (args.empty()) return EINVAL;
    return Canonicalize(conn.domid, args[0], &path);
  };

  switch (type) {
    case XS_READ: {
      if (int error = need_path()) return error_reply(error);
      std::string value;
      if (int error = tree->Read(conn.domid, path, &value, read_set)) return error_reply(error);
      return Reply(conn, type, req_id, tx_id, value);
    }
    case XS_WRITE: {
      if (int error = need_path()) return error_reply(error);
      size_t nul = payload.find('\0');
      if (nul == std::string_view::npos) return error_reply(EINVAL);
      std::vector<XsChange> changes;
      if (int error = tree->Write(conn.domid, path, payload.substr(nul + 1), read_set, &changes)) {
        return error_reply(error);
      }
      publish(changes);
      return ok_reply();
    }
    case XS_MKDIR: {
      if (int error = need_path()) return error_reply(error);
      std::vector<XsChange> changes;
      if (int error = tree->Mkdir(conn.domid, path, read_set, &changes)) return error_reply(error);
      publish(changes);
      return ok_reply();
    }
    case XS_RM: {
      if (int error = need_path()) return error_reply(error);
      std::vector<XsChange> changes;
      if (int error = tree->Remove(conn.domid, path, read_set, &changes)) return error_reply(error);
      publish(changes);
      return ok_reply();
    }
    case XS_DIRECTORY:
    case XS_DIRECTORY_PART: {
      if (int error = need_path()) return error_reply(error);
      std::vector<std::string> children;
      if (int error = tree->Directory(conn.domid, path, &children, read_set)) {
        return error_reply(error);
      }
      std::string list;
      for (const std::string& child : children) {
        list += child;
        list.push_back('\0');
      }
      if (type == XS_DIRECTORY) {
        if (list.size() > XENSTORE_PAYLOAD_MAX) return error_reply(E2BIG);
        return Reply(conn, type, req_id, tx_id, list);
      }
      // DIRECTORY_PART: "<generation>\0" then children from the byte offset; a final empty string
      // marks the end of the list.
      if (args.size() < 2) return error_reply(EINVAL);
      std::optional<uint32_t> offset = ParseUint(args[1]);
      if (!offset || *offset > list.size()) return error_reply(EINVAL);
      std::string reply = std::to_string(tree->GenerationOf(path));
      reply.push_back('\0');
      size_t budget = XENSTORE_PAYLOAD_MAX - reply.size() - 1;
      std::string_view rest = std::string_view(list).substr(*offset);
      if (rest.size() <= budget) {
        reply += rest;
        reply.push_back('\0');
      } else {
        size_t cut = rest.rfind('\0', budget - 1);
        if (cut == std::string_view::npos) return error_reply(E2BIG);
        reply += rest.substr(0, cut + 1);
      }
      return Reply(conn, type, req_id, tx_id, reply);
    }
    case XS_GET_PERMS: {
      if (int error = need_path()) return error_reply(error);
      XsPermList perms;
      if (int error = tree->GetPerms(conn.domid, path, &perms, read_set)) {
        return error_reply(error);
      }
      std::string reply;
      for (const XsPerm& perm : perms) {
        reply += perm.ToString();
        reply.push_back('\0');
      }
      return Reply(conn, type, req_id, tx_id, reply);
    }
    case XS_SET_PERMS: {
      if (int error = need_path()) return error_reply(error);
      XsPermList perms;
      for (size_t i = 1; i < args.size(); ++i) {
        std::optional<XsPerm> perm = XsPerm::Parse(args[i]);
        if (!perm) return error_reply(EINVAL);
        perms.push_back(*perm);
      }
      std::vector<XsChange> changes;
      if (int error = tree->SetPerms(conn.domid, path, perms, read_set, &changes)) {
        return error_reply(error);
      }
      publish(changes);
      return ok_reply();
    }
    case XS_WATCH: {
      if (args.size() < 2 || args[0].empty()) return error_reply(EINVAL);
      Watch watch{std::string(args[0]), "", std::string(args[1])};
      if (args[0][0] == '@') {
        watch.abs_path = watch.given_path;
      } else if (int error = Canonicalize(conn.domid, args[0], &watch.abs_path)) {
        return error_reply(error);
      }
      for (const Watch& existing : conn.watches) {
        if (existing.given_path == watch.given_path && existing.token == watch.token) {
          return error_reply(EEXIST);
        }
      }
      conn.watches.push_back(watch);
      ok_reply();
      // A new watch fires once straight away, so the client reads the current state.
      return QueueWatchEvent(conn, watch.given_path, watch.token);
    }
    case XS_UNWATCH: {
      if (args.size() < 2) return error_reply(EINVAL);
      for (auto it = conn.watches.begin(); it != conn.watches.end(); ++it) {
        if (it->given_path == args[0] && it->token == args[1]) {
          conn.watches.erase(it);
          return ok_reply();
        }
      }
      return error_reply(ENOENT);
    }
    case XS_RESET_WATCHES:
      conn.watches.clear();
      return ok_reply();
    case XS_TRANSACTION_START: {
      if (tx_id != 0) return error_reply(EBUSY);
      if (conn.domid != 0 && store_.TransactionsOf(conn.id) >= kGuestTransactionQuota) {
        return error_reply(ENOSPC);
      }
      std::string reply = std::to_string(store_.StartTransaction(conn.id));
      reply.push_back('\0');
      return Reply(conn, type, req_id, 0, reply);
    }
    case XS_TRANSACTION_END: {
      if (args.empty() || (args[0] != "T" && args[0] != "F")) return error_reply(EINVAL);
      std::vector<XsChange> changes;
      if (int error = store_.EndTransaction(tx_id, conn.id, args[0] == "T", &changes)) {
        return error_reply(error);
      }
      ok_reply();
      return FireChanges(changes);
    }
    case XS_GET_DOMAIN_PATH: {
      std::optional<uint32_t> domid = args.empty() ? std::nullopt : ParseUint(args[0]);
      if (!domid) return error_reply(EINVAL);
      std::string reply = DomainPath(*domid);
      reply.push_back('\0');
      return Reply(conn, type, req_id, tx_id, reply);
    }
    case XS_IS_DOMAIN_INTRODUCED: {
      std::optional<uint32_t> domid = args.empty() ? std::nullopt : ParseUint(args[0]);
      if (!domid) return error_reply(EINVAL);
      bool introduced = *domid == 0 || IsIntroduced(*domid);
      return Reply(conn, type, req_id, tx_id, std::string_view(introduced ? "T" : "F", 2));
    }
    case XS_INTRODUCE:
    case XS_RELEASE: {
      if (conn.domid != 0) return error_reply(EACCES);
      std::optional<uint32_t> domid = args.empty() ? std::nullopt : ParseUint(args[0]);
      if (!domid || *domid == 0 || *domid >= 0x7ff0) return error_reply(EINVAL);
      bool introduce = type == XS_INTRODUCE;
      const auto& hook = introduce ? hooks_.introduce : hooks_.release;
      if (!hook) return error_reply(ENOSYS);
      if (int error = hook(*domid)) return error_reply(error);
      ok_reply();
      return FireSpecialWatch(introduce ? "@introduceDomain" : "@releaseDomain");
    }
    case XS_CONTROL:
      return error_reply(conn.domid == 0 ? ENOSYS : EACCES);
    default:
      return error_reply(EINVAL);
  }
}

}  // namespace blockplane::harness
