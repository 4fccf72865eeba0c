// kernel_emulator.cpp -- runs the real csrc/ kernel source (adapter_branch.cuh, through the real
// launch functions of multi_adapter.cu and bottleneck.cu) on the CPU, for tests without a GPU.
//
// How: compiled with a host C++20 compiler and FASTADAPTERS_HOST_EMULATION, after a shim that
// turns the CUDA built-ins the kernel uses into host code: one std::thread per CUDA thread,
// __syncthreads as a std::barrier over the CTA, __shfl_xor_sync through a per-warp exchange buffer
// and barrier, __shared__ as function-static storage (CTAs run one after another, so a CTA owns
// it while it runs), atomics as std::atomic_ref. CTAs run in launch order, which is ticket order,
// so producers finish before their consumers start: this checks arithmetic, indexing, tails,
// vector/scalar load paths, segments and the ticket roles -- not the memory-model behaviour of
// concurrent CTAs (the GPU tests check that).
//
// Usage (driven by tests/csrc/test_kernel_emulation.py, raw little-endian files):
//   kernel_emulator multi DTYPE M N K S R G LDX XOFF  y0 x down up sizes scales acts rows starts slots out
//   kernel_emulator bottleneck DTYPE M N K B ACT LDX XOFF OUTPUT_PLACEMENT  y0 x down up scale out
// DTYPE: f16 | bf16 | f32. x is read from a buffer of M * LDX elements starting XOFF elements in
// (XOFF = 1 makes every row misaligned: the scalar fallback path). Writes y and prints the plan
// with the bytes the kernel's 16-byte loads read from down and from up.
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// ---- shim: CUDA built-ins on host threads ---------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {
struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
struct Cta {
  std::barrier<>* block = nullptr;
  std::barrier<>* warp = nullptr;   // this thread's warp
  float* exchange = nullptr;        // one slot per thread
};
thread_local Dim thread_idx;
thread_local Cta cta;
Dim block_dim;
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockDim (emu::block_dim)

inline void __syncthreads() { emu::cta.block->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
inline float __shfl_xor_sync(unsigned, float v, int offset) {
  const unsigned t = emu::thread_idx.x, warp = t / 32, lane = t % 32;
  emu::cta.exchange[t] = v;
  emu::cta.warp->arrive_and_wait();
  const float other = emu::cta.exchange[warp * 32 + (lane ^ unsigned(offset))];
  emu::cta.warp->arrive_and_wait();
  return other;
}
inline int atomicAdd(int* p, int v) {
  return std::atomic_ref<int>(*p).fetch_add(v, std::memory_order_seq_cst);
}
namespace emu {
// Bytes the kernel reads through __ldg (its 16-byte vector loads) from the down / up buffers:
// with aligned inputs and sizes that are multiples of 8, every weight read is counted.
struct Range {
  const char* begin = nullptr;
  const char* end = nullptr;
  std::atomic<long long> bytes{0};
};
Range down_reads, up_reads;
}  // namespace emu
template <typename U>
inline U __ldg(const U* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (emu::Range* r : {&emu::down_reads, &emu::up_reads})
    if (c >= r->begin && c < r->end) r->bytes.fetch_add(static_cast<long long>(sizeof(U)));
  return *p;
}
template <typename U>
inline U __ldcg(const U* p) { return *p; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

#define FASTADAPTERS_HOST_EMULATION 1
#include "multi_adapter.cu"
#include "bottleneck.cu"

namespace fastadapters {

template <typename T>
cudaError_t emulate_adapter_branch(const AdapterBranchParams& p) {
  const int threads = p.plan.threads;
  emu::block_dim = emu::Dim{unsigned(threads), 1, 1};
  for (int64_t b = 0; b < p.plan.grid; ++b) {
    std::barrier<> block(threads);
    std::vector<std::unique_ptr<std::barrier<>>> warps;  // std::barrier is not movable
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(new std::barrier<>(32));
    std::vector<float> exchange(static_cast<size_t>(threads));
    std::vector<std::thread> pool;
    pool.reserve(size_t(threads));
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        emu::thread_idx = emu::Dim{unsigned(t), 0, 0};
        emu::cta = emu::Cta{&block, warps[size_t(t / 32)].get(), exchange.data()};
        adapter_branch_kernel<T>(p);
      });
    }
    for (auto& th : pool) th.join();
  }
  return cudaSuccess;
}

}  // namespace fastadapters

// ---- driver -----------------------------------------------------------------------------------

static std::vector<char> read_file(const char* path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot read %s\n", path);
    std::exit(2);
  }
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

static void write_file(const char* path, const void* data, size_t n) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), std::streamsize(n));
}

static fastadapters::ScalarKind kind_of(const std::string& s) {
  if (s == "f16") return fastadapters::ScalarKind::kFloat16;
  if (s == "bf16") return fastadapters::ScalarKind::kBFloat16;
  if (s == "f32") return fastadapters::ScalarKind::kFloat32;
  std::fprintf(stderr, "bad dtype %s\n", s.c_str());
  std::exit(2);
}

static void print_plan(const fastadapters::AdapterBranchPlan& p) {
  std::printf("{\"grid\": %lld, \"num_k_chunks\": %lld, \"num_n_tiles\": %lld, \"max_segs\": %lld, "
              "\"down_bytes_read\": %lld, \"up_bytes_read\": %lld}\n",
              (long long)p.grid, (long long)p.num_k_chunks, (long long)p.num_n_tiles,
              (long long)p.max_segs, emu::down_reads.bytes.load(), emu::up_reads.bytes.load());
}

static void watch(emu::Range& r, const std::vector<char>& buf) {
  r.begin = buf.data();
  r.end = buf.data() + buf.size();
}

int main(int argc, char** argv) {
  using namespace fastadapters;
  if (argc < 2) return 2;
  const std::string mode = argv[1];
  if (mode == "multi" && argc == 22) {
    const ScalarKind kind = kind_of(argv[2]);
    const int64_t M = atoll(argv[3]), N = atoll(argv[4]), K = atoll(argv[5]), S = atoll(argv[6]),
                  R = atoll(argv[7]), G = atoll(argv[8]), ldx = atoll(argv[9]), xoff = atoll(argv[10]);
    auto y0 = read_file(argv[11]), x = read_file(argv[12]), down = read_file(argv[13]),
         up = read_file(argv[14]), sizes = read_file(argv[15]), scales = read_file(argv[16]),
         acts = read_file(argv[17]), rows = read_file(argv[18]), starts = read_file(argv[19]),
         slots = read_file(argv[20]);
    const int eb = scalar_kind_bytes(kind);
    std::vector<char> y(size_t(M * N * eb), 0x7f);  // poison: unwritten outputs show up
    const AdapterBranchPlan plan = multi_adapter_plan(M, N, K, R, G, kind);
    std::vector<float> partials(size_t(plan.partial_floats > 0 ? plan.partial_floats : 1), NAN);
    std::vector<int32_t> counters(size_t(plan.counter_ints), 0);
    MultiAdapterArgs a{};
    a.y = y.data();
    a.y0 = y0.data();
    a.x = x.data() + xoff * eb;
    a.down = down.data();
    a.up = up.data();
    a.sizes = reinterpret_cast<const int32_t*>(sizes.data());
    a.scales = reinterpret_cast<const float*>(scales.data());
    a.act_ids = reinterpret_cast<const int32_t*>(acts.data());
    a.sorted_rows = reinterpret_cast<const int32_t*>(rows.data());
    a.seg_starts = reinterpret_cast<const int32_t*>(starts.data());
    a.seg_slots = reinterpret_cast<const int32_t*>(slots.data());
    a.M = M, a.N = N, a.K = K, a.R = R, a.S = S, a.max_segs = G;
    a.ld_y = N, a.ld_y0 = N, a.ld_x = ldx;
    a.partials = partials.data();
    a.counters = counters.data();
    watch(emu::down_reads, down);
    watch(emu::up_reads, up);
    if (launch_multi_adapter(a, kind, nullptr) != cudaSuccess) return 3;
    print_plan(plan);
    write_file(argv[21], y.data(), y.size());
    return 0;
  }
  if (mode == "bottleneck" && argc == 17) {
    const ScalarKind kind = kind_of(argv[2]);
    const int64_t M = atoll(argv[3]), N = atoll(argv[4]), K = atoll(argv[5]), B = atoll(argv[6]),
                  act = atoll(argv[7]), ldx = atoll(argv[8]), xoff = atoll(argv[9]);
    const bool output_placement = atoi(argv[10]) != 0;
    auto y0 = read_file(argv[11]), x = read_file(argv[12]), down = read_file(argv[13]),
         up = read_file(argv[14]), scale = read_file(argv[15]);
    const int eb = scalar_kind_bytes(kind);
    std::vector<char> y(size_t(M * N * eb), 0x7f);
    const AdapterBranchPlan plan = bottleneck_fwd_plan(M, N, K, B, kind);
    std::vector<float> partials(size_t(plan.partial_floats > 0 ? plan.partial_floats : 1), NAN);
    std::vector<int32_t> counters(size_t(plan.counter_ints), 0);
    BottleneckFwdArgs a{};
    a.y = y.data();
    a.x = x.data() + xoff * eb;
    a.y0 = output_placement ? a.x : static_cast<const void*>(y0.data());
    a.down = down.data();
    a.up = up.data();
    a.scale = reinterpret_cast<const float*>(scale.data());
    a.act_id = int32_t(act);
    a.M = M, a.N = N, a.K = K, a.b = B;
    a.ld_y = N, a.ld_y0 = output_placement ? ldx : N, a.ld_x = ldx, a.ld_down = K, a.ld_up = B;
    a.partials = partials.data();
    a.counters = counters.data();
    watch(emu::down_reads, down);
    watch(emu::up_reads, up);
    if (launch_bottleneck_fwd(a, kind, nullptr) != cudaSuccess) return 3;
    print_plan(plan);
    write_file(argv[16], y.data(), y.size());
    return 0;
  }
  std::fprintf(stderr, "usage: see the header comment (mode %s, %d args)\n", mode.c_str(), argc);
  return 2;
}
