// multi_adapter.cuh -- launch API of the multi-adapter decode kernel (many adapters, one batch).
//
// Semantics (the lead's contract, shared with the Triton kernel and the Python reference):
//   for each row m of x (M, K):  s = row_slot[m]
//     s < 0 : y[m] = y0[m]                                     (base row, no adapter work)
//     else  : r = sizes[s]; h = act_{act_ids[s]}(down[s, :r, :] @ x[m])        (fp32)
//             y[m] = y0[m] + scales[s] * up[s, :, :r] @ h                      (fp32 accumulate)
//   down (S, R, K), up (S, N, R): slots padded to R in storage; compute uses only sizes[s]
//   (a rank-4 slot costs rank-4 work; sizes[s] == 0 costs nothing). LoRA: act 0, down = A,
//   up = B, scales = alpha / r. Bottleneck adapters: act 1..5. y must not alias x or y0
//   (the output placement passes x = y0 = h).
//
// Metadata contract (the caller computes it once per forward from row_slot, on the device, and
// shares it between layers; fastadapters.ops.cuda_ops.multi_adapter_meta is the reference
// implementation). With G = max_segs (any value >= the number of distinct slots present plus one
// for the base rows; min(M, S + 1) always suffices and does not depend on the mix):
//   sorted_rows (M,)    int32: a permutation of 0..M-1 in which rows of the same slot are
//                       contiguous (stable order inside a group is recommended, not required).
//   seg_starts  (G + 1,) int32, non-decreasing, seg_starts[0] = 0, seg_starts[G] = M: segment g
//                       is sorted positions [seg_starts[g], seg_starts[g + 1]); unused segments
//                       are empty (start == end, e.g. all == M at the tail).
//   seg_slots   (G,)    int32: the slot of segment g, or -1 for a segment of base rows (also for
//                       unused segments). A slot must appear in at most one segment (so each
//                       adapter's weights are read once); out-of-range slots (>= S) are treated
//                       as base rows rather than read out of bounds.
// Every row must lie in exactly one segment; rows in no segment leave y[m] unwritten.
//
// Launch: one kernel (see adapter_branch.cuh for the producer/consumer design), grid
// plan.grid = G * (ceil(K / k_chunk) + ceil(N / 256)) CTAs of 256 threads, depending on
// (M, N, K, R, G) only. Workspace: partials fp32 [plan.partial_floats] and counters int32
// [plan.counter_ints] zeroed before the launch (a memset on the same stream: graph-capturable).
// Needs sm_70+ (nanosleep in the wait loop). No torch headers.
#pragma once

#include <cuda_runtime.h>

#include "adapter_plan.cuh"

namespace fastadapters {

struct MultiAdapterArgs {
  void* y;               // (M, N), row stride ld_y
  const void* y0;        // (M, N), row stride ld_y0
  const void* x;         // (M, K), row stride ld_x
  const void* down;      // (S, R, K) contiguous
  const void* up;        // (S, N, R) contiguous
  const int32_t* sizes;  // (S,)
  const float* scales;   // (S,)
  const int32_t* act_ids;     // (S,)
  const int32_t* sorted_rows; // (M,)
  const int32_t* seg_starts;  // (max_segs + 1,)
  const int32_t* seg_slots;   // (max_segs,)
  int64_t M, N, K, R, S, max_segs;
  int64_t ld_y, ld_y0, ld_x;
  float* partials;       // multi_adapter_plan(...).partial_floats
  int32_t* counters;     // multi_adapter_plan(...).counter_ints, zero at launch
};

// Geometry and workspace sizes of one call (pure; the caller sizes the workspace with it).
AdapterBranchPlan multi_adapter_plan(int64_t M, int64_t N, int64_t K, int64_t R,
                                     int64_t max_segs, ScalarKind kind);

// Enqueues the kernel on `stream`; returns the CUDA launch status.
cudaError_t launch_multi_adapter(const MultiAdapterArgs& args, ScalarKind kind,
                                 cudaStream_t stream);

}  // namespace fastadapters
