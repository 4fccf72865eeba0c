// adapter_common.cuh -- device helpers shared by the adapter kernels in csrc/.
//
// What lives here: the storage-type <-> fp32 conversions (fp16, bf16, fp32), 16-byte vector
// loads with a scalar fallback for tails and unaligned rows, the adapter activations by id,
// and a warp-level sum. No torch headers: this compiles with nvcc alone.
//
// Activation ids (shared with the Python store and the Triton kernels):
//   0 identity (LoRA), 1 tanh, 2 relu, 3 gelu (exact, erf), 4 silu, 5 sigmoid.
//   Any other id is treated as identity (the store validates ids on the host when it loads).
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace fastadapters {

enum ActId : int {
  kActIdentity = 0,
  kActTanh = 1,
  kActRelu = 2,
  kActGelu = 3,
  kActSilu = 4,
  kActSigmoid = 5,
};

__device__ __forceinline__ float apply_act(int act_id, float v) {
  switch (act_id) {
    case kActTanh:
      return tanhf(v);
    case kActRelu:
      return v > 0.f ? v : (v == v ? 0.f : v);  // relu(NaN) = NaN, as torch
    case kActGelu:
      return 0.5f * v * (1.f + erff(v * 0.70710678118654752440f));
    case kActSilu:
      return v / (1.f + expf(-v));
    case kActSigmoid:
      return 1.f / (1.f + expf(-v));
    default:
      return v;
  }
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T in one 16-byte vector.
template <typename T>
struct Vec16 {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

// Loads kElems consecutive elements p[k .. k + kElems) as fp32 into out[], reading only
// indices < k_end (the rest are 0). When vec_ok is true, p + k is 16-byte aligned for every k
// the caller passes that is a multiple of kElems, so a full chunk is one 16-byte load.
template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int64_t k, int64_t k_end,
                                           bool vec_ok, float (&out)[Vec16<T>::kElems]) {
  constexpr int kElems = Vec16<T>::kElems;
  if (vec_ok && k + kElems <= k_end) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p + k));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kElems; ++i) out[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) out[i] = (k + i < k_end) ? to_float(p[k + i]) : 0.f;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// True when p is 16-byte aligned (host or device).
__host__ __device__ inline bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace fastadapters
