"""C++ source of the CPU sparse-FFN kernels (compiled once by :mod:`ffnkit.kernels.cpu_build`).

Why a hand-written kernel: at decode the FFN is a matrix-vector product, bound by memory bandwidth, and
the only way to be faster is to read fewer bytes. ``torch.index_select`` + matmul reads the active rows,
writes them to a copy, then reads the copy again (issue 9 measured dense 4.1 ms, torch gather 3.6 ms at
50% skipped on the Qwen2.5-0.5B FFN shape; benchmarks/results/sparse_kernel_cpu.json: dense 3.93 ms, torch
gather 4.35 ms, these loops 1.74 ms). These loops compute straight from the neuron-major packed rows
instead: per active neuron one contiguous block (gate row, up row, down column) is streamed once (a software
prefetch of the next neuron's block is available, ``pf``, but measured slower, so off by default). No
library offers this (oneDNN/MKL have no gathered GEMV), so it is ~200 lines of portable C++: gcc vector
extensions (AVX2/AVX-512/NEON, whatever ``-march=native`` gives), OpenMP threads (the libgomp torch has
already loaded), float32, bfloat16 and float16 weights, float32 accumulation. Plain C ABI, loaded with
ctypes: no Python or torch headers, so it builds in about a second.
"""

from __future__ import annotations

SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>

typedef float v8f __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint16_t v8h __attribute__((vector_size(16), aligned(2), may_alias));
typedef _Float16 v8hf __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t v8u __attribute__((vector_size(32)));

// ---- loads of 8 (or 1) weights as float32 -----------------------------------------------------------
static inline v8f ld8(const float *p) { return *(const v8f *)p; }
static inline float ld1(const float *p) { return *p; }
struct bf16 { uint16_t v; };
static inline v8f ld8(const bf16 *p) {
  v8u u = __builtin_convertvector(*(const v8h *)p, v8u) << 16;  // bf16 is the top half of a float32
  v8f f; std::memcpy(&f, &u, sizeof f); return f;
}
static inline float ld1(const bf16 *p) { uint32_t u = (uint32_t)p->v << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline v8f ld8(const _Float16 *p) { return __builtin_convertvector(*(const v8hf *)p, v8f); }
static inline float ld1(const _Float16 *p) { return (float)*p; }

static inline float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

static inline float act_f(int act, float g) {
  switch (act) {
    case 0: return g / (1.0f + std::exp(-g));                                    // silu
    case 1: return 0.5f * g * (1.0f + std::erf(g * 0.70710678118654752f));       // gelu (erf)
    case 2: return 0.5f * g * (1.0f + std::tanh(0.79788456080286536f * (g + 0.044715f * g * g * g)));
    default: return g > 0.0f ? g : 0.0f;                                          // relu
  }
}

// out[b] = <w, x[b]> for b < nb; x is [nb, d] float32. One row, four independent FMA chains for nb == 1,
// four batch rows sharing each weight load otherwise.
template <class W>
static void dots(const W *w, const float *x, int nb, int64_t d, float *out) {
  int b = 0;
  for (; b + 4 <= nb; b += 4) {
    const float *x0 = x + b * d, *x1 = x0 + d, *x2 = x1 + d, *x3 = x2 + d;
    v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) {
      v8f wv = ld8(w + j);
      a0 += wv * ld8(x0 + j); a1 += wv * ld8(x1 + j); a2 += wv * ld8(x2 + j); a3 += wv * ld8(x3 + j);
    }
    float s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
    for (; j < d; ++j) { float wj = ld1(w + j); s0 += wj * x0[j]; s1 += wj * x1[j]; s2 += wj * x2[j]; s3 += wj * x3[j]; }
    out[b] = s0; out[b + 1] = s1; out[b + 2] = s2; out[b + 3] = s3;
  }
  for (; b < nb; ++b) {
    const float *xb = x + b * d;
    v8f a0 = {}, a1 = {}, a2 = {}, a3 = {};
    int64_t j = 0;
    for (; j + 32 <= d; j += 32) {
      a0 += ld8(w + j) * ld8(xb + j);           a1 += ld8(w + j + 8) * ld8(xb + j + 8);
      a2 += ld8(w + j + 16) * ld8(xb + j + 16); a3 += ld8(w + j + 24) * ld8(xb + j + 24);
    }
    for (; j + 8 <= d; j += 8) a0 += ld8(w + j) * ld8(xb + j);
    float s = hsum((a0 + a1) + (a2 + a3));
    for (; j < d; ++j) s += ld1(w + j) * xb[j];
    out[b] = s;
  }
}

// acc[b] += h[b] * w for the nb rows with h[b] != 0 (acc is [nb, d], w is one contiguous row).
template <class W>
static void axpys(const W *w, const float *h, int nb, int64_t d, float *acc) {
  for (int b = 0; b < nb; ++b) {
    float hb = h[b];
    if (hb == 0.0f) continue;
    float *a = acc + b * d;
    v8f hv = {hb, hb, hb, hb, hb, hb, hb, hb};
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) *(v8f *)(a + j) += hv * ld8(w + j);
    for (; j < d; ++j) a[j] += hb * ld1(w + j);
  }
}

static inline void prefetch_block(const void *p, int64_t bytes) {
  const char *c = (const char *)p;
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// The gated FFN over neuron rows: neuron i has its gate row at G + i*rs, up row at U + i*rs and down column
// at Dn + i*rs (packed [F, 3, d]: G = P, U = P + d, Dn = P + 2d, rs = 3d; three [F, d] tensors: rs = d).
// Neurons: idx[0..K) (or 0..K when idx is null). use_thr: CATS, skip the up row and down column of a
// neuron whose |act(gate)| <= thr for every batch row (and zero it for the rows where it is); with tv not null
// neuron i's threshold is tv[i] (CHESS: one per neuron). scale [nb, K] multiplies h (router weights) when
// not null. y [nb, d] float32 is overwritten.
template <class W>
static void ffn_rows(const float *x, int nb, int64_t d, const W *G, const W *U, const W *Dn, int64_t rs,
                     const int64_t *idx, int64_t K, int use_thr, float thr, const float *tv, int act,
                     const float *scale, float *y, int nt, int pf) {
  if (nt < 1) nt = 1;
  float *scratch = (float *)std::calloc((size_t)nt * nb * d + (size_t)nt * 3 * nb, sizeof(float));
  const int64_t row_bytes = d * (int64_t)sizeof(W);
  #pragma omp parallel num_threads(nt)
  {
    int tid = omp_get_thread_num();
    float *acc = scratch + (size_t)tid * nb * d;
    float *g = scratch + (size_t)nt * nb * d + (size_t)tid * 3 * nb, *u = g + nb, *h = u + nb;
    #pragma omp for schedule(dynamic, 16) nowait
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = idx ? idx[k] : k;
      if (pf > 0 && k + pf < K) {
        const int64_t nxt = (idx ? idx[k + pf] : k + pf) * rs;
        prefetch_block(G + nxt, row_bytes);
        if (!use_thr) { prefetch_block(U + nxt, row_bytes); prefetch_block(Dn + nxt, row_bytes); }
      }
      dots(G + i * rs, x, nb, d, g);
      const float ti = tv ? tv[i] : thr;
      int any = 0;
      for (int b = 0; b < nb; ++b) {
        float a = act_f(act, g[b]);
        int keep = !use_thr || std::fabs(a) > ti;
        h[b] = keep ? a : 0.0f;
        any |= keep;
      }
      if (!any) continue;
      if (use_thr && pf > 0) { prefetch_block(U + i * rs, row_bytes); prefetch_block(Dn + i * rs, row_bytes); }
      dots(U + i * rs, x, nb, d, u);
      for (int b = 0; b < nb; ++b) h[b] *= u[b] * (scale ? scale[b * K + k] : 1.0f);
      axpys(Dn + i * rs, h, nb, d, acc);
    }
  }
  // y = sum of the per-thread accumulators
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t j = 0; j < (int64_t)nb * d; ++j) {
    float s = 0.0f;
    for (int t = 0; t < nt; ++t) s += scratch[(size_t)t * nb * d + j];
    y[j] = s;
  }
  std::free(scratch);
}

// TEAL: y [nb, n_out] = (x * [|x| >= thr]) @ Wt with Wt [n_in, n_out]; only the rows j of Wt with a kept,
// non-zero x[b, j] for some b are read (tv not null: input j's threshold is tv[j]). Threads split the output
// columns (no reduction needed).
template <class W>
static void input_rows(const float *x, int nb, int64_t n_in, int64_t n_out, const W *Wt, float thr,
                       const float *tv, float *y, int nt, int pf) {
  if (nt < 1) nt = 1;
  int64_t *kept = (int64_t *)std::malloc(sizeof(int64_t) * (n_in > 0 ? n_in : 1));
  float *xs = (float *)std::malloc(sizeof(float) * (n_in > 0 ? n_in : 1) * nb);  // [K, nb], kept values
  int64_t K = 0;
  for (int64_t j = 0; j < n_in; ++j) {
    int any = 0;
    const float tj = tv ? tv[j] : thr;
    for (int b = 0; b < nb; ++b) {
      float v = x[b * n_in + j];
      int keep = v != 0.0f && std::fabs(v) >= tj;
      xs[K * nb + b] = keep ? v : 0.0f;
      any |= keep;
    }
    if (any) kept[K++] = j;
  }
  std::memset(y, 0, sizeof(float) * nb * n_out);
  // columns in whole 64-byte lines per thread
  int64_t per = ((n_out + nt - 1) / nt + 15) / 16 * 16;
  #pragma omp parallel num_threads(nt)
  {
    int64_t c0 = omp_get_thread_num() * per, c1 = c0 + per < n_out ? c0 + per : n_out;
    if (c0 < c1) {
      float *tmp = (float *)std::malloc(sizeof(float) * nb * (c1 - c0));
      std::memset(tmp, 0, sizeof(float) * nb * (c1 - c0));
      for (int64_t k = 0; k < K; ++k) {
        if (pf > 0 && k + pf < K) prefetch_block(Wt + kept[k + pf] * n_out + c0, (c1 - c0) * (int64_t)sizeof(W));
        axpys(Wt + kept[k] * n_out + c0, xs + k * nb, nb, c1 - c0, tmp);
      }
      for (int b = 0; b < nb; ++b) std::memcpy(y + b * n_out + c0, tmp + b * (c1 - c0), sizeof(float) * (c1 - c0));
      std::free(tmp);
    }
  }
  std::free(kept);
  std::free(xs);
}

extern "C" {
// dtype: 0 float32, 1 bfloat16, 2 float16
int ffnkit_ffn_rows(int dtype, const float *x, int nb, int64_t d, const void *G, const void *U, const void *Dn,
                    int64_t rs, const int64_t *idx, int64_t K, int use_thr, float thr, const float *tv, int act,
                    const float *scale, float *y, int nt, int pf) {
#define FFNKIT_CALL(T) ffn_rows(x, nb, d, (const T *)G, (const T *)U, (const T *)Dn, rs, idx, K, use_thr, thr, tv, act, scale, y, nt, pf)
  switch (dtype) {
    case 0: FFNKIT_CALL(float); return 0;
    case 1: FFNKIT_CALL(bf16); return 0;
    case 2: FFNKIT_CALL(_Float16); return 0;
  }
  return 1;
#undef FFNKIT_CALL
}
int ffnkit_input_rows(int dtype, const float *x, int nb, int64_t n_in, int64_t n_out, const void *Wt, float thr,
                      const float *tv, float *y, int nt, int pf) {
  switch (dtype) {
    case 0: input_rows(x, nb, n_in, n_out, (const float *)Wt, thr, tv, y, nt, pf); return 0;
    case 1: input_rows(x, nb, n_in, n_out, (const bf16 *)Wt, thr, tv, y, nt, pf); return 0;
    case 2: input_rows(x, nb, n_in, n_out, (const _Float16 *)Wt, thr, tv, y, nt, pf); return 0;
  }
  return 1;
}
int ffnkit_abi_version(void) { return 3; }
}
"""
