// ops.cpp -- the torch binding of the CUDA kernels in csrc/: the only file with torch headers.
//
// The op schemas are defined in Python (fastadapters/ops/cuda_ops.py, torch.library.define in the
// `fastadapters` namespace) so that they, their fake (meta) implementations and their CPU
// reference kernels exist whether or not this extension was built; this file registers only the
// CUDA kernels (TORCH_LIBRARY_IMPL), which the dispatcher accepts before or after the definition.
// Schemas (keep in sync with cuda_ops.py; a mismatch fails loudly when both are registered):
//
//   fastadapters::cuda_multi_adapter(Tensor y0, Tensor x, Tensor sorted_rows, Tensor seg_starts,
//       Tensor seg_slots, Tensor down, Tensor up, Tensor sizes, Tensor scales, Tensor act_ids)
//       -> Tensor
//   fastadapters::cuda_bottleneck_fwd(Tensor x, Tensor y0, Tensor down, Tensor up, Tensor scale,
//       int act_id) -> Tensor
//
// Every check names the argument and prints the bad value (device, dtype, layout or shape).
// Built as the Python extension module fastadapters._C (PyInit__C below exists only so that
// `import fastadapters._C` loads the library; it exposes no Python functions).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include "bottleneck.cuh"
#include "multi_adapter.cuh"

namespace fastadapters {
namespace {

std::string dims_str(const std::vector<int64_t>& dims) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < dims.size(); ++i) os << (i ? ", " : "") << dims[i];
  if (dims.size() == 1) os << ",";
  os << ")";
  return os.str();
}

void check_on(const char* op, const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": expected ", name, " on a CUDA device, got ", name,
              " on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": expected ", name, " on ", device, " (the device of x), got ",
              t.device());
}

void check_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype, ", got ",
              t.scalar_type());
}

// `symbols` spells the expected shape, e.g. "(S, R, K)".
void check_shape(const char* op, const at::Tensor& t, const char* name, const char* symbols,
                 const std::vector<int64_t>& expected) {
  TORCH_CHECK(t.sizes().vec() == expected, op, ": expected ", name, " of shape ", symbols, " = ",
              dims_str(expected), ", got ", dims_str(t.sizes().vec()));
}

void check_dim(const char* op, const at::Tensor& t, const char* name, int64_t dim,
               const char* symbols) {
  TORCH_CHECK(t.dim() == dim, op, ": expected ", name, " with ", dim, " dimensions ", symbols,
              ", got shape ", dims_str(t.sizes().vec()));
}

void check_contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " contiguous, got strides ",
              dims_str(t.strides().vec()), " for shape ", dims_str(t.sizes().vec()));
}

// 2-D activations may have any row stride, but each row must be contiguous.
void check_rows_contiguous(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, op, ": expected ", name,
              " with contiguous rows (stride(1) == 1), got strides ", dims_str(t.strides().vec()));
}

ScalarKind scalar_kind_of(const char* op, const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kHalf:
      return ScalarKind::kFloat16;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    case at::kFloat:
      return ScalarKind::kFloat32;
    default:
      TORCH_CHECK(false, op, ": expected x of dtype float16, bfloat16 or float32, got ",
                  x.scalar_type());
  }
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

at::Tensor multi_adapter_cuda(const at::Tensor& y0, const at::Tensor& x,
                              const at::Tensor& sorted_rows, const at::Tensor& seg_starts,
                              const at::Tensor& seg_slots, const at::Tensor& down,
                              const at::Tensor& up, const at::Tensor& sizes,
                              const at::Tensor& scales, const at::Tensor& act_ids) {
  const char* op = "fastadapters::cuda_multi_adapter";
  check_dim(op, x, "x", 2, "(M, K)");
  check_dim(op, down, "down", 3, "(S, R, K)");
  check_dim(op, up, "up", 3, "(S, N, R)");
  check_dim(op, seg_slots, "seg_slots", 1, "(G,)");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t S = down.size(0), R = down.size(1), N = up.size(1);
  const int64_t G = seg_slots.size(0);
  check_shape(op, down, "down", "(S, R, K)", {S, R, K});
  check_shape(op, up, "up", "(S, N, R)", {S, N, R});
  check_shape(op, y0, "y0", "(M, N)", {M, N});
  check_shape(op, sizes, "sizes", "(S,)", {S});
  check_shape(op, scales, "scales", "(S,)", {S});
  check_shape(op, act_ids, "act_ids", "(S,)", {S});
  check_shape(op, sorted_rows, "sorted_rows", "(M,)", {M});
  check_shape(op, seg_starts, "seg_starts", "(G + 1,)", {G + 1});
  TORCH_CHECK(M == 0 || G >= 1, op, ": expected at least one segment for M = ", M,
              " rows, got seg_slots of shape ", dims_str(seg_slots.sizes().vec()));

  const at::Device device = x.device();
  const std::pair<const at::Tensor*, const char*> all[] = {
      {&y0, "y0"},       {&x, "x"},         {&sorted_rows, "sorted_rows"},
      {&seg_starts, "seg_starts"}, {&seg_slots, "seg_slots"}, {&down, "down"},
      {&up, "up"},       {&sizes, "sizes"}, {&scales, "scales"}, {&act_ids, "act_ids"}};
  for (const auto& [t, name] : all) check_on(op, *t, name, device);

  const ScalarKind kind = scalar_kind_of(op, x);
  check_dtype(op, y0, "y0", x.scalar_type());
  check_dtype(op, down, "down", x.scalar_type());
  check_dtype(op, up, "up", x.scalar_type());
  check_dtype(op, sizes, "sizes", at::kInt);
  check_dtype(op, act_ids, "act_ids", at::kInt);
  check_dtype(op, scales, "scales", at::kFloat);
  check_dtype(op, sorted_rows, "sorted_rows", at::kInt);
  check_dtype(op, seg_starts, "seg_starts", at::kInt);
  check_dtype(op, seg_slots, "seg_slots", at::kInt);

  check_rows_contiguous(op, x, "x");
  check_rows_contiguous(op, y0, "y0");
  check_contiguous(op, down, "down");
  check_contiguous(op, up, "up");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&sizes, "sizes"},
                                {&scales, "scales"}, {&act_ids, "act_ids"},
                                {&sorted_rows, "sorted_rows"}, {&seg_starts, "seg_starts"},
                                {&seg_slots, "seg_slots"}})
    check_contiguous(op, *t, name);

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor y = at::empty({M, N}, y0.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y;

  const AdapterBranchPlan plan = multi_adapter_plan(M, N, K, R, G, kind);
  at::Tensor partials = at::empty({std::max<int64_t>(plan.partial_floats, 1)},
                                  x.options().dtype(at::kFloat));
  at::Tensor counters = at::zeros({plan.counter_ints}, x.options().dtype(at::kInt));

  MultiAdapterArgs a;
  a.y = y.data_ptr();
  a.y0 = y0.data_ptr();
  a.x = x.data_ptr();
  a.down = down.data_ptr();
  a.up = up.data_ptr();
  a.sizes = sizes.data_ptr<int32_t>();
  a.scales = scales.data_ptr<float>();
  a.act_ids = act_ids.data_ptr<int32_t>();
  a.sorted_rows = sorted_rows.data_ptr<int32_t>();
  a.seg_starts = seg_starts.data_ptr<int32_t>();
  a.seg_slots = seg_slots.data_ptr<int32_t>();
  a.M = M;
  a.N = N;
  a.K = K;
  a.R = R;
  a.S = S;
  a.max_segs = G;
  a.ld_y = row_stride(y);
  a.ld_y0 = row_stride(y0);
  a.ld_x = row_stride(x);
  a.partials = partials.data_ptr<float>();
  a.counters = counters.data_ptr<int32_t>();
  const cudaError_t err = launch_multi_adapter(a, kind, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed (grid ", plan.grid, "): ",
              cudaGetErrorString(err));
  return y;
}

at::Tensor bottleneck_fwd_cuda(const at::Tensor& x, const at::Tensor& y0, const at::Tensor& down,
                               const at::Tensor& up, const at::Tensor& scale, int64_t act_id) {
  const char* op = "fastadapters::cuda_bottleneck_fwd";
  check_dim(op, x, "x", 2, "(M, K)");
  check_dim(op, down, "down", 2, "(b, K)");
  check_dim(op, up, "up", 2, "(N, b)");
  const int64_t M = x.size(0), K = x.size(1), b = down.size(0), N = up.size(0);
  check_shape(op, down, "down", "(b, K)", {b, K});
  check_shape(op, up, "up", "(N, b)", {N, b});
  check_shape(op, y0, "y0", "(M, N)", {M, N});
  TORCH_CHECK(scale.numel() == 1, op, ": expected scale with 1 element, got shape ",
              dims_str(scale.sizes().vec()));
  TORCH_CHECK(act_id >= 0 && act_id <= 5, op,
              ": expected act_id in 0..5 (identity, tanh, relu, gelu, silu, sigmoid), got ",
              act_id);
  const at::Device device = x.device();
  check_on(op, x, "x", device);
  check_on(op, y0, "y0", device);
  check_on(op, down, "down", device);
  check_on(op, up, "up", device);
  check_on(op, scale, "scale", device);
  const ScalarKind kind = scalar_kind_of(op, x);
  check_dtype(op, y0, "y0", x.scalar_type());
  check_dtype(op, down, "down", x.scalar_type());
  check_dtype(op, up, "up", x.scalar_type());
  check_dtype(op, scale, "scale", at::kFloat);
  check_rows_contiguous(op, x, "x");
  check_rows_contiguous(op, y0, "y0");
  check_rows_contiguous(op, down, "down");
  check_rows_contiguous(op, up, "up");

  const c10::cuda::CUDAGuard guard(device);
  at::Tensor y = at::empty({M, N}, y0.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y;

  const AdapterBranchPlan plan = bottleneck_fwd_plan(M, N, K, b, kind);
  at::Tensor partials = at::empty({std::max<int64_t>(plan.partial_floats, 1)},
                                  x.options().dtype(at::kFloat));
  at::Tensor counters = at::zeros({plan.counter_ints}, x.options().dtype(at::kInt));

  BottleneckFwdArgs a;
  a.y = y.data_ptr();
  a.y0 = y0.data_ptr();
  a.x = x.data_ptr();
  a.down = down.data_ptr();
  a.up = up.data_ptr();
  a.scale = scale.data_ptr<float>();
  a.act_id = static_cast<int32_t>(act_id);
  a.M = M;
  a.N = N;
  a.K = K;
  a.b = b;
  a.ld_y = row_stride(y);
  a.ld_y0 = row_stride(y0);
  a.ld_x = row_stride(x);
  a.ld_down = row_stride(down);
  a.ld_up = row_stride(up);
  a.partials = partials.data_ptr<float>();
  a.counters = counters.data_ptr<int32_t>();
  const cudaError_t err = launch_bottleneck_fwd(a, kind, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed (grid ", plan.grid, "): ",
              cudaGetErrorString(err));
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadapters, CUDA, m) {
  m.impl("cuda_multi_adapter", &multi_adapter_cuda);
  m.impl("cuda_bottleneck_fwd", &bottleneck_fwd_cuda);
}

}  // namespace fastadapters

extern "C" {
// `import fastadapters._C` loads this library (and so the registrations above); no functions.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
