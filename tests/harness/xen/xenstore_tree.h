#pragma once

// The data model of the emulated xenstored: a tree of nodes with values and permissions, the
// permission rules of the real xenstored (tools/xenstore/xenstored_core.c), and optimistic
// transactions. Pure: no sockets, no threads. Not thread-safe; the xenstored loop owns it.
//
// Errors are returned as errno values (ENOENT, EACCES, EINVAL, EEXIST, EAGAIN...) because that is
// what travels on the wire (as the errno name string in an XS_ERROR reply).

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace blockplane::harness {

using DomainId = uint32_t;

// One entry of a node's permission list, encoded on the wire like real xenstored: a letter
// ('n' none, 'r' read, 'w' write, 'b' both) followed by the domain id, e.g. "r5".
struct XsPerm {
  enum Access : uint8_t { kNone = 0, kRead = 1, kWrite = 2, kBoth = 3 };
  DomainId domid = 0;
  Access access = kNone;

  std::string ToString() const;
  static std::optional<XsPerm> Parse(std::string_view text);
  bool operator==(const XsPerm&) const = default;
};

// The first entry names the owner (who has full access) and the access of every domain not listed
// in the later entries.
using XsPermList = std::vector<XsPerm>;

struct XsNode {
  std::string value;
  XsPermList perms;
  std::set<std::string> children;  // names, not paths
  // Store-wide modification counter value at the last change of this node (value, perms or its
  // child list). Transactions use it to detect conflicts.
  uint64_t generation = 0;
};

// A change that watches must hear about. `perms` are the node's permissions at the time of the
// change (before removal for a removed node) so that watch delivery can check read access.
struct XsChange {
  std::string path;
  bool removed = false;
  XsPermList perms;
};

// Returns true if `path` is `ancestor` or lies below it ("/a/b" is below "/a", "/ab" is not).
bool IsPathAtOrBelow(std::string_view path, std::string_view ancestor);

// Parent path of an absolute path other than "/".
std::string ParentPath(std::string_view path);

// Validates an absolute node path the way real xenstored does (is_valid_nodename): begins with
// '/', no "//", no trailing '/' except for the root, only [A-Za-z0-9-/_@] characters, at most
// XENSTORE_ABS_PATH_MAX bytes.
bool IsValidAbsolutePath(std::string_view path);

// Quotas for unprivileged domains, xenstored's defaults: nodes a guest may own, and open
// transactions per guest connection. Exceeding them gives ENOSPC.
inline constexpr size_t kGuestNodeQuota = 1000;
inline constexpr size_t kGuestTransactionQuota = 10;

// A set of nodes with the operations of the wire protocol, performed as connection `caller`.
// Used both for the committed store and for each transaction's private copy.
class XsTree {
 public:
  // Creates a tree holding "/" owned by dom0 with no access for others ("n0").
  XsTree();

  // All paths are absolute and already validated by the caller. Every method checks permissions
  // for `caller` (dom0 may do anything) and records the paths it read or changed in the optional
  // `read_set` / `changes` so that transactions and watches can use them.
  int Read(DomainId caller, const std::string& path, std::string* value,
           std::set<std::string>* read_set);
  int Write(DomainId caller, const std::string& path, std::string_view value,
            std::set<std::string>* read_set, std::vector<XsChange>* changes);
  int Mkdir(DomainId caller, const std::string& path, std::set<std::string>* read_set,
            std::vector<XsChange>* changes);
  int Remove(DomainId caller, const std::string& path, std::set<std::string>* read_set,
             std::vector<XsChange>* changes);
  int Directory(DomainId caller, const std::string& path, std::vector<std::string>* children,
                std::set<std::string>* read_set);
  int GetPerms(DomainId caller, const std::string& path, XsPermList* perms,
               std::set<std::string>* read_set);
  int SetPerms(DomainId caller, const std::string& path, const XsPermList& perms,
               std::set<std::string>* read_set, std::vector<XsChange>* changes);

  // Permission check used for watch delivery and by the operations above.
  static bool CanRead(DomainId caller, const XsPermList& perms);
  static bool CanWrite(DomainId caller, const XsPermList& perms);

  const XsNode* Find(const std::string& path) const;
  uint64_t GenerationOf(const std::string& path) const;  // 0 when absent
  size_t node_count() const { return nodes_.size(); }
  const std::map<std::string, XsNode>& nodes() const { return nodes_; }

  // Copies the state of `path` (present or absent) from `other` into this tree, stamping it with
  // a new generation. Used to apply a committed transaction; the caller applies every changed path
  // so that parents' child lists stay consistent.
  void ApplyFrom(const XsTree& other, const std::string& path);

  // Continues the generation counter of `other` so that generations stay unique store-wide.
  void SyncGenerationCounter(const XsTree& other) { next_generation_ = other.next_generation_; }

 private:
  // Nearest existing ancestor-or-self of `path`.
  const XsNode* NearestExisting(const std::string& path, std::string* found_path) const;
  // ENOENT or EACCES for a missing node, like xenstored's errno_from_parents().
  int MissingNodeError(DomainId caller, const std::string& path) const;
  int Create(DomainId caller, const std::string& path, std::string_view value,
             std::set<std::string>* read_set, std::vector<XsChange>* changes);
  void Touch(XsNode* node) { node->generation = ++next_generation_; }
  void RemoveSubtree(const std::string& path, std::vector<XsChange>* changes);

  std::map<std::string, XsNode> nodes_;
  uint64_t next_generation_ = 1;
};

// The committed store plus open transactions. A transaction works on a private copy of the tree
// taken at start (snapshot isolation) and records every path it read or changed; it commits only if
// none of those paths changed in the store since the start, otherwise it ends with EAGAIN, as the
// real xenstored does for conflicting transactions.
class XsStore {
 public:
  XsStore() = default;

  XsTree& tree() { return tree_; }

  // Returns a new non-zero transaction id.
  uint32_t StartTransaction(uint64_t owner);
  size_t TransactionsOf(uint64_t owner) const;
  // Returns nullptr for unknown ids or ids owned by another connection.
  XsTree* TransactionTree(uint32_t id, uint64_t owner);
  std::set<std::string>* TransactionReadSet(uint32_t id, uint64_t owner);
  // Records the changes made inside a transaction (they are announced at commit).
  void RecordTransactionChanges(uint32_t id, const std::vector<XsChange>& changes);
  // Ends a transaction. On commit success fills `changes` with what watches must hear. Returns 0,
  // ENOENT for an unknown transaction or EAGAIN on conflict (the transaction is gone either way).
  int EndTransaction(uint32_t id, uint64_t owner, bool commit, std::vector<XsChange>* changes);
  // Drops every transaction of a closing connection.
  void DropTransactionsOf(uint64_t owner);
  size_t open_transactions() const { return transactions_.size(); }

 private:
  struct Transaction {
    uint64_t owner = 0;
    std::unique_ptr<XsTree> tree;      // the transaction's view, changed by its operations
    std::unique_ptr<XsTree> snapshot;  // the store as it was at start, never changed
    std::set<std::string> read_set;
    std::vector<XsChange> changes;
  };

  XsTree tree_;
  std::map<uint32_t, Transaction> transactions_;
  uint32_t next_transaction_id_ = 1;
};

}  // namespace blockplane::harness
