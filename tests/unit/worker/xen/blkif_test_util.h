#pragma once

// Builds blkif request slots byte by byte from offsets written out by hand (the ABI as documented
// by Xen, Linux blkback and QEMU), independent of the structs in worker/xen/blkif_abi.h, so the
// tests cross-check those structs instead of trusting them.

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "gtest/gtest.h"
#include "worker/xen/blkif_abi.h"
#include "worker/xen/blkif_request.h"

namespace blockplane::worker::xen::testing {

struct AbiOffsets {
  size_t request_size;
  size_t entry_size;
  // common
  size_t operation, id;
  // read/write
  size_t nr_segments, handle, sector_number, seg;
  // discard
  size_t discard_flag, discard_handle, discard_sector, discard_nr_sectors;
  // indirect
  size_t indirect_op, indirect_nr_segments, indirect_sector, indirect_handle, indirect_grefs;
  // response
  size_t response_size, rsp_id, rsp_operation, rsp_status;
};

// i386: 8-byte fields 4-byte aligned.
inline constexpr AbiOffsets kX86_32Offsets = {
    .request_size = 108,
    .entry_size = 108,
    .operation = 0,
    .id = 4,
    .nr_segments = 1,
    .handle = 2,
    .sector_number = 12,
    .seg = 20,
    .discard_flag = 1,
    .discard_handle = 2,
    .discard_sector = 12,
    .discard_nr_sectors = 20,
    .indirect_op = 1,
    .indirect_nr_segments = 2,
    .indirect_sector = 12,
    .indirect_handle = 20,
    .indirect_grefs = 24,
    .response_size = 12,
    .rsp_id = 0,
    .rsp_operation = 8,
    .rsp_status = 10,
};

// x86_64 (and native on an x86_64 host).
inline constexpr AbiOffsets kX86_64Offsets = {
    .request_size = 112,
    .entry_size = 112,
    .operation = 0,
    .id = 8,
    .nr_segments = 1,
    .handle = 2,
    .sector_number = 16,
    .seg = 24,
    .discard_flag = 1,
    .discard_handle = 2,
    .discard_sector = 16,
    .discard_nr_sectors = 24,
    .indirect_op = 1,
    .indirect_nr_segments = 2,
    .indirect_sector = 16,
    .indirect_handle = 24,
    .indirect_grefs = 28,
    .response_size = 16,
    .rsp_id = 0,
    .rsp_operation = 8,
    .rsp_status = 10,
};

inline const AbiOffsets& OffsetsFor(Protocol protocol) {
  return protocol == Protocol::kX86_32 ? kX86_32Offsets : kX86_64Offsets;
}

inline constexpr Protocol kAllProtocols[] = {Protocol::kNative, Protocol::kX86_32,
                                             Protocol::kX86_64};

template <typename T>
void Put(std::vector<uint8_t>& bytes, size_t offset, T value) {
  ASSERT_LE(offset + sizeof(T), bytes.size());
  std::memcpy(bytes.data() + offset, &value, sizeof(T));  // x86 is little-endian, as the ABI
}

template <typename T>
T Get(const uint8_t* bytes, size_t offset) {
  T value;
  std::memcpy(&value, bytes + offset, sizeof(T));
  return value;
}

struct Seg {
  uint32_t gref;
  uint8_t first;
  uint8_t last;
};

// A READ/WRITE/WRITE_BARRIER/FLUSH_DISKCACHE (or any "other" op) slot. Bytes not set are `fill`.
inline std::vector<uint8_t> RwSlot(Protocol protocol, uint8_t operation, uint64_t id,
                                   uint64_t sector, std::initializer_list<Seg> segs,
                                   uint16_t handle = 0x5a5a, int nr_segments = -1,
                                   uint8_t fill = 0) {
  const AbiOffsets& o = OffsetsFor(protocol);
  std::vector<uint8_t> b(o.request_size, fill);
  Put<uint8_t>(b, o.operation, operation);
  Put<uint8_t>(b, o.nr_segments,
               static_cast<uint8_t>(nr_segments >= 0 ? nr_segments : segs.size()));
  Put<uint16_t>(b, o.handle, handle);
  Put<uint64_t>(b, o.id, id);
  Put<uint64_t>(b, o.sector_number, sector);
  size_t i = 0;
  for (const Seg& s : segs) {
    Put<uint32_t>(b, o.seg + i * 8, s.gref);
    Put<uint8_t>(b, o.seg + i * 8 + 4, s.first);
    Put<uint8_t>(b, o.seg + i * 8 + 5, s.last);
    ++i;
  }
  return b;
}

inline std::vector<uint8_t> DiscardSlot(Protocol protocol, uint64_t id, uint64_t sector,
                                        uint64_t nr_sectors, uint8_t flag = 0,
                                        uint16_t handle = 0x5a5a) {
  const AbiOffsets& o = OffsetsFor(protocol);
  std::vector<uint8_t> b(o.request_size, 0);
  Put<uint8_t>(b, o.operation, BLKIF_OP_DISCARD);
  Put<uint8_t>(b, o.discard_flag, flag);
  Put<uint16_t>(b, o.discard_handle, handle);
  Put<uint64_t>(b, o.id, id);
  Put<uint64_t>(b, o.discard_sector, sector);
  Put<uint64_t>(b, o.discard_nr_sectors, nr_sectors);
  return b;
}

inline std::vector<uint8_t> IndirectSlot(Protocol protocol, uint8_t indirect_op, uint64_t id,
                                         uint64_t sector, uint16_t nr_segments,
                                         std::initializer_list<uint32_t> grefs,
                                         uint16_t handle = 0x5a5a) {
  const AbiOffsets& o = OffsetsFor(protocol);
  std::vector<uint8_t> b(o.request_size, 0);
  Put<uint8_t>(b, o.operation, BLKIF_OP_INDIRECT);
  Put<uint8_t>(b, o.indirect_op, indirect_op);
  Put<uint16_t>(b, o.indirect_nr_segments, nr_segments);
  Put<uint64_t>(b, o.id, id);
  Put<uint64_t>(b, o.indirect_sector, sector);
  Put<uint16_t>(b, o.indirect_handle, handle);
  size_t i = 0;
  for (uint32_t gref : grefs) Put<uint32_t>(b, o.indirect_grefs + i++ * 4, gref);
  return b;
}

// Indirect page bytes holding `segs` descriptors (blkif_request_segment: gref, first, last, pad).
inline std::vector<uint8_t> IndirectPages(const std::vector<Seg>& segs) {
  const size_t pages = (segs.size() * 8 + kXenPageSize - 1) / kXenPageSize;
  std::vector<uint8_t> b(std::max<size_t>(pages, 1) * kXenPageSize, 0);
  for (size_t i = 0; i < segs.size(); ++i) {
    Put<uint32_t>(b, i * 8, segs[i].gref);
    Put<uint8_t>(b, i * 8 + 4, segs[i].first);
    Put<uint8_t>(b, i * 8 + 5, segs[i].last);
  }
  return b;
}

// Page-aligned anonymous memory standing in for a mapped grant (so mprotect can revoke it).
class MappedPages {
 public:
  explicit MappedPages(size_t pages) : size_(pages * kXenPageSize) {
    void* p = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    EXPECT_NE(p, MAP_FAILED);
    data_ = static_cast<uint8_t*>(p);
  }
  ~MappedPages() { munmap(data_, size_); }
  MappedPages(const MappedPages&) = delete;
  MappedPages& operator=(const MappedPages&) = delete;

  uint8_t* data() { return data_; }
  size_t size() const { return size_; }
  std::span<uint8_t> span() { return {data_, size_}; }
  void Protect(int prot) { ASSERT_EQ(mprotect(data_, size_, prot), 0); }

 private:
  size_t size_;
  uint8_t* data_;
};

}  // namespace blockplane::worker::xen::testing
