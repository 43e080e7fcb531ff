// group_merge: cosine-similarity grouping of the rest tokens to Z targets (Eq. 10) and the mean of
// every group (Eq. 11). Two launches, no float atomics: the result does not depend on scheduling.
//
// group_assign_kernel: one block per rest token, a warp per target z (strided); each warp keeps its
//   best (similarity, z) and the block combines them with the tie rule. The cosine is computed in
//   fp64 and rounded once to fp32, as the reference does (scale-safe; exact ties resolve alike).
// group_mean_kernel: one block per (sample, group, tile of columns); it walks the group ids in
//   position order and sums its members' columns in fp32, so every sum has one fixed order.
#include <algorithm>

#include "common.cuh"

namespace swiftvlm {
namespace {

constexpr int kAssignThreads = 256;
constexpr int kAssignWarps = kAssignThreads / kWarp;
constexpr int kMeanThreads = 128;
constexpr double kNormEps = 1e-300;

// Similarity s of target z beats the current best (s_best, z_best): NaN ranks lowest, ties go to
// the lower z; z_best < 0 means no non-NaN similarity yet.
__device__ __forceinline__ bool better(float s, int64_t z, float s_best, int64_t z_best) {
  if (isnan(s)) return false;
  return z_best < 0 || s > s_best || (s == s_best && z < z_best);
}

template <typename T, int W>
__global__ void __launch_bounds__(kAssignThreads)
    group_assign_kernel(const T* __restrict__ h, int64_t h_sb, int64_t h_sr, int64_t R, int64_t d, int64_t Z,
                        int64_t* __restrict__ group) {
  __shared__ float warp_best_sim[kAssignWarps];
  __shared__ int64_t warp_best_z[kAssignWarps];
  const int64_t b = blockIdx.x / R;
  const int64_t i = blockIdx.x % R;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;

  // Targets t_z = floor(z R / Z) lead their own group; z = ceil(i Z / R) is i's only candidate.
  const int64_t z_own = (i * Z + R - 1) / R;
  if (z_own < Z && z_own * R / Z == i) {
    if (threadIdx.x == 0) group[b * R + i] = z_own;
    return;  // block-uniform
  }

  const T* h_i = h + b * h_sb + i * h_sr;
  const int64_t nchunks = d / W;
  float best = 0.0f;
  int64_t best_z = -1;
  for (int64_t z = warp; z < Z; z += kAssignWarps) {
    const T* h_t = h + b * h_sb + (z * R / Z) * h_sr;
    double dot = 0.0;
    double norm_i = 0.0;
    double norm_t = 0.0;
    for (int64_t c = lane; c < nchunks; c += kWarp) {
      float xi[W];
      float xt[W];
      load_chunk<T, W>(h_i + c * W, xi);
      load_chunk<T, W>(h_t + c * W, xt);
#pragma unroll
      for (int w = 0; w < W; ++w) {
        dot = fma(static_cast<double>(xi[w]), static_cast<double>(xt[w]), dot);
        norm_i = fma(static_cast<double>(xi[w]), static_cast<double>(xi[w]), norm_i);
        norm_t = fma(static_cast<double>(xt[w]), static_cast<double>(xt[w]), norm_t);
      }
    }
    dot = warp_sum(dot);
    norm_i = warp_sum(norm_i);
    norm_t = warp_sum(norm_t);
    // Eq. 10: cos(h_i, h_t) in fp64 with x / max(||x||, eps), rounded to fp32; a zero vector has similarity 0.
    const float sim = static_cast<float>(dot / (fmax(sqrt(norm_i), kNormEps) * fmax(sqrt(norm_t), kNormEps)));
    if (better(sim, z, best, best_z)) {
      best = sim;
      best_z = z;
    }
  }
  if (lane == 0) {
    warp_best_sim[warp] = best;
    warp_best_z[warp] = best_z;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 0; w < kAssignWarps; ++w) {
      if (warp_best_z[w] >= 0 && better(warp_best_sim[w], warp_best_z[w], best, best_z)) {
        best = warp_best_sim[w];
        best_z = warp_best_z[w];
      }
    }
    group[b * R + i] = best_z < 0 ? 0 : best_z;  // all similarities NaN: all tie, the lowest z wins
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kMeanThreads)
    group_mean_kernel(const T* __restrict__ h, int64_t h_sb, int64_t h_sr, const int64_t* __restrict__ group,
                      int64_t R, int64_t d, int64_t Z, int64_t col_tiles, T* __restrict__ merged,
                      int32_t* __restrict__ counts) {
  __shared__ int is_member[kMeanThreads];
  const int64_t col_tile = blockIdx.x % col_tiles;
  const int64_t z = (blockIdx.x / col_tiles) % Z;
  const int64_t b = blockIdx.x / (col_tiles * Z);
  const int64_t c = col_tile * kMeanThreads + threadIdx.x;  // this thread's W-column chunk
  const bool active = c < d / W;
  const T* h_b = h + b * h_sb;
  const int64_t* group_b = group + b * R;

  float acc[W] = {};
  int count = 0;
  for (int64_t r0 = 0; r0 < R; r0 += kMeanThreads) {
    const int64_t r = r0 + threadIdx.x;
    is_member[threadIdx.x] = r < R && group_b[r] == z;
    __syncthreads();
    const int n = static_cast<int>(R - r0 < kMeanThreads ? R - r0 : kMeanThreads);
    for (int m = 0; m < n; ++m) {
      if (!is_member[m]) continue;  // block-uniform
      ++count;
      if (active) {
        float x[W];
        load_chunk<T, W>(h_b + (r0 + m) * h_sr + c * W, x);
#pragma unroll
        for (int w = 0; w < W; ++w) acc[w] += x[w];
      }
    }
    __syncthreads();
  }
  if (col_tile == 0 && threadIdx.x == 0) counts[b * Z + z] = count;
  if (active) {
    // count >= 1: the target t_z is always a member.
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] /= static_cast<float>(count);  // Eq. 11
    store_chunk<T, W>(merged + (b * Z + z) * d + c * W, acc);
  }
}

template <typename T, int W>
cudaError_t launch_group_merge(const T* h, int64_t h_sb, int64_t h_sr, int64_t B, int64_t R, int64_t d, int64_t Z,
                               T* merged, int64_t* group, int32_t* counts, cudaStream_t stream) {
  const int64_t assign_blocks = B * R;
  const int64_t col_tiles = std::max<int64_t>(1, ceil_div(d / W, kMeanThreads));  // d == 0 still counts
  const int64_t mean_blocks = B * Z * col_tiles;
  if (assign_blocks > INT32_MAX || mean_blocks > INT32_MAX || R > INT32_MAX) return cudaErrorInvalidConfiguration;
  auto* assign = group_assign_kernel<T, W>;
  SWIFTVLM_LAUNCH(assign, static_cast<unsigned>(assign_blocks), kAssignThreads, 0, stream, h, h_sb, h_sr, R, d, Z,
                  group);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  auto* mean = group_mean_kernel<T, W>;
  SWIFTVLM_LAUNCH(mean, static_cast<unsigned>(mean_blocks), kMeanThreads, 0, stream, h, h_sb, h_sr, group, R, d, Z,
                  col_tiles, merged, counts);
  return cudaGetLastError();
}

}  // namespace

cudaError_t group_merge(DType dtype, const void* h, int64_t h_sb, int64_t h_sr, int64_t B, int64_t R, int64_t d,
                        int64_t Z, void* merged, int64_t* group, int32_t* counts, cudaStream_t stream) {
  if (Z < 1 || Z > R) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* ht = static_cast<const T*>(h);
    T* out = static_cast<T*>(merged);
    // merged is contiguous: its rows stay 16-byte aligned when d is a multiple of the vector width.
    const bool vec = aligned16(h) && aligned16(merged) && strides_aligned16(sizeof(T), {h_sb, h_sr}) &&
                     d % kVec<T> == 0;
    return vec ? launch_group_merge<T, kVec<T>>(ht, h_sb, h_sr, B, R, d, Z, out, group, counts, stream)
               : launch_group_merge<T, 1>(ht, h_sb, h_sr, B, R, d, Z, out, group, counts, stream);
  });
}

}  // namespace swiftvlm
