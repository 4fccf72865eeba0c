// plan_probe.cpp -- host-only probe of csrc/adapter_plan.cuh for tests/csrc/test_csrc_build.py.
// Reads lines "M N K R max_segs elem_bytes" on stdin and prints, per line, the plan that
// plan_adapter_branch() returns as one JSON object. Compiles with g++ alone (no CUDA, no torch).
#include <cstdio>

#include "adapter_plan.cuh"

int main() {
  long long M, N, K, R, G;
  int elem;
  while (std::scanf("%lld %lld %lld %lld %lld %d", &M, &N, &K, &R, &G, &elem) == 6) {
    const fastadapters::AdapterBranchPlan p = fastadapters::plan_adapter_branch(M, N, K, R, G, elem);
    std::printf(
        "{\"max_segs\": %lld, \"k_chunk\": %lld, \"num_k_chunks\": %lld, \"n_tile\": %lld, "
        "\"num_n_tiles\": %lld, \"num_producers\": %lld, \"grid\": %lld, \"threads\": %d, "
        "\"partial_floats\": %lld, \"counter_ints\": %lld}\n",
        (long long)p.max_segs, (long long)p.k_chunk, (long long)p.num_k_chunks,
        (long long)p.n_tile, (long long)p.num_n_tiles, (long long)p.num_producers,
        (long long)p.grid, p.threads, (long long)p.partial_floats, (long long)p.counter_ints);
  }
  return 0;
}
