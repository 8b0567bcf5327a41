// The file side of the expert cache: opening model.ptd for reads that bypass the page cache,
// and advising the program's own mappings of it. POSIX only; no ExecuTorch dependency.
#pragma once

#include <cstdint>
#include <string>

namespace ossedge {

// madvise(MADV_RANDOM) on the pages of [p, p + bytes) (a hint; a no-op where unsupported).
void advise_random_range(const void* p, int64_t bytes);

// Every mapping of `path` in this process advised MADV_RANDOM (Linux, Android): with the cache
// on, the program's mapped model.ptd serves only embedding rows and small tensors, page by page,
// and a fault must not read ahead megabytes of experts the cache reads itself.
void advise_random(const std::string& path);

// A read-only descriptor of `path`: O_DIRECT when `want_direct` and the file system serves such
// reads (F_NOCACHE on Apple), else a plain one; *direct says which. -1 (errno set) on failure.
int open_for_reads(const std::string& path, bool want_direct, bool* direct);

}  // namespace ossedge
