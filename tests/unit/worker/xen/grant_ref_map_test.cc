#include "worker/xen/grant_ref_map.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace blockplane::worker::xen {
namespace {

struct Value {
  uint32_t ref = 0;
  std::string payload;  // non-trivial: a reset must release it
};

TEST(GrantRefMapTest, FindsWhatWasInsertedAndNothingElse) {
  GrantRefMap<Value> map;
  EXPECT_TRUE(map.empty());
  EXPECT_EQ(map.Find(7), nullptr);
  Value& v = map.FindOrInsert(7);
  EXPECT_EQ(v.ref, 0u);  // value-initialised
  v.ref = 7;
  EXPECT_EQ(map.size(), 1u);
  ASSERT_NE(map.Find(7), nullptr);
  EXPECT_EQ(map.Find(7), &v);
  EXPECT_EQ(&map.FindOrInsert(7), &v);  // no second entry
  EXPECT_EQ(map.size(), 1u);
  EXPECT_EQ(map.Find(8), nullptr);
  EXPECT_EQ(map.Find(0), nullptr);
  EXPECT_EQ(map.Find(UINT32_MAX), nullptr);
  map.Erase(8);  // absent: no-op
  EXPECT_EQ(map.size(), 1u);
  map.Erase(7);
  EXPECT_TRUE(map.empty());
  EXPECT_EQ(map.Find(7), nullptr);
}

TEST(GrantRefMapTest, ReferencesStayValidAcrossGrowthAndOtherErasures) {
  GrantRefMap<Value> map;
  std::vector<Value*> held;
  for (uint32_t ref = 0; ref < 3000; ++ref) {  // grows the index several times
    Value& v = map.FindOrInsert(ref * 7919u);
    v.ref = ref * 7919u;
    held.push_back(&v);
  }
  for (uint32_t ref = 0; ref < 3000; ref += 2) map.Erase(ref * 7919u);
  for (uint32_t ref = 1; ref < 3000; ref += 2) {
    Value* found = map.Find(ref * 7919u);
    ASSERT_EQ(found, held[ref]) << ref;
    EXPECT_EQ(found->ref, ref * 7919u);
  }
  EXPECT_EQ(map.size(), 1500u);
}

TEST(GrantRefMapTest, ErasedValueIsResetAndItsNodeReusedClean) {
  GrantRefMap<Value> map;
  Value& a = map.FindOrInsert(1);
  a.payload = std::string(1000, 'x');
  map.Erase(1);
  EXPECT_TRUE(a.payload.empty());  // released at erase, not when the node is reused
  Value& b = map.FindOrInsert(2);
  EXPECT_TRUE(b.payload.empty());
  EXPECT_EQ(b.ref, 0u);
}

// Random inserts, lookups and erasures against std::map: catches a backward shift that breaks a
// probe chain (an entry that can no longer be found) or leaves a stale one behind.
TEST(GrantRefMapTest, AgreesWithStdMapUnderRandomOperations) {
  for (uint32_t key_space : {64u, 1200u, 100000u}) {
    std::mt19937 rng(key_space);
    GrantRefMap<Value> map;
    std::map<uint32_t, Value*> reference;
    for (int step = 0; step < 200000; ++step) {
      const uint32_t ref = rng() % key_space;
      switch (rng() % 3) {
        case 0: {
          Value& v = map.FindOrInsert(ref);
          if (auto it = reference.find(ref); it != reference.end()) {
            ASSERT_EQ(&v, it->second) << "step " << step;
          } else {
            ASSERT_EQ(v.ref, 0u);
            v.ref = ref;
            reference[ref] = &v;
          }
          break;
        }
        case 1:
          map.Erase(ref);
          reference.erase(ref);
          break;
        default: {
          Value* found = map.Find(ref);
          auto it = reference.find(ref);
          ASSERT_EQ(found, it == reference.end() ? nullptr : it->second) << "step " << step;
          if (found) {
            ASSERT_EQ(found->ref, ref);
          }
        }
      }
      ASSERT_EQ(map.size(), reference.size());
    }
    size_t visited = 0;
    map.ForEach([&](uint32_t ref, Value& v) {
      ++visited;
      EXPECT_EQ(v.ref, ref);
      EXPECT_EQ(reference.count(ref), 1u);
    });
    EXPECT_EQ(visited, reference.size());
  }
}

}  // namespace
}  // namespace blockplane::worker::xen
