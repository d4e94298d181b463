// The dual form over whole mini-batches on the CPU, forward and derivative, for TTT-Linear
// (Forward, Backward) and TTT-MLP (MlpForward, MlpBackward).
//
// One chain per (batch element, head): its inner weights stay in the core's cache for the
// whole sequence, every mini-batch is a few small loops, and the chains run on all cores at
// once. The math is that of ttt_step.dual_delta / ttt_step._dual_step_bwd_parts
// (docs/architecture.md §1.5-1.6); ttt_jax/math/cpu_kernel.py calls it through XLA's FFI and
// states the layouts. TTT-Linear's forward, per mini-batch:
//
//   Z = K W + bias;  G = LN-L2 gradient of Z against V - K;
//   zbar_i = Q_i W + bias - sum_{j<=i} tok_i lr_j (Q_i . K_j + 1) G_j;
//   W -= K^T (e G), bias -= sum_j e_j G_j  with e_j = tok_{b-1} lr_j.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Sizes of one call. x: [B, n, b, H, f]; lr: [B, n, b, H]; W: [B, H, f, f].
struct Dims {
  int64_t B, n, b, H, f;
  int64_t x_tok() const { return H * f; }  // stride between tokens of one head
  const float* x_at(const float* x, int64_t bi, int64_t t, int64_t h) const {
    return x + ((bi * n + t) * b) * H * f + h * f;
  }
  float* x_at(float* x, int64_t bi, int64_t t, int64_t h) const {
    return x + ((bi * n + t) * b) * H * f + h * f;
  }
  const float* lr_at(const float* lr, int64_t bi, int64_t t, int64_t h) const {
    return lr + ((bi * n + t) * b) * H + h;
  }
  float* lr_at(float* lr, int64_t bi, int64_t t, int64_t h) const {
    return lr + ((bi * n + t) * b) * H + h;
  }
};

// Copies b rows of f floats from rows `from` apart to rows `to` apart.
inline void copy_rows(const float* __restrict src, int64_t from, int64_t b, int64_t f,
                      float* __restrict dst, int64_t to) {
  for (int64_t i = 0; i < b; ++i) {
    const float* __restrict x = src + i * from;
    float* __restrict y = dst + i * to;
#pragma omp simd
    for (int64_t k = 0; k < f; ++k) y[k] = x[k];
  }
}

// out[j] += sum over the rows of X: [rows, n].
inline void col_sums(const float* __restrict X, int64_t rows, int64_t n, float* __restrict out) {
  for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += X[r * n + j];
}

// Loads b rows of f floats that lie `stride` apart into a dense [b, f] block.
inline void load_rows(const float* src, int64_t stride, int64_t b, int64_t f, float* dst) {
  copy_rows(src, stride, b, f, dst, f);
}

inline void store_rows(const float* src, int64_t b, int64_t f, float* dst, int64_t stride) {
  copy_rows(src, f, b, f, dst, stride);
}

// C += A M on a block of 16 V columns: A: [rows, inner], M: rows `ld` apart, C: rows `ld`
// apart (M and C point at the block's first column). Four rows at a time in registers.
template <int V>
inline void mm_acc_v(const float* __restrict A, int64_t rows, int64_t inner,
                     const float* __restrict M, float* __restrict C, int64_t ld) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    v16 acc[4][V];
    for (int q = 0; q < 4; ++q)
      for (int v = 0; v < V; ++v) acc[q][v] = load16(C + (r + q) * ld + 16 * v);
    for (int64_t k = 0; k < inner; ++k) {
      v16 m[V];
      for (int v = 0; v < V; ++v) m[v] = load16(M + k * ld + 16 * v);
      for (int q = 0; q < 4; ++q) {
        const float a = A[(r + q) * inner + k];
        for (int v = 0; v < V; ++v) acc[q][v] += a * m[v];
      }
    }
    for (int q = 0; q < 4; ++q)
      for (int v = 0; v < V; ++v) store16(C + (r + q) * ld + 16 * v, acc[q][v]);
  }
  for (; r < rows; ++r) {
    v16 acc[V];
    for (int v = 0; v < V; ++v) acc[v] = load16(C + r * ld + 16 * v);
    for (int64_t k = 0; k < inner; ++k) {
      const float a = A[r * inner + k];
      for (int v = 0; v < V; ++v) acc[v] += a * load16(M + k * ld + 16 * v);
    }
    for (int v = 0; v < V; ++v) store16(C + r * ld + 16 * v, acc[v]);
  }
}

// C += A M with A: [rows, inner], M: [inner, cols], C: [rows, cols], all dense row-major:
// blocks of 64 columns, then of 16, then one column at a time.
inline void mm_acc(const float* __restrict A, int64_t rows, int64_t inner,
                   const float* __restrict M, int64_t cols, float* __restrict C) {
  int64_t j = 0;
  for (; j + 64 <= cols; j += 64) mm_acc_v<4>(A, rows, inner, M + j, C + j, cols);
  for (; j + 16 <= cols; j += 16) mm_acc_v<1>(A, rows, inner, M + j, C + j, cols);
  if (j == cols) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < inner; ++k) {
      const float s = A[r * inner + k];
      for (int64_t q = j; q < cols; ++q) C[r * cols + q] += s * M[k * cols + q];
    }
}

// C = rows of init (a [cols] row) + A M.
inline void mm_bias(const float* A, int64_t rows, int64_t inner, const float* M, int64_t cols,
                    const float* init, float* C) {
  copy_rows(init, 0, rows, cols, C, cols);
  mm_acc(A, rows, inner, M, cols, C);
}

inline float dot(const float* __restrict x, const float* __restrict y, int64_t f) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < f; ++k) s += x[k] * y[k];
  return s;
}

inline float mean(const float* __restrict x, int64_t f) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < f; ++k) s += x[k];
  return s / static_cast<float>(f);
}

// One 16 x 16 block: rows of A `lda` apart to rows of T `ldt` apart, transposed in registers
// (four rounds, each swapping the off-diagonal blocks of size 8, 4, 2, 1 of every pair).
inline void transpose16(const float* __restrict A, int64_t lda, float* __restrict T,
                        int64_t ldt) {
  v16 r[16];
  for (int i = 0; i < 16; ++i) r[i] = load16(A + i * lda);
  for (int k = 8; k >= 1; k /= 2) {
    vi16 lo, hi;  // lo: [a's columns with bit k clear, then b's]; hi: the other halves
    for (int c = 0; c < 16; ++c) {
      lo[c] = (c & k) ? 16 + c - k : c;
      hi[c] = (c & k) ? 16 + c : c + k;
    }
    for (int i = 0; i < 16; ++i) {
      if (i & k) continue;
      const v16 a = r[i], b = r[i + k];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + k] = __builtin_shuffle(a, b, hi);
    }
  }
  for (int i = 0; i < 16; ++i) store16(T + i * ldt, r[i]);
}

// T = A^T for A: [rows, cols]; blocks of 16 x 16 in registers where both sizes allow.
inline void transpose(const float* __restrict A, int64_t rows, int64_t cols,
                      float* __restrict T) {
  if (rows % 16 == 0 && cols % 16 == 0) {
    for (int64_t i = 0; i < rows; i += 16)
      for (int64_t j = 0; j < cols; j += 16) transpose16(A + i * cols + j, cols, T + j * rows + i, rows);
    return;
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) T[j * rows + i] = A[i * cols + j];
}


// tanh(y) = (e^{2y} - 1) / (e^{2y} + 1), y clamped to [-9, 9] (tanh is +-1 in float beyond).
inline v16 tanh16(v16 y) {
  y = y < -9.f ? -9.f + y * 0.f : y;
  y = y > 9.f ? 9.f + y * 0.f : y;
  const v16 e = exp16(2.f * y);
  return (e - 1.f) / (e + 1.f);
}

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

// a = gelu_tanh(z) and, when gp is not null, gp = gelu_tanh'(z), for n values.
inline void gelu(const float* __restrict z, int64_t n, float* __restrict a,
                 float* __restrict gp) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 x = load16(z + i);
    const v16 t = tanh16(kGeluC * (x + kGeluA * x * x * x));
    store16(a + i, 0.5f * x * (1.f + t));
    if (gp)
      store16(gp + i, 0.5f * (1.f + t) +
                          0.5f * x * (1.f - t * t) * kGeluC * (1.f + 3.f * kGeluA * x * x));
  }
  for (; i < n; ++i) {
    const float x = z[i], t = std::tanh(kGeluC * (x + kGeluA * x * x * x));
    a[i] = 0.5f * x * (1.f + t);
    if (gp) gp[i] = 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kGeluC * (1.f + 3.f * kGeluA * x * x);
  }
}


// gelu_tanh''(z) = (1 - t^2) (u' + 3 a c z^2 - z t u'^2), t = tanh(u), u = c (z + a z^3),
// u' = c (1 + 3 a z^2); out = gelu_tanh''(z) * x * y for n values.
inline void gelu_dd_times(const float* __restrict z, const float* __restrict x,
                          const float* __restrict y, int64_t n, float* __restrict out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 v = load16(z + i);
    const v16 t = tanh16(kGeluC * (v + kGeluA * v * v * v));
    const v16 du = kGeluC * (1.f + 3.f * kGeluA * v * v);
    const v16 dd = (1.f - t * t) * (du + 3.f * kGeluA * kGeluC * v * v - v * t * du * du);
    store16(out + i, dd * load16(x + i) * load16(y + i));
  }
  for (; i < n; ++i) {
    const float v = z[i], t = std::tanh(kGeluC * (v + kGeluA * v * v * v));
    const float du = kGeluC * (1.f + 3.f * kGeluA * v * v);
    out[i] = (1.f - t * t) * (du + 3.f * kGeluA * kGeluC * v * v - v * t * du * du) * x[i] * y[i];
  }
}

// C += X^T Y over the rows: X: [rows, m], Y: [rows, n], C: [m, n].
inline void tn_acc(const float* __restrict X, int64_t rows, int64_t m,
                   const float* __restrict Y, int64_t n, float* __restrict C) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict y = Y + r * n;
    for (int64_t k = 0; k < m; ++k) {
      const float s = X[r * m + k];
      float* __restrict c = C + k * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) c[j] += s * y[j];
    }
  }
}

constexpr float kEps = 1e-6f;  // ttt_norm's eps (layernorm.TTT_NORM_EPS)

// The row statistics of the inner LayerNorm of one token and its loss gradient.
//   z: pre-LN output, t: target (v - k); writes xh (x_hat), g (gradient at x_hat), G (at z)
//   and returns 1/std; *c = mean(g * xh).
inline float ln_l2_grad(const float* z, const float* t, const float* w, const float* beta,
                        int64_t f, float* xh, float* g, float* G, float* c) {
  const float mu = mean(z, f);
  float var = 0.f;
#pragma omp simd reduction(+ : var)
  for (int64_t k = 0; k < f; ++k) var += (z[k] - mu) * (z[k] - mu);
  var /= static_cast<float>(f);
  const float r = 1.0f / std::sqrt(var + kEps);
  for (int64_t k = 0; k < f; ++k) {
    xh[k] = (z[k] - mu) * r;
    g[k] = (w[k] * xh[k] + beta[k] - t[k]) * w[k];
  }
  const float mg = mean(g, f);
  float mgx = 0.f;
#pragma omp simd reduction(+ : mgx)
  for (int64_t k = 0; k < f; ++k) mgx += g[k] * xh[k];
  mgx /= static_cast<float>(f);
  for (int64_t k = 0; k < f; ++k) G[k] = (g[k] - mg - xh[k] * mgx) * r;
  *c = mgx;
  return r;
}

// Scratch of one thread.
struct Work {
  std::vector<float> K, Q, T, Z, G, Zq, EG, XH, Gx, R, C, lr;
  explicit Work(int64_t b, int64_t f)
      : K(b * f), Q(b * f), T(b * f), Z(b * f), G(b * f), Zq(b * f), EG(b * f), XH(b * f),
        Gx(b * f), R(b), C(b), lr(b) {}
};

// Keys of one mini-batch at (W, bias): Z = K W + bias, G = the LN-L2 gradient (rows of Z
// against T = V - K), with each row's x_hat (XH), g (Gx), 1/std (R) and mean(g x_hat) (C).
inline void keys(const float* W, const float* bias, const float* lnw, const float* lnb,
                 int64_t b, int64_t f, const float* K, const float* T, float* Z, float* G,
                 float* XH, float* Gx, float* R, float* C) {
  mm_bias(K, b, f, W, f, bias, Z);
  for (int64_t i = 0; i < b; ++i)
    R[i] = ln_l2_grad(Z + i * f, T + i * f, lnw, lnb, f, XH + i * f, Gx + i * f, G + i * f,
                      C + i);
}

// W -= K^T (e G), bias -= sum_j e_j G_j; e_j = tok_last * lr_j.
inline void update(float* W, float* bias, const float* KT, const float* G, const float* lr,
                   float tok_last, int64_t b, int64_t f, float* EG) {
  for (int64_t j = 0; j < b; ++j) {
    const float e = -tok_last * lr[j];
#pragma omp simd
    for (int64_t k = 0; k < f; ++k) EG[j * f + k] = e * G[j * f + k];
  }
  mm_acc(KT, f, b, EG, f, W);
  col_sums(EG, b, f, bias);
}

// Mini-batch t of chain (bi, h): K, Q, T = V - K as dense [b, f] blocks, and its lr.
void load_frame(const Dims& d, const float* xq, const float* xk, const float* xv,
                const float* lr, int64_t bi, int64_t t, int64_t h, float* K, float* Q,
                float* T, float* lr_row) {
  const int64_t s = d.x_tok(), b = d.b, f = d.f;
  load_rows(d.x_at(xk, bi, t, h), s, b, f, K);
  load_rows(d.x_at(xq, bi, t, h), s, b, f, Q);
  const float* v = d.x_at(xv, bi, t, h);
  for (int64_t i = 0; i < b; ++i)
#pragma omp simd
    for (int64_t k = 0; k < f; ++k) T[i * f + k] = v[i * s + k] - K[i * f + k];
  const float* l = d.lr_at(lr, bi, t, h);
  for (int64_t i = 0; i < b; ++i) lr_row[i] = l[i * d.H];
}

// Chain c's block of `size` floats in an output, filled from the same block of `from`, or
// with zeros when `from` is null.
inline float* chain_block(ffi::ResultBuffer<ffi::F32>& out, const ffi::Buffer<ffi::F32>* from,
                          int64_t c, int64_t size) {
  float* dst = out->typed_data() + c * size;
  if (from)
    std::memcpy(dst, from->typed_data() + c * size, size * sizeof(float));
  else
    std::fill(dst, dst + size, 0.f);
  return dst;
}

ffi::Error Forward(ffi::ThreadPool pool,
                   ffi::Buffer<ffi::F32> w0, ffi::Buffer<ffi::F32> b0,
                   ffi::Buffer<ffi::F32> xq, ffi::Buffer<ffi::F32> xk,
                   ffi::Buffer<ffi::F32> xv, ffi::Buffer<ffi::F32> lr,
                   ffi::Buffer<ffi::F32> tok, ffi::Buffer<ffi::F32> lnw,
                   ffi::Buffer<ffi::F32> lnb, int64_t group, int64_t threads,
                   ffi::ResultBuffer<ffi::F32> w_out, ffi::ResultBuffer<ffi::F32> b_out,
                   ffi::ResultBuffer<ffi::F32> z_out, ffi::ResultBuffer<ffi::F32> w_starts,
                   ffi::ResultBuffer<ffi::F32> b_starts) {
  auto xd = xq.dimensions();
  if (xd.size() != 5) return ffi::Error::InvalidArgument("xq must be [B, n, b, H, f]");
  const Dims d{xd[0], xd[1], xd[2], xd[3], xd[4]};
  if (group < 1) return ffi::Error::InvalidArgument("group must be >= 1");
  const int64_t b = d.b, f = d.f;
  const float* tk = tok.typed_data();
  parallel_claims(pool, threads, d.B * d.H, [&](auto next_chain) {
    Work w(b, f);
    std::vector<float> lr_row(b), M(b * b), KT(f * b);
    for (int64_t c = next_chain(); c < d.B * d.H; c = next_chain()) {
      const int64_t bi = c / d.H, h = c % d.H;
      float* W = chain_block(w_out, &w0, c, f * f);
      float* bias = chain_block(b_out, &b0, c, f);
      const float* nw = lnw.typed_data() + h * f;
      const float* nb = lnb.typed_data() + h * f;
      for (int64_t t = 0; t < d.n; ++t) {
        if (t % group == 0) {
          const int64_t s = t / group;
          std::memcpy(w_starts->typed_data() + (s * d.B * d.H + c) * f * f, W,
                      f * f * sizeof(float));
          std::memcpy(b_starts->typed_data() + (s * d.B * d.H + c) * f, bias, f * sizeof(float));
        }
        load_frame(d, xq.typed_data(), xk.typed_data(), xv.typed_data(), lr.typed_data(), bi, t,
                   h, w.K.data(), w.Q.data(), w.T.data(), lr_row.data());
        keys(W, bias, nw, nb, b, f, w.K.data(), w.T.data(), w.Z.data(), w.G.data(), w.XH.data(),
             w.Gx.data(), w.R.data(), w.C.data());
        mm_bias(w.Q.data(), b, f, W, f, bias, w.Zq.data());
        transpose(w.K.data(), b, f, KT.data());
        std::fill(M.begin(), M.end(), 0.f);
        mm_acc(w.Q.data(), b, f, KT.data(), b, M.data());  // Q K^T
        for (int64_t i = 0; i < b; ++i)
          for (int64_t j = 0; j < b; ++j)
            M[i * b + j] = j <= i ? -tk[i] * lr_row[j] * (M[i * b + j] + 1.f) : 0.f;
        mm_acc(M.data(), b, b, w.G.data(), f, w.Zq.data());
        store_rows(w.Zq.data(), b, f, d.x_at(z_out->typed_data(), bi, t, h), d.x_tok());
        update(W, bias, KT.data(), w.G.data(), lr_row.data(), tk[b - 1], b, f, w.EG.data());
      }
    }
  });
  return ffi::Error::Success();
}


// The LayerNorm-L2 gradient's derivative for one token (docs/architecture.md §1.6): from dG,
// the cotangent of G, to dZ (of z) and dT (of the target), accumulating the norm's dw, dbeta.
// xh, g, r, c are the forward's (ln_l2_grad); y = w xh + beta - t.
inline void ln_l2_grad_vjp(const float* dG, const float* G, const float* xh, const float* g,
                           float r, float c, const float* t, const float* w, const float* beta,
                           int64_t f, float* u, float* dxh, float* dZ, float* dT, float* dw,
                           float* dbeta) {
  for (int64_t k = 0; k < f; ++k) u[k] = r * dG[k];
  const float mu = mean(u, f);
  const float mux = dot(u, xh, f) / static_cast<float>(f);
  for (int64_t k = 0; k < f; ++k) {
    const float dg = u[k] - mu - xh[k] * mux;
    const float y = w[k] * xh[k] + beta[k] - t[k];
    const float dy = dg * w[k];
    dw[k] += dg * y + dy * xh[k];
    dbeta[k] += dy;
    dT[k] = -dy;
    dxh[k] = dy * w[k] - c * u[k] - g[k] * mux;
  }
  const float md = mean(dxh, f);
  float mdx = 0.f;
#pragma omp simd reduction(+ : mdx)
  for (int64_t k = 0; k < f; ++k) mdx += dxh[k] * xh[k] + dG[k] * G[k];
  mdx /= static_cast<float>(f);
  for (int64_t k = 0; k < f; ++k) dZ[k] = r * (dxh[k] - md - xh[k] * mdx);
}

// The mask terms of one layer's queries in the derivative: from DM = dz G^T and the
// similarities S (xbar a^T), eta = tril(tok lr^T): accumulates d tok, d lr, and writes
// ds = -DM * eta (the cotangent of S) and negM = -eta (S + 1).
inline void mask_terms(const float* DM, const float* S, const float* tk, const float* lr_row,
                       int64_t b, int64_t H, float* dtk, float* dl, float* ds, float* negM) {
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < b; ++j) {
      const bool low = j <= i;
      const float eta = low ? tk[i] * lr_row[j] : 0.f;
      const float dm = low ? -DM[i * b + j] : 0.f;
      negM[i * b + j] = -eta * (S[i * b + j] + 1.f);
      const float deta = dm * (S[i * b + j] + 1.f);
      dtk[i] += deta * lr_row[j];
      dl[j * H] += deta * tk[i];
      ds[i * b + j] = dm * eta;
    }
}

// The derivative of one layer of the queries, zbar = xbar W + bias - M G with
// M = tril(tok lr^T) * (xbar a^T + 1) and S = xbar a^T (docs/architecture.md §1.6), from dz
// ([b, n_out]): writes d xbar ([b, n_in]) and accumulates dG, da (the keys' activations
// a: [b, n_in]), dW ([n_in, n_out]), dbias, d tok and d lr. WT: W^T ([n_out, n_in]).
// Scratch: GT (n_out * b), DM, DS, NM (b * b each).
inline void queries_bwd(const float* dz, const float* G, const float* S, const float* WT,
                        const float* a, const float* xbar, int64_t b, int64_t n_in,
                        int64_t n_out, const float* tk, const float* lr_row, int64_t H,
                        float* dtk, float* dl, float* dG, float* dxbar, float* da, float* dW,
                        float* dbias, float* GT, float* DM, float* DS, float* NM) {
  transpose(G, b, n_out, GT);
  std::fill(DM, DM + b * b, 0.f);
  mm_acc(dz, b, n_out, GT, b, DM);  // -dM
  mask_terms(DM, S, tk, lr_row, b, H, dtk, dl, DS, NM);
  tn_acc(NM, b, b, dz, n_out, dG);
  std::fill(dxbar, dxbar + b * n_in, 0.f);
  mm_acc(dz, b, n_out, WT, n_in, dxbar);
  mm_acc(DS, b, b, a, n_in, dxbar);
  tn_acc(DS, b, b, xbar, n_in, da);
  tn_acc(xbar, b, n_in, dz, n_out, dW);
  col_sums(dz, b, n_out, dbias);
}

ffi::Error Backward(ffi::ThreadPool pool,
                    ffi::Buffer<ffi::F32> w_starts, ffi::Buffer<ffi::F32> b_starts,
                    ffi::Buffer<ffi::F32> xq, ffi::Buffer<ffi::F32> xk,
                    ffi::Buffer<ffi::F32> xv, ffi::Buffer<ffi::F32> lr,
                    ffi::Buffer<ffi::F32> tok, ffi::Buffer<ffi::F32> lnw,
                    ffi::Buffer<ffi::F32> lnb, ffi::Buffer<ffi::F32> dw_end,
                    ffi::Buffer<ffi::F32> db_end, ffi::Buffer<ffi::F32> dzb, int64_t group,
                    int64_t threads,
                    ffi::ResultBuffer<ffi::F32> dw0, ffi::ResultBuffer<ffi::F32> db0,
                    ffi::ResultBuffer<ffi::F32> dxq, ffi::ResultBuffer<ffi::F32> dxk,
                    ffi::ResultBuffer<ffi::F32> dxv, ffi::ResultBuffer<ffi::F32> dlr,
                    ffi::ResultBuffer<ffi::F32> dtok, ffi::ResultBuffer<ffi::F32> dlnw,
                    ffi::ResultBuffer<ffi::F32> dlnb) {
  auto xd = xq.dimensions();
  if (xd.size() != 5) return ffi::Error::InvalidArgument("xq must be [B, n, b, H, f]");
  const Dims d{xd[0], xd[1], xd[2], xd[3], xd[4]};
  if (group < 1) return ffi::Error::InvalidArgument("group must be >= 1");
  const int64_t b = d.b, f = d.f, ng = (d.n + group - 1) / group, chains = d.B * d.H;
  if (w_starts.dimensions().size() != 5 || w_starts.dimensions()[0] != ng)
    return ffi::Error::InvalidArgument("W at group starts must be [ceil(n / group), B, H, f, f]");
  const float* tk = tok.typed_data();
  const float tok_last = tk[b - 1];
  parallel_claims(pool, threads, chains, [&](auto next_chain) {
    const int64_t bf = b * f, ff = f * f;
    std::vector<float> GT(f * b), dWnT(ff), W(ff), bias(f), EGu(bf), Z(bf);
    std::vector<float> S(b * b), DM(b * b), DS(b * b), NM(b * b);
    std::vector<float> adw(bf), dG(bf), EG(bf), da(bf), dq(bf), dz(bf), dZ(bf), dT(bf);
    std::vector<float> u(f), dxh(f);
    // Per mini-batch of the group being differentiated: its inputs, its start state
    // (transposed: the derivative reads W only as W^T) and its keys' LN-L2 gradients.
    std::vector<float> Ks(group * bf), KTs(group * bf), Qs(group * bf), Ts(group * bf);
    std::vector<float> lrs(group * b), WTs(group * ff), Gs(group * bf), XHs(group * bf);
    std::vector<float> Gxs(group * bf), Rs(group * b), Cs(group * b);
    for (int64_t c = next_chain(); c < chains; c = next_chain()) {
      const int64_t bi = c / d.H, h = c % d.H;
      float* dW = chain_block(dw0, &dw_end, c, ff);  // carried cotangent of the state
      float* dbias = chain_block(db0, &db_end, c, f);
      float* dtk = chain_block(dtok, nullptr, c, b);
      float* dnw = chain_block(dlnw, nullptr, c, f);
      float* dnb = chain_block(dlnb, nullptr, c, f);
      const float* nw = lnw.typed_data() + h * f;
      const float* nb = lnb.typed_data() + h * f;
      for (int64_t s = ng - 1; s >= 0; --s) {
        const int64_t t0 = s * group, t1 = std::min(d.n, t0 + group);
        // Recompute the group's states forward from its kept start.
        std::memcpy(W.data(), w_starts.typed_data() + (s * chains + c) * ff, ff * sizeof(float));
        std::memcpy(bias.data(), b_starts.typed_data() + (s * chains + c) * f, f * sizeof(float));
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t k = t - t0;
          float *K = Ks.data() + k * bf, *KT = KTs.data() + k * bf, *T = Ts.data() + k * bf;
          float *G = Gs.data() + k * bf, *lr_k = lrs.data() + k * b;
          load_frame(d, xq.typed_data(), xk.typed_data(), xv.typed_data(), lr.typed_data(), bi,
                     t, h, K, Qs.data() + k * bf, T, lr_k);
          keys(W.data(), bias.data(), nw, nb, b, f, K, T, Z.data(), G, XHs.data() + k * bf,
               Gxs.data() + k * bf, Rs.data() + k * b, Cs.data() + k * b);
          transpose(W.data(), f, f, WTs.data() + k * ff);
          transpose(K, b, f, KT);
          if (t + 1 < t1)
            update(W.data(), bias.data(), KT, G, lr_k, tok_last, b, f, EGu.data());
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t k = t - t0;
          const float* WT = WTs.data() + k * ff;
          const float *K = Ks.data() + k * bf, *KT = KTs.data() + k * bf;
          const float *Q = Qs.data() + k * bf, *T = Ts.data() + k * bf;
          const float *G = Gs.data() + k * bf, *XH = XHs.data() + k * bf;
          const float *Gx = Gxs.data() + k * bf, *R = Rs.data() + k * b, *C = Cs.data() + k * b;
          const float* lr_row = lrs.data() + k * b;
          load_rows(d.x_at(dzb.typed_data(), bi, t, h), d.x_tok(), b, f, dz.data());
          transpose(dW, f, f, dWnT.data());
          // The update W' = W - K^T (e G), bias' = bias - e G, read with the next cotangent.
          mm_bias(K, b, f, dW, f, dbias, adw.data());
          float* dl = d.lr_at(dlr->typed_data(), bi, t, h);
          float de_lr = 0.f;
          for (int64_t j = 0; j < b; ++j) {
            const float e = tok_last * lr_row[j];
            const float de = -dot(adw.data() + j * f, G + j * f, f);
            dl[j * d.H] = de * tok_last;
            de_lr += de * lr_row[j];
            for (int64_t q = 0; q < f; ++q) {
              dG[j * f + q] = -e * adw[j * f + q];
              EG[j * f + q] = -e * G[j * f + q];
            }
          }
          dtk[b - 1] += de_lr;
          std::fill(da.begin(), da.end(), 0.f);
          mm_acc(EG.data(), b, f, dWnT.data(), f, da.data());
          // The queries: zbar = Q W + bias - M G, M = tril(tok lr^T) * (Q K^T + 1).
          std::fill(S.begin(), S.end(), 0.f);
          mm_acc(Q, b, f, KT, b, S.data());
          queries_bwd(dz.data(), G, S.data(), WT, K, Q, b, f, f, tk, lr_row, d.H, dtk, dl,
                      dG.data(), dq.data(), da.data(), dW, dbias, GT.data(), DM.data(),
                      DS.data(), NM.data());
          // The keys: Z = K W + bias, G = the LN-L2 gradient of Z against T = V - K.
          for (int64_t j = 0; j < b; ++j)
            ln_l2_grad_vjp(dG.data() + j * f, G + j * f, XH + j * f, Gx + j * f,
                           R[j], C[j], T + j * f, nw, nb, f, u.data(), dxh.data(),
                           dZ.data() + j * f, dT.data() + j * f, dnw, dnb);
          mm_acc(dZ.data(), b, f, WT, f, da.data());
          // The step's own cotangent of its start state, added to the carried one.
          mm_acc(KT, f, b, dZ.data(), f, dW);
          col_sums(dZ.data(), b, f, dbias);
          for (int64_t i = 0; i < bf; ++i) da[i] -= dT[i];  // dK = da - dT (T = V - K)
          store_rows(dq.data(), b, f, d.x_at(dxq->typed_data(), bi, t, h), d.x_tok());
          store_rows(da.data(), b, f, d.x_at(dxk->typed_data(), bi, t, h), d.x_tok());
          store_rows(dT.data(), b, f, d.x_at(dxv->typed_data(), bi, t, h), d.x_tok());
        }
      }
    }
  });
  return ffi::Error::Success();
}


// TTT-MLP's forward (f -> h -> f, gelu_tanh between): the math of ttt_step.dual_delta for two
// layers. Outputs as Forward's, for both layers; the group starts of each leaf.
ffi::Error MlpForward(ffi::ThreadPool pool,
                      ffi::Buffer<ffi::F32> w1_0, ffi::Buffer<ffi::F32> b1_0,
                      ffi::Buffer<ffi::F32> w2_0, ffi::Buffer<ffi::F32> b2_0,
                      ffi::Buffer<ffi::F32> xq, ffi::Buffer<ffi::F32> xk,
                      ffi::Buffer<ffi::F32> xv, ffi::Buffer<ffi::F32> lr,
                      ffi::Buffer<ffi::F32> tok, ffi::Buffer<ffi::F32> lnw,
                      ffi::Buffer<ffi::F32> lnb, int64_t group, int64_t threads,
                      ffi::ResultBuffer<ffi::F32> w1_out, ffi::ResultBuffer<ffi::F32> b1_out,
                      ffi::ResultBuffer<ffi::F32> w2_out, ffi::ResultBuffer<ffi::F32> b2_out,
                      ffi::ResultBuffer<ffi::F32> z_out, ffi::ResultBuffer<ffi::F32> w1_starts,
                      ffi::ResultBuffer<ffi::F32> b1_starts,
                      ffi::ResultBuffer<ffi::F32> w2_starts,
                      ffi::ResultBuffer<ffi::F32> b2_starts) {
  auto xd = xq.dimensions();
  if (xd.size() != 5) return ffi::Error::InvalidArgument("xq must be [B, n, b, H, f]");
  const Dims d{xd[0], xd[1], xd[2], xd[3], xd[4]};
  if (group < 1) return ffi::Error::InvalidArgument("group must be >= 1");
  auto wd = w1_0.dimensions();
  if (wd.size() != 4 || wd[2] != d.f) return ffi::Error::InvalidArgument("W1 must be [B, H, f, h]");
  const int64_t b = d.b, f = d.f, h = wd[3], fh = f * h, chains = d.B * d.H;
  const float* tk = tok.typed_data();
  const float tok_last = tk[b - 1];
  parallel_claims(pool, threads, chains, [&](auto next_chain) {
    std::vector<float> K(b * f), Q(b * f), T(b * f), lr_row(b), KT(f * b);
    std::vector<float> Z1(b * h), A(b * h), GP(b * h), AT(h * b), Z2(b * f), G2(b * f);
    std::vector<float> G1(b * h), Zq1(b * h), X2(b * h), Zq2(b * f), M(b * b);
    std::vector<float> EG1(b * h), EG2(b * f), EG2T(f * b), W2T(fh), XH(f), Gx(f);
    for (int64_t c = next_chain(); c < chains; c = next_chain()) {
      const int64_t bi = c / d.H, hd = c % d.H;
      float* W1 = chain_block(w1_out, &w1_0, c, fh);
      float* B1 = chain_block(b1_out, &b1_0, c, h);
      float* W2 = chain_block(w2_out, &w2_0, c, fh);
      float* B2 = chain_block(b2_out, &b2_0, c, f);
      transpose(W2, h, f, W2T.data());
      const float* nw = lnw.typed_data() + hd * f;
      const float* nb = lnb.typed_data() + hd * f;
      for (int64_t t = 0; t < d.n; ++t) {
        if (t % group == 0) {
          const int64_t s = (t / group) * chains + c;
          std::memcpy(w1_starts->typed_data() + s * fh, W1, fh * sizeof(float));
          std::memcpy(b1_starts->typed_data() + s * h, B1, h * sizeof(float));
          std::memcpy(w2_starts->typed_data() + s * fh, W2, fh * sizeof(float));
          std::memcpy(b2_starts->typed_data() + s * f, B2, f * sizeof(float));
        }
        load_frame(d, xq.typed_data(), xk.typed_data(), xv.typed_data(), lr.typed_data(), bi, t,
                   hd, K.data(), Q.data(), T.data(), lr_row.data());
        // Keys: Z1 = K W1 + b1, A = gelu(Z1), Z2 = A W2 + b2; G2 = the LN-L2 gradient of Z2,
        // G1 = (G2 W2^T) * gelu'(Z1).
        mm_bias(K.data(), b, f, W1, h, B1, Z1.data());
        gelu(Z1.data(), b * h, A.data(), GP.data());
        mm_bias(A.data(), b, h, W2, f, B2, Z2.data());
        float cc;
        for (int64_t i = 0; i < b; ++i)
          ln_l2_grad(Z2.data() + i * f, T.data() + i * f, nw, nb, f, XH.data(), Gx.data(),
                     G2.data() + i * f, &cc);
        std::fill(G1.begin(), G1.end(), 0.f);
        mm_acc(G2.data(), b, f, W2T.data(), h, G1.data());
        for (int64_t i = 0; i < b * h; ++i) G1[i] *= GP[i];
        // Queries: Zq1 = Q W1 + b1 - M1 G1, X2 = gelu(Zq1), Zq2 = X2 W2 + b2 - M2 G2 with
        // M_l = tril(tok lr^T) * (xbar_l a_l^T + 1).
        transpose(K.data(), b, f, KT.data());
        transpose(A.data(), b, h, AT.data());
        mm_bias(Q.data(), b, f, W1, h, B1, Zq1.data());
        std::fill(M.begin(), M.end(), 0.f);
        mm_acc(Q.data(), b, f, KT.data(), b, M.data());
        for (int64_t i = 0; i < b; ++i)
          for (int64_t j = 0; j < b; ++j)
            M[i * b + j] = j <= i ? -tk[i] * lr_row[j] * (M[i * b + j] + 1.f) : 0.f;
        mm_acc(M.data(), b, b, G1.data(), h, Zq1.data());
        gelu(Zq1.data(), b * h, X2.data(), nullptr);
        mm_bias(X2.data(), b, h, W2, f, B2, Zq2.data());
        std::fill(M.begin(), M.end(), 0.f);
        mm_acc(X2.data(), b, h, AT.data(), b, M.data());
        for (int64_t i = 0; i < b; ++i)
          for (int64_t j = 0; j < b; ++j)
            M[i * b + j] = j <= i ? -tk[i] * lr_row[j] * (M[i * b + j] + 1.f) : 0.f;
        mm_acc(M.data(), b, b, G2.data(), f, Zq2.data());
        store_rows(Zq2.data(), b, f, d.x_at(z_out->typed_data(), bi, t, hd), d.x_tok());
        // The update: W1 -= K^T (e G1), W2 -= A^T (e G2) (and W2^T with it), biases e G.
        for (int64_t j = 0; j < b; ++j) {
          const float e = -tok_last * lr_row[j];
          for (int64_t q = 0; q < h; ++q) EG1[j * h + q] = e * G1[j * h + q];
          for (int64_t q = 0; q < f; ++q) EG2[j * f + q] = e * G2[j * f + q];
        }
        mm_acc(KT.data(), f, b, EG1.data(), h, W1);
        mm_acc(AT.data(), h, b, EG2.data(), f, W2);
        transpose(EG2.data(), b, f, EG2T.data());
        mm_acc(EG2T.data(), f, b, A.data(), h, W2T.data());
        for (int64_t j = 0; j < b; ++j) {
          for (int64_t q = 0; q < h; ++q) B1[q] += EG1[j * h + q];
          for (int64_t q = 0; q < f; ++q) B2[q] += EG2[j * f + q];
        }
      }
    }
  });
  return ffi::Error::Success();
}



// TTT-MLP's derivative: the math of ttt_step._dual_step_bwd_parts for two layers, each group
// recomputed forward from its kept start as Backward does.
ffi::Error MlpBackward(ffi::ThreadPool pool,
                       ffi::Buffer<ffi::F32> w1_starts, ffi::Buffer<ffi::F32> b1_starts,
                       ffi::Buffer<ffi::F32> w2_starts, ffi::Buffer<ffi::F32> b2_starts,
                       ffi::Buffer<ffi::F32> xq, ffi::Buffer<ffi::F32> xk,
                       ffi::Buffer<ffi::F32> xv, ffi::Buffer<ffi::F32> lr,
                       ffi::Buffer<ffi::F32> tok, ffi::Buffer<ffi::F32> lnw,
                       ffi::Buffer<ffi::F32> lnb, ffi::Buffer<ffi::F32> dw1_end,
                       ffi::Buffer<ffi::F32> db1_end, ffi::Buffer<ffi::F32> dw2_end,
                       ffi::Buffer<ffi::F32> db2_end, ffi::Buffer<ffi::F32> dzb, int64_t group,
                       int64_t threads, ffi::ResultBuffer<ffi::F32> dw1_0,
                       ffi::ResultBuffer<ffi::F32> db1_0, ffi::ResultBuffer<ffi::F32> dw2_0,
                       ffi::ResultBuffer<ffi::F32> db2_0, ffi::ResultBuffer<ffi::F32> dxq,
                       ffi::ResultBuffer<ffi::F32> dxk, ffi::ResultBuffer<ffi::F32> dxv,
                       ffi::ResultBuffer<ffi::F32> dlr, ffi::ResultBuffer<ffi::F32> dtok,
                       ffi::ResultBuffer<ffi::F32> dlnw, ffi::ResultBuffer<ffi::F32> dlnb) {
  auto xd = xq.dimensions();
  if (xd.size() != 5) return ffi::Error::InvalidArgument("xq must be [B, n, b, H, f]");
  const Dims d{xd[0], xd[1], xd[2], xd[3], xd[4]};
  if (group < 1) return ffi::Error::InvalidArgument("group must be >= 1");
  auto wd = w1_starts.dimensions();
  const int64_t ng = (d.n + group - 1) / group, chains = d.B * d.H;
  if (wd.size() != 5 || wd[0] != ng || wd[3] != d.f)
    return ffi::Error::InvalidArgument("W1 at group starts must be [ceil(n / group), B, H, f, h]");
  const int64_t b = d.b, f = d.f, h = wd[4], fh = f * h, bf = b * f, bh = b * h, bb = b * b;
  const float* tk = tok.typed_data();
  const float tok_last = tk[b - 1];
  parallel_claims(pool, threads, chains, [&](auto next_chain) {
    // Running state of the recomputation.
    std::vector<float> W1(fh), B1(h), W2(fh), B2(f), W2T(fh);
    // Per mini-batch of the group (see the recomputation below for what each holds).
    std::vector<float> Ks(group * bf), Qs(group * bf), Ts(group * bf), lrs(group * b);
    std::vector<float> Z1s(group * bh), As(group * bh), GP1s(group * bh), BK2s(group * bh);
    std::vector<float> G1s(group * bh), G2s(group * bf), XHs(group * bf), Gxs(group * bf);
    std::vector<float> Rs(group * b), Cs(group * b), X2s(group * bh), GPQs(group * bh);
    std::vector<float> S0s(group * bb), S1s(group * bb), W1Ts(group * fh), W2s(group * fh);
    std::vector<float> W2Ts(group * fh);
    // Scratch.
    std::vector<float> Z2(bf), KT(bf), AT(bh), Zq1(bh), M(bb), EG1(bh), EG2(bf), EG2T(bf);
    std::vector<float> adw1(bh), adw2(bf), dG1(bh), dG2(bf), das0(bf), das1(bh), dW1T(fh);
    std::vector<float> dW2T(fh), dz2(bf), GT(bh), DM(bb), DS(bb), NM(bb), dxbar(bh);
    std::vector<float> dz1(bh), dq(bf), dback(bh), dZ1(bh), dZ2(bf), dT(bf), u(f), dxh(f);
    for (int64_t c = next_chain(); c < chains; c = next_chain()) {
      const int64_t bi = c / d.H, hd = c % d.H;
      float* dW1 = chain_block(dw1_0, &dw1_end, c, fh);
      float* dB1 = chain_block(db1_0, &db1_end, c, h);
      float* dW2 = chain_block(dw2_0, &dw2_end, c, fh);
      float* dB2 = chain_block(db2_0, &db2_end, c, f);
      float* dtk = chain_block(dtok, nullptr, c, b);
      float* dnw = chain_block(dlnw, nullptr, c, f);
      float* dnb = chain_block(dlnb, nullptr, c, f);
      const float* nw = lnw.typed_data() + hd * f;
      const float* nb = lnb.typed_data() + hd * f;
      for (int64_t s = ng - 1; s >= 0; --s) {
        const int64_t t0 = s * group, t1 = std::min(d.n, t0 + group);
        const int64_t at = s * chains + c;
        std::memcpy(W1.data(), w1_starts.typed_data() + at * fh, fh * sizeof(float));
        std::memcpy(B1.data(), b1_starts.typed_data() + at * h, h * sizeof(float));
        std::memcpy(W2.data(), w2_starts.typed_data() + at * fh, fh * sizeof(float));
        std::memcpy(B2.data(), b2_starts.typed_data() + at * f, f * sizeof(float));
        transpose(W2.data(), h, f, W2T.data());
        for (int64_t t = t0; t < t1; ++t) {  // the group's steps forward, keeping what's read
          const int64_t k = t - t0;
          float *K = Ks.data() + k * bf, *Q = Qs.data() + k * bf, *T = Ts.data() + k * bf;
          float *lr_k = lrs.data() + k * b, *Z1 = Z1s.data() + k * bh, *A = As.data() + k * bh;
          float *GP1 = GP1s.data() + k * bh, *BK2 = BK2s.data() + k * bh;
          float *G1 = G1s.data() + k * bh, *G2 = G2s.data() + k * bf;
          float *X2 = X2s.data() + k * bh, *GPQ = GPQs.data() + k * bh;
          float *S0 = S0s.data() + k * bb, *S1 = S1s.data() + k * bb;
          load_frame(d, xq.typed_data(), xk.typed_data(), xv.typed_data(), lr.typed_data(), bi,
                     t, hd, K, Q, T, lr_k);
          // Keys: Z1, A = gelu(Z1), GP1 = gelu'(Z1), G2 (LN-L2 at Z2), BK2 = G2 W2^T,
          // G1 = BK2 * GP1.
          mm_bias(K, b, f, W1.data(), h, B1.data(), Z1);
          gelu(Z1, bh, A, GP1);
          mm_bias(A, b, h, W2.data(), f, B2.data(), Z2.data());
          for (int64_t i = 0; i < b; ++i)
            Rs[k * b + i] = ln_l2_grad(Z2.data() + i * f, T + i * f, nw, nb, f,
                                       XHs.data() + k * bf + i * f, Gxs.data() + k * bf + i * f,
                                       G2 + i * f, Cs.data() + k * b + i);
          std::fill(BK2, BK2 + bh, 0.f);
          mm_acc(G2, b, f, W2T.data(), h, BK2);
          for (int64_t i = 0; i < bh; ++i) G1[i] = BK2[i] * GP1[i];
          // Queries' first layer: S0 = Q K^T, Zq1 = Q W1 + b1 - M0 G1, X2 = gelu(Zq1),
          // GPQ = gelu'(Zq1); S1 = X2 A^T.
          transpose(K, b, f, KT.data());
          transpose(A, b, h, AT.data());
          std::fill(S0, S0 + bb, 0.f);
          mm_acc(Q, b, f, KT.data(), b, S0);
          for (int64_t i = 0; i < b; ++i)
            for (int64_t j = 0; j < b; ++j)
              M[i * b + j] = j <= i ? -tk[i] * lr_k[j] * (S0[i * b + j] + 1.f) : 0.f;
          mm_bias(Q, b, f, W1.data(), h, B1.data(), Zq1.data());
          mm_acc(M.data(), b, b, G1, h, Zq1.data());
          gelu(Zq1.data(), bh, X2, GPQ);
          std::fill(S1, S1 + bb, 0.f);
          mm_acc(X2, b, h, AT.data(), b, S1);
          transpose(W1.data(), f, h, W1Ts.data() + k * fh);
          std::memcpy(W2s.data() + k * fh, W2.data(), fh * sizeof(float));
          std::memcpy(W2Ts.data() + k * fh, W2T.data(), fh * sizeof(float));
          if (t + 1 < t1) {
            for (int64_t j = 0; j < b; ++j) {
              const float e = -tok_last * lr_k[j];
              for (int64_t q = 0; q < h; ++q) EG1[j * h + q] = e * G1[j * h + q];
              for (int64_t q = 0; q < f; ++q) EG2[j * f + q] = e * G2[j * f + q];
            }
            mm_acc(KT.data(), f, b, EG1.data(), h, W1.data());
            mm_acc(AT.data(), h, b, EG2.data(), f, W2.data());
            transpose(EG2.data(), b, f, EG2T.data());
            mm_acc(EG2T.data(), f, b, A, h, W2T.data());
            col_sums(EG1.data(), b, h, B1.data());
            col_sums(EG2.data(), b, f, B2.data());
          }
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t k = t - t0;
          const float *K = Ks.data() + k * bf, *Q = Qs.data() + k * bf, *T = Ts.data() + k * bf;
          const float *lr_row = lrs.data() + k * b, *Z1 = Z1s.data() + k * bh;
          const float *A = As.data() + k * bh, *GP1 = GP1s.data() + k * bh;
          const float *BK2 = BK2s.data() + k * bh, *G1 = G1s.data() + k * bh;
          const float *G2 = G2s.data() + k * bf, *XH = XHs.data() + k * bf;
          const float *Gx = Gxs.data() + k * bf, *R = Rs.data() + k * b, *C = Cs.data() + k * b;
          const float *X2 = X2s.data() + k * bh, *GPQ = GPQs.data() + k * bh;
          const float *S0 = S0s.data() + k * bb, *S1 = S1s.data() + k * bb;
          const float *W1T = W1Ts.data() + k * fh, *W2 = W2s.data() + k * fh;
          const float *W2Tk = W2Ts.data() + k * fh;
          float* dl = d.lr_at(dlr->typed_data(), bi, t, hd);
          // The update, read with the carried (next) cotangents.
          mm_bias(K, b, f, dW1, h, dB1, adw1.data());
          mm_bias(A, b, h, dW2, f, dB2, adw2.data());
          float de_lr = 0.f;
          for (int64_t j = 0; j < b; ++j) {
            const float e = tok_last * lr_row[j];
            const float de = -(dot(adw1.data() + j * h, G1 + j * h, h) +
                               dot(adw2.data() + j * f, G2 + j * f, f));
            dl[j * d.H] = de * tok_last;
            de_lr += de * lr_row[j];
            for (int64_t q = 0; q < h; ++q) {
              dG1[j * h + q] = -e * adw1[j * h + q];
              EG1[j * h + q] = -e * G1[j * h + q];
            }
            for (int64_t q = 0; q < f; ++q) {
              dG2[j * f + q] = -e * adw2[j * f + q];
              EG2[j * f + q] = -e * G2[j * f + q];
            }
          }
          dtk[b - 1] += de_lr;
          transpose(dW1, f, h, dW1T.data());
          transpose(dW2, h, f, dW2T.data());
          std::fill(das0.begin(), das0.end(), 0.f);
          mm_acc(EG1.data(), b, h, dW1T.data(), f, das0.data());
          std::fill(das1.begin(), das1.end(), 0.f);
          mm_acc(EG2.data(), b, f, dW2T.data(), h, das1.data());
          // The queries' second layer: zbar = X2 W2 + b2 - M1 G2.
          load_rows(d.x_at(dzb.typed_data(), bi, t, hd), d.x_tok(), b, f, dz2.data());
          queries_bwd(dz2.data(), G2, S1, W2Tk, A, X2, b, h, f, tk, lr_row, d.H, dtk, dl,
                      dG2.data(), dxbar.data(), das1.data(), dW2, dB2, GT.data(), DM.data(),
                      DS.data(), NM.data());
          for (int64_t i = 0; i < bh; ++i) dz1[i] = dxbar[i] * GPQ[i];
          // The queries' first layer: Zq1 = Q W1 + b1 - M0 G1.
          queries_bwd(dz1.data(), G1, S0, W1T, K, Q, b, f, h, tk, lr_row, d.H, dtk, dl,
                      dG1.data(), dq.data(), das0.data(), dW1, dB1, GT.data(), DM.data(),
                      DS.data(), NM.data());
          // The inner gradients' chain G1 = (G2 W2^T) * gelu'(Z1).
          for (int64_t i = 0; i < bh; ++i) dback[i] = dG1[i] * GP1[i];
          mm_acc(dback.data(), b, h, W2, f, dG2.data());
          tn_acc(dback.data(), b, h, G2, f, dW2);
          gelu_dd_times(Z1, dG1.data(), BK2, bh, dZ1.data());
          // The keys: Z2 = A W2 + b2 through the LN-L2 gradient, then Z1 = K W1 + b1.
          std::fill(dT.begin(), dT.end(), 0.f);
          for (int64_t j = 0; j < b; ++j)
            ln_l2_grad_vjp(dG2.data() + j * f, G2 + j * f, XH + j * f, Gx + j * f, R[j], C[j],
                           T + j * f, nw, nb, f, u.data(), dxh.data(), dZ2.data() + j * f,
                           dT.data() + j * f, dnw, dnb);
          tn_acc(A, b, h, dZ2.data(), f, dW2);
          col_sums(dZ2.data(), b, f, dB2);
          mm_acc(dZ2.data(), b, f, W2Tk, h, das1.data());
          for (int64_t i = 0; i < bh; ++i) dZ1[i] += das1[i] * GP1[i];
          tn_acc(K, b, f, dZ1.data(), h, dW1);
          col_sums(dZ1.data(), b, h, dB1);
          mm_acc(dZ1.data(), b, h, W1T, f, das0.data());
          for (int64_t i = 0; i < bf; ++i) das0[i] -= dT[i];  // dK = da - dT (T = V - K)
          store_rows(dq.data(), b, f, d.x_at(dxq->typed_data(), bi, t, hd), d.x_tok());
          store_rows(das0.data(), b, f, d.x_at(dxk->typed_data(), bi, t, hd), d.x_tok());
          store_rows(dT.data(), b, f, d.x_at(dxv->typed_data(), bi, t, hd), d.x_tok());
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TttLinearForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W  [B, H, f, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias [B, H, 1, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xq [B, n, b, H, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xk
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lr [B, n, b, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tok [b]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ln weight [H, 1, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ln bias [H, 1, f]
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // W after the last step
                                  .Ret<ffi::Buffer<ffi::F32>>()   // bias after
                                  .Ret<ffi::Buffer<ffi::F32>>()   // z_bar [B, n, b, H, f]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // W at group starts
                                  .Ret<ffi::Buffer<ffi::F32>>());  // bias at group starts

XLA_FFI_DEFINE_HANDLER_SYMBOL(TttLinearBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W at group starts
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias at group starts
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xq
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xk
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lr
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tok
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ln weight
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ln bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cotangent of the end W
                                  .Arg<ffi::Buffer<ffi::F32>>()  // of the end bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // of z_bar
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d W0 [B, H, f, f]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d bias0 [B, H, 1, f]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d xq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d xk
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d xv
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d lr
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d tok per chain [B, H, b]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d ln weight [B, H, f]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d ln bias [B, H, f]

XLA_FFI_DEFINE_HANDLER_SYMBOL(TttMlpForward, MlpForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W1 [B, H, f, h]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b1 [B, H, 1, h]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W2 [B, H, h, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b2 [B, H, 1, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xq [B, n, b, H, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xk
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lr [B, n, b, H]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tok [b]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ln weight [H, 1, f]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ln bias [H, 1, f]
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // W1 after the last step
                                  .Ret<ffi::Buffer<ffi::F32>>()   // b1
                                  .Ret<ffi::Buffer<ffi::F32>>()   // W2
                                  .Ret<ffi::Buffer<ffi::F32>>()   // b2
                                  .Ret<ffi::Buffer<ffi::F32>>()   // z_bar [B, n, b, H, f]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // W1 at group starts
                                  .Ret<ffi::Buffer<ffi::F32>>()   // b1
                                  .Ret<ffi::Buffer<ffi::F32>>()   // W2
                                  .Ret<ffi::Buffer<ffi::F32>>());  // b2

XLA_FFI_DEFINE_HANDLER_SYMBOL(TttMlpBackward, MlpBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W1 at group starts
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xq
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xk
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lr
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tok
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ln weight
                                  .Arg<ffi::Buffer<ffi::F32>>()  // ln bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cotangent of the end W1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b1
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b2
                                  .Arg<ffi::Buffer<ffi::F32>>()  // of z_bar
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d W1
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d b1
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d W2
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d b2
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d xq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d xk
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d xv
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d lr
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d tok per chain
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d ln weight per chain
                                  .Ret<ffi::Buffer<ffi::F32>>());  // d ln bias per chain
