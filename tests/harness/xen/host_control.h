#pragma once

// dom0 control of the emulated host over its hypervisor socket: create and destroy guest domains
// at run time (what a toolstack does), from tests or tools in other processes.

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "common/xen/xen_platform.h"

namespace blockplane::harness {

// Creates guest `domid` with `pages` of memory and `grant_entries` grants, and introduces it to
// xenstored (its sockets appear in run_dir, /local/domain/<domid> is created, @introduceDomain
// fires). AlreadyExists if it exists; InvalidArgument for bad sizes.
absl::Status CreateGuestDomain(const std::string& run_dir, common::xen::DomainId domid,
                               uint32_t pages, uint32_t grant_entries);

// Releases the guest from xenstored (@releaseDomain fires, its connections close) and forgets it.
// Mappings that backends hold stay valid until they unmap.
absl::Status DestroyGuestDomain(const std::string& run_dir, common::xen::DomainId domid);

}  // namespace blockplane::harness
