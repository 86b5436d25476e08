#pragma once

// GrantRefMap<T>: a map from grant reference to T for the per-queue persistent-grant cache, on
// the data path (one lookup per segment of every request).
//
// std::unordered_map cost a prime-modulo division and a pointer chase to a heap node per lookup
// (about 5% of the worker's time per polled null request). Here the index is a flat, open-addressed
// table of (ref, node) pairs, a power of two in size and at most half full, probed linearly from a
// multiplicative hash; a lookup is a multiply, a shift and usually one slot load in L1. Removal
// shifts later entries of the cluster back (no tombstones, so lookups never degrade).
//
// Values live in a node pool (std::deque, freed nodes reused), so a T& stays valid until that
// ref is erased: the cache hands out pointers to grants held by in-flight requests. Each index
// slot holds the node's address, so a hit is two dependent loads (slot, value).
//
// Grant refs are chosen by the guest, so the key space is hostile: the hash multiplier is random
// per map, so a guest cannot pick refs that collide. Even if it could, it would only lengthen its
// own queue's lookups, bounded by the cache cap (blkback's max_persistent_grants). Single thread,
// no locking.

#include <bit>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <random>
#include <vector>

namespace blockplane::worker::xen {

template <typename T>
class GrantRefMap {
 public:
  GrantRefMap() : multiplier_(RandomOddMultiplier()) { Rehash(kMinSlots); }

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }

  // The value for `ref`, or nullptr.
  T* Find(uint32_t ref) {
    for (size_t i = Home(ref);; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.value == nullptr) return nullptr;
      if (s.ref == ref) return s.value;
    }
  }

  // The value for `ref`, value-initialised when it is new.
  T& FindOrInsert(uint32_t ref) {
    if (T* found = Find(ref)) return *found;
    if ((size_ + 1) * 2 > slots_.size()) Rehash(slots_.size() * 2);
    T* node;
    if (!free_nodes_.empty()) {
      node = free_nodes_.back();
      free_nodes_.pop_back();
    } else {
      node = &nodes_.emplace_back();
    }
    Place(ref, node);
    ++size_;
    return *node;
  }

  // Removes `ref` (no-op when absent). References to other values stay valid.
  void Erase(uint32_t ref) {
    size_t i = Home(ref);
    while (true) {
      if (slots_[i].value == nullptr) return;
      if (slots_[i].ref == ref) break;
      i = (i + 1) & mask_;
    }
    *slots_[i].value = T{};  // release what the value holds now, not at reuse
    free_nodes_.push_back(slots_[i].value);
    --size_;
    // Backward-shift deletion: move each later entry of the cluster into the hole when the hole
    // lies on its probe path (between its home slot and where it sits, cyclically).
    size_t hole = i;
    for (size_t j = (i + 1) & mask_; slots_[j].value != nullptr; j = (j + 1) & mask_) {
      const size_t home = Home(slots_[j].ref);
      if (((j - home) & mask_) >= ((j - hole) & mask_)) {
        slots_[hole] = slots_[j];
        hole = j;
      }
    }
    slots_[hole] = Slot{};
  }

  // Calls f(ref, value) for every entry, in no particular order. `f` must not change the map.
  template <typename F>
  void ForEach(F&& f) {
    for (const Slot& s : slots_) {
      if (s.value != nullptr) f(s.ref, *s.value);
    }
  }

 private:
  static constexpr size_t kMinSlots = 64;
  struct Slot {
    uint32_t ref = 0;
    T* value = nullptr;  // nullptr: empty
  };

  static uint64_t RandomOddMultiplier() {
    std::random_device device;
    return ((uint64_t{device()} << 32) ^ device() ^ 0x9E3779B97F4A7C15ull) | 1;
  }

  // Multiplicative hashing: the top bits of ref * an odd 64-bit multiplier.
  size_t Home(uint32_t ref) const {
    return static_cast<size_t>((uint64_t{ref} * multiplier_) >> shift_);
  }

  void Place(uint32_t ref, T* value) {
    size_t i = Home(ref);
    while (slots_[i].value != nullptr) i = (i + 1) & mask_;
    slots_[i] = Slot{ref, value};
  }

  void Rehash(size_t count) {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(count, Slot{});
    mask_ = count - 1;
    shift_ = 64 - std::countr_zero(count);
    for (const Slot& s : old) {
      if (s.value != nullptr) Place(s.ref, s.value);
    }
  }

  uint64_t multiplier_;
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  int shift_ = 64;
  size_t size_ = 0;
  std::deque<T> nodes_;
  std::vector<T*> free_nodes_;
};

}  // namespace blockplane::worker::xen
