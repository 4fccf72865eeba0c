// adapter_branch.cuh -- the one-launch adapter-branch kernel shared by multi_adapter.cu and
// bottleneck.cu:  y[m] = y0[m] + scale * up @ act(down[:r] @ x[m])  for row groups ("segments")
// that share one adapter, with base rows copied through.
//
// Why this shape. Decode is memory-bound and has few rows, so the kernel must (a) read each
// adapter's down and up once per call however many rows use it, (b) spread that read over many
// SMs even when one adapter serves the whole batch, and (c) stay one launch with a grid that only
// depends on (M, N, K, R, max_segs), never on the adapter mix (CUDA-graph replay with any mix).
// One CTA per (segment, N-tile) that also recomputes the shrink would re-read `down` once per
// N-tile and do the rows x rank x K shrink work on a single SM per tile, so instead the grid has
// two roles:
//   producers  (segment g, K-chunk c): partial[c][p][j] = sum_{k in chunk c} down[s, j, k] * x[row(p), k]
//              for every sorted position p of segment g and j < r: a warp task is (rank index
//              j, up to 16 rows), the down row slice held in registers (16-byte loads), the rows
//              dotted against it, warp-shuffle reduction. Each down element is read from DRAM once.
//   consumers  (segment g, N-tile t): wait until the num_k_chunks producers of g have signalled,
//              h = act(sum_c partial[c][p][:r]) in shared memory, y[row, n] = y0[row, n] +
//              scale * sum_j up[s, n, j] * h[p, j] for the tile's n (one thread per n, 16-byte loads
//              of the up row). Each up element is read from DRAM once.
// Waiting inside one launch is deadlock-free because roles are taken from a ticket (an atomic
// counter incremented as each CTA starts), not from blockIdx: producers hold tickets
// [0, num_producers), consumers the rest, so when a consumer waits every producer it waits on has
// already started and runs without waiting on anything.
//
// Workspace (caller allocates, see AdapterBranchPlan): partials, fp32 [num_k_chunks][M][R]
// (uninitialised is fine), and counters, int32 [1 + max_segs], which MUST be zero at launch
// (counters[0] is the ticket, counters[1 + g] the producers done for segment g).
//
// No torch headers: compiles with nvcc alone.
#pragma once

#include "adapter_common.cuh"
#include "adapter_plan.cuh"

namespace fastadapters {

// Everything one launch needs. Element strides are in elements of the storage type; the last
// dimension of every tensor is contiguous (stride 1).
struct AdapterBranchParams {
  void* y = nullptr;              // (M, N) output, distinct from x and y0
  const void* y0 = nullptr;       // (M, N) base output (== x for the output placement)
  const void* x = nullptr;        // (M, K) adapter input
  const void* down = nullptr;     // down[s, j, k] at s * down_ss + j * down_sr + k
  const void* up = nullptr;       // up[s, n, j]   at s * up_ss + n * up_sn + j
  const int32_t* sizes = nullptr;   // (S,) rank / bottleneck size per slot (clamped to [0, R])
  const float* scales = nullptr;    // (S,) scale per slot
  const int32_t* act_ids = nullptr; // (S,) activation id per slot
  // Segment metadata (see multi_adapter.cuh). sorted_rows == nullptr selects the implicit
  // single segment used by bottleneck.cu: rows 0..M-1, slot 0, size implicit_size,
  // activation implicit_act, scale scales[0].
  const int32_t* sorted_rows = nullptr;
  const int32_t* seg_starts = nullptr;
  const int32_t* seg_slots = nullptr;
  int32_t implicit_size = 0;
  int32_t implicit_act = 0;
  int64_t M = 0, N = 0, K = 0, R = 0, S = 0;
  int64_t ld_y = 0, ld_y0 = 0, ld_x = 0;
  int64_t down_ss = 0, down_sr = 0;
  int64_t up_ss = 0, up_sn = 0;
  float* partials = nullptr;      // workspace, plan.partial_floats
  int32_t* counters = nullptr;    // workspace, plan.counter_ints, zero at launch
  AdapterBranchPlan plan;
  bool vec_x_down = false;        // x and down rows may use 16-byte loads
  bool vec_up = false;            // up rows may use 16-byte loads
};

struct SegmentInfo {
  int64_t begin;  // first sorted position
  int64_t end;    // one past the last
  int slot;       // -1: base rows (copied through)
  int size;       // rank used for compute, 0 when slot < 0
  int act;
  float scale;
};

__device__ __forceinline__ SegmentInfo load_segment(const AdapterBranchParams& p, int64_t g) {
  SegmentInfo seg;
  if (p.sorted_rows == nullptr) {
    seg.begin = 0;
    seg.end = p.M;
    seg.slot = 0;
    seg.size = p.implicit_size < 0 ? 0 : (p.implicit_size > p.R ? int(p.R) : p.implicit_size);
    seg.act = p.implicit_act;
    seg.scale = p.scales[0];
    return seg;
  }
  int64_t b = p.seg_starts[g], e = p.seg_starts[g + 1];
  b = b < 0 ? 0 : (b > p.M ? p.M : b);
  e = e < b ? b : (e > p.M ? p.M : e);
  seg.begin = b;
  seg.end = e;
  const int slot = p.seg_slots[g];
  if (slot < 0 || slot >= p.S) {  // base rows, or an out-of-range slot (treated as base)
    seg.slot = -1;
    seg.size = 0;
    seg.act = 0;
    seg.scale = 0.f;
    return seg;
  }
  const int r = p.sizes[slot];
  seg.slot = slot;
  seg.size = r < 0 ? 0 : (r > p.R ? int(p.R) : r);
  seg.act = p.act_ids[slot];
  seg.scale = p.scales[slot];
  return seg;
}

__device__ __forceinline__ int64_t row_at(const AdapterBranchParams& p, int64_t pos) {
  return p.sorted_rows == nullptr ? pos : int64_t(p.sorted_rows[pos]);
}

// A segment does shrink work (and its consumers wait) only when it has rows, a slot and rank > 0.
__device__ __forceinline__ bool segment_has_branch(const SegmentInfo& seg) {
  return seg.slot >= 0 && seg.size > 0 && seg.end > seg.begin;
}

template <typename T>
__device__ void branch_producer(const AdapterBranchParams& p, int64_t g, int64_t chunk) {
  constexpr int kVec = Vec16<T>::kElems;
  constexpr int64_t kSubSpan = int64_t(32) * kVec * kSubVecs;
  const SegmentInfo seg = load_segment(p, g);
  if (!segment_has_branch(seg)) return;  // block-uniform: nobody waits on this segment

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ down = static_cast<const T*>(p.down) + int64_t(seg.slot) * p.down_ss;
  const int64_t k_begin = chunk * p.plan.k_chunk;
  const int64_t k_end = min(p.K, k_begin + p.plan.k_chunk);
  float* __restrict__ part = p.partials + chunk * p.M * p.R;

  // Warp tasks: (rank index j, group of kProducerTaskRows rows of the segment). With a large
  // rank every warp holds one down row and dots all rows against it; with a small rank and many
  // rows (rank 1 over 64 rows) the row groups keep all warps busy. The down row slice is reloaded
  // per task (an L1 hit after the first).
  const int64_t seg_rows = seg.end - seg.begin;
  const int64_t row_groups = (seg_rows + kProducerTaskRows - 1) / kProducerTaskRows;
  const int64_t num_tasks = int64_t(seg.size) * row_groups;
  for (int64_t task = warp; task < num_tasks; task += num_warps) {
    const int j = int(task % seg.size);
    const int64_t task_begin = seg.begin + (task / seg.size) * kProducerTaskRows;
    const int64_t task_end = min(seg.end, task_begin + kProducerTaskRows);
    const T* __restrict__ drow = down + int64_t(j) * p.down_sr;
    for (int64_t ks = k_begin; ks < k_end; ks += kSubSpan) {
      float dv[kSubVecs][kVec];
#pragma unroll
      for (int v = 0; v < kSubVecs; ++v)
        load_chunk<T>(drow, ks + int64_t(v * 32 + lane) * kVec, k_end, p.vec_x_down, dv[v]);
      for (int64_t pos = task_begin; pos < task_end; pos += kProducerRowGroup) {
        float acc[kProducerRowGroup];
#pragma unroll
        for (int i = 0; i < kProducerRowGroup; ++i) {
          acc[i] = 0.f;
          if (pos + i < task_end) {  // warp-uniform
            const T* __restrict__ xrow = x + row_at(p, pos + i) * p.ld_x;
#pragma unroll
            for (int v = 0; v < kSubVecs; ++v) {
              float xv[kVec];
              load_chunk<T>(xrow, ks + int64_t(v * 32 + lane) * kVec, k_end, p.vec_x_down, xv);
#pragma unroll
              for (int e = 0; e < kVec; ++e) acc[i] = fmaf(dv[v][e], xv[e], acc[i]);
            }
          }
        }
#pragma unroll
        for (int i = 0; i < kProducerRowGroup; ++i) acc[i] = warp_sum(acc[i]);
        if (lane == 0) {
#pragma unroll
          for (int i = 0; i < kProducerRowGroup; ++i) {
            if (pos + i < task_end) {  // the same lane wrote the previous sub-chunk's value
              float* dst = part + (pos + i) * p.R + j;
              *dst = (ks == k_begin) ? acc[i] : *dst + acc[i];
            }
          }
        }
      }
    }
  }
  // Publish: every thread's partial writes are visible device-wide before the signal.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(p.counters + 1 + g, 1);
}

template <typename T>
__device__ void branch_consumer(const AdapterBranchParams& p, int64_t g, int64_t tile) {
  constexpr int kVec = Vec16<T>::kElems;
  __shared__ float s_h[kRowChunk][kRankChunk];
  const SegmentInfo seg = load_segment(p, g);
  const int64_t n = tile * p.plan.n_tile + threadIdx.x;
  const bool n_ok = n < p.N;
  T* __restrict__ y = static_cast<T*>(p.y);
  const T* __restrict__ y0 = static_cast<const T*>(p.y0);

  if (!segment_has_branch(seg)) {  // base rows, rank 0, or empty: y = y0 on this tile
    if (n_ok)
      for (int64_t pos = seg.begin; pos < seg.end; ++pos) {
        const int64_t row = row_at(p, pos);
        y[row * p.ld_y + n] = y0[row * p.ld_y0 + n];
      }
    return;
  }

  // Wait for this segment's producers (all hold smaller tickets, so they are running).
  if (threadIdx.x == 0 && p.plan.num_k_chunks > 0) {
    volatile int32_t* done = p.counters + 1 + g;
    while (*done < p.plan.num_k_chunks) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
      __nanosleep(100);
#endif
    }
    __threadfence();
  }
  __syncthreads();

  const T* __restrict__ urow =
      static_cast<const T*>(p.up) + int64_t(seg.slot) * p.up_ss + (n_ok ? n : 0) * p.up_sn;
  const int64_t plane = p.M * p.R;
  for (int64_t rc = seg.begin; rc < seg.end; rc += kRowChunk) {
    const int nr = int(min(int64_t(kRowChunk), seg.end - rc));
    float acc[kRowChunk];
#pragma unroll
    for (int i = 0; i < kRowChunk; ++i) acc[i] = 0.f;
    for (int j0 = 0; j0 < seg.size; j0 += kRankChunk) {
      const int nj = min(kRankChunk, seg.size - j0);
      __syncthreads();  // the previous pass is done reading s_h
      for (int idx = threadIdx.x; idx < kRowChunk * kRankChunk; idx += blockDim.x) {
        const int i = idx / kRankChunk, jj = idx % kRankChunk;
        float v = 0.f;
        if (i < nr && jj < nj) {
          const float* src = p.partials + (rc + i) * p.R + j0 + jj;
          float sum = 0.f;
          for (int64_t c = 0; c < p.plan.num_k_chunks; ++c) sum += __ldcg(src + c * plane);
          v = apply_act(seg.act, sum);
        }
        s_h[i][jj] = v;
      }
      __syncthreads();
      if (n_ok) {
        for (int jj = 0; jj < nj; jj += kVec) {
          float u[kVec];
          load_chunk<T>(urow, j0 + jj, j0 + nj, p.vec_up, u);
#pragma unroll
          for (int e = 0; e < kVec; ++e)
#pragma unroll
            for (int i = 0; i < kRowChunk; ++i) acc[i] = fmaf(u[e], s_h[i][jj + e], acc[i]);
        }
      }
    }
    if (n_ok) {
#pragma unroll
      for (int i = 0; i < kRowChunk; ++i) {
        if (i < nr) {
          const int64_t row = row_at(p, rc + i);
          const float base = to_float(y0[row * p.ld_y0 + n]);
          y[row * p.ld_y + n] = from_float<T>(fmaf(seg.scale, acc[i], base));
        }
      }
    }
  }
}

// Two CTAs per SM (a 128-register budget): with the bound on threads alone ptxas aimed at three
// and held the fp32 instantiation to 80 registers, spilling 32-40 B per thread; with this one no
// instantiation spills on sm_80 or sm_90a (tests/csrc/test_csrc_build.py checks `ptxas -v`).
template <typename T>
__global__ void __launch_bounds__(kBranchThreads, kBranchMinBlocksPerSM) adapter_branch_kernel(AdapterBranchParams p) {
  __shared__ int64_t s_ticket;
  if (threadIdx.x == 0) s_ticket = int64_t(atomicAdd(p.counters, 1));
  __syncthreads();
  const int64_t ticket = s_ticket;
  if (ticket < p.plan.num_producers) {
    branch_producer<T>(p, ticket / p.plan.num_k_chunks, ticket % p.plan.num_k_chunks);
  } else {
    const int64_t u = ticket - p.plan.num_producers;
    branch_consumer<T>(p, u / p.plan.num_n_tiles, u % p.plan.num_n_tiles);
  }
}

// Sets the vector-load flags from pointer alignment and strides (host side, once per launch).
template <typename T>
void finalize_adapter_branch_params(AdapterBranchParams& p) {
  constexpr int64_t kVec = Vec16<T>::kElems;
  p.vec_x_down = is_aligned16(p.x) && is_aligned16(p.down) && p.ld_x % kVec == 0 &&
                 p.down_ss % kVec == 0 && p.down_sr % kVec == 0;
  p.vec_up = is_aligned16(p.up) && p.up_ss % kVec == 0 && p.up_sn % kVec == 0;
}

#if defined(FASTADAPTERS_HOST_EMULATION)
// tests/csrc/kernel_emulator.cpp runs the grid on host threads (CTAs one after another, in
// ticket order) to check the kernel's arithmetic and indexing without a GPU.
template <typename T>
cudaError_t emulate_adapter_branch(const AdapterBranchParams& p);
#endif

// Launches on `stream`. Returns cudaErrorInvalidConfiguration for a grid past the 1-D limit,
// else the launch status.
template <typename T>
cudaError_t launch_adapter_branch_typed(AdapterBranchParams p, cudaStream_t stream) {
  finalize_adapter_branch_params<T>(p);
  if (p.plan.grid == 0) return cudaSuccess;
  if (p.plan.grid > int64_t(0x7fffffff)) return cudaErrorInvalidConfiguration;
#if defined(FASTADAPTERS_HOST_EMULATION)
  (void)stream;
  return emulate_adapter_branch<T>(p);
#else
  adapter_branch_kernel<T><<<dim3(unsigned(p.plan.grid)), dim3(p.plan.threads), 0, stream>>>(p);
  return cudaGetLastError();
#endif
}

inline cudaError_t launch_adapter_branch(const AdapterBranchParams& p, ScalarKind kind,
                                         cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat16:
      return launch_adapter_branch_typed<__half>(p, stream);
    case ScalarKind::kBFloat16:
      return launch_adapter_branch_typed<__nv_bfloat16>(p, stream);
    case ScalarKind::kFloat32:
      return launch_adapter_branch_typed<float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastadapters
