#pragma once

// The backend (consumer) side of a blkif shared ring (struct blkif_sring: req_prod, req_event,
// rsp_prod, rsp_event, padding to 64 bytes, then the entries), for any of the three ABIs. Pure
// code over a mapped span: no Xen calls, no event-channel kicks (the caller notifies when
// PushResponsesAndCheckNotify() says so).
//
// Semantics are those of xen/io/ring.h (BACK_RING_ATTACH, RING_REQUEST_PROD_OVERFLOW,
// RING_PUSH_RESPONSES_AND_CHECK_NOTIFY, RING_FINAL_CHECK_FOR_REQUESTS), written in C++ with
// std::atomic_ref on the shared indices. All index arithmetic is modulo 2^32 (RING_IDX).
//
// Hostile frontend: the only shared words read are req_prod (once per PollRequests(), with
// acquire ordering, and in FinalCheckForRequests()) and rsp_event (in the push). The request
// bytes are handed out as spans; the parser copies them once. A req_prod that is more than a
// ring ahead of the responses produced (or that moved backwards) marks the ring broken: every
// later PollRequests() returns the same error and no more slots are handed out. rsp_prod is never
// read back from shared memory (the last published value is kept privately).
//
// Threading: one owner (the queue's loop thread); not thread-safe. The frontend runs
// concurrently in another domain/process, which is what the atomics and fences are for.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "worker/xen/blkif_abi.h"

namespace blockplane::worker::xen {

using RingIdx = uint32_t;  // RING_IDX

// __RING_SIZE: entries of `protocol` that fit in `ring_bytes` after the 64-byte header, rounded
// down to a power of two (0 if none fit). One page: 32 entries for every ABI.
uint32_t RingEntries(Protocol protocol, size_t ring_bytes);

// The backend's mark in a shared ring's header: 8 bytes of the sring's __pad, which the
// frontend's SHARED_RING_INIT zeroes and the ring protocol never writes otherwise. The backend
// writes a random one at connect and records it in its request journal, so that a later worker
// can tell the rings it was written for from rings the frontend started over on the same grant
// refs (blkif_journal.h). Relaxed single 8-byte accesses: the page is guest-writable, and a
// guest that changes the mark only makes its own rings look new.
inline constexpr size_t kRingMarkOffset = 24;
uint64_t ReadRingMark(std::span<const uint8_t> shared);
void WriteRingMark(std::span<uint8_t> shared, uint64_t mark);

class BlkifBackRing {
 public:
  // Slots whose cache lines PollRequests() prefetches (a ring pass takes at most this many).
  static constexpr uint32_t kPrefetchSlots = 64;

  // Attaches to the mapped shared ring `shared` (nr_pages * 4096 bytes; the span must stay valid
  // and mapped for the life of this object). Does not write the shared page (the frontend
  // initialised it). `start` is where req_cons and rsp_prod_pvt begin (BACK_RING_ATTACH): 0 for
  // a fresh connection. `taken` requests after `start` were already taken by an earlier backend
  // process and are being answered from its journal (blkif_journal.h): req_cons begins at
  // start + taken. InvalidArgument if the span is not 4-byte aligned or holds no entry, or if
  // `taken` exceeds the ring.
  static absl::StatusOr<BlkifBackRing> Attach(Protocol protocol, std::span<uint8_t> shared,
                                              RingIdx start = 0, uint32_t taken = 0);

  Protocol protocol() const { return protocol_; }
  uint32_t size() const { return size_; }  // RING_SIZE
  RingIdx req_cons() const { return req_cons_; }
  RingIdx rsp_prod_pvt() const { return rsp_prod_pvt_; }
  // Requests taken but not yet answered.
  uint32_t outstanding() const { return req_cons_ - rsp_prod_pvt_; }
  bool broken() const { return broken_; }

  // Reads req_prod once (acquire: the slots it covers are visible after it) and returns how many
  // requests NextRequestSlot() will hand out now. DataLoss if the frontend published more
  // requests than the ring can hold given the ones still outstanding (RING_REQUEST_PROD_OVERFLOW)
  // or moved req_prod backwards: the frontend is broken; the caller stops this queue.
  absl::StatusOr<uint32_t> PollRequests();

  // The next request slot (ABI request size bytes, in shared memory) of the last poll, advancing
  // req_cons; nullopt when those are all taken or the ring is broken. The span is valid until the
  // response for it is written; parse it with ParseRequest (which copies it once).
  std::optional<std::span<const uint8_t>> NextRequestSlot();

  // Writes a response in this ring's ABI into slot rsp_prod_pvt (padding zeroed: nothing of ours
  // leaks) and advances rsp_prod_pvt. Invisible to the frontend until the next push.
  // FailedPrecondition if there is no outstanding request to answer (a backend bug: it would
  // overwrite a request the frontend may still be writing).
  absl::Status WriteResponse(uint64_t id, uint8_t operation, int16_t status);

  // RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publishes rsp_prod (release), full fence, then reads
  // rsp_event; true if the frontend asked to be notified of a response in the pushed batch.
  bool PushResponsesAndCheckNotify();

  // RING_FINAL_CHECK_FOR_REQUESTS: true if requests are waiting; otherwise sets
  // req_event = req_cons + 1 (ask for a kick on the next request), full fence, and checks again,
  // closing the race with a frontend that published just before req_event was written.
  // Call it when a poll found no work, before waiting for the event channel.
  bool FinalCheckForRequests();

 private:
  BlkifBackRing(Protocol protocol, std::span<uint8_t> shared, uint32_t size, RingIdx start,
                uint32_t taken);

  uint32_t* SharedWord(size_t offset) const;
  // RING_HAS_UNCONSUMED_REQUESTS, reading req_prod once.
  uint32_t UnconsumedRequests() const;

  Protocol protocol_;
  ProtocolLayout layout_;
  std::span<uint8_t> shared_;
  uint32_t size_;
  RingIdx req_cons_;
  RingIdx rsp_prod_pvt_;
  RingIdx req_prod_snapshot_;
  RingIdx rsp_prod_published_;
  bool broken_ = false;
  absl::Status broken_status_;
};

}  // namespace blockplane::worker::xen
