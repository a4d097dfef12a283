// Registration of the intl CUDA kernels as torch ops: torch.ops.intl_cuda.{centered_gram, centered_matmul,
// centered_tmatmul, grad_input, ns_fwd, ns_bwd}, and set_ns_variant / ns_variant (how ns_fwd / ns_bwd run).
// Schemas are defined once (TORCH_LIBRARY); the CUDA key gets the implementations; the CPU key gets the
// same functions, whose first check rejects a non-CUDA tensor with a message naming the argument.
// There are no pybind functions: importing intl_ops._C (or loading the library) runs the registrations.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <climits>
#include <string_view>

#include "intl_cuda.h"

extern "C" {
// An empty Python module, so that `import intl_ops._C` loads this library (pytorch/extension-cpp's idiom).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace intl_cuda {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  check_cuda(t, name);
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, name, " must have shape ", want, ", got ", t.sizes());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

DType dtype_of(const at::Tensor& t) {
  const auto st = t.scalar_type();
  return st == at::kFloat ? DType::f32 : (st == at::kHalf ? DType::f16 : DType::bf16);
}

// a: the (B, N observations, C variables) input view (fp32/fp16/bf16, any strides); mean: (B, C) fp32.
void check_input(const at::Tensor& a, const at::Tensor& mean) {
  check_cuda(a, "a");
  check_same_device(mean, "mean", a, "a");
  TORCH_CHECK(a.dim() == 3, "a must be 3-D (B, N observations, C variables), got shape ", a.sizes());
  const auto st = a.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "a must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(a.size(1) >= 2, "a must have at least 2 observations (dim 1), got shape ", a.sizes());
  TORCH_CHECK(a.size(2) >= 1 && a.size(1) <= INT_MAX / 2 && a.size(2) <= 46340 && a.size(0) <= 65535,
              "a has an unsupported shape ", a.sizes());
  check_f32(mean, "mean");
  check_shape(mean, "mean", {a.size(0), a.size(2)});
}

void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& a, at::IntArrayRef shape) {
  check_same_device(t, name, a, "a");
  check_f32(t, name);
  check_shape(t, name, shape);
}

// The view of A (B, N, C) itself (rows = observations), centred by column, and of A^T (rows = variables).
View view_a(const at::Tensor& a, const at::Tensor& mean) {
  return {a.data_ptr(), a.stride(0), a.stride(1), a.stride(2), static_cast<int>(a.size(1)), static_cast<int>(a.size(2)),
          mean.data_ptr<float>(), a.size(2), false};
}
View view_at(const at::Tensor& a, const at::Tensor& mean) {
  return {a.data_ptr(), a.stride(0), a.stride(2), a.stride(1), static_cast<int>(a.size(2)), static_cast<int>(a.size(1)),
          mean.data_ptr<float>(), a.size(2), true};
}
// A plain fp32 (B, R, C) tensor, or its transpose per batch.
View view_f32(const at::Tensor& t, bool transpose = false) {
  const int r = static_cast<int>(t.size(1)), c = static_cast<int>(t.size(2));
  if (transpose) return {t.data_ptr(), t.stride(0), t.stride(2), t.stride(1), c, r, nullptr, 0, false};
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), r, c, nullptr, 0, false};
}

// Sums of the split partial products, in a fixed order (no second buffer when there is one split).
at::Tensor sum_splits(const at::Tensor& ws) { return ws.size(0) == 1 ? ws.select(0, 0) : ws.sum(0); }

// Sigma = Ac^T Ac / (N - 1): the centred covariance of the variables, exactly symmetric.
at::Tensor centered_gram(const at::Tensor& a, const at::Tensor& mean) {
  check_input(a, mean);
  const int64_t B = a.size(0), N = a.size(1), C = a.size(2);
  if (B == 0) return at::zeros({0, C, C}, a.options().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor m = mean.contiguous();
  const int splits = product_splits(static_cast<int>(C), static_cast<int>(C), static_cast<int>(N), true, static_cast<int>(B));
  at::Tensor ws = at::empty({splits, B, C, C}, a.options().dtype(at::kFloat));
  check_launch(launch_product_ws(view_at(a, m), dtype_of(a), view_a(a, m), dtype_of(a), ws.data_ptr<float>(),
                                 static_cast<int>(B), true, current_stream()),
               "centered_gram");
  return sum_splits(ws).div_(static_cast<double>(N - 1));
}

// y = (a - mean) w in a's dtype: (B, N, C), or (B, C, N) = y^T per batch with transpose_out.
at::Tensor centered_matmul(const at::Tensor& a, const at::Tensor& mean, const at::Tensor& w, bool transpose_out) {
  check_input(a, mean);
  const int64_t B = a.size(0), N = a.size(1), C = a.size(2);
  check_matrix(w, "w", a, {B, C, C});
  at::Tensor y = at::empty(transpose_out ? at::IntArrayRef{B, C, N} : at::IntArrayRef{B, N, C}, a.options());
  if (B == 0) return y;
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor m = mean.contiguous(), wc = w.contiguous();
  const int64_t osr = transpose_out ? 1 : C, osc = transpose_out ? N : 1;
  check_launch(launch_product_out(view_a(a, m), dtype_of(a), view_f32(wc), DType::f32, y.data_ptr(), dtype_of(y), N * C,
                                  osr, osc, static_cast<int>(B), false, current_stream()),
               "centered_matmul");
  return y;
}

// (a - mean)^T g: (B, C, C) fp32, g (B, N, C) fp32 (any strides).
at::Tensor centered_tmatmul(const at::Tensor& a, const at::Tensor& mean, const at::Tensor& g) {
  check_input(a, mean);
  const int64_t B = a.size(0), N = a.size(1), C = a.size(2);
  check_matrix(g, "g", a, {B, N, C});
  if (B == 0) return at::zeros({0, C, C}, a.options().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor m = mean.contiguous();
  const int splits = product_splits(static_cast<int>(C), static_cast<int>(C), static_cast<int>(N), false, static_cast<int>(B));
  at::Tensor ws = at::empty({splits, B, C, C}, a.options().dtype(at::kFloat));
  check_launch(launch_product_ws(view_at(a, m), dtype_of(a), view_f32(g), DType::f32, ws.data_ptr<float>(),
                                 static_cast<int>(B), false, current_stream()),
               "centered_tmatmul");
  return sum_splits(ws);
}

// The input gradient g w^T + (a - mean) mm in a's dtype, (B, N, C) or (B, C, N) with transpose_out.
at::Tensor grad_input(const at::Tensor& g, const at::Tensor& w, const at::Tensor& a, const at::Tensor& mean,
                      const at::Tensor& mm, bool transpose_out) {
  check_input(a, mean);
  const int64_t B = a.size(0), N = a.size(1), C = a.size(2);
  check_matrix(g, "g", a, {B, N, C});
  check_matrix(w, "w", a, {B, C, C});
  check_matrix(mm, "mm", a, {B, C, C});
  at::Tensor out = at::empty(transpose_out ? at::IntArrayRef{B, C, N} : at::IntArrayRef{B, N, C}, a.options());
  if (B == 0) return out;
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor m = mean.contiguous(), wc = w.contiguous(), mc = mm.contiguous();
  at::Tensor acc = at::empty({B, N, C}, a.options().dtype(at::kFloat));
  const int batch = static_cast<int>(B);
  check_launch(launch_product_out(view_f32(g), DType::f32, view_f32(wc, true), DType::f32, acc.data_ptr(), DType::f32,
                                  N * C, C, 1, batch, false, current_stream()),
               "grad_input");
  check_launch(launch_product_out(view_a(a, m), dtype_of(a), view_f32(mc), DType::f32, acc.data_ptr(), DType::f32,
                                  N * C, C, 1, batch, true, current_stream()),
               "grad_input");
  (transpose_out ? out.transpose(1, 2) : out).copy_(acc);
  return out;
}

// The Newton-Schulz variant of every later ns_fwd / ns_bwd launch, process-wide (atomic: ops may run on
// several threads). Set explicitly, never read from the environment: a run states what it measures.
std::atomic<NsVariant> g_ns_variant{NsVariant{}};

void set_ns_variant(std::string_view operand, int64_t cluster) {
  TORCH_CHECK(operand == "dsmem" || operand == "l2", "operand must be 'dsmem' or 'l2', got '", operand, "'");
  TORCH_CHECK(cluster == 8 || cluster == 16, "cluster must be 8 or 16, got ", cluster);
  NsVariant v;
  v.operand_from_l2 = operand == "l2";
  v.cluster = static_cast<int>(cluster);
  g_ns_variant.store(v);
}

std::tuple<std::string_view, int64_t> ns_variant() {
  const NsVariant v = g_ns_variant.load();
  return {v.operand_from_l2 ? "l2" : "dsmem", v.cluster};  // string literals: static storage
}

// One-launch Newton-Schulz forward: (S, tr, Ps, powers, v) from sigma (B, C, C), C <= 256.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ns_fwd(const at::Tensor& sigma, int64_t iters) {
  check_cuda(sigma, "sigma");
  check_f32(sigma, "sigma");
  TORCH_CHECK(sigma.dim() == 3 && sigma.size(1) == sigma.size(2),
              "sigma must be 3-D (B, C, C), got shape ", sigma.sizes());
  const int64_t B = sigma.size(0), C = sigma.size(1);
  TORCH_CHECK(C >= 1 && C <= kNsMaxC, "sigma has C = ", C, ": the one-launch Newton-Schulz kernel takes 1 <= C <= ",
              kNsMaxC);
  TORCH_CHECK(iters >= 0 && iters <= 1000, "iters must be in [0, 1000], got ", iters);
  TORCH_CHECK(B <= (INT_MAX / 8), "sigma has too many matrices: ", B);
  const auto opt = sigma.options();
  at::Tensor S = at::empty({B, C, C}, opt), tr = at::empty({B}, opt), v = at::empty({B, C}, opt);
  at::Tensor Ps = at::empty({B, iters, C, C}, opt);
  at::Tensor powers = at::empty({B, std::max<int64_t>(iters - 1, 0), 2, C, C}, opt);
  if (B == 0) return {S, tr, Ps, powers, v};
  const c10::cuda::CUDAGuard guard(sigma.device());
  const at::Tensor sg = sigma.contiguous();
  check_launch(launch_ns_fwd(sg.data_ptr<float>(), S.data_ptr<float>(), tr.data_ptr<float>(), Ps.data_ptr<float>(),
                             powers.data_ptr<float>(), v.data_ptr<float>(), static_cast<int>(B), static_cast<int>(C),
                             static_cast<int>(iters), g_ns_variant.load(), current_stream()),
               "ns_fwd");
  return {S, tr, Ps, powers, v};
}

// One-launch Newton-Schulz backward: M = (Sigmabar + Sigmabar^T) / (n_obs - 1) from Wbar = Ac^T Ybar.
at::Tensor ns_bwd(const at::Tensor& wbar, const at::Tensor& S, const at::Tensor& tr, const at::Tensor& Ps,
                  const at::Tensor& powers, int64_t iters, int64_t n_obs) {
  check_cuda(wbar, "wbar");
  check_f32(wbar, "wbar");
  TORCH_CHECK(wbar.dim() == 3 && wbar.size(1) == wbar.size(2), "wbar must be 3-D (B, C, C), got shape ", wbar.sizes());
  const int64_t B = wbar.size(0), C = wbar.size(1);
  TORCH_CHECK(C >= 1 && C <= kNsMaxC, "wbar has C = ", C, ": the one-launch Newton-Schulz kernel takes 1 <= C <= ",
              kNsMaxC);
  TORCH_CHECK(iters >= 0 && iters <= 1000, "iters must be in [0, 1000], got ", iters);
  TORCH_CHECK(n_obs >= 2, "n_obs must be at least 2, got ", n_obs);
  TORCH_CHECK(B <= (INT_MAX / 8), "wbar has too many matrices: ", B);
  const std::pair<const at::Tensor*, const char*> saved[] = {
      {&S, "S"}, {&tr, "tr"}, {&Ps, "Ps"}, {&powers, "powers"}};
  for (const auto& [t, name] : saved) {
    check_same_device(*t, name, wbar, "wbar");
    check_f32(*t, name);
  }
  check_shape(S, "S", {B, C, C});
  check_shape(tr, "tr", {B});
  check_shape(Ps, "Ps", {B, iters, C, C});
  check_shape(powers, "powers", {B, std::max<int64_t>(iters - 1, 0), 2, C, C});
  at::Tensor M = at::empty({B, C, C}, wbar.options());
  if (B == 0) return M;
  const c10::cuda::CUDAGuard guard(wbar.device());
  const at::Tensor w = wbar.contiguous(), s = S.contiguous(), t = tr.contiguous(), ps = Ps.contiguous(),
                   pw = powers.contiguous();
  check_launch(launch_ns_bwd(w.data_ptr<float>(), s.data_ptr<float>(), t.data_ptr<float>(), ps.data_ptr<float>(),
                             pw.data_ptr<float>(), M.data_ptr<float>(), static_cast<int>(B), static_cast<int>(C),
                             static_cast<int>(iters), static_cast<int>(n_obs), g_ns_variant.load(), current_stream()),
               "ns_bwd");
  return M;
}

}  // namespace

TORCH_LIBRARY(intl_cuda, m) {
  m.def("centered_gram(Tensor a, Tensor mean) -> Tensor");
  m.def("centered_matmul(Tensor a, Tensor mean, Tensor w, bool transpose_out) -> Tensor");
  m.def("centered_tmatmul(Tensor a, Tensor mean, Tensor g) -> Tensor");
  m.def("grad_input(Tensor g, Tensor w, Tensor a, Tensor mean, Tensor mm, bool transpose_out) -> Tensor");
  m.def("ns_fwd(Tensor sigma, int iters) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ns_bwd(Tensor wbar, Tensor S, Tensor tr, Tensor Ps, Tensor powers, int iters, int n_obs) -> Tensor");
  // no tensor arguments: one implementation for every device, given with the schema
  m.def("set_ns_variant(str operand, int cluster) -> ()", &set_ns_variant);
  m.def("ns_variant() -> (str, int)", &ns_variant);
}

static void impl_all(torch::Library& m) {
  m.impl("centered_gram", &centered_gram);
  m.impl("centered_matmul", &centered_matmul);
  m.impl("centered_tmatmul", &centered_tmatmul);
  m.impl("grad_input", &grad_input);
  m.impl("ns_fwd", &ns_fwd);
  m.impl("ns_bwd", &ns_bwd);
}

TORCH_LIBRARY_IMPL(intl_cuda, CUDA, m) { impl_all(m); }

// CPU tensors reach the same functions, whose first TORCH_CHECK names the argument that is not on CUDA.
TORCH_LIBRARY_IMPL(intl_cuda, CPU, m) { impl_all(m); }

}  // namespace intl_cuda
