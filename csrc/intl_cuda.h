// Launchers of the intl CUDA kernels (csrc/intl_kernels.cu). Plain C++ on raw pointers so that the
// .cu file compiles without the torch headers; the op wrappers and checks live in intl_ops.cpp.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace intl_cuda {

// Largest C the one-launch Newton-Schulz kernels take (a cluster of 8 blocks holds C x C on chip).
constexpr int kNsMaxC = 256;
enum class DType { f32, f16, bf16 };

// Sums over one split of the observations of the centred Gram, upper triangle of 64 x 64 tiles
// mirrored: ws[split][b][i][j] = sum_{n in split} (a[b,n,i] - mean[b,i]) (a[b,n,j] - mean[b,j]).
// a is addressed a[b * sb + n * sn + c * sc] (elements), any of DType; mean (B, C) fp32.
int gram_splits(int B, int N, int C);  // how many splits the launcher uses (ws's first dim)
cudaError_t launch_centered_gram(const void* a, DType dt, int64_t sb, int64_t sn, int64_t sc,
                                 const float* mean, float* ws, int B, int N, int C, cudaStream_t stream);

// Newton-Schulz forward, one launch (B clusters): from sigma (B, C, C) writes S (B, C, C), tr (B),
// Ps (B, T, C, C) = P_1..P_T, Pp (B, T-1, 2, C, C) = (P_k^2, P_k^3), v (B, C) = diag(P_T S P_T).
cudaError_t launch_ns_fwd(const float* sigma, float* S, float* tr, float* Ps, float* Pp, float* v,
                          int B, int C, int iters, cudaStream_t stream);

// Newton-Schulz backward, one launch: from Wbar = Ac^T Ybar (B, C, C) and the saved S, tr, Ps, Pp,
// writes M = (Sigmabar + Sigmabar^T) / (n_obs - 1) (B, C, C), so that Acbar += Ac M (SPEC section 5).
cudaError_t launch_ns_bwd(const float* wbar, const float* S, const float* tr, const float* Ps,
                          const float* Pp, float* M, int B, int C, int iters, int n_obs, cudaStream_t stream);

}  // namespace intl_cuda
