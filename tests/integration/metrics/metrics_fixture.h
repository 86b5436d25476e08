#pragma once

// Helpers shared by the metrics integration tests: a controller with the self-test I/O path,
// attach, and a known workload through the worker's block layer.

#include <map>
#include <string>
#include <vector>

#include "blockplane/internal/diagnostics.grpc.pb.h"
#include "tests/integration/controller/fixture.h"

namespace blockplane::testing {

// Attaches `id` over a sparse `size`-byte disk (cache writeback: works on tmpfs) and returns the
// device; fails the test on error.
v1::Device AttachTestDevice(ControllerProcess& controller, const std::string& id, uint64_t size);

// Runs `ops` requests of `bytes` through the device's worker (Diagnostics/SelfTestIo) and returns
// the device's stats afterwards; fails the test on error.
v1::DeviceStats RunSelfTestIo(ControllerProcess& controller, const std::string& id, uint32_t ops,
                              uint32_t bytes, bool write);

// HTTP GET on host:port with civetweb's client.
// Returns the body; fails the test unless the status is 200.
std::string HttpGet(const std::string& host_port, const std::string& path);
// The same without failing the test: the HTTP status (0 if no connection) and the body (or why
// the connection failed).
int HttpGetStatus(const std::string& host_port, const std::string& path, std::string* body);

}  // namespace blockplane::testing

namespace blockplane::testing {

// Samples of a Prometheus text exposition: one per series line.
struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};
std::vector<Sample> ParseExposition(const std::string& text);
// The value of the one series `name` whose labels include `labels`; fails the test and returns
// -1 unless exactly one matches.
double ValueOf(const std::vector<Sample>& samples, const std::string& name,
               const std::map<std::string, std::string>& labels = {});

// Runs `promtool check metrics` on `text`; returns its combined output (empty: no problem) and
// fails the test if promtool cannot run.
std::string PromtoolCheckMetrics(const std::string& text, const std::string& scratch_dir);

}  // namespace blockplane::testing

namespace blockplane::testing {
// The controller's --metrics-listen endpoint (host:port) as it logged it; "" if not within 10 s.
std::string ControllerMetricsEndpoint(ControllerProcess& controller);
}  // namespace blockplane::testing
