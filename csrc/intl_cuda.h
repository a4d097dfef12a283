// Launchers of the intl CUDA kernels (csrc/intl_kernels.cu). Plain C++ on raw pointers so that the
// .cu file compiles without the torch headers; the op wrappers and checks live in intl_cuda.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace intl_cuda {

// Largest C the one-launch Newton-Schulz kernels take (a cluster of 8 blocks holds C x C on chip).
constexpr int kNsMaxC = 256;
enum class DType { f32, f16, bf16 };

// A strided (batch, rows, cols) view of a tensor: element (r, c) of batch b is
//   p[b * sb + r * sr + c * sc]  minus  mean[b * mean_len + (mean_by_row ? r : c)]  (if mean != nullptr),
// read as fp32 whatever its DType: how the product kernels fuse the centring into their tile loads.
struct View {
  const void* p;
  int64_t sb, sr, sc;
  int rows, cols;
  const float* mean;
  int64_t mean_len;
  bool mean_by_row;
};

// OUT_b = A_b B_b (A: M x K, B: K x N views), 3xTF32 tensor cores, 64 x 64 tiles.
// launch_product_ws: k split into product_splits(...) ranges whose partial sums go to ws
// (splits, batch, M, N) fp32 (sum them); triangle: a symmetric result, upper tiles computed and mirrored.
int product_splits(int M, int N, int K, bool triangle, int batch);
cudaError_t launch_product_ws(const View& A, DType ta, const View& B, DType tb, float* ws, int batch, bool triangle,
                              cudaStream_t stream);
// launch_product_out: no split; element (i, j) of batch b goes to out[b * osb + i * osr + j * osc] in DType
// `to` (accumulate: added to what is there, fp32 only).
cudaError_t launch_product_out(const View& A, DType ta, const View& B, DType tb, void* out, DType to, int64_t osb,
                               int64_t osr, int64_t osc, int batch, bool accumulate, cudaStream_t stream);

// How the one-launch Newton-Schulz kernels run; every variant computes the same function (benchmark
// knobs, set by the op intl_cuda::set_ns_variant, to be settled by measurement on an H100/H200).
struct NsVariant {
  // forward: the remote operand of each product read through L2 (the copies written to Ps / S anyway)
  // instead of the cluster's distributed shared memory; bitwise-equal results
  bool operand_from_l2 = false;
  // blocks per cluster for 128 < C <= 256: 8 (of 32 rows) or 16 (of 16 rows: a non-portable size, so
  // 8 x 32 is used where the device cannot hold such a cluster); C <= 128 always runs on 8 x 16
  int cluster = 8;
};

// Newton-Schulz forward, one launch (B clusters): from sigma (B, C, C) writes S (B, C, C), tr (B),
// Ps (B, T, C, C) = P_1..P_T, powers (B, T-1, 2, C, C) = (P_k^2, P_k^3), v (B, C) = diag(P_T S P_T).
cudaError_t launch_ns_fwd(const float* sigma, float* S, float* tr, float* Ps, float* powers, float* v,
                          int B, int C, int iters, NsVariant variant, cudaStream_t stream);

// Newton-Schulz backward, one launch: from Wbar = Ac^T Ybar (B, C, C) and the saved S, tr, Ps, powers,
// writes M = (Sigmabar + Sigmabar^T) / (n_obs - 1) (B, C, C), so that Acbar += Ac M (docs/math.md §5).
// Only variant.cluster applies (the backward reads its saved operands from global memory).
cudaError_t launch_ns_bwd(const float* wbar, const float* S, const float* tr, const float* Ps,
                          const float* powers, float* M, int B, int C, int iters, int n_obs, NsVariant variant,
                          cudaStream_t stream);

}  // namespace intl_cuda
