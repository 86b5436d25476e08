#include "tests/harness/xen/xenstore_tree.h"

#include <errno.h>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace blockplane::harness {
namespace {

using ::testing::ElementsAre;

TEST(XsPermTest, ParsesAndPrintsTheWireEncoding) {
  EXPECT_EQ(XsPerm::Parse("n0"), (XsPerm{0, XsPerm::kNone}));
  EXPECT_EQ(XsPerm::Parse("r5"), (XsPerm{5, XsPerm::kRead}));
  EXPECT_EQ(XsPerm::Parse("w12"), (XsPerm{12, XsPerm::kWrite}));
  EXPECT_EQ(XsPerm::Parse("b65535"), (XsPerm{65535, XsPerm::kBoth}));
  EXPECT_EQ(XsPerm::Parse("x1"), std::nullopt);
  EXPECT_EQ(XsPerm::Parse("r"), std::nullopt);
  EXPECT_EQ(XsPerm::Parse("r1a"), std::nullopt);
  EXPECT_EQ(XsPerm::Parse("r65536"), std::nullopt);
  EXPECT_EQ((XsPerm{7, XsPerm::kBoth}).ToString(), "b7");
}

TEST(XsPathTest, ValidatesLikeXenstored) {
  EXPECT_TRUE(IsValidAbsolutePath("/"));
  EXPECT_TRUE(IsValidAbsolutePath("/local/domain/0/backend/vbd-5_x@y"));
  EXPECT_FALSE(IsValidAbsolutePath(""));
  EXPECT_FALSE(IsValidAbsolutePath("relative"));
  EXPECT_FALSE(IsValidAbsolutePath("/a//b"));
  EXPECT_FALSE(IsValidAbsolutePath("/a/"));
  EXPECT_FALSE(IsValidAbsolutePath("/a b"));
  EXPECT_FALSE(IsValidAbsolutePath("/" + std::string(3072, 'a')));
  EXPECT_TRUE(IsPathAtOrBelow("/a/b", "/a"));
  EXPECT_TRUE(IsPathAtOrBelow("/a", "/a"));
  EXPECT_FALSE(IsPathAtOrBelow("/ab", "/a"));
  EXPECT_TRUE(IsPathAtOrBelow("/ab", "/"));
  EXPECT_EQ(ParentPath("/a/b"), "/a");
  EXPECT_EQ(ParentPath("/a"), "/");
}

TEST(XsTreeTest, OwnerAndListedDomainsFollowXenstoredRules) {
  XsPermList perms = {XsPerm{3, XsPerm::kRead}, XsPerm{5, XsPerm::kNone}, XsPerm{6, XsPerm::kBoth}};
  EXPECT_TRUE(XsTree::CanWrite(0, perms));  // dom0
  EXPECT_TRUE(XsTree::CanWrite(3, perms));  // owner
  EXPECT_FALSE(XsTree::CanRead(5, perms));  // listed with none
  EXPECT_TRUE(XsTree::CanWrite(6, perms));  // listed with both
  EXPECT_TRUE(XsTree::CanRead(9, perms));   // everyone else: the first entry's access
  EXPECT_FALSE(XsTree::CanWrite(9, perms));
}

TEST(XsTreeTest, CreationInheritsPermsAndGuestsOwnWhatTheyCreate) {
  XsTree tree;
  ASSERT_EQ(tree.Write(0, "/home", "", nullptr, nullptr), 0);
  ASSERT_EQ(tree.SetPerms(0, "/home", {XsPerm{0, XsPerm::kNone}, XsPerm{4, XsPerm::kWrite}},
                          nullptr, nullptr),
            0);
  std::vector<XsChange> changes;
  ASSERT_EQ(tree.Write(4, "/home/a/b", "v", nullptr, &changes), 0);
  ASSERT_EQ(changes.size(), 2u);
  EXPECT_EQ(changes[0].path, "/home/a");
  EXPECT_EQ(changes[1].path, "/home/a/b");
  XsPermList perms;
  ASSERT_EQ(tree.GetPerms(0, "/home/a/b", &perms, nullptr), 0);
  EXPECT_EQ(perms[0], (XsPerm{4, XsPerm::kNone}));
  EXPECT_EQ(tree.Write(5, "/home/c", "v", nullptr, nullptr), EACCES);
  std::string value;
  EXPECT_EQ(tree.Read(5, "/home/a/b", &value, nullptr), EACCES);
  EXPECT_EQ(tree.Read(5, "/home/zzz", &value, nullptr), EACCES);  // not even existence
  EXPECT_EQ(tree.Read(0, "/home/zzz", &value, nullptr), ENOENT);
  // Only the owner (or dom0) changes permissions.
  EXPECT_EQ(tree.SetPerms(5, "/home/a/b", {XsPerm{5, XsPerm::kBoth}}, nullptr, nullptr), EACCES);
  EXPECT_EQ(tree.SetPerms(4, "/home/a/b", {XsPerm{4, XsPerm::kRead}}, nullptr, nullptr), 0);
  EXPECT_EQ(tree.SetPerms(0, "/home/a/b", {}, nullptr, nullptr), EINVAL);
}

TEST(XsTreeTest, RemoveTakesTheSubtreeAndReportsEveryNode) {
  XsTree tree;
  ASSERT_EQ(tree.Write(0, "/a/b/c", "1", nullptr, nullptr), 0);
  ASSERT_EQ(tree.Write(0, "/a/d", "2", nullptr, nullptr), 0);
  std::vector<XsChange> changes;
  ASSERT_EQ(tree.Remove(0, "/a", nullptr, &changes), 0);
  EXPECT_EQ(tree.node_count(), 1u);  // only "/"
  EXPECT_EQ(changes.size(), 4u);
  for (const XsChange& change : changes) EXPECT_TRUE(change.removed) << change.path;
  EXPECT_EQ(tree.Remove(0, "/", nullptr, nullptr), EINVAL);
  std::vector<std::string> children;
  ASSERT_EQ(tree.Directory(0, "/", &children, nullptr), 0);
  EXPECT_TRUE(children.empty());
}

TEST(XsStoreTest, DisjointTransactionsBothCommitOverlappingOnesConflict) {
  XsStore store;
  ASSERT_EQ(store.tree().Write(0, "/x", "0", nullptr, nullptr), 0);
  ASSERT_EQ(store.tree().Write(0, "/y", "0", nullptr, nullptr), 0);

  uint32_t first = store.StartTransaction(1);
  uint32_t second = store.StartTransaction(2);
  ASSERT_NE(first, second);
  EXPECT_EQ(store.TransactionTree(first, 2), nullptr);  // not yours
  ASSERT_EQ(store.TransactionTree(first, 1)->Write(0, "/x", "1", store.TransactionReadSet(first, 1),
                                                   nullptr),
            0);
  ASSERT_EQ(store.TransactionTree(second, 2)->Write(0, "/y", "1",
                                                    store.TransactionReadSet(second, 2), nullptr),
            0);
  EXPECT_EQ(store.EndTransaction(first, 1, true, nullptr), 0);
  EXPECT_EQ(store.EndTransaction(second, 2, true, nullptr), 0);
  std::string value;
  ASSERT_EQ(store.tree().Read(0, "/x", &value, nullptr), 0);
  EXPECT_EQ(value, "1");
  ASSERT_EQ(store.tree().Read(0, "/y", &value, nullptr), 0);
  EXPECT_EQ(value, "1");

  // A transaction that read /x conflicts with a commit that changed /x.
  uint32_t reader = store.StartTransaction(1);
  ASSERT_EQ(
      store.TransactionTree(reader, 1)->Read(0, "/x", &value, store.TransactionReadSet(reader, 1)),
      0);
  ASSERT_EQ(store.TransactionTree(reader, 1)->Write(0, "/z", "from-tx",
                                                    store.TransactionReadSet(reader, 1), nullptr),
            0);
  ASSERT_EQ(store.tree().Write(0, "/x", "2", nullptr, nullptr), 0);
  EXPECT_EQ(store.EndTransaction(reader, 1, true, nullptr), EAGAIN);
  EXPECT_EQ(store.tree().Read(0, "/z", &value, nullptr), ENOENT);
  EXPECT_EQ(store.open_transactions(), 0u);

  // Creating children under the same parent concurrently conflicts (the parent's list changed).
  uint32_t creator = store.StartTransaction(1);
  ASSERT_EQ(store.TransactionTree(creator, 1)
                ->Write(0, "/dir/a", "", store.TransactionReadSet(creator, 1), nullptr),
            0);
  ASSERT_EQ(store.tree().Write(0, "/dir/b", "", nullptr, nullptr), 0);
  EXPECT_EQ(store.EndTransaction(creator, 1, true, nullptr), EAGAIN);
  std::vector<std::string> children;
  ASSERT_EQ(store.tree().Directory(0, "/dir", &children, nullptr), 0);
  EXPECT_THAT(children, ElementsAre("b"));
  EXPECT_EQ(store.EndTransaction(12345, 1, true, nullptr), ENOENT);
}

}  // namespace
}  // namespace blockplane::harness
