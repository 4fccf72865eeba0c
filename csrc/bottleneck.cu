// bottleneck.cu -- fused bottleneck-adapter forward (parallel and output placements) for small M:
// down-projection, activation, up-projection, scale and residual in one launch.
// The contract is in bottleneck.cuh, the kernel in adapter_branch.cuh.
#include "bottleneck.cuh"

#include "adapter_branch.cuh"

namespace fastadapters {

AdapterBranchPlan bottleneck_fwd_plan(int64_t M, int64_t N, int64_t K, int64_t b,
                                      ScalarKind kind) {
  return plan_adapter_branch(M, N, K, b, /*max_segs=*/1, scalar_kind_bytes(kind));
}

cudaError_t launch_bottleneck_fwd(const BottleneckFwdArgs& a, ScalarKind kind,
                                  cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  AdapterBranchParams p;
  p.y = a.y;
  p.y0 = a.y0;
  p.x = a.x;
  p.down = a.down;
  p.up = a.up;
  p.scales = a.scale;
  p.sorted_rows = nullptr;  // implicit single segment: all rows, slot 0
  p.implicit_size = static_cast<int32_t>(a.b);
  p.implicit_act = a.act_id;
  p.M = a.M;
  p.N = a.N;
  p.K = a.K;
  p.R = a.b;
  p.S = 1;
  p.ld_y = a.ld_y;
  p.ld_y0 = a.ld_y0;
  p.ld_x = a.ld_x;
  p.down_ss = 0;
  p.down_sr = a.ld_down;
  p.up_ss = 0;
  p.up_sn = a.ld_up;
  p.partials = a.partials;
  p.counters = a.counters;
  p.plan = bottleneck_fwd_plan(a.M, a.N, a.K, a.b, kind);
  return launch_adapter_branch(p, kind, stream);
}

}  // namespace fastadapters
