// The three blkif ABIs: the static layouts agree with offsets written out by hand, and a request
// built byte by byte in each ABI parses to the same fields.

#include "worker/xen/blkif_abi.h"

#include <cstddef>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "tests/unit/worker/xen/blkif_test_util.h"
#include "worker/xen/blkif_request.h"
#include "worker/xen/blkif_ring.h"

namespace blockplane::worker::xen {
namespace {

using testing::AbiOffsets;
using testing::IndirectSlot;
using testing::kAllProtocols;
using testing::OffsetsFor;
using testing::RwSlot;

template <typename Rw, typename Discard, typename Indirect, typename Response>
void ExpectLayout(const AbiOffsets& o) {
  EXPECT_EQ(sizeof(Rw), o.request_size);
  EXPECT_EQ(offsetof(Rw, operation), o.operation);
  EXPECT_EQ(offsetof(Rw, nr_segments), o.nr_segments);
  EXPECT_EQ(offsetof(Rw, handle), o.handle);
  EXPECT_EQ(offsetof(Rw, id), o.id);
  EXPECT_EQ(offsetof(Rw, sector_number), o.sector_number);
  EXPECT_EQ(offsetof(Rw, seg), o.seg);
  EXPECT_EQ(offsetof(Discard, operation), o.operation);
  EXPECT_EQ(offsetof(Discard, flag), o.discard_flag);
  EXPECT_EQ(offsetof(Discard, handle), o.discard_handle);
  EXPECT_EQ(offsetof(Discard, id), o.id);
  EXPECT_EQ(offsetof(Discard, sector_number), o.discard_sector);
  EXPECT_EQ(offsetof(Discard, nr_sectors), o.discard_nr_sectors);
  EXPECT_EQ(offsetof(Indirect, operation), o.operation);
  EXPECT_EQ(offsetof(Indirect, indirect_op), o.indirect_op);
  EXPECT_EQ(offsetof(Indirect, nr_segments), o.indirect_nr_segments);
  EXPECT_EQ(offsetof(Indirect, id), o.id);
  EXPECT_EQ(offsetof(Indirect, sector_number), o.indirect_sector);
  EXPECT_EQ(offsetof(Indirect, handle), o.indirect_handle);
  EXPECT_EQ(offsetof(Indirect, indirect_grefs), o.indirect_grefs);
  EXPECT_EQ(sizeof(Indirect), 64u);  // one cache line in every ABI
  EXPECT_EQ(sizeof(Response), o.response_size);
  EXPECT_EQ(offsetof(Response, id), o.rsp_id);
  EXPECT_EQ(offsetof(Response, operation), o.rsp_operation);
  EXPECT_EQ(offsetof(Response, status), o.rsp_status);
}

TEST(BlkifAbiTest, X86_32LayoutMatchesHandWrittenOffsets) {
  ExpectLayout<blkif_x86_32_request, blkif_x86_32_request_discard, blkif_x86_32_request_indirect,
               blkif_x86_32_response>(testing::kX86_32Offsets);
  EXPECT_EQ(LayoutOf(Protocol::kX86_32).entry_size, testing::kX86_32Offsets.entry_size);
}

TEST(BlkifAbiTest, X86_64LayoutMatchesHandWrittenOffsets) {
  ExpectLayout<blkif_x86_64_request, blkif_x86_64_request_discard, blkif_x86_64_request_indirect,
               blkif_x86_64_response>(testing::kX86_64Offsets);
  EXPECT_EQ(LayoutOf(Protocol::kX86_64).entry_size, testing::kX86_64Offsets.entry_size);
}

#if defined(__x86_64__)
TEST(BlkifAbiTest, NativeIsX86_64OnThisHost) {
  ExpectLayout<struct blkif_request, struct blkif_request_discard, struct blkif_request_indirect,
               struct blkif_response>(testing::kX86_64Offsets);
  EXPECT_EQ(LayoutOf(Protocol::kNative).entry_size, testing::kX86_64Offsets.entry_size);
}
#endif

TEST(BlkifAbiTest, SegmentAndIndirectPageLayout) {
  EXPECT_EQ(sizeof(struct blkif_request_segment), 8u);
  EXPECT_EQ(kSegmentsPerIndirectPage, 512u);
  EXPECT_EQ(kMaxIndirectSegmentsProtocol, 4096u);
  EXPECT_EQ(kSringHeaderSize, 64u);
}

TEST(BlkifAbiTest, ProtocolNames) {
  EXPECT_EQ(ParseProtocolName("x86_32-abi"), Protocol::kX86_32);
  EXPECT_EQ(ParseProtocolName("x86_64-abi"), Protocol::kX86_64);
  EXPECT_EQ(ParseProtocolName(""), Protocol::kNative);
  EXPECT_NE(ParseProtocolName(XEN_IO_PROTO_ABI_NATIVE), std::nullopt);
  EXPECT_EQ(ParseProtocolName("arm-abi"), std::nullopt);
  EXPECT_EQ(ParseProtocolName("x86_64-abi "), std::nullopt);
  for (Protocol p : kAllProtocols) {
    if (p == Protocol::kNative) continue;
    EXPECT_EQ(ParseProtocolName(ProtocolName(p)), p);
  }
  EXPECT_EQ(ProtocolName(Protocol::kNative), "native");
}

TEST(BlkifAbiTest, RingEntriesFollowRingSizeMacro) {
  for (Protocol p : kAllProtocols) {
    SCOPED_TRACE(ProtocolName(p));
    EXPECT_EQ(RingEntries(p, 1 * kXenPageSize), 32u);
    EXPECT_EQ(RingEntries(p, 2 * kXenPageSize), 64u);
    EXPECT_EQ(RingEntries(p, 4 * kXenPageSize), 128u);
    EXPECT_EQ(RingEntries(p, 16 * kXenPageSize), 512u);
    EXPECT_EQ(RingEntries(p, 64), 0u);
    EXPECT_EQ(RingEntries(p, 0), 0u);
  }
  // 64 + 108 fits one x86_32 entry but not one 112-byte entry.
  EXPECT_EQ(RingEntries(Protocol::kX86_32, 64 + 108), 1u);
  EXPECT_EQ(RingEntries(Protocol::kX86_64, 64 + 108), 0u);
  // The native count must equal the C macro's on the real struct.
  EXPECT_EQ(RingEntries(Protocol::kNative, kXenPageSize),
            static_cast<uint32_t>(__CONST_RING_SIZE(blkif, 4096)));
}

class BlkifAbiParseTest : public ::testing::TestWithParam<Protocol> {};

TEST_P(BlkifAbiParseTest, ReadWriteFieldsAtTheirOffsets) {
  DeviceGeometry geometry{.sectors = 1ull << 40};
  const auto slot = RwSlot(GetParam(), BLKIF_OP_WRITE, 0x1122334455667788ull, 0x0102030405ull,
                           {{0xA1B2C3D4, 0, 7}, {0x11, 2, 3}}, 0xBEEF);
  auto parsed = ParseRequest(GetParam(), slot, geometry);
  ASSERT_TRUE(parsed.ok()) << InvalidReasonName(parsed.error().reason);
  const BlkifRequest& r = parsed.value();
  EXPECT_EQ(r.operation, BLKIF_OP_WRITE);
  EXPECT_EQ(r.id, 0x1122334455667788ull);
  EXPECT_EQ(r.handle, 0xBEEF);
  EXPECT_EQ(r.sector_number, 0x0102030405ull);
  ASSERT_EQ(r.nr_segments, 2);
  EXPECT_EQ(r.segments[0].gref, 0xA1B2C3D4u);
  EXPECT_EQ(r.segments[0].first_sect, 0);
  EXPECT_EQ(r.segments[0].last_sect, 7);
  EXPECT_EQ(r.segments[1].gref, 0x11u);
  EXPECT_EQ(r.segments[1].first_sect, 2);
  EXPECT_EQ(r.segments[1].last_sect, 3);
  EXPECT_EQ(r.transfer_bytes, (8u + 2u) * 512u);
}

TEST_P(BlkifAbiParseTest, DiscardFieldsAtTheirOffsets) {
  DeviceGeometry geometry{.sectors = 1ull << 40, .discard_enabled = true};
  const auto slot = testing::DiscardSlot(GetParam(), 0xCAFEull << 32, 0x778899, 0x123456,
                                         BLKIF_DISCARD_SECURE, 0x0102);
  auto parsed = ParseRequest(GetParam(), slot, geometry);
  ASSERT_TRUE(parsed.ok()) << InvalidReasonName(parsed.error().reason);
  const BlkifRequest& r = parsed.value();
  EXPECT_EQ(r.operation, BLKIF_OP_DISCARD);
  EXPECT_EQ(r.id, 0xCAFEull << 32);
  EXPECT_EQ(r.handle, 0x0102);
  EXPECT_EQ(r.discard.sector, 0x778899u);
  EXPECT_EQ(r.sector_number, 0x778899u);
  EXPECT_EQ(r.discard.nr_sectors, 0x123456u);
  EXPECT_TRUE(r.discard.secure);
  EXPECT_EQ(r.transfer_bytes, 0u);
}

TEST_P(BlkifAbiParseTest, IndirectFieldsAtTheirOffsets) {
  DeviceGeometry geometry{.sectors = 1ull << 40, .max_indirect_segments = 4096};
  const auto slot = IndirectSlot(GetParam(), BLKIF_OP_READ, 0x0A0B0C0D0E0F1011ull, 0x4242, 1025,
                                 {101, 102, 103, 104, 105, 106, 107, 108}, 0x7788);
  auto parsed = ParseRequest(GetParam(), slot, geometry);
  ASSERT_TRUE(parsed.ok()) << InvalidReasonName(parsed.error().reason);
  const BlkifRequest& r = parsed.value();
  EXPECT_TRUE(r.is_indirect());
  EXPECT_EQ(r.data_operation(), BLKIF_OP_READ);
  EXPECT_EQ(r.id, 0x0A0B0C0D0E0F1011ull);
  EXPECT_EQ(r.handle, 0x7788);
  EXPECT_EQ(r.sector_number, 0x4242u);
  EXPECT_EQ(r.nr_segments, 1025);
  ASSERT_EQ(r.indirect.nr_pages, 3);  // ceil(1025 / 512)
  EXPECT_EQ(r.indirect.grefs[0], 101u);
  EXPECT_EQ(r.indirect.grefs[1], 102u);
  EXPECT_EQ(r.indirect.grefs[2], 103u);
  EXPECT_EQ(r.indirect.grefs[3], 0u);  // beyond nr_pages: not copied
}

INSTANTIATE_TEST_SUITE_P(AllAbis, BlkifAbiParseTest, ::testing::ValuesIn(testing::kAllProtocols),
                         [](const auto& info) {
                           switch (info.param) {
                             case Protocol::kX86_32:
                               return std::string("x86_32");
                             case Protocol::kX86_64:
                               return std::string("x86_64");
                             default:
                               return std::string("native");
                           }
                         });

// The ABIs really differ: the same bytes mean different things.
TEST(BlkifAbiTest, X86_32SlotReadAsX86_64IsADifferentRequest) {
  DeviceGeometry geometry{.sectors = 1ull << 40};
  const auto slot32 = RwSlot(Protocol::kX86_32, BLKIF_OP_READ, 77, 1000, {{5, 0, 7}});
  std::vector<uint8_t> padded = slot32;
  padded.resize(112, 0);
  auto as32 = ParseRequest(Protocol::kX86_32, slot32, geometry);
  auto as64 = ParseRequest(Protocol::kX86_64, padded, geometry);
  ASSERT_TRUE(as32.ok());
  EXPECT_EQ(as32.value().id, 77u);
  if (as64.ok()) {
    EXPECT_NE(as64.value().id, 77u);
  } else {
    EXPECT_NE(as64.error().id, 77u);
  }
}

}  // namespace
}  // namespace blockplane::worker::xen
