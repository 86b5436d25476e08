#pragma once

// Helpers shared by the worker unit tests.

#include <fcntl.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/event_loop.h"
#include "gtest/gtest.h"
#include "worker/backend/backend.h"
#include "worker/block/block_device.h"

namespace blockplane::worker::testing {

inline std::unique_ptr<common::EventLoop> MakeLoop() {
  auto loop = common::EventLoop::Create();
  EXPECT_TRUE(loop.ok()) << loop.status();
  return std::move(loop).value();
}

// A temp file of `size` bytes in /tmp, removed on destruction.
class TempFile {
 public:
  explicit TempFile(uint64_t size) {
    char name[] = "/tmp/blockplane-test-XXXXXX";
    int fd = mkstemp(name);
    EXPECT_GE(fd, 0);
    EXPECT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0);
    close(fd);
    path_ = name;
  }
  ~TempFile() { unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Aligned heap buffer.
class AlignedBuffer {
 public:
  AlignedBuffer(size_t size, size_t alignment = 4096) : size_(size) {
    data_ = static_cast<uint8_t*>(
        aligned_alloc(alignment, (size + alignment - 1) / alignment * alignment));
  }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(other.size_) {}
  ~AlignedBuffer() { free(data_); }
  uint8_t* data() { return data_; }
  size_t size() const { return size_; }
  iovec iov() { return {data_, size_}; }

 private:
  uint8_t* data_;
  size_t size_;
};

// Records a backend completion result.
class Waiter final : public BackendCompletion {
 public:
  void OnBackendComplete(int result) override {
    this->result = result;
    done = true;
  }
  bool done = false;
  int result = 1;
};

inline int RunToCompletion(common::EventLoop* loop, Waiter* waiter) {
  loop->RunUntil([&] { return waiter->done; });
  return waiter->result;
}

}  // namespace blockplane::worker::testing

namespace blockplane::worker::testing {

// Records a block-layer completion, and the order in which completions ran.
class BlockResult final : public BlockCompletion {
 public:
  BlockResult() = default;
  explicit BlockResult(std::vector<int>* order, int id) : order_(order), id_(id) {}
  void OnBlockComplete(int result) override {
    EXPECT_FALSE(done) << "completed twice";
    this->result = result;
    done = true;
    if (order_ != nullptr) order_->push_back(id_);
  }
  bool done = false;
  int result = 1;

 private:
  std::vector<int>* order_ = nullptr;
  int id_ = 0;
};

}  // namespace blockplane::worker::testing
