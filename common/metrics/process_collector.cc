#include "common/metrics/process_collector.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

namespace blockplane::common {
namespace {

struct ProcStat {
  bool ok = false;
  double cpu_seconds = 0;
  double start_time_seconds = 0;
  double virtual_bytes = 0;
  double resident_bytes = 0;
};

double BootTimeSeconds() {
  std::ifstream in("/proc/stat");
  std::string key;
  while (in >> key) {
    if (key == "btime") {
      double v = 0;
      in >> v;
      return v;
    }
    in.ignore(1 << 20, '\n');
  }
  return 0;
}

ProcStat ReadProcStat() {
  ProcStat out;
  std::ifstream in("/proc/self/stat");
  std::string line;
  if (!std::getline(in, line)) return out;
  // The command name (field 2) may contain spaces: fields resume after the last ')'.
  size_t paren = line.rfind(')');
  if (paren == std::string::npos) return out;
  std::istringstream fields(line.substr(paren + 2));
  std::string f[24];
  for (int i = 0; i < 22 && fields >> f[i]; ++i) {
  }
  // f[0] is field 3 (state): utime 14, stime 15, starttime 22, vsize 23, rss 24.
  const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
  const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
  try {
    out.cpu_seconds = (std::stod(f[11]) + std::stod(f[12])) / ticks;
    out.start_time_seconds = BootTimeSeconds() + std::stod(f[19]) / ticks;
    out.virtual_bytes = std::stod(f[20]);
    out.resident_bytes = std::stod(f[21]) * page;
    out.ok = true;
  } catch (...) {  // a /proc format we do not know: report nothing rather than garbage
  }
  return out;
}

double OpenFds() {
  DIR* dir = opendir("/proc/self/fd");
  if (!dir) return 0;
  double n = 0;
  while (dirent* e = readdir(dir)) {
    if (e->d_name[0] != '.') ++n;
  }
  closedir(dir);
  return n - 1;  // the directory stream's own fd
}

}  // namespace

prometheus::MetricFamily MakeFamily(const char* name, const char* help,
                                    prometheus::MetricType type) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = type;
  return f;
}

prometheus::ClientMetric& AddGauge(prometheus::MetricFamily& family,
                                   std::vector<prometheus::ClientMetric::Label> labels,
                                   double value) {
  prometheus::ClientMetric& m = family.metric.emplace_back();
  m.label = std::move(labels);
  m.gauge.value = value;
  return m;
}

prometheus::ClientMetric& AddCounter(prometheus::MetricFamily& family,
                                     std::vector<prometheus::ClientMetric::Label> labels,
                                     double value) {
  prometheus::ClientMetric& m = family.metric.emplace_back();
  m.label = std::move(labels);
  m.counter.value = value;
  return m;
}

std::vector<prometheus::MetricFamily> ProcessCollector::Collect() const {
  using prometheus::MetricType;
  std::vector<prometheus::MetricFamily> out;
  ProcStat stat = ReadProcStat();
  if (stat.ok) {
    out.push_back(MakeFamily("process_cpu_seconds_total",
                             "User and system CPU time spent, in seconds.", MetricType::Counter));
    AddCounter(out.back(), {}, stat.cpu_seconds);
    out.push_back(MakeFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                             MetricType::Gauge));
    AddGauge(out.back(), {}, stat.resident_bytes);
    out.push_back(MakeFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                             MetricType::Gauge));
    AddGauge(out.back(), {}, stat.virtual_bytes);
    out.push_back(MakeFamily("process_start_time_seconds",
                             "Start time of the process since the Unix epoch, in seconds.",
                             MetricType::Gauge));
    AddGauge(out.back(), {}, stat.start_time_seconds);
  }
  out.push_back(
      MakeFamily("process_open_fds", "Number of open file descriptors.", MetricType::Gauge));
  AddGauge(out.back(), {}, OpenFds());
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    out.push_back(MakeFamily("process_max_fds", "Maximum number of open file descriptors.",
                             MetricType::Gauge));
    AddGauge(out.back(), {}, static_cast<double>(limit.rlim_cur));
  }
  return out;
}

}  // namespace blockplane::common
