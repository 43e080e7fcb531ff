// group_merge of a ragged batch (python_ref group_merge with lengths / per-sample num_groups): sample b
// groups its first n_b = lengths[b] rows (default R) to its Z_b = num_groups[b] targets floor(z n_b /
// Z_b) by cosine similarity (Eq. 10) and averages each group (Eq. 11); group is -1 past n_b, merged
// and counts are 0 past Z_b (up to the padded width Zw). The counts are read by each block on the
// device (no host read); the widths R and Zw are host ints. Two launches, no float atomics, the same
// arithmetic per sample as group_merge.cu's kernels on the sample alone (bit-equal results):
//
// ragged_assign_kernel: one block per row (b, i), a warp per target z (strided); fp64 cosine rounded
//   once to fp32, each warp's best (similarity, z) combined with the tie rule (NaN lowest, ties to
//   the lower z). A target leads its own group; a padding row (i >= n_b) writes -1 and reads nothing.
// ragged_mean_kernel: one block per (sample, group, tile of columns); it walks the sample's group
//   ids in position order and sums its members' columns in fp32 (one fixed order); groups past Z_b
//   write zeros. Reads each member row once per group, writes merged and counts once.
// The op's launcher, group_merge_ragged_cuda, is in group_merge.cu (one body with the padded form's).
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
__device__ __forceinline__ bool better(float s, int z, float s_best, int z_best) {
  if (isnan(s)) return false;
  return z_best < 0 || s > s_best || (s == s_best && z < z_best);
}

// Sample b's rows n_b (lengths[b], else R) and groups Z_b (num_groups[b], else Zw), clamped: 0 <= n_b
// <= R, 0 <= Z_b <= min(Zw, n_b).
struct SampleGroups {
  int64_t rows, groups;
};

__device__ __forceinline__ SampleGroups sample_groups(const IndexView& num_groups, const IndexView& lengths, int64_t b,
                                                      int64_t R, int64_t Zw) {
  int64_t n = lengths.ptr == nullptr ? R : load_index(lengths, b, 0);
  n = n < 0 ? 0 : (n > R ? R : n);
  int64_t z = num_groups.ptr == nullptr ? Zw : load_index(num_groups, b, 0);
  const int64_t z_max = Zw < n ? Zw : n;
  z = z < 0 ? 0 : (z > z_max ? z_max : z);
  return {n, z};
}

template <typename T, int W>
__global__ void __launch_bounds__(kAssignThreads)
    ragged_assign_kernel(const T* __restrict__ h, int64_t h_sb, int64_t h_sr, int64_t R, int64_t d, int64_t Zw,
                         IndexView num_groups, IndexView lengths, int64_t* __restrict__ group) {
  __shared__ float warp_best_sim[kAssignWarps];
  __shared__ int warp_best_z[kAssignWarps];
  const int64_t b = blockIdx.x / R;
  const int64_t i = blockIdx.x % R;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const SampleGroups s = sample_groups(num_groups, lengths, b, R, Zw);
  const int64_t n = s.rows, Z = s.groups;
  if (i >= n || Z == 0) {  // block-uniform: a padding row (-1); rows without groups (refused inputs): 0
    if (threadIdx.x == 0) group[b * R + i] = i >= n ? -1 : 0;
    return;
  }

  // Targets t_z = floor(z n / Z) lead their own group; z = ceil(i Z / n) is i's only candidate.
  const int64_t z_own = (i * Z + n - 1) / n;
  if (z_own < Z && z_own * n / Z == i) {
    if (threadIdx.x == 0) group[b * R + i] = z_own;
    return;  // block-uniform
  }

  const T* h_i = h + b * h_sb + i * h_sr;
  const int64_t nchunks = d / W;
  float best = 0.0f;
  int best_z = -1;  // (Z <= R <= INT32_MAX: the launch checks it)
  for (int z = warp; z < Z; z += kAssignWarps) {
    const T* h_t = h + b * h_sb + (static_cast<int64_t>(z) * n / Z) * h_sr;
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
    ragged_mean_kernel(const T* __restrict__ h, int64_t h_sb, int64_t h_sr, const int64_t* __restrict__ group,
                       int64_t R, int64_t d, int64_t Zw, IndexView num_groups, IndexView lengths, int64_t col_tiles,
                       T* __restrict__ merged, int32_t* __restrict__ counts) {
  __shared__ int is_member[kMeanThreads];
  const int64_t col_tile = blockIdx.x % col_tiles;
  const int64_t z = (blockIdx.x / col_tiles) % Zw;
  const int64_t b = blockIdx.x / (col_tiles * Zw);
  const int64_t c = col_tile * kMeanThreads + threadIdx.x;  // this thread's W-column chunk
  const bool active = c < d / W;
  const SampleGroups s = sample_groups(num_groups, lengths, b, R, Zw);
  const int64_t n = z < s.groups ? s.rows : 0;  // a padding group (z >= Z_b) has no member: zeros
  const T* h_b = h + b * h_sb;
  const int64_t* group_b = group + b * R;

  float acc[W] = {};
  int count = 0;
  for (int64_t r0 = 0; r0 < n; r0 += kMeanThreads) {
    const int64_t r = r0 + threadIdx.x;
    is_member[threadIdx.x] = r < n && group_b[r] == z;
    __syncthreads();
    const int m_end = static_cast<int>(n - r0 < kMeanThreads ? n - r0 : kMeanThreads);
    for (int m = 0; m < m_end; ++m) {
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
  if (col_tile == 0 && threadIdx.x == 0) counts[b * Zw + z] = count;
  if (active) {
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] = count > 0 ? acc[w] / static_cast<float>(count) : 0.0f;  // Eq. 11
    store_chunk<T, W>(merged + (b * Zw + z) * d + c * W, acc);
  }
}

template <typename T, int W>
cudaError_t launch_ragged(const T* h, int64_t h_sb, int64_t h_sr, int64_t B, int64_t R, int64_t d, int64_t Zw,
                          IndexView num_groups, IndexView lengths, T* merged, int64_t* group, int32_t* counts,
                          cudaStream_t stream) {
  const int64_t assign_blocks = B * R;
  const int64_t col_tiles = std::max<int64_t>(1, ceil_div(d / W, kMeanThreads));  // d == 0 still counts
  const int64_t mean_blocks = B * Zw * col_tiles;
  if (assign_blocks > INT32_MAX || mean_blocks > INT32_MAX || R > INT32_MAX) return cudaErrorInvalidConfiguration;
  if (assign_blocks > 0) {
    auto* assign = ragged_assign_kernel<T, W>;
    SWIFTVLM_LAUNCH(assign, static_cast<unsigned>(assign_blocks), kAssignThreads, 0, stream, h, h_sb, h_sr, R, d, Zw,
                    num_groups, lengths, group);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (mean_blocks > 0) {
    auto* mean = ragged_mean_kernel<T, W>;
    SWIFTVLM_LAUNCH(mean, static_cast<unsigned>(mean_blocks), kMeanThreads, 0, stream, h, h_sb, h_sr, group, R, d,
                    Zw, num_groups, lengths, col_tiles, merged, counts);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t group_merge_ragged(DType dtype, const void* h, int64_t h_sb, int64_t h_sr, int64_t B, int64_t R,
                               int64_t d, int64_t Zw, IndexView num_groups, IndexView lengths, void* merged,
                               int64_t* group, int32_t* counts, cudaStream_t stream) {
  if (Zw < 0 || Zw > R) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* ht = static_cast<const T*>(h);
    T* out = static_cast<T*>(merged);
    const bool vec = aligned16(h) && aligned16(merged) && strides_aligned16(sizeof(T), {h_sb, h_sr}) &&
                     d % kVec<T> == 0;
    return vec ? launch_ragged<T, kVec<T>>(ht, h_sb, h_sr, B, R, d, Zw, num_groups, lengths, out, group, counts, stream)
               : launch_ragged<T, 1>(ht, h_sb, h_sr, B, R, d, Zw, num_groups, lengths, out, group, counts, stream);
  });
}

}  // namespace swiftvlm
