// Vector helpers shared by the native CPU kernels (ttt_cpu.cc, xent_cpu.cc).
#ifndef TTT_JAX_CSRC_SIMD_H_
#define TTT_JAX_CSRC_SIMD_H_

#include <cstdint>

// 16 floats: one AVX-512 register, or two AVX2 ones (gcc's vector extension; unaligned).
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));

inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void store16(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }

// exp(x) as 2^k e^r, k = round(x / ln2), |r| <= ln2 / 2, e^r by its Taylor series to r^7
// (relative error below 2e-7). Valid for -(Offset + 0.5) ln2 < x < 88 (the rounding needs
// x / ln2 + Offset + 0.5 > 0, the exponent k >= -126): the default covers the TTT kernel's
// |x| <= 20; Offset 126 covers a softmax's -87 <= x <= 0.
template <int Offset = 64>
inline v16 exp16(v16 x) {
  const v16 kf = __builtin_convertvector(
      __builtin_convertvector(x * 1.44269504f + (Offset + 0.5f), vi16) - Offset, v16);
  const v16 r = (x - kf * 0.693145752f) - kf * 1.42860677e-6f;
  v16 p = 1.f / 5040.f + r * 0.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi16 bits = (__builtin_convertvector(kf, vi16) + 127) << 23;
  return p * __builtin_bit_cast(v16, bits);
}

#endif  // TTT_JAX_CSRC_SIMD_H_
