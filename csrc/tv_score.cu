// tv_score and score_select: the last token's softmax attention over all valid keys, averaged
// over the heads and read at the visual keys (Eq. 1-2), as a split-K softmax.
//
// Pass 1 (score_partial_kernel), one block per (sample, KV head, tile of kKeyTile keys): the
// G = H / Hkv query heads of that KV head share every key load; per head the block writes the
// tile's max and sum of exp, and the raw logits of the tile's visual keys, to a fp32 workspace.
// Pass 2 merges: per head the global max M and denominator S from the tile partials, then
// score_i = mean_h exp(l_hi - M_h) / S_h. tv_score runs it as merge_scores_kernel; score_select
// runs it inside the select kernel, so no [B, H, L] probability tensor is ever written.
#include "select_rows.cuh"

namespace swiftvlm {
namespace {

constexpr int kKeyTile = 64;
constexpr int kScoreThreads = 256;
constexpr int kScoreWarps = kScoreThreads / kWarp;
constexpr int kMergeThreads = 256;

// Views into the workspace (score_workspace_floats).
struct ScorePartials {
  float* tile_max;   // [B, H, tiles]: max logit of the tile's valid keys (-inf if none)
  float* tile_sum;   // [B, H, tiles]: sum of exp(logit - tile_max) over them
  float* vis_logit;  // [B, H, vis_len]: logit of visual key i (-inf if masked)
};

__host__ __device__ inline int64_t num_tiles(int64_t L) { return ceil_div(L, kKeyTile); }

ScorePartials partials_in(float* workspace, const ScoreArgs& a) {
  const int64_t per_stat = a.B * a.H * num_tiles(a.L);
  return ScorePartials{workspace, workspace + per_stat, workspace + 2 * per_stat};
}

// vis_start[b] clamped to [-vis_len, L]: every position it names stays as far outside [0, L), and
// vis_start + i cannot overflow.
__device__ __forceinline__ int64_t load_vis_start(const ScoreArgs& a, int64_t b) {
  const int64_t v = load_index(a.vis_start, b, 0);
  return v < -a.vis_len ? -a.vis_len : (v > a.L ? a.L : v);
}

template <typename T, int W>
__global__ void __launch_bounds__(kScoreThreads) score_partial_kernel(ScoreArgs a, ScorePartials part) {
  SWIFTVLM_DYNAMIC_SMEM(dyn_smem);
  const int G = static_cast<int>(a.H / a.Hkv);
  const int D = static_cast<int>(a.D);
  float* q_s = reinterpret_cast<float*>(dyn_smem);  // [G, D] scaled queries
  float* logit_s = q_s + G * D;                     // [G, kKeyTile]

  const int64_t tiles = num_tiles(a.L);
  const int64_t tile = blockIdx.x % tiles;
  const int64_t g = (blockIdx.x / tiles) % a.Hkv;
  const int64_t b = blockIdx.x / (tiles * a.Hkv);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;

  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + g * G * a.q_sh;
  for (int idx = threadIdx.x; idx < G * D; idx += kScoreThreads) {
    q_s[idx] = to_float(q[(idx / D) * a.q_sh + idx % D]) * a.scale;  // Eq. 2: scale * q
  }
  __syncthreads();

  // One warp per key: lanes split the head dim into W-element chunks; each loaded chunk serves
  // all G heads of the group.
  const int64_t j0 = tile * kKeyTile;
  const T* k_head = static_cast<const T*>(a.k) + b * a.k_sb + g * a.k_sh;
  const int nchunks = D / W;
  for (int jl = warp; jl < kKeyTile; jl += kScoreWarps) {
    const int64_t j = j0 + jl;
    const bool valid = j < a.L && (a.key_mask == nullptr || a.key_mask[b * a.mask_sb + j * a.mask_sl]);
    if (lane == 0) {
      for (int h = 0; h < G; ++h) logit_s[h * kKeyTile + jl] = valid ? 0.0f : -INFINITY;
    }
    if (!valid) continue;  // masked and padding keys are never read
    const T* k_row = k_head + j * a.k_sl;
    for (int c0 = 0; c0 < nchunks; c0 += kWarp) {
      const int c = c0 + lane;
      float kf[W] = {};
      if (c < nchunks) load_chunk<T, W>(k_row + c * W, kf);
      for (int h = 0; h < G; ++h) {
        float dot = 0.0f;
        if (c < nchunks) {
          const float* qh = q_s + h * D + c * W;
#pragma unroll
          for (int w = 0; w < W; ++w) dot = fmaf(kf[w], qh[w], dot);
        }
        dot = warp_sum(dot);  // Eq. 2: scale * <q_h, k_j>
        if (lane == 0) logit_s[h * kKeyTile + jl] += dot;
      }
    }
  }
  __syncthreads();

  const int64_t vs = load_vis_start(a, b);
  for (int h = warp; h < G; h += kScoreWarps) {
    const int64_t head = g * G + h;
    float* vis_row = part.vis_logit + (b * a.H + head) * a.vis_len;
    float m = -INFINITY;
    for (int jl = lane; jl < kKeyTile; jl += kWarp) {
      const float l = logit_s[h * kKeyTile + jl];
      m = fmaxf(m, l);
      const int64_t j = j0 + jl;
      if (j < a.L && j >= vs && j - vs < a.vis_len) vis_row[j - vs] = l;
    }
    m = warp_max(m);
    float s = 0.0f;
    if (m != -INFINITY) {  // warp-uniform: an all-masked tile contributes nothing
      for (int jl = lane; jl < kKeyTile; jl += kWarp) s += expf(logit_s[h * kKeyTile + jl] - m);
      s = warp_sum(s);  // Eq. 2: this tile's share of the softmax denominator
    }
    if (lane == 0) {
      part.tile_max[(b * a.H + head) * tiles + tile] = m;
      part.tile_sum[(b * a.H + head) * tiles + tile] = s;
    }
  }
}

// True when sample b has a valid key; every lane of the warp calls it and gets the answer.
__device__ bool any_valid_key(const ScoreArgs& a, int64_t b, int lane) {
  if (a.key_mask == nullptr) return a.L > 0;
  bool any = false;
  for (int64_t j = lane; j < a.L && !any; j += kWarp) any = a.key_mask[b * a.mask_sb + j * a.mask_sl];
  return __any_sync(kFullMask, any);
}

// Merged visual scores from the partials; also a Source of select_rows_kernel.
struct VisualScores {
  ScoreArgs a;
  ScorePartials part;
  float* scores;  // [B, vis_len] output

  static size_t smem_bytes(int64_t H) { return 2 * static_cast<size_t>(H) * sizeof(float); }

  // One sample's scores once its per-head max and softmax denominator are in shared memory.
  struct Row {
    const float* vis_logit;  // [H, vis_len]
    const float* head_max;
    const float* head_sum;
    float* scores;
    int64_t H, vis_len, L, vs;

    __device__ float score(int i) const {
      const int64_t pos = vs + i;
      if (pos < 0 || pos >= L) return 0.0f;  // outside the sequence: score 0, nothing read
      float acc = 0.0f;
      for (int64_t h = 0; h < H; ++h) acc += expf(vis_logit[h * vis_len + i] - head_max[h]) / head_sum[h];  // Eq. 2
      return acc / static_cast<float>(H);  // Eq. 1: mean over the heads
    }
    __device__ void store(int i, float s) const { scores[i] = s; }
    __device__ float stored(int i) const { return scores[i]; }
  };

  // Per head: global max and softmax denominator from the tile partials (a warp per head).
  __device__ Row prepare(int row, float* smem) const {
    float* head_max = smem;
    float* head_sum = smem + a.H;
    const int64_t tiles = num_tiles(a.L);
    const int lane = threadIdx.x % kWarp;
    for (int64_t h = threadIdx.x / kWarp; h < a.H; h += blockDim.x / kWarp) {
      const float* tmax = part.tile_max + (row * a.H + h) * tiles;
      const float* tsum = part.tile_sum + (row * a.H + h) * tiles;
      float m = -INFINITY;
      for (int64_t t = lane; t < tiles; t += kWarp) m = fmaxf(m, tmax[t]);
      m = warp_max(m);
      float s = 0.0f;
      if (m != -INFINITY) {
        for (int64_t t = lane; t < tiles; t += kWarp) s += tsum[t] * expf(tmax[t] - m);
        s = warp_sum(s);  // Eq. 2: softmax denominator over all valid keys
      }
      // Every logit -inf (warp-uniform): without a valid key the head adds 0 to the mean; valid keys
      // whose logits are all -inf make it NaN, as torch.softmax. A NaN or +inf logit already made s NaN.
      const bool none_valid = m == -INFINITY && !any_valid_key(a, row, lane);
      if (lane == 0) {
        head_max[h] = m == -INFINITY ? 0.0f : m;
        head_sum[h] = m == -INFINITY ? (none_valid ? 1.0f : NAN) : s;
      }
    }
    __syncthreads();
    return Row{part.vis_logit + row * a.H * a.vis_len, head_max, head_sum, scores + row * a.vis_len,
               a.H, a.vis_len, a.L, load_vis_start(a, row)};
  }
};

__global__ void __launch_bounds__(kMergeThreads) merge_scores_kernel(VisualScores src, int64_t blocks_per_row) {
  SWIFTVLM_DYNAMIC_SMEM(dyn_smem);
  const int row = static_cast<int>(blockIdx.x / blocks_per_row);
  const int64_t i = (blockIdx.x % blocks_per_row) * kMergeThreads + threadIdx.x;
  const VisualScores::Row scores = src.prepare(row, reinterpret_cast<float*>(dyn_smem));
  if (i < src.a.vis_len) scores.store(static_cast<int>(i), scores.score(static_cast<int>(i)));
}

template <typename T, int W>
cudaError_t launch_score_partial(const ScoreArgs& a, const ScorePartials& part, cudaStream_t stream) {
  const int64_t G = a.H / a.Hkv;
  const size_t smem = static_cast<size_t>(G * (a.D + kKeyTile)) * sizeof(float);
  auto* kernel = score_partial_kernel<T, W>;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = a.B * a.Hkv * num_tiles(a.L);
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  if (blocks > 0) SWIFTVLM_LAUNCH(kernel, static_cast<unsigned>(blocks), kScoreThreads, smem, stream, a, part);
  return cudaGetLastError();
}

// Pass 1 with 16-byte key loads when every key row start is 16-byte aligned.
cudaError_t score_partials(const ScoreArgs& a, const ScorePartials& part, cudaStream_t stream) {
  if (a.H <= 0 || a.Hkv <= 0 || a.H % a.Hkv != 0 || a.D > INT32_MAX / (a.H / a.Hkv)) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = aligned16(a.k) && strides_aligned16(sizeof(T), {a.k_sb, a.k_sh, a.k_sl}) && a.D % kVec<T> == 0;
    return vec ? launch_score_partial<T, kVec<T>>(a, part, stream) : launch_score_partial<T, 1>(a, part, stream);
  });
}

}  // namespace

size_t score_workspace_floats(int64_t B, int64_t H, int64_t L, int64_t vis_len) {
  return static_cast<size_t>(B * H * (2 * num_tiles(L) + vis_len));
}

cudaError_t tv_score(const ScoreArgs& a, float* workspace, float* scores, cudaStream_t stream) {
  if (a.B == 0 || a.vis_len == 0) return cudaSuccess;
  const ScorePartials part = partials_in(workspace, a);
  cudaError_t err = score_partials(a, part, stream);
  if (err != cudaSuccess) return err;
  const VisualScores src{a, part, scores};
  const int64_t blocks_per_row = ceil_div(a.vis_len, kMergeThreads);
  const int64_t blocks = a.B * blocks_per_row;
  if (blocks > INT32_MAX || a.B > INT32_MAX) return cudaErrorInvalidConfiguration;
  const size_t smem = VisualScores::smem_bytes(a.H);
  err = allow_dynamic_smem(merge_scores_kernel, smem);
  if (err != cudaSuccess) return err;
  auto* merge = merge_scores_kernel;
  SWIFTVLM_LAUNCH(merge, static_cast<unsigned>(blocks), kMergeThreads, smem, stream, src, blocks_per_row);
  return cudaGetLastError();
}

cudaError_t score_select(const ScoreArgs& a, int64_t keep, float* workspace, float* scores, int64_t* keep_idx,
                         int64_t* rest_idx, cudaStream_t stream) {
  if (a.B == 0 || a.vis_len == 0) return cudaSuccess;
  const ScorePartials part = partials_in(workspace, a);
  const cudaError_t err = score_partials(a, part, stream);
  if (err != cudaSuccess) return err;
  const VisualScores src{a, part, scores};
  return launch_select_rows(src, VisualScores::smem_bytes(a.H), a.B, a.vis_len, keep, keep_idx, rest_idx, stream);
}

}  // namespace swiftvlm
