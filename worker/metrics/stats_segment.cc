#include "worker/metrics/stats_segment.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/unique_fd.h"

namespace blockplane::worker {
namespace {

absl::Status Errno(const std::string& what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", strerror(errno)));
}

// Checks a header read from a file (not mapped: plain bytes).
absl::Status CheckHeader(const StatsSegmentHeader& h, uint64_t file_size,
                         const std::string& device_id) {
  if (h.magic != kStatsSegmentMagic) return absl::DataLossError("bad magic");
  if (h.version != kStatsSegmentVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("layout version ", h.version, ", expected ", kStatsSegmentVersion));
  }
  if (h.header_size != sizeof(StatsSegmentHeader) || h.total_size != sizeof(StatsSegmentLayout) ||
      file_size != sizeof(StatsSegmentLayout)) {
    return absl::DataLossError("size does not match the layout");
  }
  if (strnlen(h.device_id, sizeof(h.device_id)) == sizeof(h.device_id) ||
      device_id != h.device_id) {
    return absl::FailedPreconditionError(
        absl::StrCat("belongs to another device (",
                     std::string(h.device_id, strnlen(h.device_id, sizeof(h.device_id))), ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckFile(int fd, const std::string& device_id) {
  struct stat st;
  if (fstat(fd, &st) != 0) return absl::InternalError(strerror(errno));
  // Read the header as bytes: the atomics at its end are not read here.
  alignas(StatsSegmentHeader) unsigned char buf[sizeof(StatsSegmentHeader)];
  if (pread(fd, buf, sizeof(buf), 0) != static_cast<ssize_t>(sizeof(buf))) {
    return absl::DataLossError("short header");
  }
  StatsSegmentHeader h;
  memcpy(static_cast<void*>(&h), buf, offsetof(StatsSegmentHeader, generation));
  return CheckHeader(h, static_cast<uint64_t>(st.st_size), device_id);
}

}  // namespace

std::string StatsSegmentPath(const std::string& state_dir, const std::string& device_id) {
  return absl::StrCat(state_dir, "/stats/", device_id, ".stats");
}

absl::Status PrepareStatsSegment(const std::string& path, const std::string& device_id) {
  if (device_id.size() >= kStatsSegmentDeviceIdSize) {
    return absl::InvalidArgumentError("device id too long for the stats segment");
  }
  {
    common::UniqueFd existing(open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (existing && CheckFile(existing.get(), device_id).ok()) return absl::OkStatus();
  }
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path).parent_path(), ec);
  if (ec)
    return absl::InternalError(
        absl::StrCat("cannot create the folder of ", path, ": ", ec.message()));
  std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  common::UniqueFd fd(open(tmp.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) return Errno("cannot create", tmp);
  // ftruncate gives zeroes, which is every counter at 0.
  if (ftruncate(fd.get(), sizeof(StatsSegmentLayout)) != 0) {
    absl::Status s = Errno("cannot size", tmp);
    unlink(tmp.c_str());
    return s;
  }
  unsigned char header[offsetof(StatsSegmentHeader, generation)] = {};
  StatsSegmentHeader h;  // only the plain fields are copied out
  h.magic = kStatsSegmentMagic;
  h.version = kStatsSegmentVersion;
  h.header_size = sizeof(StatsSegmentHeader);
  h.total_size = sizeof(StatsSegmentLayout);
  memset(h.device_id, 0, sizeof(h.device_id));
  memcpy(h.device_id, device_id.data(), device_id.size());
  memcpy(header, static_cast<const void*>(&h), sizeof(header));
  if (pwrite(fd.get(), header, sizeof(header), 0) != static_cast<ssize_t>(sizeof(header)) ||
      rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status s = Errno("cannot write", tmp);
    unlink(tmp.c_str());
    return s;
  }
  return absl::OkStatus();
}

void RemoveStatsSegment(const std::string& path) { unlink(path.c_str()); }

absl::StatusOr<std::unique_ptr<StatsSegment>> StatsSegment::Open(const std::string& path,
                                                                 const std::string& device_id,
                                                                 uint64_t generation) {
  common::UniqueFd fd(open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd) return Errno("cannot open stats segment", path);
  if (absl::Status s = CheckFile(fd.get(), device_id); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat("stats segment ", path, ": ", s.message()));
  }
  void* p =
      mmap(nullptr, sizeof(StatsSegmentLayout), PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) return Errno("cannot map stats segment", path);
  auto* layout = static_cast<StatsSegmentLayout*>(p);
  layout->header.generation.store(generation, std::memory_order_relaxed);
  layout->header.mappings.fetch_add(1, std::memory_order_relaxed);
  return std::unique_ptr<StatsSegment>(new StatsSegment(layout));
}

StatsSegment::~StatsSegment() { munmap(layout_, sizeof(StatsSegmentLayout)); }

}  // namespace blockplane::worker
