// multi_adapter.cu -- multi-adapter decode: every row's adapter (LoRA or bottleneck, any rank)
// in one launch, rows grouped by slot so each adapter's weights are read once per call.
// The contract (metadata, workspace) is in multi_adapter.cuh, the kernel in adapter_branch.cuh.
#include "multi_adapter.cuh"

#include "adapter_branch.cuh"

namespace fastadapters {

AdapterBranchPlan multi_adapter_plan(int64_t M, int64_t N, int64_t K, int64_t R,
                                     int64_t max_segs, ScalarKind kind) {
  return plan_adapter_branch(M, N, K, R, max_segs, scalar_kind_bytes(kind));
}

cudaError_t launch_multi_adapter(const MultiAdapterArgs& a, ScalarKind kind,
                                 cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  AdapterBranchParams p;
  p.y = a.y;
  p.y0 = a.y0;
  p.x = a.x;
  p.down = a.down;
  p.up = a.up;
  p.sizes = a.sizes;
  p.scales = a.scales;
  p.act_ids = a.act_ids;
  p.sorted_rows = a.sorted_rows;
  p.seg_starts = a.seg_starts;
  p.seg_slots = a.seg_slots;
  p.M = a.M;
  p.N = a.N;
  p.K = a.K;
  p.R = a.R;
  p.S = a.S;
  p.ld_y = a.ld_y;
  p.ld_y0 = a.ld_y0;
  p.ld_x = a.ld_x;
  p.down_ss = a.R * a.K;
  p.down_sr = a.K;
  p.up_ss = a.N * a.R;
  p.up_sn = a.R;
  p.partials = a.partials;
  p.counters = a.counters;
  p.plan = multi_adapter_plan(a.M, a.N, a.K, a.R, a.max_segs, kind);
  return launch_adapter_branch(p, kind, stream);
}

}  // namespace fastadapters
