#pragma once

// Wire layouts of the Xen blkif protocol for the three ABIs a frontend may ask for with the
// xenstore key "protocol":
//
//   native       the backend's own ABI: the structs of <xen/io/blkif.h> as compiled here
//                (on x86_64 this is byte-for-byte the x86_64 ABI).
//   x86_32-abi   a 32-bit x86 guest: 8-byte integers are 4-byte aligned (i386 SysV), so every
//                field after `handle` sits 4 bytes earlier than in the 64-bit layout.
//   x86_64-abi   a 64-bit x86 guest on a backend of another ABI.
//
// The 32/64-bit layouts are not in the public headers (Linux xen-blkback keeps them in
// drivers/block/xen-blkback/common.h, QEMU in hw/block/xen_blkif.h). They are defined here with
// the packing rules of those ABIs, and every size and field offset is pinned by a static_assert so
// that a compiler or header change cannot move a byte silently.
//
// Nothing here is read in place from shared memory: the parser (blkif_request.h) memcpy()s a slot
// into one of these structs and reads only the copy.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
// clang-format off: xen.h needs <cstdint> first; blkif.h needs xen.h.
#include <xen/grant_table.h>
#include <xen/io/blkif.h>
#include <xen/io/protocols.h>
#include <xen/io/ring.h>
#include <xen/xen.h>
// clang-format on

namespace blockplane::worker::xen {

// Sizes fixed by the protocol, whatever the guest's page size.
inline constexpr size_t kXenPageSize = 4096;
inline constexpr uint32_t kSectorSize = 512;  // every blkif sector field is in 512-byte units
inline constexpr uint32_t kSectorsPerPage = kXenPageSize / kSectorSize;  // 8: last_sect <= 7

// Segment descriptors in an indirect page (Linux SEGS_PER_INDIRECT_FRAME with 4 KiB pages).
inline constexpr uint32_t kSegmentsPerIndirectPage =
    kXenPageSize / sizeof(struct blkif_request_segment);
// Upper bound of the protocol on indirect segments (8 indirect pages x 512).
inline constexpr uint32_t kMaxIndirectSegmentsProtocol =
    kSegmentsPerIndirectPage * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST;

// Size of the shared ring header (req_prod, req_event, rsp_prod, rsp_event, pvt, __pad).
inline constexpr size_t kSringHeaderSize = offsetof(struct blkif_sring, ring);

static_assert(sizeof(struct blkif_request_segment) == 8);
static_assert(offsetof(struct blkif_request_segment, gref) == 0);
static_assert(offsetof(struct blkif_request_segment, first_sect) == 4);
static_assert(offsetof(struct blkif_request_segment, last_sect) == 5);
static_assert(kSegmentsPerIndirectPage == 512);
static_assert(kSringHeaderSize == 64);
static_assert(offsetof(struct blkif_sring, req_prod) == 0);
static_assert(offsetof(struct blkif_sring, req_event) == 4);
static_assert(offsetof(struct blkif_sring, rsp_prod) == 8);
static_assert(offsetof(struct blkif_sring, rsp_event) == 12);

// ---------------------------------------------------------------------------------------------
// x86_32-abi: i386 aligns uint64_t to 4 bytes; pack(4) reproduces that on any host.
#pragma pack(push, 4)
struct blkif_x86_32_request {  // READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE (and "other")
  uint8_t operation;
  uint8_t nr_segments;
  uint16_t handle;
  uint64_t id;
  uint64_t sector_number;
  struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};
struct blkif_x86_32_request_discard {
  uint8_t operation;
  uint8_t flag;  // BLKIF_DISCARD_SECURE or zero
  uint16_t handle;
  uint64_t id;
  uint64_t sector_number;
  uint64_t nr_sectors;
};
struct blkif_x86_32_request_indirect {
  uint8_t operation;  // BLKIF_OP_INDIRECT
  uint8_t indirect_op;
  uint16_t nr_segments;
  uint64_t id;
  uint64_t sector_number;
  uint16_t handle;
  uint16_t pad1;
  grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
  uint64_t pad2;  // the public header's "make it 64 byte aligned on i386"
};
struct blkif_x86_32_response {
  uint64_t id;
  uint8_t operation;
  int16_t status;
};
#pragma pack(pop)

static_assert(sizeof(blkif_x86_32_request) == 108);
static_assert(offsetof(blkif_x86_32_request, operation) == 0);
static_assert(offsetof(blkif_x86_32_request, nr_segments) == 1);
static_assert(offsetof(blkif_x86_32_request, handle) == 2);
static_assert(offsetof(blkif_x86_32_request, id) == 4);
static_assert(offsetof(blkif_x86_32_request, sector_number) == 12);
static_assert(offsetof(blkif_x86_32_request, seg) == 20);

static_assert(sizeof(blkif_x86_32_request_discard) == 28);
static_assert(offsetof(blkif_x86_32_request_discard, flag) == 1);
static_assert(offsetof(blkif_x86_32_request_discard, handle) == 2);
static_assert(offsetof(blkif_x86_32_request_discard, id) == 4);
static_assert(offsetof(blkif_x86_32_request_discard, sector_number) == 12);
static_assert(offsetof(blkif_x86_32_request_discard, nr_sectors) == 20);

static_assert(sizeof(blkif_x86_32_request_indirect) == 64);
static_assert(offsetof(blkif_x86_32_request_indirect, indirect_op) == 1);
static_assert(offsetof(blkif_x86_32_request_indirect, nr_segments) == 2);
static_assert(offsetof(blkif_x86_32_request_indirect, id) == 4);
static_assert(offsetof(blkif_x86_32_request_indirect, sector_number) == 12);
static_assert(offsetof(blkif_x86_32_request_indirect, handle) == 20);
static_assert(offsetof(blkif_x86_32_request_indirect, indirect_grefs) == 24);

static_assert(sizeof(blkif_x86_32_response) == 12);
static_assert(offsetof(blkif_x86_32_response, id) == 0);
static_assert(offsetof(blkif_x86_32_response, operation) == 8);
static_assert(offsetof(blkif_x86_32_response, status) == 10);

// ---------------------------------------------------------------------------------------------
// x86_64-abi: natural alignment; alignas(8) keeps the 64-bit layout on a 32-bit host too.
struct blkif_x86_64_request {
  uint8_t operation;
  uint8_t nr_segments;
  uint16_t handle;
  alignas(8) uint64_t id;
  uint64_t sector_number;
  struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};
struct blkif_x86_64_request_discard {
  uint8_t operation;
  uint8_t flag;
  uint16_t handle;
  alignas(8) uint64_t id;
  uint64_t sector_number;
  uint64_t nr_sectors;
};
struct blkif_x86_64_request_indirect {
  uint8_t operation;
  uint8_t indirect_op;
  uint16_t nr_segments;
  alignas(8) uint64_t id;
  uint64_t sector_number;
  uint16_t handle;
  uint16_t pad1;
  grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
};
struct blkif_x86_64_response {
  alignas(8) uint64_t id;
  uint8_t operation;
  int16_t status;
};

static_assert(sizeof(blkif_x86_64_request) == 112);
static_assert(offsetof(blkif_x86_64_request, operation) == 0);
static_assert(offsetof(blkif_x86_64_request, nr_segments) == 1);
static_assert(offsetof(blkif_x86_64_request, handle) == 2);
static_assert(offsetof(blkif_x86_64_request, id) == 8);
static_assert(offsetof(blkif_x86_64_request, sector_number) == 16);
static_assert(offsetof(blkif_x86_64_request, seg) == 24);

static_assert(sizeof(blkif_x86_64_request_discard) == 32);
static_assert(offsetof(blkif_x86_64_request_discard, flag) == 1);
static_assert(offsetof(blkif_x86_64_request_discard, handle) == 2);
static_assert(offsetof(blkif_x86_64_request_discard, id) == 8);
static_assert(offsetof(blkif_x86_64_request_discard, sector_number) == 16);
static_assert(offsetof(blkif_x86_64_request_discard, nr_sectors) == 24);

static_assert(sizeof(blkif_x86_64_request_indirect) == 64);
static_assert(offsetof(blkif_x86_64_request_indirect, indirect_op) == 1);
static_assert(offsetof(blkif_x86_64_request_indirect, nr_segments) == 2);
static_assert(offsetof(blkif_x86_64_request_indirect, id) == 8);
static_assert(offsetof(blkif_x86_64_request_indirect, sector_number) == 16);
static_assert(offsetof(blkif_x86_64_request_indirect, handle) == 24);
static_assert(offsetof(blkif_x86_64_request_indirect, indirect_grefs) == 28);

static_assert(sizeof(blkif_x86_64_response) == 16);
static_assert(offsetof(blkif_x86_64_response, id) == 0);
static_assert(offsetof(blkif_x86_64_response, operation) == 8);
static_assert(offsetof(blkif_x86_64_response, status) == 10);

// ---------------------------------------------------------------------------------------------
// native: the public header's structs, compiled for this host.
static_assert(offsetof(struct blkif_request, operation) == 0);
static_assert(offsetof(struct blkif_request, nr_segments) == 1);
static_assert(offsetof(struct blkif_request, handle) == 2);
static_assert(offsetof(struct blkif_request_discard, flag) == 1);
static_assert(offsetof(struct blkif_request_indirect, indirect_op) == 1);
static_assert(offsetof(struct blkif_request_indirect, nr_segments) == 2);
static_assert(sizeof(struct blkif_request_discard) <= sizeof(struct blkif_request));
static_assert(sizeof(struct blkif_request_indirect) <= sizeof(struct blkif_request));
#if defined(__x86_64__)
// On x86_64 hosts native is the x86_64 ABI; the offsets must agree field by field.
static_assert(sizeof(struct blkif_request) == sizeof(blkif_x86_64_request));
static_assert(offsetof(struct blkif_request, id) == offsetof(blkif_x86_64_request, id));
static_assert(offsetof(struct blkif_request, sector_number) ==
              offsetof(blkif_x86_64_request, sector_number));
static_assert(offsetof(struct blkif_request, seg) == offsetof(blkif_x86_64_request, seg));
static_assert(sizeof(struct blkif_request_discard) == sizeof(blkif_x86_64_request_discard));
static_assert(offsetof(struct blkif_request_discard, nr_sectors) ==
              offsetof(blkif_x86_64_request_discard, nr_sectors));
static_assert(sizeof(struct blkif_request_indirect) == sizeof(blkif_x86_64_request_indirect));
static_assert(offsetof(struct blkif_request_indirect, handle) ==
              offsetof(blkif_x86_64_request_indirect, handle));
static_assert(offsetof(struct blkif_request_indirect, indirect_grefs) ==
              offsetof(blkif_x86_64_request_indirect, indirect_grefs));
static_assert(sizeof(struct blkif_response) == sizeof(blkif_x86_64_response));
static_assert(offsetof(struct blkif_response, status) == offsetof(blkif_x86_64_response, status));
#endif

// ---------------------------------------------------------------------------------------------
// Protocol selection.

enum class Protocol : uint8_t { kNative, kX86_32, kX86_64 };

// Maps the frontend's "protocol" key to a Protocol. The named ABIs map to their explicit layouts
// (on an x86_64 host "x86_64-abi" is byte-for-byte native, so either would do). An empty string
// (key absent) means native, as QEMU does; Linux blkback assumes x86_32 on x86 for such very old
// frontends, modern ones always write the key. Returns nullopt for an ABI this backend cannot
// serve (e.g. "arm-abi" on x86): the caller fails the connection.
constexpr std::optional<Protocol> ParseProtocolName(std::string_view name) {
  if (name == XEN_IO_PROTO_ABI_X86_32) return Protocol::kX86_32;
  if (name == XEN_IO_PROTO_ABI_X86_64) return Protocol::kX86_64;
  if (name.empty() || name == XEN_IO_PROTO_ABI_NATIVE) return Protocol::kNative;
  return std::nullopt;
}

// Name for logs and metrics labels ("native", "x86_32-abi", "x86_64-abi").
constexpr std::string_view ProtocolName(Protocol protocol) {
  switch (protocol) {
    case Protocol::kX86_32:
      return XEN_IO_PROTO_ABI_X86_32;
    case Protocol::kX86_64:
      return XEN_IO_PROTO_ABI_X86_64;
    case Protocol::kNative:
    default:
      return "native";
  }
}

// Per-ABI sizes. A ring entry is the union of request and response.
struct ProtocolLayout {
  size_t request_size;   // bytes the parser copies out of a slot
  size_t response_size;  // bytes written into a slot for a response
  size_t entry_size;     // stride of the ring array
};

constexpr ProtocolLayout LayoutOf(Protocol protocol) {
  switch (protocol) {
    case Protocol::kX86_32:
      return {sizeof(blkif_x86_32_request), sizeof(blkif_x86_32_response),
              sizeof(blkif_x86_32_request) > sizeof(blkif_x86_32_response)
                  ? sizeof(blkif_x86_32_request)
                  : sizeof(blkif_x86_32_response)};
    case Protocol::kX86_64:
      return {sizeof(blkif_x86_64_request), sizeof(blkif_x86_64_response),
              sizeof(blkif_x86_64_request) > sizeof(blkif_x86_64_response)
                  ? sizeof(blkif_x86_64_request)
                  : sizeof(blkif_x86_64_response)};
    case Protocol::kNative:
    default:
      return {sizeof(struct blkif_request), sizeof(struct blkif_response),
              sizeof(union blkif_sring_entry)};
  }
}

static_assert(LayoutOf(Protocol::kX86_32).entry_size == 108);
static_assert(LayoutOf(Protocol::kX86_64).entry_size == 112);
static_assert(LayoutOf(Protocol::kNative).entry_size == sizeof(union blkif_sring_entry));

}  // namespace blockplane::worker::xen
