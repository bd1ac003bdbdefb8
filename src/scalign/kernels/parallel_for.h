// ParallelFor over the intra-op thread pool XLA hands to an FFI handler; shared by the kernels
// of this directory (decode_attention.cc, decode_matmul.cc).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace scalign {

// Runs f(a, b) over [0, n) split into one share per pool thread. Shares are claimed from a
// shared counter by the caller and by tasks scheduled on the pool; the caller keeps claiming
// until none is left, then waits only for shares other threads are already running. So the
// call finishes even when every pool thread is busy (two devices of one process calling this
// at once from the pool's own threads), and a task that starts late finds nothing to do. The
// state is shared-owned, so such a late task never touches the caller's freed stack.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const F& f) {
  int64_t parts = pool.num_threads();
  if (parts > n) parts = n;
  if (parts <= 1) {
    f(0, n);
    return;
  }
  struct State {
    State(const F& f, int64_t n, int64_t parts) : f(f), n(n), parts(parts) {}
    F f;
    const int64_t n, parts;
    std::atomic<int64_t> next{0}, done{0};
    void Work() {
      for (int64_t i = next.fetch_add(1); i < parts; i = next.fetch_add(1)) {
        f(n * i / parts, n * (i + 1) / parts);
        if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == parts) done.notify_all();
      }
    }
  };
  auto state = std::make_shared<State>(f, n, parts);
  for (int64_t i = 1; i < parts; ++i) pool.Schedule([state] { state->Work(); });
  state->Work();
  for (int64_t v = state->done.load(std::memory_order_acquire); v < parts;
       v = state->done.load(std::memory_order_acquire))
    state->done.wait(v, std::memory_order_acquire);
}

}  // namespace scalign
