// bottleneck.cuh -- launch API of the fused bottleneck-adapter forward for small M (one adapter).
//
//   parallel placement: y = y0 + scale * U @ act(D @ x)     x (M, K), y0 (M, N)
//   output placement:   y = h  + scale * U @ act(D @ h)     the caller passes x = y0 = h (K == N)
//   D (b, K) = adapter_down.weight, U (N, b) = adapter_up.weight, no biases (as the LLM-Adapters
//   fork), scale a 1-element fp32 device buffer (fixed or learned scaling, no host sync), act id
//   0 identity, 1 tanh, 2 relu, 3 gelu (erf), 4 silu, 5 sigmoid. fp32 accumulation.
//   y must not alias x or y0.
//
// Same one-launch producer/consumer kernel as the multi-adapter op (adapter_branch.cuh) with one
// implicit segment holding all M rows: the down matrix is split over ceil(K / k_chunk) producer
// CTAs and read once, the up matrix over ceil(N / 256) consumer CTAs and read once.
// Workspace: partials fp32 [plan.partial_floats], counters int32 [plan.counter_ints] zeroed
// before the launch. No torch headers.
#pragma once

#include <cuda_runtime.h>

#include "adapter_plan.cuh"

namespace fastadapters {

struct BottleneckFwdArgs {
  void* y;             // (M, N), row stride ld_y
  const void* y0;      // (M, N), row stride ld_y0 (== x for the output placement)
  const void* x;       // (M, K), row stride ld_x
  const void* down;    // (b, K), row stride ld_down
  const void* up;      // (N, b), row stride ld_up
  const float* scale;  // 1 element
  int32_t act_id;
  int64_t M, N, K, b;
  int64_t ld_y, ld_y0, ld_x, ld_down, ld_up;
  float* partials;     // bottleneck_fwd_plan(...).partial_floats
  int32_t* counters;   // bottleneck_fwd_plan(...).counter_ints, zero at launch
};

AdapterBranchPlan bottleneck_fwd_plan(int64_t M, int64_t N, int64_t K, int64_t b, ScalarKind kind);

cudaError_t launch_bottleneck_fwd(const BottleneckFwdArgs& args, ScalarKind kind,
                                  cudaStream_t stream);

}  // namespace fastadapters
