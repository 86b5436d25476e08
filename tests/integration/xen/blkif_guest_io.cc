#include "tests/integration/xen/blkif_guest_io.h"

#include <poll.h>

#include <cstring>
#include <functional>
#include <string>

#include "worker/xen/blkif_ring.h"

namespace blockplane::xen_e2e {
namespace {

using worker::xen::Protocol;

constexpr size_t kPage = 4096;

std::atomic_ref<uint32_t> SharedWord(std::byte* ring, size_t offset) {
  return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(ring + offset));
}
constexpr size_t kReqProd = 0, kReqEvent = 4, kRspProd = 8, kRspEvent = 12;

template <typename Rw, typename Discard, typename Indirect>
void Encode(std::byte* slot, size_t entry_size, const GuestRequest& request, uint64_t id,
            std::span<const uint32_t> refs, uint32_t indirect_ref) {
  std::memset(slot, 0, entry_size);
  if (request.operation == BLKIF_OP_DISCARD) {
    Discard d{};
    d.operation = BLKIF_OP_DISCARD;
    d.flag = request.secure ? BLKIF_DISCARD_SECURE : 0;
    d.id = id;
    d.sector_number = request.sector;
    d.nr_sectors = request.discard_sectors;
    std::memcpy(slot, &d, sizeof(d));
  } else if (request.indirect) {
    Indirect r{};
    r.operation = BLKIF_OP_INDIRECT;
    r.indirect_op = request.operation;
    r.nr_segments = static_cast<uint16_t>(refs.size());
    r.id = id;
    r.sector_number = request.sector;
    r.indirect_grefs[0] = indirect_ref;
    std::memcpy(slot, &r, sizeof(r));
  } else {
    Rw r{};
    r.operation = request.operation;
    r.nr_segments = static_cast<uint8_t>(refs.size());
    r.id = id;
    r.sector_number = request.sector;
    for (size_t i = 0; i < refs.size(); ++i) {
      r.seg[i].gref = refs[i];
      r.seg[i].first_sect = 0;
      r.seg[i].last_sect = 7;
    }
    std::memcpy(slot, &r, sizeof(r));
  }
}

}  // namespace

GuestQueue::GuestQueue(harness::GuestDomain* guest, const harness::BlkfrontQueue* queue,
                       Protocol protocol, common::xen::DomainId backend, bool persistent,
                       uint32_t first_frame, uint32_t slots, uint32_t max_pages)
    : guest_(guest),
      queue_(queue),
      protocol_(protocol),
      layout_(worker::xen::LayoutOf(protocol)),
      backend_(backend),
      persistent_(persistent),
      first_frame_(first_frame),
      max_pages_(max_pages) {
  ring_size_ = worker::xen::RingEntries(protocol, queue->ring_refs.size() * kPage);
  slots_.resize(std::min(slots, ring_size_));
  if (persistent_) {
    for (uint32_t s = 0; s < slots_.size(); ++s) {
      for (uint32_t p = 0; p < max_pages_; ++p) {
        (void)guest_->GrantAccess(Frame(s, p), backend_, Frame(s, p), /*readonly=*/false);
      }
    }
  }
}

GuestQueue::~GuestQueue() = default;

std::byte* GuestQueue::Entry(uint32_t index) const {
  return queue_->ring + worker::xen::kSringHeaderSize +
         size_t{index & (ring_size_ - 1)} * layout_.entry_size;
}

absl::Status GuestQueue::Prepare(uint32_t slot, const GuestRequest& request, uint64_t id) {
  if (request.pages > max_pages_) return absl::InvalidArgumentError("request too large");
  std::vector<uint32_t> refs;
  const bool has_data = request.operation != BLKIF_OP_DISCARD &&
                        !(request.operation == BLKIF_OP_FLUSH_DISKCACHE && request.pages == 0);
  if (has_data) {
    const bool to_disk = request.operation != BLKIF_OP_READ;
    for (uint32_t p = 0; p < request.pages; ++p) {
      const uint32_t frame = Frame(slot, p);
      if (!persistent_) {
        if (absl::Status s = guest_->GrantAccess(frame, backend_, frame, /*readonly=*/to_disk);
            !s.ok()) {
          return s;
        }
      }
      if (to_disk && request.write_data) {
        std::memcpy(guest_->Page(frame).data(), request.write_data + size_t{p} * kPage, kPage);
      }
      refs.push_back(frame);
    }
  }
  const uint32_t indirect = Frame(slot, max_pages_);
  if (request.indirect) {
    auto* segments = reinterpret_cast<blkif_request_segment*>(guest_->Page(indirect).data());
    for (size_t i = 0; i < refs.size(); ++i) {
      segments[i] = blkif_request_segment{refs[i], 0, 7};
    }
    if (absl::Status s = guest_->GrantAccess(indirect, backend_, indirect, /*readonly=*/true);
        !s.ok()) {
      return s;
    }
  }
  std::byte* entry = Entry(req_prod_pvt_);
  if (protocol_ == Protocol::kX86_32) {
    Encode<worker::xen::blkif_x86_32_request, worker::xen::blkif_x86_32_request_discard,
           worker::xen::blkif_x86_32_request_indirect>(entry, layout_.entry_size, request, id, refs,
                                                       indirect);
  } else {
    Encode<worker::xen::blkif_x86_64_request, worker::xen::blkif_x86_64_request_discard,
           worker::xen::blkif_x86_64_request_indirect>(entry, layout_.entry_size, request, id, refs,
                                                       indirect);
  }
  ++req_prod_pvt_;
  return absl::OkStatus();
}

void GuestQueue::Finish(uint32_t slot, const GuestRequest& request) {
  const bool has_data = request.operation != BLKIF_OP_DISCARD &&
                        !(request.operation == BLKIF_OP_FLUSH_DISKCACHE && request.pages == 0);
  if (has_data) {
    for (uint32_t p = 0; p < request.pages; ++p) {
      const uint32_t frame = Frame(slot, p);
      if (request.operation == BLKIF_OP_READ && request.read_data) {
        std::memcpy(request.read_data + size_t{p} * kPage, guest_->Page(frame).data(), kPage);
      }
      // The backend must have unmapped a non-persistent grant before it answered.
      if (!persistent_ && !guest_->EndAccess(frame)) ++grants_still_mapped_;
    }
  }
  if (request.indirect && !guest_->EndAccess(Frame(slot, max_pages_))) ++grants_still_mapped_;
}

void GuestQueue::Push() {
  // RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
  std::byte* ring = queue_->ring;
  const uint32_t old = SharedWord(ring, kReqProd).load(std::memory_order_relaxed);
  SharedWord(ring, kReqProd).store(req_prod_pvt_, std::memory_order_release);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const uint32_t event = SharedWord(ring, kReqEvent).load(std::memory_order_relaxed);
  pushed_.store(req_prod_pvt_, std::memory_order_relaxed);
  if (static_cast<uint32_t>(req_prod_pvt_ - event) < static_cast<uint32_t>(req_prod_pvt_ - old)) {
    (void)queue_->event_channel->Notify();
  }
}

absl::Status GuestQueue::Reap(const std::function<void(const GuestResponse&)>& on_response) {
  std::byte* ring = queue_->ring;
  for (;;) {
    const uint32_t rp = SharedWord(ring, kRspProd).load(std::memory_order_acquire);
    if (static_cast<uint32_t>(rp - rsp_cons_) > ring_size_) {
      return absl::DataLossError("backend published rsp_prod beyond the ring");
    }
    if (rp != rsp_cons_) {
      for (; rsp_cons_ != rp; ++rsp_cons_) {
        GuestResponse response;
        const std::byte* entry = Entry(rsp_cons_);
        std::memcpy(&response.id, entry, 8);
        std::memcpy(&response.operation, entry + 8, 1);
        std::memcpy(&response.status, entry + 10, 2);
        on_response(response);
      }
      return absl::OkStatus();
    }
    // RING_FINAL_CHECK_FOR_RESPONSES, then sleep on the event channel.
    SharedWord(ring, kRspEvent).store(rsp_cons_ + 1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (SharedWord(ring, kRspProd).load(std::memory_order_acquire) != rsp_cons_) continue;
    pollfd pfd{queue_->event_channel->ReadinessFd(), POLLIN, 0};
    if (poll(&pfd, 1, kWaitMs) != 1) {
      return absl::DeadlineExceededError("no response from the backend within " +
                                         std::to_string(kWaitMs) + " ms");
    }
    (void)queue_->event_channel->Ack();
  }
}

absl::StatusOr<std::vector<GuestResponse>> GuestQueue::Run(std::span<GuestRequest> requests,
                                                           uint32_t depth) {
  std::vector<GuestResponse> responses(requests.size());
  depth = std::max<uint32_t>(1, std::min<uint32_t>(depth, static_cast<uint32_t>(slots_.size())));
  size_t next = 0, done = 0;
  uint32_t busy = 0;
  absl::Status failure;
  while (done < requests.size()) {
    bool pushed = false;
    for (uint32_t s = 0; s < slots_.size() && next < requests.size() && busy < depth; ++s) {
      if (slots_[s].busy) continue;
      Slot& slot = slots_[s];
      slot.busy = true;
      slot.request = next;
      ++slot.generation;
      const uint64_t id = (slot.generation << 16) | s;
      if (absl::Status st = Prepare(s, requests[next], id); !st.ok()) return st;
      ++next;
      ++busy;
      pushed = true;
    }
    if (pushed) Push();
    absl::Status reaped = Reap([&](const GuestResponse& response) {
      const uint32_t s = static_cast<uint32_t>(response.id & 0xffff);
      if (s >= slots_.size() || !slots_[s].busy ||
          (slots_[s].generation << 16 | s) != response.id) {
        failure = absl::DataLossError("response with an unknown id " + std::to_string(response.id));
        return;
      }
      Slot& slot = slots_[s];
      Finish(s, requests[slot.request]);
      responses[slot.request] = response;
      slot.busy = false;
      --busy;
      ++done;
      completed_.fetch_add(1, std::memory_order_relaxed);
    });
    if (!reaped.ok()) return reaped;
    if (!failure.ok()) return failure;
  }
  return responses;
}

absl::StatusOr<GuestResponse> GuestQueue::RunRaw(std::span<const uint8_t> bytes) {
  std::byte* entry = Entry(req_prod_pvt_);
  std::memset(entry, 0, layout_.entry_size);
  std::memcpy(entry, bytes.data(), std::min(bytes.size(), layout_.entry_size));
  ++req_prod_pvt_;
  Push();
  GuestResponse got;
  int count = 0;
  absl::Status reaped = Reap([&](const GuestResponse& response) {
    got = response;
    ++count;
  });
  if (!reaped.ok()) return reaped;
  if (count != 1) return absl::DataLossError("expected one response");
  return got;
}

bool GuestQueue::BackendIdle() const {
  const uint32_t pushed = static_cast<uint32_t>(pushed_.load(std::memory_order_acquire));
  return SharedWord(queue_->ring, kReqEvent).load(std::memory_order_acquire) == pushed + 1;
}

void GuestQueue::PublishBogusReqProd(uint32_t ahead) {
  req_prod_pvt_ += ahead;
  Push();
}

bool GuestQueue::RevokePersistentGrants() {
  if (!persistent_) return true;
  bool all = true;
  for (uint32_t s = 0; s < slots_.size(); ++s) {
    for (uint32_t p = 0; p < max_pages_; ++p) all &= guest_->EndAccess(Frame(s, p));
  }
  return all;
}

}  // namespace blockplane::xen_e2e
