// The softmax pass of the fused LM head on the CPU (ttt_jax/math/cross_entropy.py,
// docs/architecture.md §2): one chunk's logits become, in place, the derivative of its
// masked cross-entropy, and each token's loss is returned.
//
// Per token t with logits x (V floats), target y and weight m:
//
//   lse = max(x) + log(sum_j exp(x_j - max(x)))
//   loss_t = m * (lse - x_y)
//   x_j <- m * exp(x_j - lse) - m * [j == y]
//
// A row is 4 * V bytes (125 KiB at V = 32000) and stays in the core's L2 cache over its three
// passes (max; exp and sum; scale), where XLA makes each pass over the whole chunk. Rows are
// split over the threads. Targets outside [0, V) give a NaN loss and no one-hot term.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

float row_max(const float* x, int64_t n) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
  if (n >= 16) {
    v16 acc = load16(x);
    for (j = 16; j + 16 <= n; j += 16) {
      const v16 v = load16(x + j);
      acc = v > acc ? v : acc;
    }
    for (int i = 0; i < 16; ++i) m = std::max(m, acc[i]);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// x_j <- exp(max(x_j - shift, -87)); returns the sum.
float exp_in_place(float* x, int64_t n, float shift) {
  v16 acc = v16{};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    v16 v = load16(x + j) - shift;
    v = v < -87.f ? -87.f + v * 0.f : v;
    const v16 e = exp16<126>(v);
    store16(x + j, e);
    acc += e;
  }
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += acc[i];
  for (; j < n; ++j) {
    x[j] = std::exp(std::max(x[j] - shift, -87.f));
    s += x[j];
  }
  return s;
}

void scale(float* x, int64_t n, float c) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) store16(x + j, load16(x + j) * c);
  for (; j < n; ++j) x[j] *= c;
}

// One token's row; returns its weighted loss.
float row(float* x, int64_t n, int32_t target, float weight) {
  const bool in_range = target >= 0 && target < n;
  const float picked = in_range ? x[target] : std::numeric_limits<float>::quiet_NaN();
  const float mx = row_max(x, n);
  const float sum = exp_in_place(x, n, mx);
  const float lse = mx + std::log(sum);
  scale(x, n, weight / sum);
  if (in_range) x[target] -= weight;
  return weight * (lse - picked);
}

ffi::Error SoftmaxXent(ffi::ThreadPool pool,
                       ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets,
                       ffi::Buffer<ffi::F32> weights, int64_t threads,
                       ffi::ResultBuffer<ffi::F32> dlogits, ffi::ResultBuffer<ffi::F32> losses) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("softmax_xent: logits must be 2-D");
  const int64_t rows = dims[0], n = dims[1];
  float* out = dlogits->typed_data();
  if (out != logits.typed_data()) std::copy_n(logits.typed_data(), rows * n, out);
  const int32_t* y = targets.typed_data();
  const float* w = weights.typed_data();
  float* loss = losses->typed_data();
  parallel_claims(pool, threads, rows, [&](auto next_row) {
    for (int64_t r = next_row(); r < rows; r = next_row())
      loss[r] = row(out + r * n, n, y[r], w[r]);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TttSoftmaxXent, SoftmaxXent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits [rows, V]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // targets [rows]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weights [rows]
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dlogits (aliases logits)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // weighted loss [rows]
