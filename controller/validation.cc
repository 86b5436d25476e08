#include "controller/validation.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/unique_fd.h"

namespace blockplane::controller {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", problem));
}

absl::Status CheckEnum(absl::string_view field, int value, bool (*is_valid)(int)) {
  if (is_valid(value)) return absl::OkStatus();
  return Invalid(field, absl::StrCat("unknown value ", value));
}

bool IsPowerOfTwo(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

// Parses "a".."z", "aa".. (bijective base 26, as Linux names disks) into a 0-based index.
bool ParseDiskLetters(absl::string_view letters, uint32_t* disk) {
  if (letters.empty() || letters.size() > 4) return false;
  uint64_t value = 0;
  for (char c : letters) {
    if (c < 'a' || c > 'z') return false;
    value = value * 26 + static_cast<uint64_t>(c - 'a' + 1);
  }
  *disk = static_cast<uint32_t>(value - 1);
  return true;
}

bool ParseDecimal(absl::string_view digits, uint64_t limit, uint64_t* out) {
  if (digits.empty() || digits.size() > 10) return false;
  if (digits.size() > 1 && digits[0] == '0') return false;
  uint64_t value = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
    value = value * 10 + static_cast<uint64_t>(c - '0');
  }
  if (value > limit) return false;
  *out = value;
  return true;
}

bool IsUnder(const std::filesystem::path& path, const std::filesystem::path& root) {
  auto p = path.begin();
  for (const std::filesystem::path& r : root) {
    if (r.empty()) continue;  // trailing slash of the root; `p` may already be at the end
    if (p == path.end() || *p != r) return false;
    ++p;
  }
  return true;
}

}  // namespace

absl::Status ValidateDeviceId(absl::string_view id, absl::string_view field) {
  if (id.empty()) return Invalid(field, "must not be empty");
  if (id.size() > kMaxDeviceIdLength) {
    return Invalid(field, absl::StrCat("is ", id.size(), " characters long; at most ",
                                       kMaxDeviceIdLength, " are allowed"));
  }
  for (char c : id) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!ok) {
      return Invalid(field, absl::StrCat("\"", id, "\" has a character outside [a-z0-9._-]"));
    }
  }
  char first = id[0];
  if (!((first >= 'a' && first <= 'z') || (first >= '0' && first <= '9'))) {
    return Invalid(field, absl::StrCat("\"", id, "\" must start with a letter or a digit"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint32_t> ParseXenVirtualDevice(absl::string_view text) {
  constexpr absl::string_view kField = "spec.xen.virtual_device";
  auto bad = [&](absl::string_view why) {
    return Invalid(kField, absl::StrCat("\"", text, "\" ", why,
                                        "; use a name like xvda, xvdb1, hda, sda or a number"));
  };
  if (text.empty()) return Invalid(kField, "must be set (for example xvda)");
  if (text[0] >= '0' && text[0] <= '9') {
    uint64_t value;
    if (!ParseDecimal(text, (1u << 29) - 1, &value) || value == 0) {
      return bad("is not a valid virtual-device number");
    }
    return static_cast<uint32_t>(value);
  }
  auto split = [](absl::string_view rest, absl::string_view* letters, absl::string_view* digits) {
    size_t i = 0;
    while (i < rest.size() && rest[i] >= 'a' && rest[i] <= 'z') ++i;
    *letters = rest.substr(0, i);
    *digits = rest.substr(i);
  };
  absl::string_view letters, digits;
  uint32_t disk;
  uint64_t part = 0;
  if (text.substr(0, 3) == "xvd") {
    split(text.substr(3), &letters, &digits);
    if (!ParseDiskLetters(letters, &disk) || disk >= (1u << 20)) return bad("has no valid disk");
    if (!digits.empty() && !ParseDecimal(digits, 255, &part)) return bad("has a bad partition");
    if (disk < 16 && part < 16) return (202u << 8) | (disk << 4) | static_cast<uint32_t>(part);
    return (1u << 28) | (disk << 8) | static_cast<uint32_t>(part);
  }
  if (text.substr(0, 2) == "hd") {
    split(text.substr(2), &letters, &digits);
    if (letters.size() != 1 || letters[0] > 't') return bad("needs one disk letter a-t");
    if (!digits.empty() && !ParseDecimal(digits, 63, &part)) return bad("has a bad partition");
    static constexpr uint32_t kIdeMajors[] = {3, 22, 33, 34, 56, 57, 88, 89, 90, 91};
    disk = static_cast<uint32_t>(letters[0] - 'a');
    return (kIdeMajors[disk / 2] << 8) | ((disk % 2) << 6) | static_cast<uint32_t>(part);
  }
  if (text.substr(0, 2) == "sd") {
    split(text.substr(2), &letters, &digits);
    if (letters.size() != 1 || letters[0] > 'p') return bad("needs one disk letter a-p");
    if (!digits.empty() && !ParseDecimal(digits, 15, &part)) return bad("has a bad partition");
    disk = static_cast<uint32_t>(letters[0] - 'a');
    return (8u << 8) | (disk << 4) | static_cast<uint32_t>(part);
  }
  return bad("is not a Xen virtual device");
}

std::string XenVirtualDeviceName(uint32_t number) {
  auto letters = [](uint32_t disk) {
    std::string out;
    for (uint64_t d = uint64_t{disk} + 1; d > 0; d = (d - 1) / 26) {
      out.insert(out.begin(), static_cast<char>('a' + (d - 1) % 26));
    }
    return out;
  };
  auto with_part = [](std::string name, uint32_t part) {
    return part == 0 ? name : absl::StrCat(name, part);
  };
  if ((number >> 8) == 202) return with_part("xvd" + letters((number >> 4) & 15), number & 15);
  if ((number >> 28) == 1) {
    return with_part("xvd" + letters((number >> 8) & 0xfffff), number & 0xff);
  }
  return absl::StrCat(number);  // hd*/sd* numbers and the rest stay numeric
}

absl::Status ValidateSpec(const v1::DeviceSpec& spec) {
  if (!spec.has_backend()) return Invalid("spec.backend", "must be set");
  const v1::BackendSpec& b = spec.backend();
  if (b.has_null()) {
    if (!b.path().empty()) {
      return Invalid("spec.backend", "set exactly one of path and null, not both");
    }
  } else {
    if (b.path().empty()) {
      return Invalid("spec.backend.path", "must be set (or spec.backend.null for a null backend)");
    }
    if (b.path()[0] != '/') {
      return Invalid("spec.backend.path", absl::StrCat("\"", b.path(), "\" must be absolute"));
    }
    if (b.path().find('\0') != std::string::npos) {
      return Invalid("spec.backend.path", "contains a NUL character");
    }
  }
  if (absl::Status s = CheckEnum("spec.backend.format", b.format(), v1::ImageFormat_IsValid);
      !s.ok())
    return s;
  if (absl::Status s = CheckEnum("spec.backend.cache", b.cache(), v1::CacheMode_IsValid); !s.ok())
    return s;
  if (absl::Status s = CheckEnum("spec.backend.discard", b.discard(), v1::DiscardMode_IsValid);
      !s.ok())
    return s;
  if (absl::Status s =
          CheckEnum("spec.backend.detect_zeroes", b.detect_zeroes(), v1::DetectZeroes_IsValid);
      !s.ok())
    return s;
  if (absl::Status s =
          CheckEnum("spec.backend.error_policy", b.error_policy(), v1::ErrorPolicy_IsValid);
      !s.ok())
    return s;
  if (b.logical_block_size() != 0 && b.logical_block_size() != 512 &&
      b.logical_block_size() != 4096) {
    return Invalid("spec.backend.logical_block_size",
                   absl::StrCat(b.logical_block_size(), " is not supported; use 512 or 4096"));
  }
  if (b.has_null()) {
    const uint64_t size = b.null().size_bytes();
    const uint32_t lbs = LogicalBlockSize(b);
    if (size == 0) return Invalid("spec.backend.null.size_bytes", "must be greater than 0");
    if (size % lbs != 0) {
      return Invalid("spec.backend.null.size_bytes",
                     absl::StrCat(size, " is not a multiple of the logical block size ", lbs));
    }
    if (size > kMaxNullBackendSize) {
      return Invalid(
          "spec.backend.null.size_bytes",
          absl::StrCat(size, " is above the limit of ", kMaxNullBackendSize, " bytes (1 PiB)"));
    }
    if (absl::Status s = CheckEnum("spec.backend.null.completion", b.null().completion(),
                                   v1::NullCompletion_IsValid);
        !s.ok())
      return s;
  }
  if (b.detect_zeroes() == v1::DETECT_ZEROES_UNMAP && b.discard() != v1::DISCARD_MODE_UNMAP) {
    return Invalid("spec.backend.detect_zeroes",
                   "unmap needs spec.backend.discard = unmap (as in QEMU)");
  }

  if (spec.has_xen() && spec.has_vhost_user()) {
    return Invalid("spec", "set exactly one frontend: xen or vhost_user, not both");
  }
  if (!spec.has_xen() && !spec.has_vhost_user()) {
    return Invalid("spec", "set exactly one frontend: xen or vhost_user");
  }
  if (spec.has_xen()) {
    const v1::XenFrontend& x = spec.xen();
    if (x.domid() == 0 || x.domid() > kMaxXenDomid) {
      return Invalid(
          "spec.xen.domid",
          absl::StrCat(x.domid(), " is out of range; a guest domid is 1..", kMaxXenDomid));
    }
    if (absl::StatusOr<uint32_t> vdev = ParseXenVirtualDevice(x.virtual_device()); !vdev.ok()) {
      return vdev.status();
    }
    if (x.max_queues() > kMaxXenQueues) {
      return Invalid("spec.xen.max_queues",
                     absl::StrCat(x.max_queues(), " is above the limit of ", kMaxXenQueues));
    }
    if (x.max_ring_page_order() > kMaxRingPageOrder) {
      return Invalid(
          "spec.xen.max_ring_page_order",
          absl::StrCat(x.max_ring_page_order(), " is above the limit of ", kMaxRingPageOrder));
    }
    if (x.max_indirect_segments() > kMaxIndirectSegments) {
      return Invalid(
          "spec.xen.max_indirect_segments",
          absl::StrCat(x.max_indirect_segments(), " is above the limit of ", kMaxIndirectSegments));
    }
    if (x.has_poll_us() && x.poll_us() > kMaxXenPollUs) {
      return Invalid("spec.xen.poll_us", absl::StrCat(x.poll_us(), " is above the limit of ",
                                                      kMaxXenPollUs, " (10 s)"));
    }
  } else {
    const v1::VhostUserFrontend& v = spec.vhost_user();
    if (v.socket_path().empty()) return Invalid("spec.vhost_user.socket_path", "must be set");
    if (v.socket_path()[0] != '/') {
      return Invalid("spec.vhost_user.socket_path",
                     absl::StrCat("\"", v.socket_path(), "\" must be absolute"));
    }
    if (v.socket_path().size() > 107) {
      return Invalid("spec.vhost_user.socket_path",
                     "is longer than a unix socket path can be (107 bytes)");
    }
    if (v.num_queues() > kMaxVhostQueues) {
      return Invalid("spec.vhost_user.num_queues",
                     absl::StrCat(v.num_queues(), " is above the limit of ", kMaxVhostQueues));
    }
    if (v.queue_size() != 0 &&
        (!IsPowerOfTwo(v.queue_size()) || v.queue_size() < 64 || v.queue_size() > 32768)) {
      return Invalid("spec.vhost_user.queue_size",
                     absl::StrCat(v.queue_size(), " must be a power of two from 64 to 32768"));
    }
  }
  return absl::OkStatus();
}

v1::DeviceSpec NormalizeSpec(const v1::DeviceSpec& spec) {
  v1::DeviceSpec n = spec;
  v1::BackendSpec* b = n.mutable_backend();
  b->set_path(std::filesystem::path(b->path()).lexically_normal().string());
  if (b->format() == v1::IMAGE_FORMAT_UNSPECIFIED) b->set_format(v1::IMAGE_FORMAT_RAW);
  if (b->cache() == v1::CACHE_MODE_UNSPECIFIED) b->set_cache(v1::CACHE_MODE_NONE);
  if (b->discard() == v1::DISCARD_MODE_UNSPECIFIED) b->set_discard(v1::DISCARD_MODE_IGNORE);
  if (b->detect_zeroes() == v1::DETECT_ZEROES_UNSPECIFIED) {
    b->set_detect_zeroes(v1::DETECT_ZEROES_OFF);
  }
  if (b->logical_block_size() == 0) b->set_logical_block_size(512);
  if (b->has_null() && b->null().completion() == v1::NULL_COMPLETION_UNSPECIFIED) {
    b->mutable_null()->set_completion(v1::NULL_COMPLETION_NOP);
  }
  if (b->error_policy() == v1::ERROR_POLICY_UNSPECIFIED) {
    b->set_error_policy(v1::ERROR_POLICY_REPORT);
  }
  if (n.has_xen()) {
    v1::XenFrontend* x = n.mutable_xen();
    // One spelling per device ("51712" and "xvda" are the same disk), so that AttachDevice
    // idempotency does not depend on how the client wrote it. hd/sd names are kept as written.
    if (absl::StatusOr<uint32_t> number = ParseXenVirtualDevice(x->virtual_device());
        number.ok() && absl::StartsWith(XenVirtualDeviceName(*number), "xvd")) {
      x->set_virtual_device(XenVirtualDeviceName(*number));
    }
    if (x->max_queues() == 0) x->set_max_queues(4);
    if (!x->has_persistent_grants()) x->set_persistent_grants(true);
    if (x->max_indirect_segments() == 0 && !x->disable_indirect()) {
      x->set_max_indirect_segments(32);
    }
    if (x->disable_indirect()) x->set_max_indirect_segments(0);
  } else if (n.has_vhost_user()) {
    v1::VhostUserFrontend* v = n.mutable_vhost_user();
    v->set_socket_path(std::filesystem::path(v->socket_path()).lexically_normal().string());
    if (v->num_queues() == 0) v->set_num_queues(1);
    if (v->queue_size() == 0) v->set_queue_size(256);
  }
  return n;
}

uint32_t LogicalBlockSize(const v1::BackendSpec& backend) {
  return backend.logical_block_size() == 0 ? 512 : backend.logical_block_size();
}

absl::StatusOr<BackingInfo> InspectBacking(const v1::BackendSpec& backend,
                                           const std::vector<std::string>& backing_roots) {
  constexpr absl::string_view kField = "spec.backend.path";
  const std::string& path = backend.path();
  if (backing_roots.empty()) {
    return Invalid(kField,
                   "no backing roots are configured; start blockplaned with "
                   "--backing-root DIR for the folders that hold disk images");
  }
  auto outside = [&](absl::string_view shown) {
    return Invalid(kField, absl::StrCat(shown, " is outside the backing roots (",
                                        absl::StrJoin(backing_roots, ", "), ")"));
  };
  std::filesystem::path lexical = std::filesystem::path(path).lexically_normal();
  bool lexically_inside = false;
  for (const std::string& root : backing_roots) {
    if (IsUnder(lexical, std::filesystem::path(root).lexically_normal())) lexically_inside = true;
  }
  if (!lexically_inside) return outside(path);

  char resolved[PATH_MAX];
  if (realpath(path.c_str(), resolved) == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(kField, ": ", path, ": ", strerror(errno)));
  }
  bool inside = false;
  for (const std::string& root : backing_roots) {
    char root_resolved[PATH_MAX];
    if (realpath(root.c_str(), root_resolved) == nullptr) continue;
    if (IsUnder(resolved, root_resolved)) inside = true;
  }
  if (!inside) return outside(absl::StrCat(path, " (resolved to ", resolved, ")"));

  BackingInfo info;
  info.resolved_path = resolved;
  struct stat st;
  if (stat(resolved, &st) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(kField, ": ", path, ": ", strerror(errno)));
  }
  if (S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        kField, ": ", path, " is a directory; give a disk image file or block device"));
  }
  if (S_ISREG(st.st_mode)) {
    info.size_bytes = static_cast<uint64_t>(st.st_size);
  } else if (S_ISBLK(st.st_mode)) {
    info.is_block_device = true;
    common::UniqueFd fd(::open(resolved, O_RDONLY | O_CLOEXEC));
    if (!fd || ioctl(fd.get(), BLKGETSIZE64, &info.size_bytes) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(kField, ": cannot read the size of ", path, ": ", strerror(errno)));
    }
  } else {
    return absl::FailedPreconditionError(
        absl::StrCat(kField, ": ", path, " is neither a regular file nor a block device"));
  }
  int mode = backend.read_only() ? R_OK : (R_OK | W_OK);
  if (access(resolved, mode) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        kField, ": ", path, " is not ", backend.read_only() ? "readable" : "readable and writable",
        ": ", strerror(errno)));
  }
  uint32_t lbs = LogicalBlockSize(backend);
  if (info.size_bytes == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(kField, ": ", path, " is empty; give it a size first (truncate -s 1G ...)"));
  }
  if (info.size_bytes % lbs != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(kField, ": ", path, " is ", info.size_bytes,
                     " bytes, not a multiple of the logical block size ", lbs));
  }
  return info;
}

absl::Status ValidateResize(const v1::Device& device, const v1::ResizeDeviceRequest& request) {
  uint64_t want = request.new_size_bytes();
  uint32_t lbs = LogicalBlockSize(device.spec().backend());
  if (want == 0) return Invalid("new_size_bytes", "must be greater than 0");
  if (want % lbs != 0) {
    return Invalid("new_size_bytes", absl::StrCat(want,
                                                  " is not a multiple of the logical block "
                                                  "size ",
                                                  lbs));
  }
  if (want > (uint64_t{1} << 62)) return Invalid("new_size_bytes", "is too large");
  if (device.spec().backend().has_null() && want > kMaxNullBackendSize) {
    return Invalid("new_size_bytes", absl::StrCat(want, " is above the null backend's limit of ",
                                                  kMaxNullBackendSize, " bytes (1 PiB)"));
  }
  if (want < device.status().size_bytes() && !request.allow_shrink()) {
    return Invalid("new_size_bytes",
                   absl::StrCat(want, " is smaller than the current size ",
                                device.status().size_bytes(), "; set allow_shrink to shrink"));
  }
  if (want < device.status().highest_written_offset()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "new_size_bytes: ", want, " is below the highest offset the guest has written (",
        device.status().highest_written_offset(), "); shrinking would lose data"));
  }
  if (device.spec().backend().read_only()) {
    return absl::FailedPreconditionError(
        absl::StrCat("device_id: device ", device.id(), " is read-only and cannot be resized"));
  }
  return absl::OkStatus();
}

}  // namespace blockplane::controller
