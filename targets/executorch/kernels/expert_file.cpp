#include "expert_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>

#include "expert_pack.h"

namespace ossedge {

void advise_random_range(const void* p, int64_t bytes) {
#ifdef MADV_RANDOM
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto start = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const auto end = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
  madvise(reinterpret_cast<void*>(start), end - start, MADV_RANDOM);  // a hint
#else
  (void)p, (void)bytes;
#endif
}

void advise_random(const std::string& path) {
#if defined(__linux__) && defined(MADV_RANDOM)
  char real[4096];
  if (realpath(path.c_str(), real) == nullptr) return;
  FILE* maps = std::fopen("/proc/self/maps", "r");
  if (maps == nullptr) return;
  char line[4608];
  while (std::fgets(line, sizeof line, maps) != nullptr) {
    unsigned long start = 0, end = 0;
    int name_at = 0;
    if (std::sscanf(line, "%lx-%lx %*s %*s %*s %*s %n", &start, &end, &name_at) < 2) continue;
    std::string name(line + name_at);
    while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
    if (name == real) madvise(reinterpret_cast<void*>(start), end - start, MADV_RANDOM);
  }
  std::fclose(maps);
#else
  (void)path;
#endif
}

int open_for_reads(const std::string& path, bool want_direct, bool* direct) {
  *direct = false;
#ifdef O_DIRECT
  if (want_direct) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
    if (fd >= 0) {
      // Some file systems accept the flag at open and refuse the reads: try one.
      void* probe = nullptr;
      if (posix_memalign(&probe, pack::kExtentAlign, pack::kExtentAlign) == 0) {
        const ssize_t n = pread(fd, probe, pack::kExtentAlign, 0);
        std::free(probe);
        if (n >= 0) {
          *direct = true;
          return fd;
        }
      }
      close(fd);
    }
  }
#endif
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
#ifdef F_NOCACHE
  if (fd >= 0 && want_direct && fcntl(fd, F_NOCACHE, 1) == 0) *direct = true;
#endif
  return fd;
}

}  // namespace ossedge
