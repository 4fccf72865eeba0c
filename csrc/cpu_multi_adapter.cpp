// cpu_multi_adapter.cpp -- the multi-adapter op on the CPU, in place, one call per table.
//
// Built on first use by fastadapters/ops/cpu_ext.py (torch.utils.cpp_extension, a Python module:
// cpu_multi_adapter_, and cpu_multi_adapter_calls_ that runs it for each rank bucket of a prepared
// TableCalls in one call from Python), never at install time. Contract: fastadapters/ops/multi.py's docstring,
// in place on y:
//
//   for m with s = row_slot[m] >= 0 and r = clamp(sizes[s], 0, R) > 0:
//       h    = down[s, :r, :] @ x[m]                       accumulated in fp32 (fp64 for fp64)
//       y[m] = y[m] + scales[s] * up[s, :, :r] @ act[act_ids[s]](h)     rounded to y's dtype once
//
// Rows are grouped by slot (a counting sort, O(M + S)); a row reads only its own slot's first r
// ranks, so padding and other slots' weights (NaN or not) never reach it. Groups of at least
// `gemm_min_rows` rows (prefill: one request's tokens) run as two GEMMs through ATen (MKL/oneDNN,
// torch's threads; the AVX-512 build's float32 / bfloat16 loops beat them at every size, so for
// those the caller passes a threshold no group reaches); smaller groups (decode: one token per request) run as fused dot products over
// the slot's weight rows, on torch's thread pool (at::parallel_for): one parallel region per call,
// every table's small groups of a TableCalls call together, cut into one run per thread by cost
// (run_small_); float32 and bfloat16 with the adapter store's transposed up have vector loops of
// their own (small_group_f32, small_group_bf16), the other cases generic ones. y may be x
// itself (an output adapter h + f(h)): every row's h is computed before that row is written, and
// rows are disjoint. Nothing here allocates per row; there is no autograd (inference only: the
// Python wrapper refuses inputs that require grad).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

template <typename acc_t>
inline acc_t apply_act(int act, acc_t v) {
  switch (act) {
    case 1: return std::tanh(v);
    case 2: return v < acc_t(0) ? acc_t(0) : v;  // relu; NaN stays NaN, as torch's
    case 3: return acc_t(0.5) * v * (acc_t(1) + std::erf(v * acc_t(0.70710678118654752440)));
    case 4: return v / (acc_t(1) + std::exp(-v));
    case 5: return acc_t(1) / (acc_t(1) + std::exp(-v));
    default: return v;
  }
}

// a thread's scratch rows, kept between calls (grown, never shrunk: no allocation per call)
template <typename A>
A* scratch(int which, size_t n) {
  thread_local std::vector<A> bufs[3];
  if (bufs[which].size() < n) bufs[which].resize(n);
  return bufs[which].data();
}

// One group of n (small) rows of slot s: h = down[s,:r] @ x[row] for each row, then
// y[row] += scale * up[s,:,:r] @ act(h). Weight rows are read once per group, not per row.
// `up` is slot s's (N, R) matrix with strides (un, ur): ur == 1 is the (S, N, R) contiguous layout
// (a short dot product per output), un == 1 the transposed storage the adapter store keeps on the
// CPU (an axpy per rank over contiguous outputs, which vectorizes fully).
template <typename scalar_t, typename acc_t>
void small_group(const scalar_t* __restrict__ x, scalar_t* y, const scalar_t* __restrict__ down,
                 const scalar_t* __restrict__ up, int64_t un, int64_t ur, const int64_t* rows, int n, int64_t K,
                 int64_t N, int64_t R, int64_t r, acc_t scale, int act, acc_t* hbuf /* kMaxSmall * R */,
                 acc_t* xbuf /* kMaxSmall * max(K, N) */) {
  // x rows into accumulate precision (also decouples them from y when y aliases x)
  for (int i = 0; i < n; ++i) {
    const scalar_t* xr = x + rows[i] * K;
    acc_t* xb = xbuf + i * K;
    for (int64_t k = 0; k < K; ++k) xb[k] = static_cast<acc_t>(xr[k]);
  }
  // down: four weight rows at a time (four independent accumulator chains per row; one chain is
  // bound by the FMA latency, not the throughput), the x row read once per four
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) {
    const scalar_t* w0 = down + j * K;
    const scalar_t* w1 = w0 + K;
    const scalar_t* w2 = w1 + K;
    const scalar_t* w3 = w2 + K;
    for (int i = 0; i < n; ++i) {
      const acc_t* xb = xbuf + i * K;
      acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t k = 0; k < K; ++k) {
        const acc_t xv = xb[k];
        a0 += static_cast<acc_t>(w0[k]) * xv;
        a1 += static_cast<acc_t>(w1[k]) * xv;
        a2 += static_cast<acc_t>(w2[k]) * xv;
        a3 += static_cast<acc_t>(w3[k]) * xv;
      }
      acc_t* h = hbuf + i * R + j;
      h[0] = a0; h[1] = a1; h[2] = a2; h[3] = a3;
    }
  }
  for (; j < r; ++j) {
    const scalar_t* w = down + j * K;
    for (int i = 0; i < n; ++i) {
      const acc_t* xb = xbuf + i * K;
      acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += static_cast<acc_t>(w[k]) * xb[k];
      hbuf[i * R + j] = acc;
    }
  }
  if (act != 0)
    for (int i = 0; i < n; ++i)
      for (int64_t t = 0; t < r; ++t) hbuf[i * R + t] = apply_act(act, hbuf[i * R + t]);
  if (un == 1) {  // transposed storage: out[i] = sum_j h[i][j] * up_row_j, then y += scale * out
    acc_t* out = xbuf;  // the x rows are no longer needed
    for (int64_t t = 0; t < int64_t(n) * N; ++t) out[t] = 0;
    int64_t jj = 0;
    for (; jj + 4 <= r; jj += 4) {  // four ranks per pass: one load and store of out per four FMAs
      const scalar_t* u0 = up + jj * ur;
      const scalar_t* u1 = u0 + ur;
      const scalar_t* u2 = u1 + ur;
      const scalar_t* u3 = u2 + ur;
      for (int i = 0; i < n; ++i) {
        const acc_t* h = hbuf + i * R + jj;
        const acc_t h0 = h[0], h1 = h[1], h2 = h[2], h3 = h[3];
        acc_t* o = out + i * N;
#pragma omp simd
        for (int64_t c = 0; c < N; ++c)
          o[c] += static_cast<acc_t>(u0[c]) * h0 + static_cast<acc_t>(u1[c]) * h1 +
                  static_cast<acc_t>(u2[c]) * h2 + static_cast<acc_t>(u3[c]) * h3;
      }
    }
    for (; jj < r; ++jj) {
      const scalar_t* u = up + jj * ur;
      for (int i = 0; i < n; ++i) {
        const acc_t hj = hbuf[i * R + jj];
        acc_t* o = out + i * N;
#pragma omp simd
        for (int64_t c = 0; c < N; ++c) o[c] += static_cast<acc_t>(u[c]) * hj;
      }
    }
    for (int i = 0; i < n; ++i) {
      scalar_t* yr = y + rows[i] * N;
      const acc_t* o = out + i * N;
#pragma omp simd
      for (int64_t c = 0; c < N; ++c) yr[c] = static_cast<scalar_t>(static_cast<acc_t>(yr[c]) + scale * o[c]);
    }
    return;
  }
  for (int i = 0; i < n; ++i) {
    const acc_t* h = hbuf + i * R;
    scalar_t* yr = y + rows[i] * N;
    for (int64_t c = 0; c < N; ++c) {
      const scalar_t* u = up + c * un;  // ur == 1 here (checked by the caller)
      acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t t = 0; t < r; ++t) acc += static_cast<acc_t>(u[t]) * h[t];
      yr[c] = static_cast<scalar_t>(static_cast<acc_t>(yr[c]) + scale * acc);
    }
  }
}

// ---- float32 small groups with the transposed up storage the adapter store keeps on the CPU.
// Two shapes of loop, picked by the group's row count:
//  * 1-2 rows (decode: one token per request): bound by reading the slot's weights, so each (r, K)
//    / (r, N) block is read front to back as a single stream: on a 2-core EPYC (one core) that
//    reads ~25-30 GB/s, where the generic small_group's four interleaved weight-row streams read
//    ~15-20 GB/s. Over a decode step's recorded calls these loops take ~1.5x as long as a loop
//    that only sums the same blocks (their arithmetic does not overlap the memory stream); what
//    was tried to close that, and did not move the engine's time, is in docs/DESIGN.md.
//  * 3+ rows (a prefill chunk, up to 64 rows at a time): bound by arithmetic, so register tiles
//    (below: down_tiles, up_tiles) load each x and weight vector once per tile and sum a tile's
//    dot products with a shuffle tree. Built for AVX-512 they beat ATen's two GEMMs per slot at
//    every group size measured (1.4-2x from 64 to 1024 rows; see cpp_gemm_min_rows in ops/multi.py).
// GCC/Clang vector extensions: 8 floats with AVX2 (the build's -mavx2), 16 with AVX-512 flags.
#if defined(__AVX512F__)
constexpr int kVW = 16;
#else
constexpr int kVW = 8;
#endif
typedef float vf __attribute__((vector_size(kVW * sizeof(float))));
inline vf vload(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof(v)); return v; }
inline void vstore(float* p, const vf& v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline float vsum(const vf& v) {
  float s = 0;
  for (int q = 0; q < kVW; ++q) s += v[q];
  return s;
}

// Weights are float32, or bfloat16 held as its bits (uint16_t) and widened to float32 as they are
// loaded: a bfloat16 is the top half of the float32 with the same value, so widening is a shift
// (vpmovzxwd + vpslld with AVX-512), exact. The arithmetic stays float32 either way.
typedef uint16_t vh __attribute__((vector_size(kVW * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(kVW * sizeof(uint32_t))));
inline vf wload(const float* p) { return vload(p); }
inline vf wload(const uint16_t* p) {
  vh b;
  __builtin_memcpy(&b, p, sizeof(b));
  const vu u = __builtin_convertvector(b, vu) << 16;
  vf v;
  __builtin_memcpy(&v, &u, sizeof(v));
  return v;
}
inline float wval(float v) { return v; }
inline float wval(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

// h[i * R] = w . x[i] for NI rows of x (stride K) and one weight row: the ranks of a tiled group past
// its last whole block of 4 (down_tiles)
template <int NI, typename W>
inline void down_one(const float* __restrict__ xb, const W* __restrict__ w, int64_t K, float* h, int64_t R) {
  vf acc[NI];
  for (int i = 0; i < NI; ++i) acc[i] = vf{};
  int64_t k = 0;
  for (; k + kVW <= K; k += kVW) {
    const vf wv = wload(w + k);
    for (int i = 0; i < NI; ++i) acc[i] += wv * vload(xb + i * K + k);
  }
  for (int i = 0; i < NI; ++i) {
    float s = vsum(acc[i]);
    for (int64_t kk = k; kk < K; ++kk) s += wval(w[kk]) * xb[i * K + kk];
    h[i * R] = s;
  }
}

// h[i * R + j] = w[j] . x[i] for NI rows of x (stride K) and r weight rows (stride K), weight rows
// taken one after another: the slot's (r, K) block is read front to back as one stream (measured
// faster than several interleaved row streams, above), with 4 / NI independent accumulators per
// row of x
template <int NI>
inline void down_seq(const float* __restrict__ xb, const float* __restrict__ w, int64_t K, int64_t r, float* h,
                     int64_t R) {
  constexpr int P = NI == 1 ? 4 : 2;
  for (int64_t j = 0; j < r; ++j) {
    const float* wr = w + j * K;
    vf acc[NI][P];
    for (int i = 0; i < NI; ++i)
      for (int p = 0; p < P; ++p) acc[i][p] = vf{};
    int64_t k = 0;
    for (; k + P * kVW <= K; k += P * kVW)
      for (int p = 0; p < P; ++p) {
        const vf wv = vload(wr + k + p * kVW);
        for (int i = 0; i < NI; ++i) acc[i][p] += wv * vload(xb + i * K + k + p * kVW);
      }
    for (; k + kVW <= K; k += kVW) {
      const vf wv = vload(wr + k);
      for (int i = 0; i < NI; ++i) acc[i][0] += wv * vload(xb + i * K + k);
    }
    for (int i = 0; i < NI; ++i) {
      vf t = acc[i][0];
      for (int p = 1; p < P; ++p) t += acc[i][p];
      float s = vsum(t);
      for (int64_t kk = k; kk < K; ++kk) s += wr[kk] * xb[i * K + kk];
      h[i * R + j] = s;
    }
  }
}

// out[i, :] += sum_j h[i * R + j] * u[j * ur + :] for NI rows of out (stride N), the up rows taken
// one after another (one stream, as above)
template <int NI>
inline void up_seq(const float* __restrict__ u, int64_t ur, const float* h, int64_t r, int64_t R,
                   float* __restrict__ out, int64_t N) {
  for (int64_t j = 0; j < r; ++j) {
    const float* row = u + j * ur;
    vf hb[NI];
    for (int i = 0; i < NI; ++i) hb[i] = vf{} + h[i * R + j];
    int64_t c = 0;
    for (; c + kVW <= N; c += kVW) {
      const vf uv = vload(row + c);
      for (int i = 0; i < NI; ++i) vstore(out + i * N + c, vload(out + i * N + c) + uv * hb[i]);
    }
    for (; c < N; ++c)
      for (int i = 0; i < NI; ++i) out[i * N + c] += row[c] * h[i * R + j];
  }
}

// ---- A group of 3+ rows (a prefill chunk; bound by arithmetic, its weights in the caches).
// down: register tiles of up to kTileRows rows x 4 ranks (16 accumulator vectors with AVX-512, each x
// and weight vector loaded once per tile), their 16 sums reduced 4 at a time by a shuffle tree (hsum4) rather than
// one lane at a time. up: tiles of up to kTileRows rows x 4 vectors of outputs summed in registers over all
// r ranks (the slot's up block read from L1 once per tile, no output row reloaded per rank), then
// added to y scaled, once (no zeroed buffer, no second pass).

// Rows a tile holds: 4 where there are 32 vector registers (AVX-512: a 4 x 4 tile's 16 accumulators,
// its 4 x rows and a weight vector fit), 2 with AVX2's 16 (4 rows there spill).
#if defined(__AVX512F__)
constexpr int kTileRows = 4;
#else
constexpr int kTileRows = 2;
#endif

// A two-vector lane shuffle with constant indices (lane i of the result is lane idx[i] of a:b):
// GCC's __builtin_shuffle (GCC 4.7+; __builtin_shufflevector only from GCC 12), clang's
// __builtin_shufflevector.
typedef int32_t vi __attribute__((vector_size(kVW * sizeof(int32_t))));
#if defined(__clang__)
#define FA_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define FA_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif

// s[jb] = sum of v[jb]'s lanes, for 4 vectors: two lane-halving folds and two in-lane ones
inline void hsum4(const vf& a, const vf& b, const vf& c, const vf& d, float* s) {
#if defined(__AVX512F__)
  const vf ab = FA_SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                FA_SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const vf cd = FA_SHUFFLE(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                FA_SHUFFLE(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  vf t = FA_SHUFFLE(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         FA_SHUFFLE(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  t += FA_SHUFFLE(t, t, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  t += FA_SHUFFLE(t, t, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  s[0] = t[0]; s[1] = t[4]; s[2] = t[8]; s[3] = t[12];
#else
  const vf ab = FA_SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11) + FA_SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  const vf cd = FA_SHUFFLE(c, d, 0, 1, 2, 3, 8, 9, 10, 11) + FA_SHUFFLE(c, d, 4, 5, 6, 7, 12, 13, 14, 15);
  vf t = FA_SHUFFLE(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) + FA_SHUFFLE(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
  t += FA_SHUFFLE(t, t, 1, 0, 3, 2, 5, 4, 7, 6);
  s[0] = t[0]; s[1] = t[2]; s[2] = t[4]; s[3] = t[6];
#endif
}

// h[i * R + jb] = w[jb] . x[i] for NI rows of x (stride K) and 4 weight rows (stride K)
template <int NI, typename W>
inline void down_tile(const float* __restrict__ xb, const W* __restrict__ w, int64_t K, float* h, int64_t R) {
  vf acc[NI][4];
  for (int i = 0; i < NI; ++i)
    for (int jb = 0; jb < 4; ++jb) acc[i][jb] = vf{};
  int64_t k = 0;
  for (; k + kVW <= K; k += kVW) {
    vf xv[NI];
    for (int i = 0; i < NI; ++i) xv[i] = vload(xb + i * K + k);
    for (int jb = 0; jb < 4; ++jb) {
      const vf wv = wload(w + jb * K + k);
      for (int i = 0; i < NI; ++i) acc[i][jb] += wv * xv[i];
    }
  }
  for (int i = 0; i < NI; ++i) {
    float s[4];
    hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3], s);
    for (int jb = 0; jb < 4; ++jb) {
      for (int64_t kk = k; kk < K; ++kk) s[jb] += wval(w[jb * K + kk]) * xb[i * K + kk];
      h[i * R + jb] = s[jb];
    }
  }
}

template <typename W>
inline void down_tiles(const float* xbuf, const W* down, int n, int64_t K, int64_t r, float* hbuf, int64_t R) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) {  // a rank block's 4 weight rows stay in L1 over the row tiles
    const W* w = down + j * K;
    int i = 0;
    for (; i + kTileRows <= n; i += kTileRows) down_tile<kTileRows>(xbuf + i * K, w, K, hbuf + i * R + j, R);
    switch (n - i) {
      case 3: down_tile<3>(xbuf + i * K, w, K, hbuf + i * R + j, R); break;
      case 2: down_tile<2>(xbuf + i * K, w, K, hbuf + i * R + j, R); break;
      case 1: down_tile<1>(xbuf + i * K, w, K, hbuf + i * R + j, R); break;
      default: break;
    }
  }
  for (; j < r; ++j) {  // remainder ranks, two rows at a time
    int i = 0;
    for (; i + 2 <= n; i += 2) down_one<2>(xbuf + i * K, down + j * K, K, hbuf + i * R + j, R);
    if (i < n) down_one<1>(xbuf + i * K, down + j * K, K, hbuf + i * R + j, R);
  }
}

// y[rows[i]][c ..] += scale * a (kVW outputs), rounded once to y's type
inline void add_scaled(float* yr, const vf& a, float scale) { vstore(yr, vload(yr) + a * scale); }
inline void add_scaled(at::BFloat16* yr, const vf& a, float scale) {
  for (int q = 0; q < kVW; ++q) yr[q] = static_cast<at::BFloat16>(static_cast<float>(yr[q]) + scale * a[q]);
}

// y[rows[i], c + v * kVW ..] += scale * sum_j h[i * R + j] * u[j * ur + c + v * kVW ..] for NI rows,
// CV vectors of outputs
template <int NI, int CV, typename T, typename W>
inline void up_tile(const W* __restrict__ u, int64_t ur, const float* h, int64_t R, int64_t r, int64_t c,
                    T* y, const int64_t* rows, int64_t N, float scale) {
  vf acc[NI][CV];
  for (int i = 0; i < NI; ++i)
    for (int v = 0; v < CV; ++v) acc[i][v] = vf{};
  for (int64_t j = 0; j < r; ++j) {
    vf uv[CV];
    for (int v = 0; v < CV; ++v) uv[v] = wload(u + j * ur + c + v * kVW);
    for (int i = 0; i < NI; ++i) {
      const vf hb = vf{} + h[i * R + j];
      for (int v = 0; v < CV; ++v) acc[i][v] += uv[v] * hb;
    }
  }
  for (int i = 0; i < NI; ++i)
    for (int v = 0; v < CV; ++v) add_scaled(y + rows[i] * N + c + v * kVW, acc[i][v], scale);
}

template <int CV, typename T, typename W>
inline void up_cols(const W* u, int64_t ur, const float* hbuf, int n, int64_t R, int64_t r, int64_t c, T* y,
                    const int64_t* rows, int64_t N, float scale) {
  int i = 0;
  for (; i + kTileRows <= n; i += kTileRows) up_tile<kTileRows, CV>(u, ur, hbuf + i * R, R, r, c, y, rows + i, N, scale);
  switch (n - i) {
    case 3: up_tile<3, CV>(u, ur, hbuf + i * R, R, r, c, y, rows + i, N, scale); break;
    case 2: up_tile<2, CV>(u, ur, hbuf + i * R, R, r, c, y, rows + i, N, scale); break;
    case 1: up_tile<1, CV>(u, ur, hbuf + i * R, R, r, c, y, rows + i, N, scale); break;
    default: break;
  }
}

template <typename T, typename W>
inline void up_tiles(const W* up, int64_t ur, const float* hbuf, int n, int64_t r, int64_t R, T* y,
                     const int64_t* rows, int64_t N, float scale) {
  int64_t c = 0;
  for (; c + 4 * kVW <= N; c += 4 * kVW) up_cols<4>(up, ur, hbuf, n, R, r, c, y, rows, N, scale);
  for (; c + kVW <= N; c += kVW) up_cols<1>(up, ur, hbuf, n, R, r, c, y, rows, N, scale);
  for (; c < N; ++c)  // outputs past the last whole vector
    for (int i = 0; i < n; ++i) {
      float o = 0;
      for (int64_t j = 0; j < r; ++j) o += wval(up[j * ur + c]) * hbuf[i * R + j];
      T* yc = y + rows[i] * N + c;
      *yc = static_cast<T>(static_cast<float>(*yc) + scale * o);
    }
}

inline void act_rows(float* hbuf, int n, int64_t r, int64_t R, int act) {
  if (act != 0)
    for (int i = 0; i < n; ++i)
      for (int64_t t = 0; t < r; ++t) hbuf[i * R + t] = apply_act(act, hbuf[i * R + t]);
}

void small_group_f32(const float* __restrict__ x, float* y, const float* __restrict__ down,
                     const float* __restrict__ up, int64_t ur, const int64_t* rows, int n, int64_t K, int64_t N,
                     int64_t R, int64_t r, float scale, int act, float* hbuf, float* xbuf) {
  for (int i = 0; i < n; ++i) std::copy(x + rows[i] * K, x + rows[i] * K + K, xbuf + i * K);
  if (n > 2) {  // enough rows to be bound by arithmetic: the register tiles
    down_tiles(xbuf, down, n, K, r, hbuf, R);
    act_rows(hbuf, n, r, R, act);
    up_tiles(up, ur, hbuf, n, r, R, y, rows, N, scale);
    return;
  }
  // decode: bound by reading the weights once; one stream each
  if (n == 2) down_seq<2>(xbuf, down, K, r, hbuf, R); else down_seq<1>(xbuf, down, K, r, hbuf, R);
  act_rows(hbuf, n, r, R, act);
  float* out = xbuf;  // the x rows are no longer needed
  std::fill(out, out + int64_t(n) * N, 0.f);
  if (n == 2) up_seq<2>(up, ur, hbuf, r, R, out, N); else up_seq<1>(up, ur, hbuf, r, R, out, N);
  for (int i = 0; i < n; ++i) {
    float* yr = y + rows[i] * N;
    const float* o = out + i * N;
    for (int64_t c = 0; c < N; ++c) yr[c] += scale * o[c];
  }
}

// bfloat16 decode loops (1-2 rows): a vector of kVW uint32 lanes loads 2 * kVW bfloat16 weights,
// and each lane's low and high halves are its even and odd weights. ``lane << 16`` is the even one
// as a float32 and ``lane & 0xffff0000`` the odd one: two integer operations widen 2 * kVW weights
// (converting kVW at a time takes two per kVW). So x rows and the up-projection's output are kept
// "split": in each block of 2 * kVW positions the even positions first, then the odd ones
// (split_row, and the y write in small_group_bf16); positions past the last whole block stay in order.
inline void split_row(float* row, int64_t n) {  // in place
  float tmp[2 * kVW];
  for (int64_t b = 0; b + 2 * kVW <= n; b += 2 * kVW) {
    std::copy(row + b, row + b + 2 * kVW, tmp);
    for (int q = 0; q < kVW; ++q) {
      row[b + q] = tmp[2 * q];
      row[b + kVW + q] = tmp[2 * q + 1];
    }
  }
}

inline void widen_pairs(const uint16_t* p, vf& even, vf& odd) {
  vu raw;
  __builtin_memcpy(&raw, p, sizeof(raw));
  const vu lo = raw << 16, hi = raw & 0xffff0000u;
  __builtin_memcpy(&even, &lo, sizeof(even));
  __builtin_memcpy(&odd, &hi, sizeof(odd));
}

// h[i * R + j] = w[j] . x[i] for NI split rows of x (stride K), the (r, K) block read as one stream
template <int NI>
inline void down_seq_bf16(const float* __restrict__ xs, const uint16_t* __restrict__ w, int64_t K, int64_t r,
                          float* h, int64_t R) {
  for (int64_t j = 0; j < r; ++j) {
    const uint16_t* wr = w + j * K;
    vf acc[NI][2];
    for (int i = 0; i < NI; ++i) acc[i][0] = acc[i][1] = vf{};
    int64_t k = 0;
    for (; k + 2 * kVW <= K; k += 2 * kVW) {
      vf even, odd;
      widen_pairs(wr + k, even, odd);
      for (int i = 0; i < NI; ++i) {
        acc[i][0] += even * vload(xs + i * K + k);
        acc[i][1] += odd * vload(xs + i * K + k + kVW);
      }
    }
    for (int i = 0; i < NI; ++i) {
      float s = vsum(acc[i][0] + acc[i][1]);
      for (int64_t kk = k; kk < K; ++kk) s += wval(wr[kk]) * xs[i * K + kk];
      h[i * R + j] = s;
    }
  }
}

// out[i, :] += sum_j h[i * R + j] * u[j * ur + :] for NI split rows of out (stride N), one stream
template <int NI>
inline void up_seq_bf16(const uint16_t* __restrict__ u, int64_t ur, const float* h, int64_t r, int64_t R,
                        float* __restrict__ out, int64_t N) {
  for (int64_t j = 0; j < r; ++j) {
    const uint16_t* row = u + j * ur;
    vf hb[NI];
    for (int i = 0; i < NI; ++i) hb[i] = vf{} + h[i * R + j];
    int64_t c = 0;
    for (; c + 2 * kVW <= N; c += 2 * kVW) {
      vf even, odd;
      widen_pairs(row + c, even, odd);
      for (int i = 0; i < NI; ++i) {
        float* o = out + i * N + c;
        vstore(o, vload(o) + even * hb[i]);
        vstore(o + kVW, vload(o + kVW) + odd * hb[i]);
      }
    }
    for (; c < N; ++c)
      for (int i = 0; i < NI; ++i) out[i * N + c] += wval(row[c]) * h[i * R + j];
  }
}

// Rows of a bfloat16 group from which its slot's weights are widened to float32 once, into scratch,
// rather than as each tile loads them (a tile of 4 rows widens every weight vector again).
constexpr int kWidenRows = 16;

// small_group_f32 for bfloat16 (weights as their bits), float32 arithmetic: x rows widened into
// xbuf, y rounded once (round to nearest even, as at::BFloat16 converts). 1-2 rows take the split
// loops above, more rows small_group_f32's register tiles with each weight vector widened as loaded.
void small_group_bf16(const at::BFloat16* __restrict__ x, at::BFloat16* y, const uint16_t* __restrict__ down,
                      const uint16_t* __restrict__ up, int64_t ur, const int64_t* rows, int n, int64_t K, int64_t N,
                      int64_t R, int64_t r, float scale, int act, float* hbuf, float* xbuf) {
  using T = at::BFloat16;
  const bool split = n <= 2;  // decode: the split loops (above)
  for (int i = 0; i < n; ++i) {
    const T* xr = x + rows[i] * K;
    float* xb = xbuf + i * K;
    for (int64_t k = 0; k < K; ++k) xb[k] = static_cast<float>(xr[k]);
    if (split) split_row(xb, K);
  }
  if (!split) {  // enough rows to be bound by arithmetic: the register tiles
    if (n >= kWidenRows) {  // the slot's weights widened once, then float32's tiles
      float* wd = scratch<float>(2, r * (K + N));
      float* wu = wd + r * K;
      for (int64_t t = 0; t < r * K; ++t) wd[t] = wval(down[t]);
      for (int64_t j = 0; j < r; ++j)
        for (int64_t c = 0; c < N; ++c) wu[j * N + c] = wval(up[j * ur + c]);
      down_tiles(xbuf, wd, n, K, r, hbuf, R);
      act_rows(hbuf, n, r, R, act);
      up_tiles(wu, N, hbuf, n, r, R, y, rows, N, scale);
      return;
    }
    down_tiles(xbuf, down, n, K, r, hbuf, R);
    act_rows(hbuf, n, r, R, act);
    up_tiles(up, ur, hbuf, n, r, R, y, rows, N, scale);
    return;
  }
  if (n == 2) down_seq_bf16<2>(xbuf, down, K, r, hbuf, R); else down_seq_bf16<1>(xbuf, down, K, r, hbuf, R);
  act_rows(hbuf, n, r, R, act);
  float* out = xbuf;  // the x rows are no longer needed
  std::fill(out, out + int64_t(n) * N, 0.f);
  if (n == 2) up_seq_bf16<2>(up, ur, hbuf, r, R, out, N); else up_seq_bf16<1>(up, ur, hbuf, r, R, out, N);
  for (int i = 0; i < n; ++i) {  // out is split: position 2q of a block is its q-th, 2q + 1 its (kVW + q)-th
    T* yr = y + rows[i] * N;
    const float* o = out + i * N;
    int64_t c = 0;
    for (; c + 2 * kVW <= N; c += 2 * kVW)
      for (int q = 0; q < kVW; ++q) {
        yr[c + 2 * q] = static_cast<T>(static_cast<float>(yr[c + 2 * q]) + scale * o[c + q]);
        yr[c + 2 * q + 1] = static_cast<T>(static_cast<float>(yr[c + 2 * q + 1]) + scale * o[c + kVW + q]);
      }
    for (; c < N; ++c) yr[c] = static_cast<T>(static_cast<float>(yr[c]) + scale * o[c]);
  }
}

constexpr int kMaxSmall = 8;  // rows a small group of the generic loops holds at once (larger ones loop)
// rows a group of float32's and bfloat16's own loops holds at once: its x rows (kMaxTile x K floats)
// stay in L2 while each rank block of its weights is applied to all of them
constexpr int kMaxTile = 64;

#define FA_CHECK(cond, ...) TORCH_CHECK(cond, "fastadapters cpu_multi_adapter_: ", __VA_ARGS__)

struct Group { int64_t slot, start, n, r; };

// float32 and bfloat16 with the adapter store's transposed up (un == 1) have loops of their own
// (small_group_f32, small_group_bf16); everything else takes the generic small_group
inline bool own_loops(at::ScalarType dt, int64_t un) {
  return un == 1 && (dt == at::kFloat || dt == at::kBFloat16);
}


// One table's small groups, checked and ready to run (its large groups have run already).
struct SmallWork {
  std::vector<int64_t> order;  // rows grouped by slot; a group's rows are order[start .. start + n)
  std::vector<Group> small;
  const void* down;
  const void* up;
  const int32_t* act;
  const float* scale;
  int64_t R, us, un, ur;
};

// Checks one table's arguments, groups its rows by slot, runs the large groups (ATen GEMMs) and
// leaves the small ones in `work`; returns the GEMM-path rows.
int64_t prepare_(at::Tensor& y, const at::Tensor& x, const at::Tensor& row_slot, const at::Tensor& down,
                 const at::Tensor& up, const at::Tensor& sizes, const at::Tensor& scales, const at::Tensor& act_ids,
                 int64_t gemm_min_rows, SmallWork& work) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&y, &x, &row_slot, &down, &up, &sizes, &scales, &act_ids})
    FA_CHECK(t->device().is_cpu(), "expected CPU tensors, got one on ", t->device());
  FA_CHECK(x.dim() == 2 && y.dim() == 2 && y.size(0) == x.size(0), "expected x (M, K) and y (M, N), got x ",
           x.sizes(), " and y ", y.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  FA_CHECK(down.dim() == 3 && down.size(2) == K, "expected down (S, R, ", K, "), got ", down.sizes());
  const int64_t S = down.size(0), R = down.size(1);
  FA_CHECK(up.dim() == 3 && up.size(0) == S && up.size(1) == N && up.size(2) == R, "expected up (", S, ", ", N, ", ",
           R, "), got ", up.sizes());
  FA_CHECK(row_slot.dim() == 1 && row_slot.size(0) == M && row_slot.scalar_type() == at::kInt,
           "expected row_slot (", M, ",) int32, got ", row_slot.sizes(), " ", row_slot.scalar_type());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&sizes, &act_ids})
    FA_CHECK(t->dim() == 1 && t->size(0) == S && t->scalar_type() == at::kInt, "expected sizes/act_ids (", S,
             ",) int32, got ", t->sizes(), " ", t->scalar_type());
  FA_CHECK(scales.dim() == 1 && scales.size(0) == S && scales.scalar_type() == at::kFloat,
           "expected scales (", S, ",) float32, got ", scales.sizes(), " ", scales.scalar_type());
  const auto dt = y.scalar_type();
  FA_CHECK(x.scalar_type() == dt && down.scalar_type() == dt && up.scalar_type() == dt,
           "expected y, x, down and up of one dtype, got ", dt, ", ", x.scalar_type(), ", ", down.scalar_type(), ", ",
           up.scalar_type());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&y, &x, &row_slot, &down, &sizes, &scales, &act_ids})
    FA_CHECK(t->is_contiguous(), "expected contiguous y, x, row_slot, down, sizes, scales and act_ids");
  const int64_t us = up.stride(0), un = up.stride(1), ur = up.stride(2);
  FA_CHECK((ur == 1 && un == R) || (un == 1 && ur == N),
           "expected up contiguous (S, N, R) or stored as (S, R, N) and transposed, got strides ", up.strides());
  if (M == 0 || S == 0) return 0;

  const int32_t* rs = row_slot.data_ptr<int32_t>();
  const int32_t* sz = sizes.data_ptr<int32_t>();
  const int32_t* ac = act_ids.data_ptr<int32_t>();
  const float* sc = scales.data_ptr<float>();
  // rows grouped by slot (stable): every value checked before anything is written
  std::vector<int64_t> count(S + 1, 0);
  for (int64_t m = 0; m < M; ++m) {
    const int32_t s = rs[m];
    FA_CHECK(s >= -1 && s < S, "row_slot[", m, "] = ", s, "; valid: -1 (base) or 0..", S - 1);
    if (s >= 0) ++count[s + 1];
  }
  for (int64_t s = 0; s < S; ++s) {
    FA_CHECK(ac[s] >= 0 && ac[s] <= 5, "act_ids[", s, "] = ", ac[s], "; valid: 0..5");
    count[s + 1] += count[s];
  }
  std::vector<int64_t>& order = work.order;
  order.assign(count[S], 0);
  {
    std::vector<int64_t> fill(count.begin(), count.end() - 1);
    for (int64_t m = 0; m < M; ++m)
      if (rs[m] >= 0) order[fill[rs[m]]++] = m;
  }
  std::vector<Group>& small = work.small;
  std::vector<Group> large;
  const int64_t chunk = own_loops(dt, un) ? kMaxTile : kMaxSmall;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = count[s + 1] - count[s];
    const int64_t r = std::min<int64_t>(std::max<int32_t>(sz[s], 0), R);
    if (n == 0 || r == 0) continue;
    if (n >= gemm_min_rows) {
      large.push_back(Group{s, count[s], n, r});
    } else {
      for (int64_t off = 0; off < n; off += chunk)  // small groups split into chunks
        small.push_back(Group{s, count[s] + off, std::min<int64_t>(chunk, n - off), r});
    }
  }

  int64_t gemm_rows = 0;
  // large groups: two GEMMs each through ATen (its own threading), in accumulate precision
  const auto acc_type = dt == at::kDouble ? at::kDouble : at::kFloat;
  for (const Group& g : large) {
    gemm_rows += g.n;
    const int64_t first = order[g.start];
    const bool contiguous = order[g.start + g.n - 1] - first == g.n - 1;
    at::Tensor idx;
    at::Tensor xs;
    if (contiguous) {
      xs = x.narrow(0, first, g.n);
    } else {
      idx = at::from_blob(order.data() + g.start, {g.n}, at::kLong).clone();
      xs = x.index_select(0, idx);
    }
    at::Tensor wd = down.select(0, g.slot).narrow(0, 0, g.r);  // (r, K)
    at::Tensor wu = up.select(0, g.slot).narrow(1, 0, g.r);    // (N, r)
    at::Tensor h = at::mm(xs.to(acc_type), wd.to(acc_type).t());
    switch (ac[g.slot]) {
      case 1: h.tanh_(); break;
      case 2: h.relu_(); break;
      case 3: h = at::gelu(h); break;
      case 4: h = at::silu(h); break;
      case 5: h.sigmoid_(); break;
      default: break;
    }
    const double scale = sc[g.slot];
    if (contiguous && dt == acc_type) {
      y.narrow(0, first, g.n).addmm_(h, wu.t(), 1.0, scale);
    } else {
      at::Tensor ys = contiguous ? y.narrow(0, first, g.n) : y.index_select(0, idx);
      at::Tensor out = at::addmm(ys.to(acc_type), h, wu.to(acc_type).t(), 1.0, scale).to(dt);
      if (contiguous) ys.copy_(out); else y.index_copy_(0, idx, out);
    }
  }
  work.down = down.data_ptr();
  work.up = up.data_ptr();
  work.act = ac;
  work.scale = sc;
  work.R = R;
  work.us = us;
  work.un = un;
  work.ur = ur;
  return gemm_rows;
}

// Work below which the small groups of one call stay on the calling thread (a parallel region
// costs a few microseconds): in run_small_'s cost units, a decode group of rank 8 at K = N = 576 is
// ~28k. On a SmolLM2-135M decode step's calls (32 rows, 17 adapters of ranks 8-64), two threads
// took 8.1-8.6 ms against 13.3-13.6 ms on one, where 2^14 and 2^18 did no better than this.
constexpr int64_t kParallelMinCost = int64_t(1) << 16;

// Runs the small groups of every table in `works` on y (rows are disjoint across groups and
// tables: a row has one slot of one table). With more than one thread and enough work they are
// cut into one contiguous run of groups per thread with about equal cost, so that every thread
// streams its own slots' weights (a decode call's groups are few and of unequal rank; a split by
// count would leave one thread the large ones). Each group is computed by one thread whatever the
// split, so the result does not depend on the thread count.
void run_small_(at::Tensor& y, const at::Tensor& x, const std::vector<SmallWork>& works) {
  const int64_t K = x.size(1), N = y.size(1);
  struct Item { const SmallWork* w; const Group* g; };
  std::vector<Item> items;
  std::vector<int64_t> prefix{0};  // prefix[i]: cost of items before i
  int64_t R = 1;
  for (const SmallWork& w : works) {
    R = std::max(R, w.R);
    for (const Group& g : w.small) {
      items.push_back(Item{&w, &g});
      // the weights are read once per group, the arithmetic grows with its rows
      prefix.push_back(prefix.back() + g.r * (K + N) * (g.n + 2));
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  if (n_items == 0) return;
  const int64_t total = prefix.back();
  const int64_t tasks = total < kParallelMinCost ? 1 : std::min<int64_t>(at::get_num_threads(), n_items);
  std::vector<int64_t> cut(tasks + 1, n_items);
  cut[0] = 0;
  for (int64_t t = 1, i = 0; t < tasks; ++t) {  // task t starts at the first item whose middle is past t/tasks of the cost
    while (i < n_items && (prefix[i] + prefix[i + 1]) * tasks < 2 * total * t) ++i;
    cut[t] = std::max(i, cut[t - 1]);
  }
  const auto dt = y.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "cpu_multi_adapter_", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, tasks, 1, [&](int64_t lo, int64_t hi) {
      const size_t rows_max = std::max(kMaxSmall, kMaxTile);
      acc_t* hbuf = scratch<acc_t>(0, rows_max * R);
      acc_t* xbuf = scratch<acc_t>(1, rows_max * std::max(K, N));
      for (int64_t i = cut[lo]; i < cut[hi]; ++i) {
        const SmallWork& w = *items[i].w;
        const Group& g = *items[i].g;
        const scalar_t* dp = static_cast<const scalar_t*>(w.down) + g.slot * w.R * K;
        const scalar_t* upp = static_cast<const scalar_t*>(w.up) + g.slot * w.us;
        const int64_t* rows = w.order.data() + g.start;
        if (w.un == 1 && std::is_same_v<scalar_t, float>) {  // the store's transposed up (the casts are no-ops here)
          small_group_f32(reinterpret_cast<const float*>(xp), reinterpret_cast<float*>(yp),
                          reinterpret_cast<const float*>(dp), reinterpret_cast<const float*>(upp), w.ur, rows,
                          static_cast<int>(g.n), K, N, w.R, g.r, static_cast<float>(w.scale[g.slot]), w.act[g.slot],
                          reinterpret_cast<float*>(hbuf), reinterpret_cast<float*>(xbuf));
          continue;
        }
        if (w.un == 1 && std::is_same_v<scalar_t, at::BFloat16>) {  // the same for bfloat16 (acc_t is float)
          small_group_bf16(reinterpret_cast<const at::BFloat16*>(xp), reinterpret_cast<at::BFloat16*>(yp),
                           reinterpret_cast<const uint16_t*>(dp), reinterpret_cast<const uint16_t*>(upp), w.ur, rows,
                           static_cast<int>(g.n), K, N, w.R, g.r, static_cast<float>(w.scale[g.slot]), w.act[g.slot],
                           reinterpret_cast<float*>(hbuf), reinterpret_cast<float*>(xbuf));
          continue;
        }
        small_group<scalar_t, acc_t>(xp, yp, dp, upp, w.un, w.ur, rows, static_cast<int>(g.n), K, N, w.R, g.r,
                                     static_cast<acc_t>(w.scale[g.slot]), w.act[g.slot], hbuf, xbuf);
      }
    });
  });
}

// (..., N) / (..., K) -> (M, N) / (M, K) views (2-D tensors are returned as they are)
std::pair<at::Tensor, at::Tensor> as_rows(const at::Tensor& y, const at::Tensor& x) {
  if (x.dim() == 2 && y.dim() == 2) return {y, x};
  FA_CHECK(x.dim() >= 2 && y.dim() == x.dim() && x.sizes().slice(0, x.dim() - 1) == y.sizes().slice(0, y.dim() - 1),
           "expected x (M, K) and y (M, N), or x (..., K) and y (..., N) with the same leading sizes, got x ",
           x.sizes(), " and y ", y.sizes());
  FA_CHECK(x.is_contiguous() && y.is_contiguous(), "expected contiguous y and x");
  return {y.view({-1, y.size(-1)}), x.view({-1, x.size(-1)})};
}

}  // namespace

// y (M, N) in place; x (M, K); row_slot (M,) int32; down (S, R, K); up (S, N, R); sizes (S,) int32;
// scales (S,) float32; act_ids (S,) int32. All CPU; y/x/down/up one floating dtype; y, x, down and
// the small tensors contiguous; up either contiguous or the transposed storage (strides (N*R, 1, N)).
// Returns the number of rows that took the GEMM path (for tests and benchmarks).
// x may also be (..., K) and y (..., N) with the same leading sizes, both contiguous (a layer's
// (B, T, K) input and output as the serving router has them): their rows are the flattened
// leading dimensions.
int64_t cpu_multi_adapter_(at::Tensor y, const at::Tensor& x, const at::Tensor& row_slot, const at::Tensor& down,
                           const at::Tensor& up, const at::Tensor& sizes, const at::Tensor& scales,
                           const at::Tensor& act_ids, int64_t gemm_min_rows) {
  auto [y2, x2] = as_rows(y, x);
  std::vector<SmallWork> works(1);
  const int64_t gemm_rows = prepare_(y2, x2, row_slot, down, up, sizes, scales, act_ids, gemm_min_rows, works[0]);
  run_small_(y2, x2, works);
  return gemm_rows;
}

// One layer phase's kernel calls, one per rank bucket: the serving router builds it once per layer
// and batch shape and hands it over whole, so a phase costs one call from Python however many rank
// buckets its rows use (fastadapters/serving/routing.py, Router.forward).
struct TableCalls {
  std::vector<at::Tensor> row_slot, down, up, sizes, scales, act_ids;
  TableCalls(std::vector<at::Tensor> rs, std::vector<at::Tensor> d, std::vector<at::Tensor> u,
             std::vector<at::Tensor> sz, std::vector<at::Tensor> sc, std::vector<at::Tensor> ac)
      : row_slot(std::move(rs)), down(std::move(d)), up(std::move(u)), sizes(std::move(sz)), scales(std::move(sc)),
        act_ids(std::move(ac)) {
    const size_t n = row_slot.size();
    FA_CHECK(down.size() == n && up.size() == n && sizes.size() == n && scales.size() == n && act_ids.size() == n,
             "TableCalls: expected lists of one length (one entry per rank bucket), got ", n, ", ", down.size(), ", ",
             up.size(), ", ", sizes.size(), ", ", scales.size(), ", ", act_ids.size());
  }
  size_t size() const { return row_slot.size(); }
};

// cpu_multi_adapter_ for each entry of `calls`, on the same y and x (the buckets' rows are
// disjoint: a row has one adapter, in one bucket); returns the GEMM-path rows of all of them.
int64_t cpu_multi_adapter_calls_(at::Tensor y, const at::Tensor& x, const TableCalls& calls, int64_t gemm_min_rows) {
  auto [y2, x2] = as_rows(y, x);
  int64_t gemm_rows = 0;
  std::vector<SmallWork> works(calls.size());
  for (size_t i = 0; i < calls.size(); ++i)
    gemm_rows += prepare_(y2, x2, calls.row_slot[i], calls.down[i], calls.up[i], calls.sizes[i], calls.scales[i],
                          calls.act_ids[i], gemm_min_rows, works[i]);
  run_small_(y2, x2, works);  // one parallel region for every bucket's small groups
  return gemm_rows;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_multi_adapter_", &cpu_multi_adapter_,
        "y += per-row adapter deltas in place (fastadapters.ops.multi contract); returns the GEMM-path rows");
  pybind11::class_<TableCalls>(m, "TableCalls", pybind11::module_local())
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>(),
           "row_slot, down, up, sizes, scales, act_ids: one list entry per rank bucket")
      .def("__len__", &TableCalls::size)
      .def_readonly("row_slot", &TableCalls::row_slot)
      .def_readonly("down", &TableCalls::down)
      .def_readonly("up", &TableCalls::up);
  m.def("cpu_multi_adapter_calls_", &cpu_multi_adapter_calls_,
        "cpu_multi_adapter_ for every entry of a TableCalls on the same y and x; returns the GEMM-path rows");
}
