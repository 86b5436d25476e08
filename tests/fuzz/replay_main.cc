// A main() for fuzz targets in builds without libFuzzer (g++): replays corpus files and
// directories given on the command line through LLVMFuzzerTestOneInput, then runs N generated
// inputs from a fixed seed (half mutated corpus entries, half plain random bytes), so CI without
// clang still executes every fuzz body. Deterministic: the same seed gives the same inputs.
//
//   <target>_replay [--random=N] [--seed=S] [--max_len=L] [file|dir]...
//
// Exit status 0 when every input ran; a failing input aborts (the fuzz body checks invariants)
// and a fatal-signal handler leaves that input in ./replay-crash-input for reproduction (feed it
// to the replay binary or to the libFuzzer binary as a file argument).

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

std::vector<uint8_t> ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// The input being run, for the crash handler.
const uint8_t* g_current_data = nullptr;
size_t g_current_size = 0;

void SaveInputAndDie(int sig) {
  // Async-signal-safe: open/write/close only.
  const int fd = open("replay-crash-input", O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    if (g_current_size > 0 && write(fd, g_current_data, g_current_size) < 0) {
    }
    close(fd);
  }
  const char msg[] = "replay: input that crashed saved to ./replay-crash-input\n";
  if (write(STDERR_FILENO, msg, sizeof(msg) - 1) < 0) {
  }
  signal(sig, SIG_DFL);
  raise(sig);
}

void Run(const std::vector<uint8_t>& input) {
  g_current_data = input.data();
  g_current_size = input.size();
  LLVMFuzzerTestOneInput(input.data(), input.size());
}

bool ParseFlag(const char* arg, const char* name, uint64_t* value) {
  const size_t n = std::strlen(name);
  if (std::strncmp(arg, name, n) != 0 || arg[n] != '=') return false;
  *value = std::strtoull(arg + n + 1, nullptr, 10);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  for (int sig : {SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL}) signal(sig, SaveInputAndDie);
  uint64_t random_runs = 0;
  uint64_t seed = 1;
  uint64_t max_len = 4096 * 6;
  std::vector<std::vector<uint8_t>> corpus;
  for (int i = 1; i < argc; ++i) {
    if (ParseFlag(argv[i], "--random", &random_runs) || ParseFlag(argv[i], "--seed", &seed) ||
        ParseFlag(argv[i], "--max_len", &max_len)) {
      continue;
    }
    const std::filesystem::path path(argv[i]);
    std::vector<std::filesystem::path> files;
    if (std::filesystem::is_directory(path)) {
      for (const auto& entry : std::filesystem::directory_iterator(path)) {
        if (entry.is_regular_file()) files.push_back(entry.path());
      }
      std::sort(files.begin(), files.end());
    } else if (std::filesystem::is_regular_file(path)) {
      files.push_back(path);
    } else {
      std::fprintf(stderr, "replay: no such file or directory: %s\n", argv[i]);
      return 2;
    }
    for (const auto& file : files) corpus.push_back(ReadFile(file));
  }

  for (const auto& input : corpus) Run(input);
  std::printf("replay: %zu corpus inputs ok\n", corpus.size());

  std::mt19937_64 rng(seed);
  std::vector<uint8_t> input;
  for (uint64_t run = 0; run < random_runs; ++run) {
    if (!corpus.empty() && rng() % 2 == 0) {
      // Mutate a corpus entry: flip a few bytes, sometimes resize.
      input = corpus[rng() % corpus.size()];
      if (rng() % 4 == 0) input.resize(rng() % (max_len + 1));
      const int flips = 1 + static_cast<int>(rng() % 8);
      for (int f = 0; f < flips && !input.empty(); ++f) {
        input[rng() % input.size()] = static_cast<uint8_t>(rng());
      }
    } else {
      input.resize(rng() % (max_len + 1));
      for (auto& byte : input) byte = static_cast<uint8_t>(rng());
    }
    Run(input);
  }
  std::printf("replay: %llu generated inputs ok (seed %llu)\n",
              static_cast<unsigned long long>(random_runs), static_cast<unsigned long long>(seed));
  return 0;
}
