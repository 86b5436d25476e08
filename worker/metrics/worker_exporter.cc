#include "worker/metrics/worker_exporter.h"

#include <exception>

#include "absl/strings/str_cat.h"
#include "common/metrics/process_collector.h"
#include "prometheus/exposer.h"

namespace blockplane::worker {

absl::StatusOr<std::unique_ptr<WorkerExporter>> WorkerExporter::Start(
    const std::string& listen, std::shared_ptr<prometheus::Collectable> device) {
  size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics_listen: \"", listen, "\" is not host:port"));
  }
  std::unique_ptr<WorkerExporter> exporter(new WorkerExporter());
  try {
    // One thread: Prometheus scrapes one at a time; a second connection waits.
    exporter->exposer_ = std::make_unique<prometheus::Exposer>(listen, 1);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve /metrics on ", listen, ": ", e.what()));
  }
  std::vector<int> ports = exporter->exposer_->GetListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(absl::StrCat("cannot serve /metrics on ", listen));
  }
  exporter->device_ = std::move(device);
  exporter->process_ = std::make_shared<common::ProcessCollector>();
  exporter->exposer_->RegisterCollectable(exporter->device_);
  exporter->exposer_->RegisterCollectable(exporter->process_);
  exporter->endpoint_ = absl::StrCat(listen.substr(0, colon), ":", ports.front());
  return exporter;
}

WorkerExporter::~WorkerExporter() {
  // Stop serving before the collectors go.
  exposer_.reset();
}

}  // namespace blockplane::worker
