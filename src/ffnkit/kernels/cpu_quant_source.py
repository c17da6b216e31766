"""C++ source of the CPU quantised-matmul kernels (compiled once by :mod:`ffnkit.kernels.cpu_build`).

Why a hand-written kernel: torch's own CPU int4 op (``_weight_int4pack_mm_for_cpu``) is slow on this
project's AVX2 machine: one 1536x576 matrix at batch 1, one thread, took 5.9 ms against 0.35 ms for the
float32 matmul and 0.19 ms for these loops (benchmarks/results/quant_kernel_cpu_torch_op.json, medians on
a loaded 2-core machine). At decode a quantised matrix-vector product is
bound by memory bandwidth, so reading 4 or 8 bits per weight instead of 32 pays only when the integers are
widened in registers, never written back: these loops do exactly that (gcc vector extensions, whatever
``-march=native`` gives, OpenMP threads over output rows, float32 accumulation).

Maths: W[o, i] = (q[o, i] - z[o, g]) * s[o, g] for input i in group g, so
y[b, o] = sum_g s[o, g] * (sum_{i in g} q[o, i] x[b, i] - z[o, g] * sum_{i in g} x[b, i]).
The group sums of x are computed once per call; per weight the loop widens, converts and multiplies-adds.

int4 layout (repacked once from ffnkit's saved format): per row, blocks of 16 weights in 8 bytes, byte j
holding weight j in its low nibble and weight 8 + j in its high nibble, stored unsigned (q + 8, zero point
z + 8). int8 layout: the signed integers as they are, row-major.

From ``DEQUANT_ROWS`` rows of x on (prefill), decoding every weight once per 4 rows costs more than it
saves: ``ffnkit_qdequant`` writes the float32 matrix once (the same values as torchao's dequantisation)
and a BLAS matmul follows.
"""

from __future__ import annotations

SOURCE = r"""
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>

typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint8_t v8b __attribute__((vector_size(8), aligned(1), may_alias));
typedef int8_t v8sb __attribute__((vector_size(8), aligned(1), may_alias));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
static inline v8f bcast(float a) { v8f r = {a, a, a, a, a, a, a, a}; return r; }

// 16 int4 weights (8 bytes) as float32: lo = weights 0..7, hi = weights 8..15; or 8 int8 weights.
// AVX2 widens with one vpmovzxbd / vpmovsxbd (gcc's generic byte->int conversion inserts lanes one by one).
#ifdef __AVX2__
#include <immintrin.h>
static inline void q4_block(const uint8_t *p, v8f &lo, v8f &hi) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
  __m256 l = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  __m256 h = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  std::memcpy(&lo, &l, 32); std::memcpy(&hi, &h, 32);
}
static inline v8f q8_block(const int8_t *p) {
  __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
  v8f r; std::memcpy(&r, &f, 32); return r;
}
#else
static inline void q4_block(const uint8_t *p, v8f &lo, v8f &hi) {
  v8i b = __builtin_convertvector(*(const v8b *)p, v8i);
  lo = __builtin_convertvector(b & 15, v8f);
  hi = __builtin_convertvector(b >> 4, v8f);
}
static inline v8f q8_block(const int8_t *p) { return __builtin_convertvector(*(const v8sb *)p, v8f); }
#endif

// Rows o in [0, n) of y [nb, n] for NB batch rows starting at x (stride k); xs [nb, G] group sums of x.
template <int NB, int BITS>
static inline void rows_tile(const float *x, const float *xs, int64_t k, int64_t n, int64_t g, const uint8_t *w,
                             const float *s, const float *z, const float *bias, float *y, int64_t o) {
  const int64_t G = k / g;
  const int64_t rowb = BITS == 4 ? k / 2 : k;
  const uint8_t *wr = w + o * rowb;
  v8f tot[NB];
  float corr[NB];
  for (int b = 0; b < NB; ++b) { tot[b] = bcast(0.0f); corr[b] = 0.0f; }
  for (int64_t gi = 0; gi < G; ++gi) {
    v8f acc[NB];
    for (int b = 0; b < NB; ++b) acc[b] = bcast(0.0f);
    const int64_t i0 = gi * g;
    if (BITS == 4) {
      for (int64_t i = i0; i < i0 + g; i += 16) {
        v8f lo, hi;
        q4_block(wr + i / 2, lo, hi);
        for (int b = 0; b < NB; ++b) {
          const float *xb = x + b * k + i;
          acc[b] += lo * *(const v8f *)xb + hi * *(const v8f *)(xb + 8);
        }
      }
    } else {
      for (int64_t i = i0; i < i0 + g; i += 8) {
        v8f wv = q8_block((const int8_t *)wr + i);
        for (int b = 0; b < NB; ++b) acc[b] += wv * *(const v8f *)(x + b * k + i);
      }
    }
    const float sg = s[o * G + gi], zg = z[o * G + gi];
    const v8f sv = bcast(sg);
    for (int b = 0; b < NB; ++b) { tot[b] += sv * acc[b]; corr[b] += sg * zg * xs[b * G + gi]; }
  }
  const float bo = bias ? bias[o] : 0.0f;
  for (int b = 0; b < NB; ++b) y[b * n + o] = hsum(tot[b]) - corr[b] + bo;
}

template <int BITS>
static void qlinear(int nb, const float *x, int64_t k, int64_t n, const uint8_t *w, const float *s,
                    const float *z, int64_t g, const float *bias, float *y, int nt) {
  if (nt < 1) nt = 1;
  const int64_t G = k / g;
  float *xs = (float *)std::malloc(sizeof(float) * (nb * G > 0 ? nb * G : 1));  // [nb, G]
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t gi = 0; gi < G; ++gi) {
      float t = 0.0f;
      for (int64_t i = gi * g; i < (gi + 1) * g; ++i) t += x[b * k + i];
      xs[b * G + gi] = t;
    }
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = 0; o < n; ++o) {
    int b = 0;
    for (; b + 4 <= nb; b += 4) rows_tile<4, BITS>(x + b * k, xs + b * G, k, n, g, w, s, z, bias, y + b * n, o);
    for (; b < nb; ++b) rows_tile<1, BITS>(x + b * k, xs + b * G, k, n, g, w, s, z, bias, y + b * n, o);
  }
  std::free(xs);
}

extern "C" {
// y [nb, n] = x [nb, k] @ W^T (+ bias); bits 4 or 8; g divides k (a multiple of 16 for 4 bits, 8 for 8).
int ffnkit_qlinear(int bits, int nb, const float *x, int64_t k, int64_t n, const uint8_t *w, const float *s,
                   const float *z, int64_t g, const float *bias, float *y, int nt) {
  if (g <= 0 || k % g) return 2;
  if (bits == 4 && g % 16 == 0) { qlinear<4>(nb, x, k, n, w, s, z, g, bias, y, nt); return 0; }
  if (bits == 8 && g % 8 == 0) { qlinear<8>(nb, x, k, n, w, s, z, g, bias, y, nt); return 0; }
  return 1;
}
// W [n, k] float32 = (q - z) * s, element for element what torchao's dequantisation gives (q - z is an
// exact small integer, then one rounding): the prefill path, followed by a BLAS matmul.
int ffnkit_qdequant(int bits, int64_t k, int64_t n, const uint8_t *w, const float *s, const float *z, int64_t g,
                    float *out, int nt) {
  if (g <= 0 || k % g || (bits == 4 && g % 16) || (bits == 8 && g % 8)) return 1;
  if (nt < 1) nt = 1;
  const int64_t G = k / g, rowb = bits == 4 ? k / 2 : k;
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t o = 0; o < n; ++o) {
    const uint8_t *wr = w + o * rowb;
    float *dst = out + o * k;
    for (int64_t gi = 0; gi < G; ++gi) {
      const v8f sv = bcast(s[o * G + gi]), zv = bcast(z[o * G + gi]);
      for (int64_t i = gi * g; i < (gi + 1) * g; i += bits == 4 ? 16 : 8) {
        if (bits == 4) {
          v8f lo, hi;
          q4_block(wr + i / 2, lo, hi);
          *(v8f *)(dst + i) = (lo - zv) * sv;
          *(v8f *)(dst + i + 8) = (hi - zv) * sv;
        } else {
          *(v8f *)(dst + i) = (q8_block((const int8_t *)wr + i) - zv) * sv;
        }
      }
    }
  }
  return 0;
}
int ffnkit_quant_abi_version(void) { return 2; }
}
"""
