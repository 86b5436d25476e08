#include "tests/integration/metrics/metrics_fixture.h"

#include <civetweb.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "absl/strings/numbers.h"
#include "gtest/gtest.h"

namespace blockplane::testing {

v1::Device AttachTestDevice(ControllerProcess& controller, const std::string& id, uint64_t size) {
  v1::DeviceSpec spec = XenSpec(controller.CreateDisk(id + ".img", size));
  spec.mutable_backend()->set_cache(v1::CACHE_MODE_WRITEBACK);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::AttachDeviceRequest req;
  req.set_device_id(id);
  *req.mutable_spec() = spec;
  v1::Device device;
  grpc::Status s = controller.stub().AttachDevice(&ctx, req, &device);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return device;
}

v1::DeviceStats RunSelfTestIo(ControllerProcess& controller, const std::string& id, uint32_t ops,
                              uint32_t bytes, bool write) {
  auto stub = internal::Diagnostics::NewStub(controller.channel());
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  internal::SelfTestIoCall call;
  call.set_device_id(id);
  call.mutable_io()->set_ops(ops);
  call.mutable_io()->set_bytes(bytes);
  call.mutable_io()->set_write(write);
  call.mutable_io()->set_queue_depth(8);
  v1::DeviceStats stats;
  grpc::Status s = stub->SelfTestIo(&ctx, call, &stats);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return stats;
}

int HttpGetStatus(const std::string& host_port, const std::string& path, std::string* body) {
  body->clear();
  size_t colon = host_port.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(host_port.substr(colon + 1), &port)) {
    *body = "not host:port: " + host_port;
    return 0;
  }
  std::string host = host_port.substr(0, colon);
  char error[256] = "";
  mg_connection* conn =
      mg_download(host.c_str(), port, 0, error, sizeof(error),
                  "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path.c_str(), host_port.c_str());
  if (!conn) {
    *body = error;
    return 0;
  }
  const mg_response_info* info = mg_get_response_info(conn);
  int status = info ? info->status_code : 0;
  char buf[16384];
  int n;
  while ((n = mg_read(conn, buf, sizeof(buf))) > 0) body->append(buf, static_cast<size_t>(n));
  mg_close_connection(conn);
  return status;
}

std::string HttpGet(const std::string& host_port, const std::string& path) {
  std::string body;
  int status = HttpGetStatus(host_port, path, &body);
  EXPECT_EQ(status, 200) << "GET http://" << host_port << path << ": " << body;
  return body;
}

}  // namespace blockplane::testing

namespace blockplane::testing {

std::vector<Sample> ParseExposition(const std::string& text) {
  std::vector<Sample> out;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty() || line[0] == '#') continue;
    Sample s;
    size_t i = line.find_first_of("{ ");
    s.name = line.substr(0, i);
    if (i != std::string::npos && line[i] == '{') {
      ++i;
      while (i < line.size() && line[i] != '}') {
        size_t eq = line.find('=', i);
        std::string key = line.substr(i, eq - i);
        size_t q = eq + 2;  // after ="
        std::string value;
        while (q < line.size() && line[q] != '"') {
          if (line[q] == '\\' && q + 1 < line.size()) ++q;
          value += line[q++];
        }
        s.labels[key] = value;
        i = q + 1;
        if (i < line.size() && line[i] == ',') ++i;
      }
      ++i;
    }
    std::string value = line.substr(line.find_first_not_of(' ', i));
    value = value.substr(0, value.find(' '));  // drop a timestamp
    s.value = value == "+Inf" ? HUGE_VAL : std::strtod(value.c_str(), nullptr);
    out.push_back(std::move(s));
  }
  return out;
}

double ValueOf(const std::vector<Sample>& samples, const std::string& name,
               const std::map<std::string, std::string>& labels) {
  const Sample* found = nullptr;
  int matches = 0;
  for (const Sample& s : samples) {
    if (s.name != name) continue;
    bool all = true;
    for (const auto& [k, v] : labels) {
      auto it = s.labels.find(k);
      if (it == s.labels.end() || it->second != v) all = false;
    }
    if (all) {
      found = &s;
      ++matches;
    }
  }
  EXPECT_EQ(matches, 1) << name;
  return matches == 1 ? found->value : -1;
}

std::string PromtoolCheckMetrics(const std::string& text, const std::string& scratch_dir) {
  static int n = 0;
  std::string path = scratch_dir + "/metrics-" + std::to_string(++n) + ".txt";
  FILE* f = fopen(path.c_str(), "w");
  EXPECT_NE(f, nullptr) << path;
  if (!f) return "cannot write " + path;
  fwrite(text.data(), 1, text.size(), f);
  fclose(f);
  CommandResult r =
      RunCommand({"/bin/sh", "-c", "exec promtool check metrics < '" + path + "' 2>&1"});
  EXPECT_NE(r.exit_code, 127) << "promtool not found";
  return r.out + r.err;
}

}  // namespace blockplane::testing

namespace blockplane::testing {

std::string ControllerMetricsEndpoint(ControllerProcess& controller) {
  std::string endpoint;
  WaitFor([&] {
    std::ifstream in(controller.log_path());
    std::string line;
    const std::string marker = "Prometheus service discovery on http://";
    while (std::getline(in, line)) {
      size_t at = line.find(marker);
      if (at == std::string::npos) continue;
      size_t start = at + marker.size();
      endpoint = line.substr(start, line.find('/', start) - start);
      return true;
    }
    return false;
  });
  return endpoint;
}

}  // namespace blockplane::testing
