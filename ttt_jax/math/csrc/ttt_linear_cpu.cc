// TTT-Linear's dual form over whole mini-batches on the CPU: forward and derivative.
//
// One chain per (batch element, head): its f x f weights and bias stay in the core's cache for
// the whole sequence, every mini-batch is a few small loops, and the chains run on all cores
// at once. The math is that of ttt_step.dual_delta / ttt_step._dual_step_bwd_parts for one
// inner layer (docs/architecture.md §1.5-1.6); ttt_jax/math/cpu_kernel.py calls it through
// XLA's FFI and states the layouts.
//
//   forward:  Z = K W + bias;  G = LN-L2 gradient of Z against V - K;
//             zbar_i = Q_i W + bias - sum_{j<=i} tok_i lr_j (Q_i . K_j + 1) G_j;
//             W -= K^T (e G), bias -= sum_j e_j G_j  with e_j = tok_{b-1} lr_j.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

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

// Loads b rows of f floats that lie `stride` apart into a dense [b, f] block.
inline void load_rows(const float* src, int64_t stride, int64_t b, int64_t f, float* dst) {
  copy_rows(src, stride, b, f, dst, f);
}

inline void store_rows(const float* src, int64_t b, int64_t f, float* dst, int64_t stride) {
  copy_rows(src, f, b, f, dst, stride);
}

// 16 floats: one AVX-512 register, or two AVX2 ones (gcc's vector extension; unaligned).
typedef float v16 __attribute__((vector_size(64), aligned(4)));

inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store16(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }

// C += A M with A: [rows, inner], M: [inner, cols], C: [rows, cols], all dense row-major.
// Columns in registers of 16, four rows at a time when cols is 16 or 64 (the usual sizes).
template <int V>  // cols / 16
inline void mm_acc_v(const float* __restrict A, int64_t rows, int64_t inner,
                     const float* __restrict M, float* __restrict C) {
  constexpr int64_t cols = 16 * V;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    v16 acc[4][V];
    for (int q = 0; q < 4; ++q)
      for (int v = 0; v < V; ++v) acc[q][v] = load16(C + (r + q) * cols + 16 * v);
    for (int64_t k = 0; k < inner; ++k) {
      v16 m[V];
      for (int v = 0; v < V; ++v) m[v] = load16(M + k * cols + 16 * v);
      for (int q = 0; q < 4; ++q) {
        const float a = A[(r + q) * inner + k];
        for (int v = 0; v < V; ++v) acc[q][v] += a * m[v];
      }
    }
    for (int q = 0; q < 4; ++q)
      for (int v = 0; v < V; ++v) store16(C + (r + q) * cols + 16 * v, acc[q][v]);
  }
  for (; r < rows; ++r) {
    v16 acc[V];
    for (int v = 0; v < V; ++v) acc[v] = load16(C + r * cols + 16 * v);
    for (int64_t k = 0; k < inner; ++k) {
      const float a = A[r * inner + k];
      for (int v = 0; v < V; ++v) acc[v] += a * load16(M + k * cols + 16 * v);
    }
    for (int v = 0; v < V; ++v) store16(C + r * cols + 16 * v, acc[v]);
  }
}

inline void mm_acc(const float* __restrict A, int64_t rows, int64_t inner,
                   const float* __restrict M, int64_t cols, float* __restrict C) {
  switch (cols) {
    case 16: return mm_acc_v<1>(A, rows, inner, M, C);
    case 32: return mm_acc_v<2>(A, rows, inner, M, C);
    case 64: return mm_acc_v<4>(A, rows, inner, M, C);
    default: break;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict c = C + r * cols;
    for (int64_t k = 0; k < inner; ++k) {
      const float s = A[r * inner + k];
      const float* __restrict m = M + k * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) c[j] += s * m[j];
    }
  }
}

// C = rows of init (a [cols] row) + A M.
inline void mm_bias(const float* A, int64_t rows, int64_t inner, const float* M, int64_t cols,
                    const float* init, float* C) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(C + r * cols, init, cols * sizeof(float));
  mm_acc(A, rows, inner, M, cols, C);
}

// T = A^T for A: [rows, cols].
inline void transpose(const float* __restrict A, int64_t rows, int64_t cols,
                      float* __restrict T) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) T[j * rows + i] = A[i * cols + j];
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
    for (int64_t k = 0; k < f; ++k) EG[j * f + k] = e * G[j * f + k];
  }
  mm_acc(KT, f, b, EG, f, W);
  for (int64_t j = 0; j < b; ++j)
    for (int64_t k = 0; k < f; ++k) bias[k] += EG[j * f + k];
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

// Runs `body(chain)` for every chain on up to `threads` threads.
template <typename F>
void parallel_chains(int64_t chains, int64_t threads, F body) {
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, chains));
  if (threads == 1) {
    for (int64_t c = 0; c < chains; ++c) body(c);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t w = 0; w < threads; ++w)
    pool.emplace_back([&, w] {
      for (int64_t c = w; c < chains; c += threads) body(c);
    });
  for (auto& th : pool) th.join();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> w0, ffi::Buffer<ffi::F32> b0,
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
  parallel_chains(d.B * d.H, threads, [&](int64_t c) {
    const int64_t bi = c / d.H, h = c % d.H;
    Work w(b, f);
    std::vector<float> lr_row(b), M(b * b), KT(f * b);
    float* W = w_out->typed_data() + c * f * f;
    float* bias = b_out->typed_data() + c * f;
    std::memcpy(W, w0.typed_data() + c * f * f, f * f * sizeof(float));
    std::memcpy(bias, b0.typed_data() + c * f, f * sizeof(float));
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

ffi::Error Backward(ffi::Buffer<ffi::F32> w_starts, ffi::Buffer<ffi::F32> b_starts,
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
  parallel_chains(chains, threads, [&](int64_t c) {
    const int64_t bi = c / d.H, h = c % d.H;
    const int64_t bf = b * f, ff = f * f;
    std::vector<float> QT(f * b), GT(f * b), dWnT(ff), W(ff), bias(f), EGu(bf), Z(bf);
    std::vector<float> S(b * b), M(b * b), MT(b * b), DM(b * b), DS(b * b), DST(b * b);
    std::vector<float> adw(bf), dG(bf), EG(bf), da(bf), dq(bf), dz(bf), dZ(bf), dT(bf);
    std::vector<float> u(f), dxh(f);
    // Per mini-batch of the group being differentiated: its inputs, its start state
    // (transposed: the derivative reads W only as W^T) and its keys' LN-L2 gradients.
    std::vector<float> Ks(group * bf), KTs(group * bf), Qs(group * bf), Ts(group * bf);
    std::vector<float> lrs(group * b), WTs(group * ff), Gs(group * bf), XHs(group * bf);
    std::vector<float> Gxs(group * bf), Rs(group * b), Cs(group * b);
    float* dW = dw0->typed_data() + c * ff;  // carried cotangent of the state
    float* dbias = db0->typed_data() + c * f;
    std::memcpy(dW, dw_end.typed_data() + c * ff, ff * sizeof(float));
    std::memcpy(dbias, db_end.typed_data() + c * f, f * sizeof(float));
    float* dtk = dtok->typed_data() + c * b;
    float* dnw = dlnw->typed_data() + c * f;
    float* dnb = dlnb->typed_data() + c * f;
    std::fill(dtk, dtk + b, 0.f);
    std::fill(dnw, dnw + f, 0.f);
    std::fill(dnb, dnb + f, 0.f);
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
        transpose(Q, b, f, QT.data());
        transpose(G, b, f, GT.data());
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
        std::fill(DM.begin(), DM.end(), 0.f);
        mm_acc(dz.data(), b, f, GT.data(), b, DM.data());  // -dM
        for (int64_t i = 0; i < b; ++i)
          for (int64_t j = 0; j < b; ++j) {
            const bool low = j <= i;
            const float eta = low ? tk[i] * lr_row[j] : 0.f;
            const float dm = low ? -DM[i * b + j] : 0.f;
            M[i * b + j] = eta * (S[i * b + j] + 1.f);
            MT[j * b + i] = -M[i * b + j];
            const float deta = dm * (S[i * b + j] + 1.f);
            dtk[i] += deta * lr_row[j];
            dl[j * d.H] += deta * tk[i];
            DS[i * b + j] = dm * eta;
            DST[j * b + i] = dm * eta;
          }
        mm_acc(MT.data(), b, b, dz.data(), f, dG.data());
        std::fill(dq.begin(), dq.end(), 0.f);
        mm_acc(dz.data(), b, f, WT, f, dq.data());
        mm_acc(DS.data(), b, b, K, f, dq.data());
        mm_acc(DST.data(), b, b, Q, f, da.data());
        // The keys: Z = K W + bias, G = the LN-L2 gradient of Z against T = V - K.
        for (int64_t j = 0; j < b; ++j)
          ln_l2_grad_vjp(dG.data() + j * f, G + j * f, XH + j * f, Gx + j * f,
                         R[j], C[j], T + j * f, nw, nb, f, u.data(), dxh.data(),
                         dZ.data() + j * f, dT.data() + j * f, dnw, dnb);
        mm_acc(dZ.data(), b, f, WT, f, da.data());
        // The step's own cotangent of its start state, added to the carried one.
        mm_acc(QT.data(), f, b, dz.data(), f, dW);
        mm_acc(KT, f, b, dZ.data(), f, dW);
        for (int64_t j = 0; j < b; ++j)
          for (int64_t q = 0; q < f; ++q) dbias[q] += dz[j * f + q] + dZ[j * f + q];
        for (int64_t i = 0; i < bf; ++i) da[i] -= dT[i];  // dK = da - dT (T = V - K)
        store_rows(dq.data(), b, f, d.x_at(dxq->typed_data(), bi, t, h), d.x_tok());
        store_rows(da.data(), b, f, d.x_at(dxk->typed_data(), bi, t, h), d.x_tok());
        store_rows(dT.data(), b, f, d.x_at(dxv->typed_data(), bi, t, h), d.x_tok());
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TttLinearForward, Forward,
                              ffi::Ffi::Bind()
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
