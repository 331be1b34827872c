// CPU threading used by every CPU launcher: a blocking parallel-for over [0, n). Launchers call it
// with the GIL already released by the binding.
#pragma once
#include <cstdint>
#include <functional>

namespace gpfm {

// Runs fn(begin, end) over disjoint chunks of [0, n) on up to num_threads() threads and returns
// when all are done. The first exception thrown by a chunk is rethrown in the caller.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

int num_threads();
void set_num_threads(int n);  // n <= 0 restores the default (hardware concurrency)

}  // namespace gpfm
