// adapter_plan.cuh -- host-only launch planning for the adapter-branch kernel
// (adapter_branch.cuh): the element-type tag, the tile constants and plan_adapter_branch(), a pure
// function of the shapes that sizes the grid and the workspace. Plain C++ (no CUDA or torch
// headers), so ops.cpp includes it through the launch headers and tests/csrc compiles it with g++
// alone to check the geometry on a machine without a GPU.
#pragma once

#include <cstdint>

namespace fastadapters {

// Element type of the activation / weight tensors of one call (all of y, y0, x, down, up share it).
enum class ScalarKind : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

inline int scalar_kind_bytes(ScalarKind kind) { return kind == ScalarKind::kFloat32 ? 4 : 2; }

constexpr int kBranchThreads = 256;       // threads per CTA, both roles; also the consumer N-tile
constexpr int kBranchMinBlocksPerSM = 2;  // launch-bounds occupancy target (<= 128 registers)
constexpr int kRowChunk = 8;              // rows per consumer pass (register accumulators)
constexpr int kRankChunk = 64;            // rank entries of h staged in shared memory per pass
constexpr int kSubVecs = 2;               // 16-byte vectors per lane per producer K sub-chunk
constexpr int kProducerRowGroup = 4;      // rows dotted together in a producer (ILP)
constexpr int kProducerTaskRows = 16;     // rows per producer warp task (a multiple of the above)
constexpr int64_t kPartialBudgetFloats = int64_t(1) << 22;  // 16 MiB of fp32 partials at most
                                                             // (unless K forces one chunk)

// Launch geometry and workspace sizes; a pure function of the shapes (tested on the host).
struct AdapterBranchPlan {
  int64_t max_segs = 0;       // segments the grid provides for (>= distinct adapters + 1 base)
  int64_t k_chunk = 0;        // K elements per producer CTA (a multiple of 32 * 16B-vector width)
  int64_t num_k_chunks = 0;   // ceil(K / k_chunk); 0 when K == 0
  int64_t n_tile = 0;         // N outputs per consumer CTA
  int64_t num_n_tiles = 0;    // ceil(N / n_tile)
  int64_t num_producers = 0;  // max_segs * num_k_chunks
  int64_t grid = 0;           // num_producers + max_segs * num_n_tiles (1-D)
  int threads = kBranchThreads;
  int64_t partial_floats = 0; // num_k_chunks * M * R
  int64_t counter_ints = 0;   // 1 + max_segs
};

inline int64_t ceil_div_i64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// M rows, N outputs, K inputs, R padded rank (storage), max_segs segments, elem_bytes 2 or 4.
// The K chunk starts at 2 vectors per lane (512 fp16/bf16 or 256 fp32 elements) and doubles while
// the fp32 partials would exceed kPartialBudgetFloats (large M x R, i.e. prefill-sized calls).
inline AdapterBranchPlan plan_adapter_branch(int64_t M, int64_t N, int64_t K, int64_t R,
                                             int64_t max_segs, int elem_bytes) {
  AdapterBranchPlan plan;
  const int64_t vec = 16 / elem_bytes;
  const int64_t span = 32 * vec * kSubVecs;
  plan.max_segs = max_segs < 0 ? 0 : max_segs;
  int64_t k_chunk = span;
  if (K > 0) {
    while (k_chunk < K && ceil_div_i64(K, k_chunk) * M * R > kPartialBudgetFloats) k_chunk *= 2;
  }
  plan.k_chunk = k_chunk;
  plan.num_k_chunks = K > 0 ? ceil_div_i64(K, k_chunk) : 0;
  plan.threads = kBranchThreads;
  plan.n_tile = kBranchThreads;
  plan.num_n_tiles = N > 0 ? ceil_div_i64(N, plan.n_tile) : 0;
  plan.num_producers = plan.max_segs * plan.num_k_chunks;
  plan.grid = plan.num_producers + plan.max_segs * plan.num_n_tiles;
  plan.partial_floats = plan.num_k_chunks * M * R;
  plan.counter_ints = 1 + plan.max_segs;
  return plan;
}

}  // namespace fastadapters
