#pragma once

#include <memory>
#include <vector>

namespace blockplane::worker {

// A free list of reusable objects, so per-I/O state costs no allocation once the pool has grown
// to the peak queue depth. Objects keep their members (and vector capacities) between uses;
// Get() does not reset them. Single-threaded (loop thread). Objects live as long as the pool.
template <typename T>
class ObjectPool {
 public:
  template <typename... Args>
  T* Get(Args&&... args) {
    if (free_.empty()) {
      all_.push_back(std::make_unique<T>(std::forward<Args>(args)...));
      return all_.back().get();
    }
    T* object = free_.back();
    free_.pop_back();
    return object;
  }
  void Put(T* object) { free_.push_back(object); }
  size_t allocated() const { return all_.size(); }
  size_t in_use() const { return all_.size() - free_.size(); }

 private:
  std::vector<std::unique_ptr<T>> all_;
  std::vector<T*> free_;
};

}  // namespace blockplane::worker
