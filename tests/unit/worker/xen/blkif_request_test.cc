// Validation rules of ParseRequest / ParseIndirectSegments: each rule accepted at its edge and
// refused just past it, with the right InvalidReason, response status and the guest's id kept.

#include "worker/xen/blkif_request.h"

#include <atomic>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/worker/xen/blkif_test_util.h"

namespace blockplane::worker::xen {
namespace {

using testing::DiscardSlot;
using testing::IndirectPages;
using testing::IndirectSlot;
using testing::RwSlot;
using testing::Seg;

constexpr uint64_t kId = 0xDEADBEEF00C0FFEEull;
constexpr uint64_t kDiskSectors = 1 << 20;  // 512 MiB
constexpr uint64_t kMax64 = std::numeric_limits<uint64_t>::max();

DeviceGeometry Geometry() {
  return DeviceGeometry{.sectors = kDiskSectors,
                        .read_only = false,
                        .max_indirect_segments = 256,
                        .discard_enabled = true,
                        .logical_block_size = 512};
}

std::string Name(const ::testing::TestParamInfo<Protocol>& info) {
  switch (info.param) {
    case Protocol::kX86_32:
      return "x86_32";
    case Protocol::kX86_64:
      return "x86_64";
    default:
      return "native";
  }
}

class BlkifRequestTest : public ::testing::TestWithParam<Protocol> {
 protected:
  Protocol p() const { return GetParam(); }

  Parsed<BlkifRequest> Parse(const std::vector<uint8_t>& slot,
                             const DeviceGeometry& geometry = Geometry()) {
    return ParseRequest(p(), slot, geometry);
  }

  // Refused with `reason`, answered with `status`, echoing the id and `echo_op`.
  void ExpectRefused(const Parsed<BlkifRequest>& parsed, InvalidReason reason, uint8_t echo_op,
                     int16_t status = BLKIF_RSP_ERROR, uint64_t id = kId) {
    ASSERT_FALSE(parsed.ok()) << "accepted; expected " << InvalidReasonName(reason);
    EXPECT_EQ(InvalidReasonName(parsed.error().reason), InvalidReasonName(reason));
    EXPECT_EQ(parsed.error().status, status);
    EXPECT_EQ(parsed.error().id, id);
    EXPECT_EQ(parsed.error().operation, echo_op);
  }

  void ExpectAccepted(const Parsed<BlkifRequest>& parsed) {
    ASSERT_TRUE(parsed.ok()) << InvalidReasonName(parsed.error().reason);
    EXPECT_EQ(parsed.value().id, kId);
  }
};

// --- operations ---------------------------------------------------------------------------------

TEST_P(BlkifRequestTest, UnknownOperationsAreNotSupported) {
  for (int op : {BLKIF_OP_RESERVED_1, 7, 8, 0x80, 0xFF}) {
    SCOPED_TRACE(op);
    ExpectRefused(Parse(RwSlot(p(), op, kId, 0, {{1, 0, 7}})), InvalidReason::kUnknownOperation,
                  static_cast<uint8_t>(op), BLKIF_RSP_EOPNOTSUPP);
  }
}

TEST_P(BlkifRequestTest, ReadAndWriteAccepted) {
  for (int op : {BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER}) {
    SCOPED_TRACE(op);
    auto parsed = Parse(RwSlot(p(), op, kId, 8, {{1, 0, 7}, {2, 0, 0}}));
    ExpectAccepted(parsed);
    EXPECT_EQ(parsed.value().operation, op);
    EXPECT_EQ(parsed.value().data_operation(), op);
    EXPECT_EQ(parsed.value().transfer_bytes, 9u * 512u);
  }
}

// --- nr_segments --------------------------------------------------------------------------------

TEST_P(BlkifRequestTest, NrSegmentsBounds) {
  const std::initializer_list<Seg> eleven = {{1, 0, 7}, {2, 0, 7},  {3, 0, 7}, {4, 0, 7},
                                             {5, 0, 7}, {6, 0, 7},  {7, 0, 7}, {8, 0, 7},
                                             {9, 0, 7}, {10, 0, 7}, {11, 0, 7}};
  auto max = Parse(RwSlot(p(), BLKIF_OP_READ, kId, 0, eleven));
  ExpectAccepted(max);
  EXPECT_EQ(max.value().nr_segments, 11);
  EXPECT_EQ(max.value().transfer_bytes, 11u * 4096u);
  for (int op : {BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER}) {
    SCOPED_TRACE(op);
    ExpectRefused(Parse(RwSlot(p(), op, kId, 0, {}, 0, 0)), InvalidReason::kBadNrSegments, op);
    ExpectRefused(Parse(RwSlot(p(), op, kId, 0, eleven, 0, 12)), InvalidReason::kBadNrSegments, op);
    ExpectRefused(Parse(RwSlot(p(), op, kId, 0, eleven, 0, 255)), InvalidReason::kBadNrSegments,
                  op);
  }
}

TEST_P(BlkifRequestTest, SegmentsBeyondNrSegmentsAreIgnored) {
  // Garbage in seg[2..10] (0xFF: last_sect 255) must not matter when nr_segments is 2.
  auto parsed =
      Parse(RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 0, 7}, {2, 0, 7}}, 0, /*nr=*/2, 0xFF));
  ExpectAccepted(parsed);
  EXPECT_EQ(parsed.value().nr_segments, 2);
  EXPECT_EQ(parsed.value().segments[2].gref, 0u);  // not copied into the request
}

TEST_P(BlkifRequestTest, FlushWithoutSegmentsHasNoRange) {
  for (uint64_t sector : {uint64_t{0}, kDiskSectors, kMax64}) {
    auto parsed = Parse(RwSlot(p(), BLKIF_OP_FLUSH_DISKCACHE, kId, sector, {}));
    ExpectAccepted(parsed);
    EXPECT_EQ(parsed.value().nr_segments, 0);
    EXPECT_EQ(parsed.value().transfer_bytes, 0u);
  }
}

TEST_P(BlkifRequestTest, FlushWithSegmentsIsCheckedLikeAWrite) {
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_FLUSH_DISKCACHE, kId, 0, {{1, 0, 7}})));
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_FLUSH_DISKCACHE, kId, kDiskSectors, {{1, 0, 7}})),
                InvalidReason::kBadSectorRange, BLKIF_OP_FLUSH_DISKCACHE);
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_FLUSH_DISKCACHE, kId, 0, {{1, 3, 2}})),
                InvalidReason::kBadFirstLastSect, BLKIF_OP_FLUSH_DISKCACHE);
}

// --- first_sect / last_sect ---------------------------------------------------------------------

TEST_P(BlkifRequestTest, FirstLastSect) {
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 7, 7}})));
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 0, 0}})));
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 3, 5}})));
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 5, 4}})),
                InvalidReason::kBadFirstLastSect, BLKIF_OP_READ);
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 0, 8}})),
                InvalidReason::kBadFirstLastSect, BLKIF_OP_READ);
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_WRITE, kId, 0, {{1, 0, 7}, {2, 255, 255}})),
                InvalidReason::kBadFirstLastSect, BLKIF_OP_WRITE);
}

TEST_P(BlkifRequestTest, SegmentAccessors) {
  auto parsed = Parse(RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 3, 5}}));
  ExpectAccepted(parsed);
  const BlkifSegment& s = parsed.value().segments[0];
  EXPECT_EQ(s.sectors(), 3u);
  EXPECT_EQ(s.offset_bytes(), 3u * 512u);
  EXPECT_EQ(s.length_bytes(), 3u * 512u);
}

// --- logical block size -------------------------------------------------------------------------

TEST_P(BlkifRequestTest, LogicalBlockSize4096NeedsWholePages) {
  DeviceGeometry g = Geometry();
  g.logical_block_size = 4096;
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_WRITE, kId, 8, {{1, 0, 7}, {2, 0, 7}}), g));
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_WRITE, kId, 8, {{1, 1, 7}}), g),
                InvalidReason::kMisaligned, BLKIF_OP_WRITE);
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_WRITE, kId, 8, {{1, 0, 6}}), g),
                InvalidReason::kMisaligned, BLKIF_OP_WRITE);
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 4, {{1, 0, 7}}), g),
                InvalidReason::kMisaligned, BLKIF_OP_READ);
  // A flush without data has nothing to align.
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_FLUSH_DISKCACHE, kId, 3, {}), g));
}

TEST_P(BlkifRequestTest, LogicalBlockSize1024) {
  DeviceGeometry g = Geometry();
  g.logical_block_size = 1024;
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 2, {{1, 2, 5}}), g));
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 2, {{1, 1, 2}}), g),
                InvalidReason::kMisaligned, BLKIF_OP_READ);
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 2, {{1, 2, 2}}), g),
                InvalidReason::kMisaligned, BLKIF_OP_READ);
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 1, {{1, 0, 1}}), g),
                InvalidReason::kMisaligned, BLKIF_OP_READ);
}

// --- sector range -------------------------------------------------------------------------------

TEST_P(BlkifRequestTest, SectorRangeEdges) {
  // 9 sectors ending exactly at the end of the disk.
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_READ, kId, kDiskSectors - 9, {{1, 0, 7}, {2, 0, 0}})));
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_READ, kId, kDiskSectors - 8, {{1, 0, 7}, {2, 0, 0}})),
                InvalidReason::kBadSectorRange, BLKIF_OP_READ);
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_READ, kId, kDiskSectors, {{1, 0, 0}})),
                InvalidReason::kBadSectorRange, BLKIF_OP_READ);
  DeviceGeometry empty = Geometry();
  empty.sectors = 0;
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 0, 0}}), empty),
                InvalidReason::kBadSectorRange, BLKIF_OP_READ);
}

TEST_P(BlkifRequestTest, SectorNumberNearUint64MaxDoesNotWrap) {
  for (uint64_t sector : {kMax64, kMax64 - 1, kMax64 - 7, kMax64 - 8}) {
    SCOPED_TRACE(sector);
    ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_WRITE, kId, sector, {{1, 0, 7}, {1, 0, 7}})),
                  InvalidReason::kBadSectorRange, BLKIF_OP_WRITE);
  }
  // A disk of 2^64 - 1 sectors: the last 8 fit, one more would wrap.
  DeviceGeometry huge = Geometry();
  huge.sectors = kMax64;
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_WRITE, kId, kMax64 - 8, {{1, 0, 7}}), huge));
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_WRITE, kId, kMax64 - 7, {{1, 0, 7}}), huge),
                InvalidReason::kBadSectorRange, BLKIF_OP_WRITE);
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_WRITE, kId, kMax64, {{1, 0, 0}}), huge),
                InvalidReason::kBadSectorRange, BLKIF_OP_WRITE);
}

// --- read-only ----------------------------------------------------------------------------------

TEST_P(BlkifRequestTest, ReadOnlyDeviceRefusesEverythingButReads) {
  DeviceGeometry ro = Geometry();
  ro.read_only = true;
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 0, 7}}), ro));
  for (int op : {BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE}) {
    SCOPED_TRACE(op);
    ExpectRefused(Parse(RwSlot(p(), op, kId, 0, {{1, 0, 7}}), ro), InvalidReason::kReadOnlyWrite,
                  op);
  }
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_FLUSH_DISKCACHE, kId, 0, {}), ro),
                InvalidReason::kReadOnlyWrite, BLKIF_OP_FLUSH_DISKCACHE);
  ExpectRefused(Parse(DiscardSlot(p(), kId, 0, 8), ro), InvalidReason::kReadOnlyWrite,
                BLKIF_OP_DISCARD);
  ExpectRefused(Parse(IndirectSlot(p(), BLKIF_OP_WRITE, kId, 0, 20, {9}), ro),
                InvalidReason::kReadOnlyWrite, BLKIF_OP_WRITE);
  ExpectAccepted(Parse(IndirectSlot(p(), BLKIF_OP_READ, kId, 0, 20, {9}), ro));
}

// --- indirect -----------------------------------------------------------------------------------

TEST_P(BlkifRequestTest, IndirectNrSegmentsAndPages) {
  struct Case {
    uint16_t nr_segments;
    uint8_t pages;
  };
  DeviceGeometry g = Geometry();
  g.max_indirect_segments = 4096;
  for (Case c : {Case{1, 1}, Case{512, 1}, Case{513, 2}, Case{1024, 2}, Case{4096, 8}}) {
    SCOPED_TRACE(c.nr_segments);
    auto parsed = Parse(
        IndirectSlot(p(), BLKIF_OP_WRITE, kId, 0, c.nr_segments, {1, 2, 3, 4, 5, 6, 7, 8}), g);
    ExpectAccepted(parsed);
    EXPECT_EQ(parsed.value().nr_segments, c.nr_segments);
    EXPECT_EQ(parsed.value().indirect.nr_pages, c.pages);
    EXPECT_EQ(parsed.value().transfer_bytes, 0u);  // known after ParseIndirectSegments
    for (int i = 0; i < 8; ++i) {
      EXPECT_EQ(parsed.value().indirect.grefs[i], i < c.pages ? uint32_t(i + 1) : 0u);
    }
  }
  ExpectRefused(Parse(IndirectSlot(p(), BLKIF_OP_WRITE, kId, 0, 0, {1}), g),
                InvalidReason::kBadNrSegments, BLKIF_OP_WRITE);
  ExpectRefused(Parse(IndirectSlot(p(), BLKIF_OP_WRITE, kId, 0, 4097, {1}), g),
                InvalidReason::kBadNrSegments, BLKIF_OP_WRITE);
  ExpectRefused(Parse(IndirectSlot(p(), BLKIF_OP_WRITE, kId, 0, 0xFFFF, {1}), g),
                InvalidReason::kBadNrSegments, BLKIF_OP_WRITE);
}

TEST_P(BlkifRequestTest, IndirectLimitedToAdvertisedSegments) {
  DeviceGeometry g = Geometry();  // 256
  ExpectAccepted(Parse(IndirectSlot(p(), BLKIF_OP_READ, kId, 0, 256, {1}), g));
  ExpectRefused(Parse(IndirectSlot(p(), BLKIF_OP_READ, kId, 0, 257, {1}), g),
                InvalidReason::kBadNrSegments, BLKIF_OP_READ);
  // Advertised more than the protocol allows: clamped to 8 pages x 512.
  g.max_indirect_segments = 1 << 20;
  ExpectAccepted(Parse(IndirectSlot(p(), BLKIF_OP_READ, kId, 0, 4096, {1}), g));
  ExpectRefused(Parse(IndirectSlot(p(), BLKIF_OP_READ, kId, 0, 4097, {1}), g),
                InvalidReason::kBadNrSegments, BLKIF_OP_READ);
  // Not advertised at all.
  g.max_indirect_segments = 0;
  ExpectRefused(Parse(IndirectSlot(p(), BLKIF_OP_READ, kId, 0, 1, {1}), g),
                InvalidReason::kBadIndirect, BLKIF_OP_READ);
}

TEST_P(BlkifRequestTest, IndirectOpMustBeReadOrWrite) {
  for (int op : {BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_DISCARD,
                 BLKIF_OP_INDIRECT, 0x77}) {
    SCOPED_TRACE(op);
    // The response echoes the indirect op, as blkback does.
    ExpectRefused(Parse(IndirectSlot(p(), op, kId, 0, 1, {1})), InvalidReason::kBadIndirect,
                  static_cast<uint8_t>(op));
  }
}

TEST_P(BlkifRequestTest, IndirectStartSectorChecked) {
  ExpectAccepted(Parse(IndirectSlot(p(), BLKIF_OP_READ, kId, kDiskSectors - 1, 1, {1})));
  ExpectRefused(Parse(IndirectSlot(p(), BLKIF_OP_READ, kId, kDiskSectors, 1, {1})),
                InvalidReason::kBadSectorRange, BLKIF_OP_READ);
  ExpectRefused(Parse(IndirectSlot(p(), BLKIF_OP_READ, kId, kMax64, 1, {1})),
                InvalidReason::kBadSectorRange, BLKIF_OP_READ);
  DeviceGeometry g = Geometry();
  g.logical_block_size = 4096;
  ExpectRefused(Parse(IndirectSlot(p(), BLKIF_OP_READ, kId, 4, 1, {1}), g),
                InvalidReason::kMisaligned, BLKIF_OP_READ);
}

// --- discard ------------------------------------------------------------------------------------

TEST_P(BlkifRequestTest, Discard) {
  auto parsed = Parse(DiscardSlot(p(), kId, 100, 50));
  ExpectAccepted(parsed);
  EXPECT_EQ(parsed.value().discard.sector, 100u);
  EXPECT_EQ(parsed.value().discard.nr_sectors, 50u);
  EXPECT_FALSE(parsed.value().discard.secure);
  EXPECT_TRUE(Parse(DiscardSlot(p(), kId, 100, 50, BLKIF_DISCARD_SECURE)).value().discard.secure);
  // Unknown flag bits are ignored.
  EXPECT_FALSE(Parse(DiscardSlot(p(), kId, 100, 50, 0xFE)).value().discard.secure);
  // The whole disk.
  ExpectAccepted(Parse(DiscardSlot(p(), kId, 0, kDiskSectors)));
  // Not aligned to the logical block size: accepted, the block layer trims it.
  DeviceGeometry g = Geometry();
  g.logical_block_size = 4096;
  ExpectAccepted(Parse(DiscardSlot(p(), kId, 3, 5), g));
}

TEST_P(BlkifRequestTest, DiscardRefusals) {
  ExpectRefused(Parse(DiscardSlot(p(), kId, 0, 0)), InvalidReason::kBadDiscard, BLKIF_OP_DISCARD);
  ExpectRefused(Parse(DiscardSlot(p(), kId, 0, kDiskSectors + 1)), InvalidReason::kBadSectorRange,
                BLKIF_OP_DISCARD);
  ExpectRefused(Parse(DiscardSlot(p(), kId, kDiskSectors, 1)), InvalidReason::kBadSectorRange,
                BLKIF_OP_DISCARD);
  ExpectRefused(Parse(DiscardSlot(p(), kId, kMax64, kMax64)), InvalidReason::kBadSectorRange,
                BLKIF_OP_DISCARD);
  ExpectRefused(Parse(DiscardSlot(p(), kId, 1, kMax64)), InvalidReason::kBadSectorRange,
                BLKIF_OP_DISCARD);
  DeviceGeometry off = Geometry();
  off.discard_enabled = false;
  ExpectRefused(Parse(DiscardSlot(p(), kId, 0, 8), off), InvalidReason::kNotAdvertised,
                BLKIF_OP_DISCARD, BLKIF_RSP_EOPNOTSUPP);
}

TEST_P(BlkifRequestTest, FlushAndBarrierOnlyWhenAdvertised) {
  DeviceGeometry g = Geometry();
  g.flush_enabled = false;
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_FLUSH_DISKCACHE, kId, 0, {}), g),
                InvalidReason::kNotAdvertised, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_EOPNOTSUPP);
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_WRITE_BARRIER, kId, 0, {{1, 0, 7}}), g));
  g = Geometry();
  g.barrier_enabled = false;
  ExpectRefused(Parse(RwSlot(p(), BLKIF_OP_WRITE_BARRIER, kId, 0, {{1, 0, 7}}), g),
                InvalidReason::kNotAdvertised, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP);
  ExpectAccepted(Parse(RwSlot(p(), BLKIF_OP_FLUSH_DISKCACHE, kId, 0, {}), g));
}

// --- slot size ----------------------------------------------------------------------------------

TEST_P(BlkifRequestTest, ShortSlotIsRefusedWithoutReadingPastIt) {
  auto slot = RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 0, 7}});
  slot.pop_back();
  auto parsed = Parse(slot);
  ASSERT_FALSE(parsed.ok());
  EXPECT_EQ(parsed.error().reason, InvalidReason::kShortSlot);
  EXPECT_TRUE(Parse({}).error().reason == InvalidReason::kShortSlot);
}

TEST_P(BlkifRequestTest, LongerSlotOnlyUsesTheRequestBytes) {
  auto slot = RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 0, 7}});
  slot.resize(slot.size() + 64, 0xFF);
  ExpectAccepted(Parse(slot));
}

// --- ParseIndirectSegments ----------------------------------------------------------------------

class BlkifIndirectSegmentsTest : public BlkifRequestTest {
 protected:
  BlkifRequest Accepted(uint64_t sector, uint16_t nr, uint8_t op = BLKIF_OP_READ,
                        const DeviceGeometry& g = Geometry()) {
    auto parsed = Parse(IndirectSlot(p(), op, kId, sector, nr, {1, 2}), g);
    EXPECT_TRUE(parsed.ok());
    return parsed.ok() ? parsed.value() : BlkifRequest{};
  }
  std::vector<BlkifSegment> out_ = std::vector<BlkifSegment>(4096);
};

TEST_P(BlkifIndirectSegmentsTest, ValidDescriptors) {
  std::vector<Seg> segs;
  for (uint32_t i = 0; i < 200; ++i) segs.push_back({1000 + i, 0, 7});
  segs[7] = {7, 2, 4};
  const auto pages = IndirectPages(segs);
  auto result = ParseIndirectSegments(Accepted(16, 200), pages, Geometry(), out_);
  ASSERT_TRUE(result.ok()) << InvalidReasonName(result.error().reason);
  EXPECT_EQ(result.value().nr_segments, 200u);
  EXPECT_EQ(result.value().transfer_bytes, (199u * 8u + 3u) * 512u);
  EXPECT_EQ(out_[0].gref, 1000u);
  EXPECT_EQ(out_[7].gref, 7u);
  EXPECT_EQ(out_[7].first_sect, 2);
  EXPECT_EQ(out_[7].last_sect, 4);
  EXPECT_EQ(out_[199].gref, 1199u);
}

TEST_P(BlkifIndirectSegmentsTest, TwoPagesOfDescriptors) {
  DeviceGeometry g = Geometry();
  g.max_indirect_segments = 1024;
  std::vector<Seg> segs(600, Seg{5, 0, 7});
  const auto pages = IndirectPages(segs);
  ASSERT_EQ(pages.size(), 2 * kXenPageSize);
  auto result = ParseIndirectSegments(Accepted(0, 600, BLKIF_OP_WRITE, g), pages, g, out_);
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(result.value().transfer_bytes, 600u * 4096u);
}

TEST_P(BlkifIndirectSegmentsTest, BadDescriptorRefusedWithTheRequestId) {
  std::vector<Seg> segs(100, Seg{5, 0, 7});
  segs[99] = {5, 6, 5};
  auto result = ParseIndirectSegments(Accepted(0, 100), IndirectPages(segs), Geometry(), out_);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().reason, InvalidReason::kBadFirstLastSect);
  EXPECT_EQ(result.error().id, kId);
  EXPECT_EQ(result.error().operation, BLKIF_OP_READ);
  EXPECT_EQ(result.error().status, BLKIF_RSP_ERROR);
  segs[99] = {5, 0, 8};
  EXPECT_EQ(
      ParseIndirectSegments(Accepted(0, 100), IndirectPages(segs), Geometry(), out_).error().reason,
      InvalidReason::kBadFirstLastSect);
}

TEST_P(BlkifIndirectSegmentsTest, DescriptorsBeyondCountIgnored) {
  std::vector<Seg> segs(10, Seg{5, 0, 7});
  segs.push_back({5, 9, 1});  // the 11th is garbage, the request has 10
  auto result = ParseIndirectSegments(Accepted(0, 10), IndirectPages(segs), Geometry(), out_);
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(result.value().nr_segments, 10u);
}

TEST_P(BlkifIndirectSegmentsTest, WholeRangeInsideDisk) {
  std::vector<Seg> segs(4, Seg{5, 0, 7});  // 32 sectors
  const auto pages = IndirectPages(segs);
  EXPECT_TRUE(ParseIndirectSegments(Accepted(kDiskSectors - 32, 4), pages, Geometry(), out_).ok());
  auto result = ParseIndirectSegments(Accepted(kDiskSectors - 31, 4), pages, Geometry(), out_);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().reason, InvalidReason::kBadSectorRange);
  // Near 2^64 on a disk that large: no wrap-around.
  DeviceGeometry huge = Geometry();
  huge.sectors = kMax64;
  EXPECT_TRUE(
      ParseIndirectSegments(Accepted(kMax64 - 32, 4, BLKIF_OP_READ, huge), pages, huge, out_).ok());
  auto wrap =
      ParseIndirectSegments(Accepted(kMax64 - 8, 4, BLKIF_OP_READ, huge), pages, huge, out_);
  ASSERT_FALSE(wrap.ok());
  EXPECT_EQ(wrap.error().reason, InvalidReason::kBadSectorRange);
}

TEST_P(BlkifIndirectSegmentsTest, MisalignedDescriptorWith4KBlocks) {
  DeviceGeometry g = Geometry();
  g.logical_block_size = 4096;
  std::vector<Seg> segs(3, Seg{5, 0, 7});
  EXPECT_TRUE(
      ParseIndirectSegments(Accepted(8, 3, BLKIF_OP_READ, g), IndirectPages(segs), g, out_).ok());
  segs[1] = {5, 0, 3};
  auto result =
      ParseIndirectSegments(Accepted(8, 3, BLKIF_OP_READ, g), IndirectPages(segs), g, out_);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.error().reason, InvalidReason::kMisaligned);
}

TEST_P(BlkifIndirectSegmentsTest, CallerErrorsAreRefusedNotOverrun) {
  std::vector<Seg> segs(100, Seg{5, 0, 7});
  auto pages = IndirectPages(segs);
  // Mapped bytes shorter than the descriptors.
  auto short_pages = std::span<const uint8_t>(pages).first(99 * 8);
  EXPECT_EQ(ParseIndirectSegments(Accepted(0, 100), short_pages, Geometry(), out_).error().reason,
            InvalidReason::kBadIndirect);
  // Output array too small.
  std::vector<BlkifSegment> small(99);
  EXPECT_EQ(ParseIndirectSegments(Accepted(0, 100), pages, Geometry(), small).error().reason,
            InvalidReason::kBadIndirect);
  // Not an indirect request.
  auto direct = Parse(RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 0, 7}}));
  ASSERT_TRUE(direct.ok());
  EXPECT_EQ(ParseIndirectSegments(direct.value(), pages, Geometry(), out_).error().reason,
            InvalidReason::kBadIndirect);
}

// --- copy once ----------------------------------------------------------------------------------

// Validation reads only the private copy: once the copy is taken, the shared page can change or
// even disappear (PROT_NONE: any read of it would fault) and the result is the same.
TEST_P(BlkifRequestTest, ValidationNeverTouchesTheSharedSlotAfterTheCopy) {
  testing::MappedPages shared(1);
  const auto slot = RwSlot(p(), BLKIF_OP_WRITE, kId, 64, {{11, 0, 7}, {12, 1, 2}});
  std::memcpy(shared.data(), slot.data(), slot.size());
  const std::span<const uint8_t> shared_slot(shared.data(), slot.size());

  const RequestSlotCopy copy = CopyRequestSlot(p(), shared_slot);
  // The guest rewrites the slot into an invalid request...
  std::memset(shared.data(), 0xFF, shared.size());
  // ...and then revokes the page.
  shared.Protect(PROT_NONE);
  auto parsed = ValidateRequest(copy, Geometry());
  shared.Protect(PROT_READ | PROT_WRITE);

  ExpectAccepted(parsed);
  EXPECT_EQ(parsed.value().operation, BLKIF_OP_WRITE);
  EXPECT_EQ(parsed.value().sector_number, 64u);
  EXPECT_EQ(parsed.value().nr_segments, 2);
  EXPECT_EQ(parsed.value().segments[1].gref, 12u);
  EXPECT_EQ(parsed.value().transfer_bytes, 10u * 512u);
}

TEST_P(BlkifRequestTest, CopyTakesExactlyTheRequestBytes) {
  testing::MappedPages shared(2);
  const size_t size = LayoutOf(p()).request_size;
  // The slot ends exactly at a page that is not readable: reading one byte more would fault.
  shared.Protect(PROT_READ | PROT_WRITE);
  ASSERT_EQ(mprotect(shared.data() + kXenPageSize, kXenPageSize, PROT_NONE), 0);
  const auto slot = RwSlot(p(), BLKIF_OP_READ, kId, 0, {{1, 0, 7}});
  uint8_t* at = shared.data() + kXenPageSize - size;
  std::memcpy(at, slot.data(), size);
  auto parsed = ParseRequest(p(), std::span<const uint8_t>(at, size), Geometry());
  ASSERT_EQ(mprotect(shared.data() + kXenPageSize, kXenPageSize, PROT_READ | PROT_WRITE), 0);
  ExpectAccepted(parsed);
}

// A guest flipping the slot between a valid and an invalid request while we parse: whatever mix
// of bytes the single copy catches, an accepted request satisfies every rule (a double fetch
// would let a check see one value and the result carry another).
TEST_P(BlkifRequestTest, RacingGuestCannotSmuggleAnInvalidRequest) {
  testing::MappedPages shared(1);
  const auto good = RwSlot(p(), BLKIF_OP_READ, kId, kDiskSectors - 11 * 8,
                           {{1, 0, 7},
                            {1, 0, 7},
                            {1, 0, 7},
                            {1, 0, 7},
                            {1, 0, 7},
                            {1, 0, 7},
                            {1, 0, 7},
                            {1, 0, 7},
                            {1, 0, 7},
                            {1, 0, 7},
                            {1, 0, 7}});
  auto bad = good;
  const auto& o = testing::OffsetsFor(p());
  bad[o.nr_segments] = 200;
  testing::Put<uint64_t>(bad, o.sector_number, kMax64 - 3);
  for (size_t i = 0; i < 11; ++i) bad[o.seg + i * 8 + 5] = 0xF0;  // last_sect
  std::memcpy(shared.data(), good.data(), good.size());

  std::atomic<bool> stop{false};
  std::thread guest([&] {
    uint8_t* slot = shared.data();
    for (uint64_t n = 0; !stop.load(std::memory_order_relaxed); ++n) {
      const auto& src = (n & 1) ? bad : good;
      for (size_t i = 0; i < src.size(); ++i) {
        std::atomic_ref<uint8_t>(slot[i]).store(src[i], std::memory_order_relaxed);
      }
    }
  });
  const DeviceGeometry geometry = Geometry();
  int accepted = 0;
  // In a lambda so that a failed ASSERT still stops and joins the guest thread.
  [&] {
    for (int i = 0; i < 20000; ++i) {
      auto parsed =
          ParseRequest(p(), std::span<const uint8_t>(shared.data(), good.size()), geometry);
      if (!parsed.ok()) continue;
      ++accepted;
      const BlkifRequest& r = parsed.value();
      ASSERT_GE(r.nr_segments, 1);
      ASSERT_LE(r.nr_segments, BLKIF_MAX_SEGMENTS_PER_REQUEST);
      uint64_t sectors = 0;
      for (int s = 0; s < r.nr_segments; ++s) {
        ASSERT_LE(r.segments[s].first_sect, r.segments[s].last_sect);
        ASSERT_LE(r.segments[s].last_sect, 7);
        sectors += r.segments[s].sectors();
      }
      ASSERT_EQ(r.transfer_bytes, sectors * 512);
      ASSERT_LE(r.sector_number, geometry.sectors);
      ASSERT_LE(sectors, geometry.sectors - r.sector_number);
    }
  }();
  stop = true;
  guest.join();
  RecordProperty("accepted", accepted);
}

// The same for indirect descriptors: the guest flips them between valid and invalid while we
// parse; accepted segments (what the I/O would use) must all be valid.
TEST_P(BlkifIndirectSegmentsTest, RacingGuestCannotSmuggleInvalidDescriptors) {
  testing::MappedPages shared(1);
  constexpr int kCount = 64;
  const auto good = IndirectPages(std::vector<Seg>(kCount, Seg{5, 0, 7}));
  auto bad = good;
  for (int i = 0; i < kCount; ++i) {
    bad[i * 8 + 4] = 6;     // first_sect > last_sect
    bad[i * 8 + 5] = 0xF0;  // last_sect beyond the page
  }
  std::memcpy(shared.data(), good.data(), kXenPageSize);
  const BlkifRequest request = Accepted(0, kCount);

  std::atomic<bool> stop{false};
  std::thread guest([&] {
    uint8_t* page = shared.data();
    for (uint64_t n = 0; !stop.load(std::memory_order_relaxed); ++n) {
      const auto& src = (n & 1) ? bad : good;
      for (int i = 0; i < kCount * 8; ++i) {
        std::atomic_ref<uint8_t>(page[i]).store(src[i], std::memory_order_relaxed);
      }
    }
  });
  [&] {
    for (int i = 0; i < 20000; ++i) {
      auto result = ParseIndirectSegments(
          request, std::span<const uint8_t>(shared.data(), kXenPageSize), Geometry(), out_);
      if (!result.ok()) continue;
      uint64_t sectors = 0;
      for (int s = 0; s < kCount; ++s) {
        ASSERT_LE(out_[s].first_sect, out_[s].last_sect);
        ASSERT_LE(out_[s].last_sect, 7);
        sectors += out_[s].sectors();
      }
      ASSERT_EQ(result.value().transfer_bytes, sectors * 512);
    }
  }();
  stop = true;
  guest.join();
}

INSTANTIATE_TEST_SUITE_P(AllAbis, BlkifRequestTest, ::testing::ValuesIn(testing::kAllProtocols),
                         Name);
INSTANTIATE_TEST_SUITE_P(AllAbis, BlkifIndirectSegmentsTest,
                         ::testing::ValuesIn(testing::kAllProtocols), Name);

// --- reasons ------------------------------------------------------------------------------------

TEST(InvalidReasonTest, NamesAreDistinctMetricLabels) {
  std::set<std::string> names;
  for (size_t i = 0; i < kInvalidReasonCount; ++i) {
    const std::string name(InvalidReasonName(static_cast<InvalidReason>(i)));
    EXPECT_FALSE(name.empty());
    EXPECT_NE(name, "unknown");
    EXPECT_EQ(name.find_first_not_of("abcdefghijklmnopqrstuvwxyz_"), std::string::npos) << name;
    names.insert(name);
  }
  EXPECT_EQ(names.size(), kInvalidReasonCount);
  EXPECT_EQ(InvalidReasonName(InvalidReason::kUnknownOperation), "unknown_op");
  EXPECT_EQ(InvalidReasonName(InvalidReason::kReadOnlyWrite), "readonly_write");
}

}  // namespace
}  // namespace blockplane::worker::xen
