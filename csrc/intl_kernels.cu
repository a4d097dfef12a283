// CUDA kernels of the intl backend (docs/math.md §3 and §5), Hopper (sm_90a):
//   tile_product_kernel   products of strided views with the centring fused into the loads: the centred
//                         Gram (upper triangle of tiles), y = Ac W and the backward's N x C products
//   ns_fwd_kernel         the whole Newton-Schulz forward (T steps) in one launch
//   ns_bwd_kernel         the whole Newton-Schulz backward in one launch
// Products use tensor cores (mma.sync m16n8k8 tf32) in 3xTF32 form: x*y ~= xh*yh + xh*yl + xl*yh with
// xh = tf32(x), xl = tf32(x - xh), which keeps fp32-level accuracy (the reference multiplies in fp32).
//
// The Newton-Schulz kernels run one thread-block cluster of CL blocks per C x C problem (C <= 256).
// Block q of the cluster owns rows [q R, q R + R) of every C x C matrix (CL x R = 8 x 16 for C <= 128,
// else 8 x 32, or 16 x 16 with NsVariant::cluster = 16; C is zero-padded to CL R). A product X Y then
// needs X's rows locally and all of Y: Y's row slab k/R is read straight from block k/R's shared memory
// (distributed shared memory). Every iterate is a polynomial in S (symmetric, commuting), so each
// product can be ordered with the changing operand local and only P_{k-1} or S remote: the forward
// needs one cluster barrier per step.
#include "intl_cuda.h"

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cg = cooperative_groups;

namespace intl_cuda {
namespace {

constexpr int kThreads = 256; // 8 warps per block
constexpr int kWarps = kThreads / 32;

// ------------------------------------------------------------------ 3xTF32 tensor-core step
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  lo = to_tf32(x - __uint_as_float(hi));
}

// d += a b for one m16n8k8 tile (fragments in the PTX ISA's layout for .tf32).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a b in 3xTF32; the small cross terms first.
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const uint32_t (&ah)[4], const uint32_t (&al)[4],
                                           const uint32_t (&bh)[2], const uint32_t (&bl)[2]) {
  mma_tf32(d, al, bh);
  mma_tf32(d, ah, bl);
  mma_tf32(d, ah, bh);
}

__device__ __forceinline__ float block_sum(float x, float* scratch /* kWarps floats */) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += scratch[w];
  __syncthreads();  // scratch can be reused
  return s;
}

// ------------------------------------------------------------------ Newton-Schulz: slab products
template <int R, int CL>
struct Cfg {
  static constexpr int CP = R * CL;             // padded C
  static constexpr int LD = CP + 4;             // shared row stride: conflict-free A-fragment loads
  static constexpr int MT = R / 16;             // m16 tiles: every warp covers all R rows ...
  static constexpr int kWarpCols = CP / kWarps; // ... and CP / 8 of the columns
  static constexpr int NT = kWarpCols / 8;      // (n8 tiles)
  static constexpr int kSlab = R * LD;          // floats per slab
};

// A operand: this block's R x CP slab in shared memory.
template <int R, int CL>
struct LocalSlab {
  const float* p;
  __device__ __forceinline__ float at(int r, int c) const { return p[r * Cfg<R, CL>::LD + c]; }
};

// B operand: a CP x CP matrix whose row slab q sits at the same offset `p` in block q's shared memory.
template <int R, int CL>
struct ClusterMatrix {
  const float* p;
  __device__ __forceinline__ float at(int k, int n) const {
    const float* q = cg::this_cluster().map_shared_rank(p, static_cast<unsigned>(k / R));
    return q[(k % R) * Cfg<R, CL>::LD + n];
  }
};

// Either operand: a C x C row-major matrix in global memory (rows offset by row0), zero outside C x C.
// kWrittenHere: the matrix was written during this kernel (by other blocks, before a cluster barrier), so
// it is read through L2 (ld.global.cg), never through the non-coherent read-only path.
template <bool kWrittenHere = false>
struct GlobalMatrix {
  const float* p;
  int C, row0;
  __device__ __forceinline__ float at(int r, int c) const {
    r += row0;
    if (r >= C || c >= C) return 0.f;
    const float* q = p + static_cast<size_t>(r) * C + c;
    return kWrittenHere ? __ldcg(q) : __ldg(q);
  }
};

template <int R, int CL>
using Acc = float[Cfg<R, CL>::MT][Cfg<R, CL>::NT][4];

template <int R, int CL>
__device__ __forceinline__ void zero(Acc<R, CL>& acc) {
#pragma unroll
  for (int mt = 0; mt < Cfg<R, CL>::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < Cfg<R, CL>::NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
}

// acc += X Y restricted to this block's rows: X (R x CP, A operand), Y (CP x CP, B operand).
// Warp w computes columns [w CP/8, (w + 1) CP/8).
template <int R, int CL, class AOp, class BOp>
__device__ __forceinline__ void slab_product(Acc<R, CL>& acc, AOp X, BOp Y) {
  using K = Cfg<R, CL>;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n0 = (threadIdx.x >> 5) * Cfg<R, CL>::kWarpCols;
#pragma unroll 2  // lets the next step's loads overlap this step's mma
  for (int k0 = 0; k0 < K::CP; k0 += 8) {
    uint32_t ah[K::MT][4], al[K::MT][4];
#pragma unroll
    for (int mt = 0; mt < K::MT; ++mt) {
      const int r = mt * 16 + g;
      split_tf32(X.at(r, k0 + t), ah[mt][0], al[mt][0]);
      split_tf32(X.at(r + 8, k0 + t), ah[mt][1], al[mt][1]);
      split_tf32(X.at(r, k0 + t + 4), ah[mt][2], al[mt][2]);
      split_tf32(X.at(r + 8, k0 + t + 4), ah[mt][3], al[mt][3]);
    }
#pragma unroll
    for (int nt = 0; nt < K::NT; ++nt) {
      const int n = n0 + nt * 8 + g;
      uint32_t bh[2], bl[2];
      split_tf32(Y.at(k0 + t, n), bh[0], bl[0]);
      split_tf32(Y.at(k0 + t + 4, n), bh[1], bl[1]);
#pragma unroll
      for (int mt = 0; mt < K::MT; ++mt) mma_3xtf32(acc[mt][nt], ah[mt], al[mt], bh, bl);
    }
  }
}

// f(r, c, value) for each accumulator entry of this thread (r: slab row, c: column).
template <int R, int CL, class F>
__device__ __forceinline__ void for_each_acc(const Acc<R, CL>& acc, F f) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n0 = (threadIdx.x >> 5) * Cfg<R, CL>::kWarpCols;
#pragma unroll
  for (int mt = 0; mt < Cfg<R, CL>::MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < Cfg<R, CL>::NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) f(mt * 16 + g + (i >> 1) * 8, n0 + nt * 8 + 2 * t + (i & 1), acc[mt][nt][i]);
}

__device__ __forceinline__ void store_if(float* dst, int i, int c, int C, float x) {
  if (i < C && c < C) dst[static_cast<size_t>(i) * C + c] = x;
}

// 1/t and 1/sqrt(t), 0 where t == 0: a constant input (trace 0) gives zero output and gradient.
__device__ __forceinline__ float guarded_inverse(float t) { return t > 0.f ? 1.f / t : 0.f; }
__device__ __forceinline__ float guarded_rsqrt(float t) { return t > 0.f ? 1.f / sqrtf(t) : 0.f; }

// The Newton-Schulz kernels' dynamic shared memory: kNsSlabs slabs of R x LD floats, then `rest`.
constexpr int kNsSlabs = 4;

template <int R, int CL>
__device__ __forceinline__ float* ns_slab(int q) {
  extern __shared__ float4 smem4[];
  return reinterpret_cast<float*>(smem4) + q * Cfg<R, CL>::kSlab;
}

// Where a Newton-Schulz block works: matrix b of the batch (CC = C * C entries each), slab rows from row0.
struct NsBlock {
  size_t b, CC;
  int rank, row0;
};

// This block's NsBlock; moves Ps (B, T, C, C) and powers (B, T-1, 2, C, C) to matrix b's saved tensors.
template <int R, int CL, class Ptr>
__device__ __forceinline__ NsBlock ns_block(const cg::cluster_group& cluster, int C, int iters, Ptr& Ps, Ptr& powers) {
  NsBlock k;
  k.rank = static_cast<int>(cluster.block_rank());
  k.row0 = k.rank * R;
  k.b = blockIdx.x / CL;
  k.CC = static_cast<size_t>(C) * C;
  Ps += k.b * iters * k.CC;
  powers += k.b * (iters > 1 ? iters - 1 : 0) * 2 * k.CC;
  return k;
}

// acc = X Y restricted to this block's rows (zeroed first): every Newton-Schulz product starts so.
template <int R, int CL, class AOp, class BOp>
__device__ __forceinline__ void product(Acc<R, CL>& acc, AOp X, BOp Y) {
  zero<R, CL>(acc);
  slab_product<R, CL>(acc, X, Y);
}

// ------------------------------------------------------------------ Newton-Schulz forward
// The remote operand (P_{k-1} or S, the whole matrix) comes from the other blocks' shared memory
// (kFromL2 = false, the default) or from the copies this kernel writes to Ps / S_out, through L2
// (kFromL2 = true): which is faster depends on DSMEM vs L2 bandwidth per SM; NsVariant::operand_from_l2.
// acc = (this block's rows of X, a local slab) times the whole matrix whose slabs are smem_slab across
// the cluster (or its copy `global`).
template <int R, int CL, bool kFromL2>
__device__ __forceinline__ void times_full(Acc<R, CL>& acc, const float* X, const float* smem_slab, const float* global,
                                           int C) {
  if constexpr (kFromL2) {
    product<R, CL>(acc, LocalSlab<R, CL>{X}, GlobalMatrix<true>{global, C, 0});
  } else {
    product<R, CL>(acc, LocalSlab<R, CL>{X}, ClusterMatrix<R, CL>{smem_slab});
  }
}

// x into row r, column c of this block's slab and of the saved global matrix (first row row0).
template <int R, int CL>
__device__ __forceinline__ void keep(float* slab, float* global, int row0, int C, int r, int c, float x) {
  slab[r * Cfg<R, CL>::LD + c] = x;
  store_if(global, row0 + r, c, C, x);
}

template <int R, int CL, bool kFromL2>
__global__ void __launch_bounds__(kThreads, 1)
    ns_fwd_kernel(const float* __restrict__ sigma, float* __restrict__ S_out, float* __restrict__ tr_out,
                  float* __restrict__ Ps, float* __restrict__ powers, float* __restrict__ v_out, int C, int iters) {
  using K = Cfg<R, CL>;
  // S, B (= P_{k-1}), X (P_k^2, then P_k), Y (P_k^3); after them kWarps x R floats, then kWarps floats
  float *Ss = ns_slab<R, CL>(0), *Bs = ns_slab<R, CL>(1), *Xs = ns_slab<R, CL>(2), *Ys = ns_slab<R, CL>(3);
  float* vpart = ns_slab<R, CL>(kNsSlabs);
  float* scratch = vpart + kWarps * R;

  cg::cluster_group cluster = cg::this_cluster();
  const NsBlock blk = ns_block<R, CL>(cluster, C, iters, Ps, powers);
  const int rank = blk.rank, row0 = blk.row0;
  const size_t b = blk.b, CC = blk.CC;
  sigma += b * CC;
  S_out += b * CC;
  v_out += b * C;

  // tr = trace(Sigma): every block sums the C diagonal entries itself.
  float part = 0.f;
  for (int i = threadIdx.x; i < C; i += kThreads) part += sigma[static_cast<size_t>(i) * (C + 1)];
  const float tr = block_sum(part, scratch);
  const float inv_tr = guarded_inverse(tr);  // constant input: S = 0, y = 0 (as the reference)
  if (rank == 0 && threadIdx.x == 0) tr_out[b] = tr;

  // S = Sigma / tr and B = P_1 = 1.5 I - 0.5 S (P_0 = I when iters == 0), zero-padded.
  for (int e = threadIdx.x; e < K::kSlab; e += kThreads) {
    const int r = e / K::LD, c = e % K::LD, i = row0 + r;
    const bool in = i < C && c < C;
    const float s = in ? sigma[static_cast<size_t>(i) * C + c] * inv_tr : 0.f;
    const float eye = i == c ? 1.f : 0.f;
    const float p = !in ? 0.f : (iters >= 1 ? 1.5f * eye - 0.5f * s : eye);
    Ss[e] = s;
    Bs[e] = p;
    if (in) {
      S_out[static_cast<size_t>(i) * C + c] = s;
      if (iters >= 1) Ps[static_cast<size_t>(i) * C + c] = p;
    }
  }
  cluster.sync();  // S and P_1 of every block are visible to the cluster

  Acc<R, CL> acc;
  for (int k = 2; k <= iters; ++k) {
    float* P2g = powers + static_cast<size_t>(k - 2) * 2 * CC;
    float* P3g = P2g + CC;
    float* Pkg = Ps + static_cast<size_t>(k - 1) * CC;
    const float* Bg = Pkg - CC;  // P_{k-1}, as written to Ps
    // X = B^2 (local B rows times the cluster's B)
    times_full<R, CL, kFromL2>(acc, Bs, Bs, Bg, C);
    for_each_acc<R, CL>(acc, [&](int r, int c, float x) { keep<R, CL>(Xs, P2g, row0, C, r, c, x); });
    __syncthreads();
    // Y = B^3 = X B
    times_full<R, CL, kFromL2>(acc, Xs, Bs, Bg, C);
    for_each_acc<R, CL>(acc, [&](int r, int c, float x) { keep<R, CL>(Ys, P3g, row0, C, r, c, x); });
    __syncthreads();
    // P_k = 1.5 B - 0.5 Y S, written over X (only ever read locally)
    times_full<R, CL, kFromL2>(acc, Ys, Ss, S_out, C);
    for_each_acc<R, CL>(acc, [&](int r, int c, float x) {
      keep<R, CL>(Xs, Pkg, row0, C, r, c, 1.5f * Bs[r * K::LD + c] - 0.5f * x);
    });
    cluster.sync();  // every block has finished reading the old B; the new P_k is complete
    float* tmp = Bs;
    Bs = Xs;
    Xs = tmp;
  }

  // v_i = (P_T S P_T)_ii = sum_c (P_T S)_ic (P_T)_ic, P_T symmetric: the output variances.
  times_full<R, CL, kFromL2>(acc, Bs, Ss, S_out, C);
  {
    using KK = Cfg<R, CL>;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int n0 = (threadIdx.x >> 5) * Cfg<R, CL>::kWarpCols;
#pragma unroll
    for (int mt = 0; mt < KK::MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = mt * 16 + g + half * 8;
        float s = 0.f;
#pragma unroll
        for (int nt = 0; nt < KK::NT; ++nt)
#pragma unroll
          for (int j = 0; j < 2; ++j) s += acc[mt][nt][half * 2 + j] * Bs[r * KK::LD + n0 + nt * 8 + 2 * t + j];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (t == 0) vpart[(threadIdx.x >> 5) * R + r] = s;  // each warp's share of the columns
      }
  }
  __syncthreads();
  for (int r = threadIdx.x; r < R; r += kThreads) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += vpart[w * R + r];  // a fixed order: deterministic
    if (row0 + r < C) v_out[row0 + r] = s;
  }
  cluster.sync();  // no block may exit while others can still read its shared memory
}

// ------------------------------------------------------------------ Newton-Schulz backward
// docs/math.md §5, k = T..2 with B = P_{k-1}, G = Pbar (not symmetric), H = G S:
//   Sbar -= 0.5 B^3 G;   G = 1.5 G - 0.5 (H B^2 + B (H B) + B^2 H)
// then Sbar -= 0.5 G (k = 1). G, H, H B and Sbar live in shared slabs; S, B, B^2, B^3 are read
// from global memory (the saved forward tensors, L2-resident).
template <int R, int CL>
__global__ void __launch_bounds__(kThreads, 1)
    ns_bwd_kernel(const float* __restrict__ wbar, const float* __restrict__ S, const float* __restrict__ tr_in,
                  const float* __restrict__ Ps, const float* __restrict__ powers, float* __restrict__ M, int C,
                  int iters, int n_obs) {
  using K = Cfg<R, CL>;
  // G, H, H B, Sbar; after them 2 floats (this block's <Wbar, P_T> and <Sbar, S>), then kWarps floats
  float *Gs = ns_slab<R, CL>(0), *Hs = ns_slab<R, CL>(1), *HBs = ns_slab<R, CL>(2), *Sb = ns_slab<R, CL>(3);
  float* dots = ns_slab<R, CL>(kNsSlabs);
  float* scratch = dots + 2;

  cg::cluster_group cluster = cg::this_cluster();
  const NsBlock blk = ns_block<R, CL>(cluster, C, iters, Ps, powers);
  const int row0 = blk.row0;
  const size_t b = blk.b, CC = blk.CC;
  wbar += b * CC;
  S += b * CC;
  M += b * CC;
  const float tr = tr_in[b];
  const float inv_tr = guarded_inverse(tr);
  const float inv_sqrt_tr = guarded_rsqrt(tr);
  const float* PT = iters >= 1 ? Ps + static_cast<size_t>(iters - 1) * CC : nullptr;

  // G = Pbar = Wbar / sqrt(tr); <Wbar, P_T> for trbar; Sbar = 0.
  float wp = 0.f;
  for (int e = threadIdx.x; e < K::kSlab; e += kThreads) {
    const int r = e / K::LD, c = e % K::LD, i = row0 + r;
    const bool in = i < C && c < C;
    const size_t o = static_cast<size_t>(i) * C + c;
    const float w = in ? wbar[o] : 0.f;
    if (in) wp += w * (PT != nullptr ? PT[o] : (i == c ? 1.f : 0.f));
    Gs[e] = w * inv_sqrt_tr;
    Sb[e] = 0.f;
  }
  cluster.sync();

  Acc<R, CL> acc;
  for (int k = iters; k >= 2; --k) {
    const float* Bg = Ps + static_cast<size_t>(k - 2) * CC;
    const float* B2g = powers + static_cast<size_t>(k - 2) * 2 * CC;
    const float* B3g = B2g + CC;
    // Sbar -= 0.5 B^3 G (G from the cluster); H = G S
    product<R, CL>(acc, GlobalMatrix<>{B3g, C, row0}, ClusterMatrix<R, CL>{Gs});
    for_each_acc<R, CL>(acc, [&](int r, int c, float x) { Sb[r * K::LD + c] -= 0.5f * x; });
    product<R, CL>(acc, LocalSlab<R, CL>{Gs}, GlobalMatrix<>{S, C, 0});
    for_each_acc<R, CL>(acc, [&](int r, int c, float x) { Hs[r * K::LD + c] = x; });
    cluster.sync();  // H complete; every block is done reading G
    // HB = H B; acc = H B^2 + B^2 H
    product<R, CL>(acc, LocalSlab<R, CL>{Hs}, GlobalMatrix<>{Bg, C, 0});
    for_each_acc<R, CL>(acc, [&](int r, int c, float x) { HBs[r * K::LD + c] = x; });
    product<R, CL>(acc, LocalSlab<R, CL>{Hs}, GlobalMatrix<>{B2g, C, 0});
    slab_product<R, CL>(acc, GlobalMatrix<>{B2g, C, row0}, ClusterMatrix<R, CL>{Hs});
    cluster.sync();  // HB complete
    // acc += B (H B); G = 1.5 G - 0.5 acc
    slab_product<R, CL>(acc, GlobalMatrix<>{Bg, C, row0}, ClusterMatrix<R, CL>{HBs});
    for_each_acc<R, CL>(acc, [&](int r, int c, float x) { Gs[r * K::LD + c] = 1.5f * Gs[r * K::LD + c] - 0.5f * x; });
    cluster.sync();  // the new G is complete; H and HB may be overwritten
  }

  // k = 1 (B = I): Sbar -= 0.5 G. Then <Sbar, S>.
  float ss = 0.f;
  for (int e = threadIdx.x; e < K::kSlab; e += kThreads) {
    const int r = e / K::LD, c = e % K::LD, i = row0 + r;
    float sb = Sb[e];
    if (iters >= 1) sb -= 0.5f * Gs[e];
    Sb[e] = sb;
    if (i < C && c < C) ss += sb * S[static_cast<size_t>(i) * C + c];
  }
  wp = block_sum(wp, scratch);
  ss = block_sum(ss, scratch);
  if (threadIdx.x == 0) {
    dots[0] = wp;
    dots[1] = ss;
  }
  cluster.sync();  // Sbar and the partial dots of every block are visible
  float wp_all = 0.f, ss_all = 0.f;
#pragma unroll
  for (int q = 0; q < CL; ++q) {
    const float* d = cluster.map_shared_rank(dots, static_cast<unsigned>(q));
    wp_all += d[0];
    ss_all += d[1];
  }
  const float trbar = -0.5f * (inv_sqrt_tr * inv_tr) * wp_all;
  const float diag = 2.f * (trbar - ss_all * inv_tr);  // the I term of Sigmabar + Sigmabar^T
  const float scale = 1.f / static_cast<float>(n_obs - 1);
  // M = (Sigmabar + Sigmabar^T) / (N - 1), Sigmabar = Sbar / tr + (trbar - <Sbar, S> / tr^2) I.
  for (int e = threadIdx.x; e < R * C; e += kThreads) {
    const int r = e / C, c = e % C, i = row0 + r;
    if (i >= C) break;
    const float* sbt = cluster.map_shared_rank(Sb, static_cast<unsigned>(c / R));
    const float sym = Sb[r * K::LD + c] + sbt[(c % R) * K::LD + i];
    M[static_cast<size_t>(i) * C + c] = (sym * inv_tr + (i == c ? diag : 0.f)) * scale;
  }
  cluster.sync();
}

// ------------------------------------------------------------------ tiled products with fused centring (any C)
// OUT (M x N per batch) = sum_k A(i, k) B(k, j), A and B read through strided views with the centring
// (a mean per row or per column) applied as the tiles are loaded. 64 x 64 output tiles, 32-deep shared
// tiles, 4 warps of 32 x 32, 3xTF32 mma. Either the upper triangle of tiles only (a symmetric result,
// mirrored) or all tiles; the k range can be split (partial sums to a workspace, summed on the host side).
constexpr int kGT = 64;        // output tile
constexpr int kGK = 32;        // k per shared tile
constexpr int kGThreads = 128; // 4 warps, 2 x 2 over the tile, 32 x 32 each
constexpr int kGLD = kGT + 8;  // conflict-free fragment loads (8 t + g covers all banks)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_float(float x, float* dst) { *dst = x; }
__device__ __forceinline__ void from_float(float x, __half* dst) { *dst = __float2half_rn(x); }
__device__ __forceinline__ void from_float(float x, __nv_bfloat16* dst) { *dst = __float2bfloat16_rn(x); }

template <class T>
__device__ __forceinline__ float load_view(const View& v, int b, int r, int c) {
  if (r >= v.rows || c >= v.cols) return 0.f;
  float x = to_float(static_cast<const T*>(v.p)[b * v.sb + r * v.sr + c * v.sc]);
  if (v.mean != nullptr) x -= v.mean[static_cast<int64_t>(b) * v.mean_len + (v.mean_by_row ? r : c)];
  return x;
}

template <class TA, class TB, class TO>
__global__ void __launch_bounds__(kGThreads)
    tile_product_kernel(View A, View B, TO* __restrict__ out, int64_t o_split, int64_t osb, int64_t osr, int64_t osc,
                        int k_per_split, bool triangle, bool accumulate) {
  __shared__ float As[kGK][kGLD], Bs[kGK][kGLD];  // As[k][i] = A(i, k), Bs[k][j] = B(k, j)
  const int M = A.rows, N = B.cols, K = A.cols;
  int ti, tj;
  if (triangle) {  // upper-triangle tile (ti <= tj) of the nt x nt grid
    const int nt = (M + kGT - 1) / kGT;
    int idx = blockIdx.x;
    ti = 0;
    while (idx >= nt - ti) {
      idx -= nt - ti;
      ++ti;
    }
    tj = ti + idx;
  } else {
    const int ntj = (N + kGT - 1) / kGT;
    ti = blockIdx.x / ntj;
    tj = blockIdx.x % ntj;
  }
  const int split = blockIdx.y, b = blockIdx.z;
  const int k_begin = split * k_per_split, k_end = min(K, k_begin + k_per_split);

  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, w = threadIdx.x >> 5;
  const int m0 = (w >> 1) * 32, c0 = (w & 1) * 32;
  float acc[2][4][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][q][i] = 0.f;

  for (int k0 = k_begin; k0 < k_end; k0 += kGK) {
    // Thread order follows each view's contiguous dimension (coalesced loads).
    for (int e = threadIdx.x; e < kGK * kGT; e += kGThreads) {
      const int i = A.sr == 1 ? e % kGT : e / kGK, ka = A.sr == 1 ? e / kGT : e % kGK;
      As[ka][i] = k0 + ka < k_end ? load_view<TA>(A, b, ti * kGT + i, k0 + ka) : 0.f;
      const int j = B.sc == 1 ? e % kGT : e / kGK, kb = B.sc == 1 ? e / kGT : e % kGK;
      Bs[kb][j] = k0 + kb < k_end ? load_view<TB>(B, b, k0 + kb, tj * kGT + j) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kGK; kk += 8) {
      uint32_t ah[2][4], al[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {  // fragment element (m, k) = As[k][m]
        const int m = m0 + mt * 16 + g;
        split_tf32(As[kk + t][m], ah[mt][0], al[mt][0]);
        split_tf32(As[kk + t][m + 8], ah[mt][1], al[mt][1]);
        split_tf32(As[kk + t + 4][m], ah[mt][2], al[mt][2]);
        split_tf32(As[kk + t + 4][m + 8], ah[mt][3], al[mt][3]);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int n = c0 + q * 8 + g;
        uint32_t bh[2], bl[2];
        split_tf32(Bs[kk + t][n], bh[0], bl[0]);
        split_tf32(Bs[kk + t + 4][n], bh[1], bl[1]);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) mma_3xtf32(acc[mt][q], ah[mt], al[mt], bh, bl);
      }
    }
    __syncthreads();
  }

  TO* o = out + split * o_split + b * osb;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int gi = ti * kGT + m0 + mt * 16 + g + (i >> 1) * 8;
        const int gj = tj * kGT + c0 + q * 8 + 2 * t + (i & 1);
        if (gi < M && gj < N) {
          float x = acc[mt][q][i];
          TO* dst = o + gi * osr + gj * osc;
          if (accumulate) x += to_float(*dst);
          from_float(x, dst);
          if (triangle && ti != tj) from_float(x, o + gj * osr + gi * osc);  // mirror
        }
      }
}

// The launch of `blocks` blocks of kThreads threads in clusters of CL, with `smem` bytes of dynamic
// shared memory each; `attr` holds the cluster size and must outlive the returned config.
inline cudaLaunchConfig_t cluster_config(cudaLaunchAttribute& attr, int CL, int blocks, size_t smem, cudaStream_t stream) {
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = CL;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(blocks);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Launches B clusters of CL blocks of kThreads threads with `smem` bytes of dynamic shared memory each.
template <class... Params, class... Args>
cudaError_t launch_clusters(void (*kernel)(Params...), int CL, int B, size_t smem, cudaStream_t stream, Args... args) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err == cudaSuccess && CL > 8) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(attr, CL, B * CL, smem, stream);
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

// Whether a cluster of CL blocks of `kernel` can be resident at all (sizes > 8 are not portable).
template <class... Params>
bool cluster_fits(void (*kernel)(Params...), int CL, size_t smem) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) != cudaSuccess ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(attr, CL, CL, smem, nullptr);
  int clusters = 0;
  const bool ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters > 0;
  cudaGetLastError();  // clear a sticky-free error from the query
  return ok;
}

template <int R, int CL, bool kFromL2>
struct NsFwd {
  static constexpr size_t kSmem = (kNsSlabs * Cfg<R, CL>::kSlab + (R + 1) * kWarps) * sizeof(float);
  static cudaError_t launch(const float* sigma, float* S, float* tr, float* Ps, float* powers, float* v, int B, int C,
                            int iters, cudaStream_t stream) {
    return launch_clusters(ns_fwd_kernel<R, CL, kFromL2>, CL, B, kSmem, stream, sigma, S, tr, Ps, powers, v, C, iters);
  }
  static bool fits() {
    static const bool ok = cluster_fits(ns_fwd_kernel<R, CL, kFromL2>, CL, kSmem);
    return ok;
  }
};

template <int R, int CL>
struct NsBwd {
  static constexpr size_t kSmem = (kNsSlabs * Cfg<R, CL>::kSlab + 2 + kWarps) * sizeof(float);
  static cudaError_t launch(const float* wbar, const float* S, const float* tr, const float* Ps, const float* powers,
                            float* M, int B, int C, int iters, int n_obs, cudaStream_t stream) {
    return launch_clusters(ns_bwd_kernel<R, CL>, CL, B, kSmem, stream, wbar, S, tr, Ps, powers, M, C, iters, n_obs);
  }
  static bool fits() {
    static const bool ok = cluster_fits(ns_bwd_kernel<R, CL>, CL, kSmem);
    return ok;
  }
};

// How the k range is split: `per` (a multiple of kGK) per split, enough splits to fill ~2 waves of
// 132 SMs with the tiles, each split at least 4 shared tiles long.
void split_plan(long long tiles, int K, int& splits, int& per) {
  long long want = (264 + tiles - 1) / tiles;
  const long long most = (K + 4 * kGK - 1) / (4 * kGK);
  want = want > most ? most : want;
  want = want < 1 ? 1 : want;
  per = static_cast<int>(((K + want - 1) / want + kGK - 1) / kGK * kGK);
  splits = (K + per - 1) / per;  // no empty split
}

long long tile_count(int M, int N, bool triangle, int B) {
  const long long ti = (M + kGT - 1) / kGT, tj = (N + kGT - 1) / kGT;
  return (triangle ? ti * (ti + 1) / 2 : ti * tj) * B;
}

template <class TA, class TB, class TO>
cudaError_t launch_product(const View& A, const View& B, TO* out, int64_t o_split, int64_t osb, int64_t osr,
                           int64_t osc, int batch, int splits, int per, bool triangle, bool accumulate,
                           cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(tile_count(A.rows, B.cols, triangle, 1)), splits, batch);
  tile_product_kernel<TA, TB, TO><<<grid, kGThreads, 0, stream>>>(A, B, out, o_split, osb, osr, osc, per, triangle,
                                                                  accumulate);
  return cudaGetLastError();
}

// fp32 output: B fp32 with A of any type, or A and B views of the same input (the centred Gram).
cudaError_t launch_product_f32(const View& A, DType ta, const View& B, DType tb, float* out, int64_t o_split,
                               int64_t osb, int64_t osr, int64_t osc, int batch, int splits, int per, bool triangle,
                               bool accumulate, cudaStream_t stream) {
#define INTL_LAUNCH(TA_, TB_) \
  return launch_product<TA_, TB_, float>(A, B, out, o_split, osb, osr, osc, batch, splits, per, triangle, accumulate, stream)
  if (ta == DType::f32 && tb == DType::f32) INTL_LAUNCH(float, float);
  if (tb == DType::f32) {
    if (ta == DType::f16) INTL_LAUNCH(__half, float);
    INTL_LAUNCH(__nv_bfloat16, float);
  }
  if (ta != tb) return cudaErrorInvalidValue;
  if (ta == DType::f16) INTL_LAUNCH(__half, __half);
  INTL_LAUNCH(__nv_bfloat16, __nv_bfloat16);
#undef INTL_LAUNCH
}

}  // namespace

int product_splits(int M, int N, int K, bool triangle, int batch) {
  int splits, per;
  split_plan(tile_count(M, N, triangle, batch), K, splits, per);
  return splits;
}

cudaError_t launch_product_ws(const View& A, DType ta, const View& B, DType tb, float* ws, int batch, bool triangle,
                              cudaStream_t stream) {
  int splits, per;
  split_plan(tile_count(A.rows, B.cols, triangle, batch), A.cols, splits, per);
  const int64_t MN = static_cast<int64_t>(A.rows) * B.cols;
  return launch_product_f32(A, ta, B, tb, ws, MN * batch, MN, B.cols, 1, batch, splits, per, triangle, false, stream);
}

cudaError_t launch_product_out(const View& A, DType ta, const View& B, DType tb, void* out, DType to, int64_t osb,
                               int64_t osr, int64_t osc, int batch, bool accumulate, cudaStream_t stream) {
  const int per = (A.cols + kGK - 1) / kGK * kGK;  // one split: the whole k range
  if (to == DType::f32)
    return launch_product_f32(A, ta, B, tb, static_cast<float*>(out), 0, osb, osr, osc, batch, 1, per, false,
                              accumulate, stream);
  // a low-precision output (y = Ac W in the input's dtype): A of that dtype, B fp32
  if (ta != to || tb != DType::f32) return cudaErrorInvalidValue;
  if (to == DType::f16)
    return launch_product<__half, float, __half>(A, B, static_cast<__half*>(out), 0, osb, osr, osc, batch, 1, per,
                                                 false, accumulate, stream);
  return launch_product<__nv_bfloat16, float, __nv_bfloat16>(A, B, static_cast<__nv_bfloat16*>(out), 0, osb, osr, osc,
                                                             batch, 1, per, false, accumulate, stream);
}

cudaError_t launch_ns_fwd(const float* sigma, float* S, float* tr, float* Ps, float* powers, float* v, int B, int C,
                          int iters, NsVariant variant, cudaStream_t stream) {
  const bool l2 = variant.operand_from_l2;
  if (C <= 128)
    return l2 ? NsFwd<16, 8, true>::launch(sigma, S, tr, Ps, powers, v, B, C, iters, stream)
              : NsFwd<16, 8, false>::launch(sigma, S, tr, Ps, powers, v, B, C, iters, stream);
  if (variant.cluster == 16 && (l2 ? NsFwd<16, 16, true>::fits() : NsFwd<16, 16, false>::fits()))
    return l2 ? NsFwd<16, 16, true>::launch(sigma, S, tr, Ps, powers, v, B, C, iters, stream)
              : NsFwd<16, 16, false>::launch(sigma, S, tr, Ps, powers, v, B, C, iters, stream);
  return l2 ? NsFwd<32, 8, true>::launch(sigma, S, tr, Ps, powers, v, B, C, iters, stream)
            : NsFwd<32, 8, false>::launch(sigma, S, tr, Ps, powers, v, B, C, iters, stream);
}

cudaError_t launch_ns_bwd(const float* wbar, const float* S, const float* tr, const float* Ps, const float* powers,
                          float* M, int B, int C, int iters, int n_obs, NsVariant variant, cudaStream_t stream) {
  if (C <= 128) return NsBwd<16, 8>::launch(wbar, S, tr, Ps, powers, M, B, C, iters, n_obs, stream);
  if (variant.cluster == 16 && NsBwd<16, 16>::fits())
    return NsBwd<16, 16>::launch(wbar, S, tr, Ps, powers, M, B, C, iters, n_obs, stream);
  return NsBwd<32, 8>::launch(wbar, S, tr, Ps, powers, M, B, C, iters, n_obs, stream);
}

}  // namespace intl_cuda
