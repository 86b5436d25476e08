#include "common/xen/xen_platform.h"

#include <errno.h>

#include <cstring>
#include <string>

namespace blockplane::common::xen {

absl::Status ErrnoToStatus(int error, std::string_view message) {
  std::string text = std::string(message) + ": " +
                     (strerrorname_np(error) ? strerrorname_np(error) : "errno") + " (" +
                     std::strerror(error) + ")";
  switch (error) {
    case 0:
      return absl::OkStatus();
    case EINVAL:
    case E2BIG:
      return absl::InvalidArgumentError(text);
    case ENOENT:
    case ESRCH:
      return absl::NotFoundError(text);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(text);
    case EAGAIN:
      return absl::AbortedError(text);
    case EEXIST:
      return absl::AlreadyExistsError(text);
    case ENOMEM:
    case ENOSPC:
      return absl::ResourceExhaustedError(text);
    case ENOSYS:
    case EOPNOTSUPP:
      return absl::UnimplementedError(text);
    case EBUSY:
      return absl::UnavailableError(text);
    default:
      return absl::InternalError(text);
  }
}

int StatusToErrno(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return 0;
    case absl::StatusCode::kInvalidArgument:
      return EINVAL;
    case absl::StatusCode::kNotFound:
      return ENOENT;
    case absl::StatusCode::kPermissionDenied:
      return EACCES;
    case absl::StatusCode::kAborted:
      return EAGAIN;
    case absl::StatusCode::kAlreadyExists:
      return EEXIST;
    case absl::StatusCode::kResourceExhausted:
      return ENOMEM;
    case absl::StatusCode::kUnimplemented:
      return ENOSYS;
    case absl::StatusCode::kUnavailable:
      return EBUSY;
    default:
      return EIO;
  }
}

absl::Status XenStore::RunTransaction(const std::function<absl::Status(TransactionId)>& body,
                                      int max_attempts) {
  absl::Status last = absl::AbortedError("no attempt made");
  for (int attempt = 0; attempt < max_attempts; ++attempt) {
    absl::StatusOr<TransactionId> tx = StartTransaction();
    if (!tx.ok()) return tx.status();
    if (absl::Status status = body(*tx); !status.ok()) {
      (void)EndTransaction(*tx, /*abort=*/true);
      return status;
    }
    last = EndTransaction(*tx, /*abort=*/false);
    if (!absl::IsAborted(last)) return last;  // committed, or a real error
  }
  return last;
}

}  // namespace blockplane::common::xen
