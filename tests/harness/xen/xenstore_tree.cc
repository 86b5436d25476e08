#include "tests/harness/xen/xenstore_tree.h"

#include <errno.h>

#include <charconv>

namespace blockplane::harness {
namespace {

constexpr size_t kAbsPathMax = 3072;  // XENSTORE_ABS_PATH_MAX

}  // namespace

std::string XsPerm::ToString() const {
  static constexpr char kLetters[] = {'n', 'r', 'w', 'b'};
  return kLetters[access & 3] + std::to_string(domid);
}

std::optional<XsPerm> XsPerm::Parse(std::string_view text) {
  if (text.size() < 2) return std::nullopt;
  XsPerm perm;
  switch (text[0]) {
    case 'n':
      perm.access = kNone;
      break;
    case 'r':
      perm.access = kRead;
      break;
    case 'w':
      perm.access = kWrite;
      break;
    case 'b':
      perm.access = kBoth;
      break;
    default:
      return std::nullopt;
  }
  std::string_view digits = text.substr(1);
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), perm.domid);
  if (ec != std::errc() || end != digits.data() + digits.size() || perm.domid > 0xffff) {
    return std::nullopt;
  }
  return perm;
}

bool IsPathAtOrBelow(std::string_view path, std::string_view ancestor) {
  if (ancestor == "/") return !path.empty() && path[0] == '/';
  if (path.size() < ancestor.size() || path.substr(0, ancestor.size()) != ancestor) return false;
  return path.size() == ancestor.size() || path[ancestor.size()] == '/';
}

std::string ParentPath(std::string_view path) {
  size_t slash = path.rfind('/');
  if (slash == 0 || slash == std::string_view::npos) return "/";
  return std::string(path.substr(0, slash));
}

bool IsValidAbsolutePath(std::string_view path) {
  if (path.empty() || path[0] != '/' || path.size() > kAbsPathMax) return false;
  if (path == "/") return true;
  if (path.back() == '/') return false;
  char previous = 0;
  for (char c : path) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '/' || c == '_' || c == '@';
    if (!ok) return false;
    if (c == '/' && previous == '/') return false;
    previous = c;
  }
  return true;
}

XsTree::XsTree() {
  XsNode root;
  root.perms = {XsPerm{0, XsPerm::kNone}};
  root.generation = next_generation_++;
  nodes_.emplace("/", std::move(root));
}

bool XsTree::CanRead(DomainId caller, const XsPermList& perms) {
  if (caller == 0) return true;
  if (perms.empty()) return false;
  if (perms[0].domid == caller) return true;
  for (size_t i = 1; i < perms.size(); ++i) {
    if (perms[i].domid == caller) return (perms[i].access & XsPerm::kRead) != 0;
  }
  return (perms[0].access & XsPerm::kRead) != 0;
}

bool XsTree::CanWrite(DomainId caller, const XsPermList& perms) {
  if (caller == 0) return true;
  if (perms.empty()) return false;
  if (perms[0].domid == caller) return true;
  for (size_t i = 1; i < perms.size(); ++i) {
    if (perms[i].domid == caller) return (perms[i].access & XsPerm::kWrite) != 0;
  }
  return (perms[0].access & XsPerm::kWrite) != 0;
}

const XsNode* XsTree::Find(const std::string& path) const {
  auto it = nodes_.find(path);
  return it == nodes_.end() ? nullptr : &it->second;
}

uint64_t XsTree::GenerationOf(const std::string& path) const {
  const XsNode* node = Find(path);
  return node ? node->generation : 0;
}

const XsNode* XsTree::NearestExisting(const std::string& path, std::string* found_path) const {
  std::string current = path;
  while (true) {
    if (const XsNode* node = Find(current)) {
      if (found_path) *found_path = current;
      return node;
    }
    current = ParentPath(current);  // terminates: "/" always exists
  }
}

int XsTree::MissingNodeError(DomainId caller, const std::string& path) const {
  const XsNode* ancestor = NearestExisting(path, nullptr);
  return CanRead(caller, ancestor->perms) ? ENOENT : EACCES;
}

int XsTree::Read(DomainId caller, const std::string& path, std::string* value,
                 std::set<std::string>* read_set) {
  if (read_set) read_set->insert(path);
  const XsNode* node = Find(path);
  if (!node) return MissingNodeError(caller, path);
  if (!CanRead(caller, node->perms)) return EACCES;
  *value = node->value;
  return 0;
}

int XsTree::Create(DomainId caller, const std::string& path, std::string_view value,
                   std::set<std::string>* read_set, std::vector<XsChange>* changes) {
  std::string ancestor_path;
  const XsNode* ancestor = NearestExisting(path, &ancestor_path);
  if (read_set) read_set->insert(ancestor_path);
  if (!CanWrite(caller, ancestor->perms)) return EACCES;
  // Create every missing node from the ancestor down, each inheriting its parent's permissions;
  // an unprivileged domain owns what it creates (xenstored's construct_node()).
  std::vector<std::string> missing;
  for (std::string current = path; current != ancestor_path; current = ParentPath(current)) {
    missing.push_back(current);
  }
  if (caller != 0) {
    // A guest owns what it creates; bound how much (a linear scan: stores here are small).
    size_t owned = 0;
    for (const auto& [node_path, node] : nodes_) {
      if (!node.perms.empty() && node.perms[0].domid == caller) ++owned;
    }
    if (owned + missing.size() > kGuestNodeQuota) return ENOSPC;
  }
  for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
    const std::string& child_path = *it;
    std::string parent_path = ParentPath(child_path);
    XsNode& parent = nodes_.at(parent_path);
    XsNode child;
    child.perms = parent.perms;
    if (caller != 0 && !child.perms.empty()) child.perms[0].domid = caller;
    if (child_path == path) child.value = std::string(value);
    parent.children.insert(child_path.substr(child_path.rfind('/') + 1));
    Touch(&parent);
    Touch(&child);
    if (read_set) read_set->insert(child_path);
    if (changes) changes->push_back(XsChange{child_path, false, child.perms});
    nodes_[child_path] = std::move(child);
  }
  return 0;
}

int XsTree::Write(DomainId caller, const std::string& path, std::string_view value,
                  std::set<std::string>* read_set, std::vector<XsChange>* changes) {
  if (read_set) read_set->insert(path);
  auto it = nodes_.find(path);
  if (it == nodes_.end()) return Create(caller, path, value, read_set, changes);
  XsNode& node = it->second;
  if (!CanWrite(caller, node.perms)) return EACCES;
  node.value = std::string(value);
  Touch(&node);
  if (changes) changes->push_back(XsChange{path, false, node.perms});
  return 0;
}

int XsTree::Mkdir(DomainId caller, const std::string& path, std::set<std::string>* read_set,
                  std::vector<XsChange>* changes) {
  if (read_set) read_set->insert(path);
  const XsNode* node = Find(path);
  if (!node) return Create(caller, path, "", read_set, changes);
  return CanWrite(caller, node->perms) ? 0 : EACCES;
}

void XsTree::RemoveSubtree(const std::string& path, std::vector<XsChange>* changes) {
  auto it = nodes_.find(path);
  if (it == nodes_.end()) return;
  std::set<std::string> children = it->second.children;
  for (const std::string& child : children) {
    RemoveSubtree(path == "/" ? "/" + child : path + "/" + child, changes);
  }
  it = nodes_.find(path);
  if (changes) changes->push_back(XsChange{path, true, it->second.perms});
  nodes_.erase(it);
}

int XsTree::Remove(DomainId caller, const std::string& path, std::set<std::string>* read_set,
                   std::vector<XsChange>* changes) {
  if (path == "/") return EINVAL;
  if (read_set) read_set->insert(path);
  const XsNode* node = Find(path);
  std::string parent_path = ParentPath(path);
  if (!node) {
    // Removing a missing node is fine if its parent exists (do_rm() in xenstored).
    int error = MissingNodeError(caller, path);
    if (read_set) read_set->insert(parent_path);
    if (error == ENOENT && Find(parent_path)) return 0;
    return error;
  }
  if (!CanWrite(caller, node->perms)) return EACCES;
  RemoveSubtree(path, changes);
  XsNode& parent = nodes_.at(parent_path);
  parent.children.erase(path.substr(path.rfind('/') + 1));
  Touch(&parent);
  if (read_set) read_set->insert(parent_path);
  return 0;
}

int XsTree::Directory(DomainId caller, const std::string& path, std::vector<std::string>* children,
                      std::set<std::string>* read_set) {
  if (read_set) read_set->insert(path);
  const XsNode* node = Find(path);
  if (!node) return MissingNodeError(caller, path);
  if (!CanRead(caller, node->perms)) return EACCES;
  children->assign(node->children.begin(), node->children.end());
  return 0;
}

int XsTree::GetPerms(DomainId caller, const std::string& path, XsPermList* perms,
                     std::set<std::string>* read_set) {
  if (read_set) read_set->insert(path);
  const XsNode* node = Find(path);
  if (!node) return MissingNodeError(caller, path);
  if (!CanRead(caller, node->perms)) return EACCES;
  *perms = node->perms;
  return 0;
}

int XsTree::SetPerms(DomainId caller, const std::string& path, const XsPermList& perms,
                     std::set<std::string>* read_set, std::vector<XsChange>* changes) {
  if (perms.empty()) return EINVAL;
  if (read_set) read_set->insert(path);
  auto it = nodes_.find(path);
  if (it == nodes_.end()) return MissingNodeError(caller, path);
  XsNode& node = it->second;
  // Changing permissions needs write access and ownership (XS_PERM_OWNER in xenstored).
  if (caller != 0 && (node.perms.empty() || node.perms[0].domid != caller)) return EACCES;
  node.perms = perms;
  Touch(&node);
  if (changes) changes->push_back(XsChange{path, false, node.perms});
  return 0;
}

void XsTree::ApplyFrom(const XsTree& other, const std::string& path) {
  const XsNode* source = other.Find(path);
  if (!source) {
    nodes_.erase(path);
    return;
  }
  XsNode copy = *source;
  Touch(&copy);
  nodes_[path] = std::move(copy);
}

uint32_t XsStore::StartTransaction(uint64_t owner) {
  uint32_t id = next_transaction_id_++;
  if (next_transaction_id_ == 0) next_transaction_id_ = 1;
  Transaction& transaction = transactions_[id];
  transaction.owner = owner;
  transaction.tree = std::make_unique<XsTree>(tree_);
  transaction.snapshot = std::make_unique<XsTree>(tree_);
  return id;
}

size_t XsStore::TransactionsOf(uint64_t owner) const {
  size_t count = 0;
  for (const auto& [id, transaction] : transactions_) count += transaction.owner == owner;
  return count;
}

XsTree* XsStore::TransactionTree(uint32_t id, uint64_t owner) {
  auto it = transactions_.find(id);
  if (it == transactions_.end() || it->second.owner != owner) return nullptr;
  return it->second.tree.get();
}

std::set<std::string>* XsStore::TransactionReadSet(uint32_t id, uint64_t owner) {
  auto it = transactions_.find(id);
  if (it == transactions_.end() || it->second.owner != owner) return nullptr;
  return &it->second.read_set;
}

void XsStore::RecordTransactionChanges(uint32_t id, const std::vector<XsChange>& changes) {
  auto it = transactions_.find(id);
  if (it == transactions_.end()) return;
  it->second.changes.insert(it->second.changes.end(), changes.begin(), changes.end());
}

int XsStore::EndTransaction(uint32_t id, uint64_t owner, bool commit,
                            std::vector<XsChange>* changes) {
  auto it = transactions_.find(id);
  if (it == transactions_.end() || it->second.owner != owner) return ENOENT;
  Transaction transaction = std::move(it->second);
  transactions_.erase(it);
  if (!commit) return 0;

  // Paths the transaction changed: those whose node differs from the snapshot.
  std::set<std::string> dirty;
  for (const auto& [path, node] : transaction.tree->nodes()) {
    if (transaction.snapshot->GenerationOf(path) != node.generation) dirty.insert(path);
  }
  for (const auto& [path, node] : transaction.snapshot->nodes()) {
    if (!transaction.tree->Find(path)) dirty.insert(path);
  }
  // Conflict: anything the transaction read or changed was changed in the store since the start.
  auto conflicts = [&](const std::string& path) {
    return tree_.GenerationOf(path) != transaction.snapshot->GenerationOf(path);
  };
  for (const std::string& path : transaction.read_set) {
    if (conflicts(path)) return EAGAIN;
  }
  for (const std::string& path : dirty) {
    if (conflicts(path)) return EAGAIN;
  }
  for (const std::string& path : dirty) tree_.ApplyFrom(*transaction.tree, path);
  if (changes) *changes = std::move(transaction.changes);
  return 0;
}

void XsStore::DropTransactionsOf(uint64_t owner) {
  std::erase_if(transactions_, [owner](const auto& entry) { return entry.second.owner == owner; });
}

}  // namespace blockplane::harness
