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

The same library holds the mixture-of-experts kernel (``ffnkit_moe_experts``, used by
:mod:`ffnkit.kernels.moe_cpu`): expert-major, each weight row read once for all the tokens routed to it,
register tiles of dot products for few tokens and GEMM-style broadcast tiles for many.
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
typedef int32_t v8i __attribute__((vector_size(32)));

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

// silu on 8 lanes: g / (1 + exp(-g)), exp by range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial
// (about 2 ulp; the scalar std::exp per element cost ~17% of a 64-token expert's time in the packed path)
static inline v8f exp8(v8f x) {
  const v8f hi = v8f{} + 88.3762626647949f, lo = v8f{} - 88.3762626647949f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const v8f magic = v8f{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  v8f n = (x * 1.44269504088896341f + magic) - magic;
  v8f r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v8f p = v8f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}
static inline v8f silu8(v8f g) { return g / (1.0f + exp8(-g)); }

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

// ---- mixture of experts, expert-major -----------------------------------------------------------------
// hadd of two vectors (x86 vhaddps order, portable): [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7]
static inline v8f hadd2(v8f a, v8f b) {
  return __builtin_shuffle(a, b, v8i{0, 2, 8, 10, 4, 6, 12, 14}) + __builtin_shuffle(a, b, v8i{1, 3, 9, 11, 5, 7, 13, 15});
}
// lane i = the sum of a[i]'s lanes, for eight vectors at once (9 vector ops instead of 8 scalar reductions)
static inline v8f hsum8(const v8f *a) {
  v8f u0 = hadd2(hadd2(a[0], a[1]), hadd2(a[2], a[3])), u1 = hadd2(hadd2(a[4], a[5]), hadd2(a[6], a[7]));
  return __builtin_shuffle(u0, u1, v8i{0, 1, 2, 3, 8, 9, 10, 11}) + __builtin_shuffle(u0, u1, v8i{4, 5, 6, 7, 12, 13, 14, 15});
}

// One register tile: NR (1 or 2) weight rows (w + r*ldw) against NB (<= 4) token rows (xr[b]); lane r*4 + b
// of the result = <w_r, x_b>. 2 x 4 = 8 independent FMA chains (two FMA ports x four cycles of latency),
// six loads per eight FMAs.
template <class W, int NR, int NB>
static inline v8f tile_dots(const W *w, int64_t ldw, const float *const *xr, int64_t d, int64_t pfd) {
  v8f acc[8];
  for (int q = 0; q < 8; ++q) acc[q] = v8f{};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    v8f wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = ld8(w + r * ldw + j);
    if (pfd > 0 && !(j & 15)) for (int r = 0; r < NR; ++r) __builtin_prefetch(w + r * ldw + j + pfd, 0, 3);
    for (int b = 0; b < NB; ++b) {
      v8f xv = ld8(xr[b] + j);
      for (int r = 0; r < NR; ++r) acc[r * 4 + b] += wv[r] * xv;
    }
  }
  v8f out = hsum8(acc);
  for (; j < d; ++j)
    for (int r = 0; r < NR; ++r) {
      const float wj = ld1(w + r * ldw + j);
      for (int b = 0; b < NB; ++b) out[r * 4 + b] += wj * xr[b][j];
    }
  return out;
}

// sink(b0, n, s) for NR rows against nb token rows, four at a time: s lane r*4 + b = <w_r, x_(b0+b)>.
template <class W, int NR, class Sink>
static inline void rows_dots(const W *w, int64_t ldw, const float *const *xr, int nb, int64_t d, int64_t pfd,
                             Sink sink) {
  int b = 0;
  for (; b + 4 <= nb; b += 4) sink(b, 4, tile_dots<W, NR, 4>(w, ldw, xr + b, d, b ? 0 : pfd));
  switch (nb - b) {
    case 3: sink(b, 3, tile_dots<W, NR, 3>(w, ldw, xr + b, d, b ? 0 : pfd)); break;
    case 2: sink(b, 2, tile_dots<W, NR, 2>(w, ldw, xr + b, d, b ? 0 : pfd)); break;
    case 1: sink(b, 1, tile_dots<W, NR, 1>(w, ldw, xr + b, d, b ? 0 : pfd)); break;
  }
}

// The broadcast tile for experts with many tokens: the tokens' vectors are packed 16 to a block,
// xp[j * 16 + lane], so one weight element (broadcast) multiplies 8 or 16 tokens at once and the sums
// need no horizontal reduction. NR weight rows (w[r], contiguous, length d) x NV vectors of 8 tokens:
// 6 x 2 = 12 accumulators, 8 loads per 12 FMAs.
template <class W, int NR, int NV>
static inline void bcast_tile(const W *const *w, const float *xp, int64_t d, int64_t pfd, v8f out[6][2]) {
  v8f acc[NR][NV];
  for (int r = 0; r < NR; ++r) for (int v = 0; v < NV; ++v) acc[r][v] = v8f{};
  for (int64_t j = 0; j < d; ++j) {
    v8f xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = ld8(xp + j * 16 + 8 * v);
    if (pfd > 0 && !(j & 15)) for (int r = 0; r < NR; ++r) __builtin_prefetch(w[r] + j + pfd, 0, 3);
    for (int r = 0; r < NR; ++r) {
      const float ws = ld1(w[r] + j);
      const v8f wb = {ws, ws, ws, ws, ws, ws, ws, ws};  // one vbroadcastss from memory for float32
      for (int v = 0; v < NV; ++v) acc[r][v] += wb * xv[v];
    }
  }
  for (int r = 0; r < NR; ++r) for (int v = 0; v < NV; ++v) out[r][v] = acc[r][v];
}

template <class W, int NR>
static inline void bcast_tile_nv(const W *const *w, const float *xp, int64_t d, int64_t pfd, int nv, v8f out[6][2]) {
  if (nv == 2) bcast_tile<W, NR, 2>(w, xp, d, pfd, out); else bcast_tile<W, NR, 1>(w, xp, d, pfd, out);
}

template <class W>
static inline void bcast_rows(const W *const *w, int nr, const float *xp, int64_t d, int64_t pfd, int nv,
                              v8f out[6][2]) {
  switch (nr) {
    case 6: bcast_tile_nv<W, 6>(w, xp, d, pfd, nv, out); break;
    case 5: bcast_tile_nv<W, 5>(w, xp, d, pfd, nv, out); break;
    case 4: bcast_tile_nv<W, 4>(w, xp, d, pfd, nv, out); break;
    case 3: bcast_tile_nv<W, 3>(w, xp, d, pfd, nv, out); break;
    case 2: bcast_tile_nv<W, 2>(w, xp, d, pfd, nv, out); break;
    default: bcast_tile_nv<W, 1>(w, xp, d, pfd, nv, out); break;
  }
}

// y [T, D] float32 (overwritten) = sum over pairs (t, k) of w[t,k] * down_e (act(gate_e x_t) * up_e x_t),
// e = idx[t, k]; gate_up [E, 2F, D], down [E, D, F] contiguous; a pair with e outside [0, E) or weight 0
// adds nothing. The pairs are grouped by expert (a counting sort). Phase 1 computes every pair's
// h = w * act(g) * u, threads splitting each expert's neurons, so each gate and up row is read once for all
// of that expert's tokens; phase 2 adds down_e h into y, threads splitting the D output rows (no two
// threads write the same element of y, no reduction). An expert with fewer than pack_min tokens runs dot
// tiles on its token rows in place; one with more packs its tokens 16 to a block (xp) and runs broadcast
// tiles, its h landing in the same packed layout ([F, 16] per block) that phase 2 then reads.
static const int64_t kChunk = 4;  // packed blocks (16 tokens each) per chunk

template <class W>
static int moe_experts(const float *x, int64_t T, int64_t D, int64_t F, int64_t E, int64_t K, const W *GU,
                        const W *DN, const int64_t *idx, const float *wts, int act, float *y, int nt,
                        int pack_min, int pf) {
  if (nt < 1) nt = 1;
  if (pack_min < 1) pack_min = 1;
  const int64_t S = T * K;
  int64_t *start = (int64_t *)std::calloc((size_t)E + 2, sizeof(int64_t));
  int64_t *pb = (int64_t *)std::calloc((size_t)E + 1, sizeof(int64_t));  // padded base slot of each expert
  int64_t *tok = (int64_t *)std::malloc(sizeof(int64_t) * (S > 0 ? S : 1));
  float *pw = (float *)std::malloc(sizeof(float) * (S > 0 ? S : 1));
  if (!start || !pb || !tok || !pw) { std::free(start); std::free(pb); std::free(tok); std::free(pw); return 2; }
  for (int64_t p = 0; p < S; ++p) {
    int64_t e = idx[p];
    if (e >= 0 && e < E && wts[p] != 0.0f) start[e + 2]++;
  }
  for (int64_t e = 0; e < E; ++e) start[e + 2] += start[e + 1];  // start[e + 1] = first slot of expert e
  for (int64_t p = 0; p < S; ++p) {
    int64_t e = idx[p];
    if (e >= 0 && e < E && wts[p] != 0.0f) { int64_t s = start[e + 1]++; tok[s] = p / K; pw[s] = wts[p]; }
  }
  // now start[e] .. start[e + 1] are expert e's slots
  const int64_t n_all = start[E];
  for (int64_t e = 0; e < E; ++e) {
    const int64_t nb = start[e + 1] - start[e];
    pb[e + 1] = pb[e] + (nb >= pack_min ? (nb + 15) / 16 * 16 : nb);
  }
  const int64_t P = pb[E] > 0 ? pb[E] : 1;
  const float **xr = (const float **)std::malloc(sizeof(float *) * (n_all > 0 ? n_all : 1));
  const float **hr = (const float **)std::malloc(sizeof(float *) * (n_all > 0 ? n_all : 1));
  float *h = (float *)std::malloc(sizeof(float) * P * F);  // [P, F] rows, or [blocks, F, 16] when packed
  float *xp = (float *)std::malloc(sizeof(float) * P * D);  // [blocks, D, 16] for the packed experts
  float *ppw = (float *)std::calloc((size_t)P, sizeof(float));  // router weights by padded slot, 0 = padding
  if (!xr || !hr || !h || !xp || !ppw) {
    std::free(start); std::free(pb); std::free(tok); std::free(pw); std::free(xr); std::free(hr);
    std::free(h); std::free(xp); std::free(ppw);
    return 2;  // out of memory: the caller says so
  }
  for (int64_t e = 0; e < E; ++e) {
    const int64_t s0 = start[e], nb = start[e + 1] - s0;
    for (int64_t s = s0; s < s0 + nb; ++s) {
      xr[s] = x + tok[s] * D; hr[s] = h + (pb[e] + s - s0) * F; ppw[pb[e] + s - s0] = pw[s];
    }
    if (nb >= pack_min && nb % 16) {  // zero the padding lanes of the last block
      float *blk = xp + (pb[e] + nb / 16 * 16) * D;
      for (int64_t j = 0; j < D; ++j) for (int64_t l = nb % 16; l < 16; ++l) blk[j * 16 + l] = 0.0f;
    }
  }
  std::memset(y, 0, sizeof(float) * T * D);
  #pragma omp parallel num_threads(nt)
  {
    // phase 0: pack the tokens of the experts with many (a transpose per block of 16)
    #pragma omp for schedule(static)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = start[e], nb = start[e + 1] - s0;
      if (nb < pack_min) continue;
      for (int64_t l = 0; l < nb; ++l) {
        float *blk = xp + (pb[e] + l / 16 * 16) * D + l % 16;
        const float *xs = xr[s0 + l];
        for (int64_t j = 0; j < D; ++j) blk[j * 16] = xs[j];
      }
    }
    // phase 1: h = w * act(gate x) * (up x), threads splitting each expert's neurons
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = start[e];
      const int nb = (int)(start[e + 1] - s0);
      if (nb == 0) continue;
      const W *G = GU + e * 2 * F * D;
      if (nb < pack_min) {
        #pragma omp for schedule(static) nowait
        for (int64_t i = 0; i < F; ++i) {
          rows_dots<W, 2>(G + i * D, F * D, xr + s0, nb, D, (int64_t)pf * D, [&](int b0, int n, v8f o) {
            float *hi = h + (pb[e] + b0) * F + i;
            if (act == 0) {  // gate in lanes 0..3, up in 4..7
              v8f hv = silu8(o) * __builtin_shuffle(o, v8i{4, 5, 6, 7, 4, 5, 6, 7});
              for (int b = 0; b < n; ++b) hi[b * F] = pw[s0 + b0 + b] * hv[b];
            } else {
              for (int b = 0; b < n; ++b) hi[b * F] = pw[s0 + b0 + b] * act_f(act, o[b]) * o[4 + b];
            }
          });
        }
        continue;
      }
      const int64_t nblk = (nb + 15) / 16;
      for (int64_t c0 = 0; c0 < nblk; c0 += kChunk) {  // a chunk of tokens stays in L2 across the neurons
      const int64_t c1 = c0 + kChunk < nblk ? c0 + kChunk : nblk;
      #pragma omp for schedule(static) nowait
      for (int64_t ig = 0; ig < (F + 2) / 3; ++ig) {
        const int64_t i0 = 3 * ig;
        const int nn = (int)(F - i0 < 3 ? F - i0 : 3);
        const W *wr[6];
        for (int n = 0; n < nn; ++n) { wr[n] = G + (i0 + n) * D; wr[nn + n] = G + (F + i0 + n) * D; }
        for (int64_t bk = c0; bk < c1; ++bk) {
          const int64_t l0 = bk * 16;
          const int nl = (int)(nb - l0 < 16 ? nb - l0 : 16);
          v8f o[6][2];
          bcast_rows<W>(wr, 2 * nn, xp + (pb[e] + l0) * D, D, bk > c0 ? 0 : (int64_t)pf * 3 * D, nl > 8 ? 2 : 1, o);
          float *hb = h + (pb[e] + l0) * F;  // [F, 16] block; padding lanes get weight 0, so h = 0
          const float *bw = ppw + pb[e] + l0;
          for (int n = 0; n < nn; ++n)
            for (int v = 0; v < 2; ++v) {
              v8f hv = v8f{};
              if (v * 8 < nl) {
                if (act == 0) {
                  hv = ld8(bw + 8 * v) * silu8(o[n][v]) * o[nn + n][v];
                } else {
                  for (int l = 0; l < 8; ++l) hv[l] = bw[8 * v + l] * act_f(act, o[n][v][l]) * o[nn + n][v][l];
                }
              }
              *(v8f *)(hb + (i0 + n) * 16 + 8 * v) = hv;
            }
        }
      }
      }
    }
    #pragma omp barrier
    // phase 2: y += down_e h. Every loop over the row groups has the same bounds and a static schedule, so a
    // thread owns the same 6 of y's columns in all of them: no two threads write one element, no barrier.
    const int64_t ngroups = (D + 5) / 6;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = start[e];
      const int nb = (int)(start[e + 1] - s0);
      if (nb == 0) continue;
      if (nb < pack_min) {
        #pragma omp for schedule(static) nowait
        for (int64_t rg = 0; rg < ngroups; ++rg) {
          const int64_t r0 = 6 * rg;
          const int nr = (int)(D - r0 < 6 ? D - r0 : 6);
          const W *Dn = DN + e * D * F + r0 * F;
          int q = 0;
          for (; q + 2 <= nr; q += 2) {
            rows_dots<W, 2>(Dn + q * F, F, hr + s0, nb, F, (int64_t)pf * 2 * F, [&](int b0, int n, v8f o) {
              for (int b = 0; b < n; ++b) { float *yt = y + tok[s0 + b0 + b] * D + r0 + q; yt[0] += o[b]; yt[1] += o[4 + b]; }
            });
          }
          if (q < nr) {
            rows_dots<W, 1>(Dn + q * F, F, hr + s0, nb, F, (int64_t)pf * F, [&](int b0, int n, v8f o) {
              for (int b = 0; b < n; ++b) y[tok[s0 + b0 + b] * D + r0 + q] += o[b];
            });
          }
        }
        continue;
      }
      const int64_t nblk = (nb + 15) / 16;
      for (int64_t c0 = 0; c0 < nblk; c0 += kChunk) {
        const int64_t c1 = c0 + kChunk < nblk ? c0 + kChunk : nblk;
        #pragma omp for schedule(static) nowait
        for (int64_t rg = 0; rg < ngroups; ++rg) {
          const int64_t r0 = 6 * rg;
          const int nr = (int)(D - r0 < 6 ? D - r0 : 6);
          const W *wr[6];
          for (int q = 0; q < nr; ++q) wr[q] = DN + e * D * F + (r0 + q) * F;
          for (int64_t bk = c0; bk < c1; ++bk) {
            const int64_t l0 = bk * 16;
            const int nl = (int)(nb - l0 < 16 ? nb - l0 : 16);
            v8f o[6][2];
            bcast_rows<W>(wr, nr, h + (pb[e] + l0) * F, F, bk > c0 ? 0 : (int64_t)pf * 6 * F, nl > 8 ? 2 : 1, o);
            for (int l = 0; l < nl; ++l) {
              float *yt = y + tok[s0 + l0 + l] * D + r0;
              for (int q = 0; q < nr; ++q) yt[q] += o[q][l / 8][l % 8];
            }
          }
        }
      }
    }
  }
  std::free(start); std::free(pb); std::free(tok); std::free(pw); std::free(xr); std::free(hr);
  std::free(h); std::free(xp); std::free(ppw);
  return 0;
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
// x [T, D] float32, idx [T, K] int64, w [T, K] float32, y [T, D] float32; weights in dtype
int ffnkit_moe_experts(int dtype, const float *x, int64_t T, int64_t D, int64_t F, int64_t E, int64_t K,
                       const void *GU, const void *DN, const int64_t *idx, const float *w, int act, float *y, int nt,
                       int pack_min, int pf) {
  switch (dtype) {
    case 0: return moe_experts(x, T, D, F, E, K, (const float *)GU, (const float *)DN, idx, w, act, y, nt, pack_min, pf);
    case 1: return moe_experts(x, T, D, F, E, K, (const bf16 *)GU, (const bf16 *)DN, idx, w, act, y, nt, pack_min, pf);
    case 2: return moe_experts(x, T, D, F, E, K, (const _Float16 *)GU, (const _Float16 *)DN, idx, w, act, y, nt, pack_min, pf);
  }
  return 1;
}
int ffnkit_abi_version(void) { return 4; }
}
"""
