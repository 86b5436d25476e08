#pragma once

#include <sstream>
#include <string>
#include <string_view>

namespace blockplane::common {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Process-wide settings, set once by main() before other threads start.
void SetLogComponent(std::string_view component);  // "blockplaned", "worker[dev0]"
void SetMinLogLevel(LogLevel level);
bool ParseLogLevel(std::string_view text, LogLevel* level);

// One log line: logfmt on stderr, prefixed with the syslog priority ("<6>") so that journald
// records the level when the unit sets SyslogLevelPrefix (the default). Thread-safe: each line is
// written with a single write(2).
class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  const char* file_;
  int line_;
  std::ostringstream stream_;
};

bool LogEnabled(LogLevel level);

}  // namespace blockplane::common

#define BP_LOG(level)                                                                              \
  if (!::blockplane::common::LogEnabled(::blockplane::common::LogLevel::k##level)) {               \
  } else                                                                                           \
    ::blockplane::common::LogMessage(::blockplane::common::LogLevel::k##level, __FILE__, __LINE__) \
        .stream()
