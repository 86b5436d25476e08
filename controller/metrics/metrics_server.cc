#include "controller/metrics/metrics_server.h"

#include <CivetServer.h>

#include <exception>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/metrics/process_collector.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"

namespace blockplane::controller {
namespace {

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  return out + "\"";
}

// DEVICE_STATE_WAITING_FOR_FRONTEND -> waiting_for_frontend
std::string StateLabel(v1::DeviceState state) {
  std::string name = v1::DeviceState_Name(state);
  if (name.rfind("DEVICE_STATE_", 0) == 0) name.erase(0, 13);
  for (char& c : name) c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
  return name;
}

}  // namespace

class MetricsServer::Handler final : public CivetHandler {
 public:
  Handler(std::function<std::string()> body, const char* content_type)
      : body_(std::move(body)), content_type_(content_type) {}
  bool handleGet(CivetServer*, mg_connection* conn) override {
    std::string body;
    try {
      body = body_();
    } catch (const std::exception& e) {
      mg_send_http_error(conn, 500, "%s", e.what());
      return true;
    }
    mg_send_http_ok(conn, content_type_, static_cast<long long>(body.size()));
    mg_write(conn, body.data(), body.size());
    return true;
  }

 private:
  const std::function<std::string()> body_;
  const char* const content_type_;
};

MetricsServer::MetricsServer(ControllerMetrics* metrics, DeviceLister devices)
    : metrics_(metrics), devices_(std::move(devices)) {}

MetricsServer::~MetricsServer() {
  server_.reset();  // stops civetweb's threads before the handlers go
}

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& listen,
                                                                    ControllerMetrics* metrics,
                                                                    DeviceLister devices) {
  size_t colon = listen.rfind(':');
  if (colon == std::string::npos || colon == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-listen: \"", listen, "\" is not host:port"));
  }
  std::unique_ptr<MetricsServer> server(new MetricsServer(metrics, std::move(devices)));
  MetricsServer* self = server.get();
  server->metrics_handler_ = std::make_unique<Handler>([self] { return self->MetricsText(); },
                                                       "text/plain; version=0.0.4; charset=utf-8");
  server->sd_handler_ = std::make_unique<Handler>([self] { return self->ServiceDiscoveryJson(); },
                                                  "application/json");
  std::vector<std::string> options = {"listening_ports", listen, "num_threads", "2"};
  try {
    server->server_ = std::make_unique<CivetServer>(options);
  } catch (const std::exception& e) {
    return absl::UnavailableError(
        absl::StrCat("--metrics-listen: cannot listen on ", listen, ": ", e.what()));
  }
  std::vector<int> ports = server->server_->getListeningPorts();
  if (ports.empty()) {
    return absl::UnavailableError(absl::StrCat("--metrics-listen: cannot listen on ", listen));
  }
  server->server_->addHandler("/metrics", server->metrics_handler_.get());
  server->server_->addHandler("/sd", server->sd_handler_.get());
  server->endpoint_ = absl::StrCat(listen.substr(0, colon), ":", ports.front());
  return server;
}

std::string MetricsServer::MetricsText() const {
  std::vector<prometheus::MetricFamily> families = metrics_->registry()->Collect();
  // Devices by state, counted at scrape time; every state is listed so that a rule can compare
  // it with 0.
  std::map<std::string, double> by_state;
  for (int s = v1::DeviceState_MIN; s <= v1::DeviceState_MAX; ++s) {
    if (v1::DeviceState_IsValid(s) && s != v1::DEVICE_STATE_UNSPECIFIED) {
      by_state[StateLabel(static_cast<v1::DeviceState>(s))] = 0;
    }
  }
  // And each device's state, as the controller sees it (a FAILED device has no worker to ask).
  prometheus::MetricFamily device_state = common::MakeFamily(
      "blockplane_controller_device_state", "1 for each device, labelled with its current state.",
      prometheus::MetricType::Gauge);
  for (const v1::Device& d : devices_()) {
    std::string state = StateLabel(d.status().state());
    by_state[state] += 1;
    common::AddGauge(device_state, {{"device", d.id()}, {"state", state}}, 1);
  }
  prometheus::MetricFamily devices = common::MakeFamily(
      "blockplane_controller_devices", "Devices by state.", prometheus::MetricType::Gauge);
  for (const auto& [state, n] : by_state) common::AddGauge(devices, {{"state", state}}, n);
  families.push_back(std::move(devices));
  families.push_back(std::move(device_state));
  for (prometheus::MetricFamily& f : common::ProcessCollector().Collect()) {
    families.push_back(std::move(f));
  }
  return prometheus::TextSerializer().Serialize(families);
}

std::string MetricsServer::ServiceDiscoveryJson() const {
  std::string out = "[";
  bool first = true;
  for (const v1::Device& d : devices_()) {
    const std::string& endpoint = d.status().metrics_endpoint();
    if (endpoint.empty()) continue;
    std::vector<std::pair<std::string, std::string>> labels = {{"device", d.id()}};
    if (d.spec().has_xen()) {
      labels.push_back({"frontend", "xen"});
      labels.push_back({"domid", absl::StrCat(d.spec().xen().domid())});
    } else if (d.spec().has_vhost_user()) {
      labels.push_back({"frontend", "vhost_user"});
      labels.push_back({"socket", d.spec().vhost_user().socket_path()});
    } else {
      labels.push_back({"frontend", "none"});
    }
    absl::StrAppend(&out, first ? "" : ",", "\n  {\"targets\": [", JsonString(endpoint),
                    "], \"labels\": {");
    for (size_t i = 0; i < labels.size(); ++i) {
      absl::StrAppend(&out, i ? ", " : "", JsonString(labels[i].first), ": ",
                      JsonString(labels[i].second));
    }
    absl::StrAppend(&out, "}}");
    first = false;
  }
  absl::StrAppend(&out, first ? "]\n" : "\n]\n");
  return out;
}

}  // namespace blockplane::controller
