// Work split over XLA's own intra-op threads, shared by the native CPU kernels (ttt_cpu.cc,
// xent_cpu.cc).
#ifndef TTT_JAX_CSRC_PARALLEL_H_
#define TTT_JAX_CSRC_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

// Runs body(0), ..., body(parts - 1), each once, on the calling thread and on the workers of
// XLA's intra-op pool (the pool that runs XLA's own ops, so the kernels add no threads of
// their own to the machine). Every taker, the caller included, claims the next unclaimed part
// until none is left; the caller then waits only for parts that workers have already claimed.
// So the call finishes even when no worker is free (the caller runs every part itself), and a
// task that a worker starts after the call has returned claims nothing.
template <typename F>
void parallel_parts(xla::ffi::ThreadPool& pool, int64_t parts, F&& body) {
  if (parts <= 1) {
    if (parts == 1) body(0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto* fn = &body;  // dereferenced only for a claimed part, i.e. before the call returns
  auto take = [state, parts, fn] {
    for (int64_t i; (i = state->next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
      (*fn)(i);
      state->done.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  for (int64_t w = 1; w < parts; ++w) pool.Schedule(decltype(take)(take));  // a copy each
  take();
  while (state->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

// Items 0 .. items - 1 shared by up to `takers` of those threads: each taker runs
// `body(next_item)` once (so per-taker scratch is allocated once, not per item), and the body
// takes items `next_item()` until that returns `items` or more. A taker that starts late or
// runs slower takes fewer; every item is taken exactly once.
template <typename F>
void parallel_claims(xla::ffi::ThreadPool& pool, int64_t takers, int64_t items, F&& body) {
  std::atomic<int64_t> next{0};
  parallel_parts(pool, std::max<int64_t>(1, std::min(takers, items)), [&](int64_t) {
    body([&next] { return next.fetch_add(1, std::memory_order_relaxed); });
  });
}

#endif  // TTT_JAX_CSRC_PARALLEL_H_
