// Launchers of the intl CUDA kernels (csrc/intl_kernels.cu). Plain C++ on raw pointers so that the
// .cu file compiles without the torch headers; the op wrappers and checks live in intl_ops.cpp.
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

// Newton-Schulz forward, one launch (B clusters): from sigma (B, C, C) writes S (B, C, C), tr (B),
// Ps (B, T, C, C) = P_1..P_T, Pp (B, T-1, 2, C, C) = (P_k^2, P_k^3), v (B, C) = diag(P_T S P_T).
cudaError_t launch_ns_fwd(const float* sigma, float* S, float* tr, float* Ps, float* Pp, float* v,
                          int B, int C, int iters, cudaStream_t stream);

// Newton-Schulz backward, one launch: from Wbar = Ac^T Ybar (B, C, C) and the saved S, tr, Ps, Pp,
// writes M = (Sigmabar + Sigmabar^T) / (n_obs - 1) (B, C, C), so that Acbar += Ac M (SPEC section 5).
cudaError_t launch_ns_bwd(const float* wbar, const float* S, const float* tr, const float* Ps,
                          const float* Pp, float* M, int B, int C, int iters, int n_obs, cudaStream_t stream);

}  // namespace intl_cuda
