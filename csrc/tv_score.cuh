// The two passes of tv_score that score_select runs too (tv_score.cu describes both).
//   pass 1 (score_partial_kernel) is defined in tv_score.cu and launched through score_partials;
//   pass 2 (score_merge_kernel) is a template here, with the step that runs after it as a parameter:
//   tv_score.cu instantiates it with nothing after the scores, score_select.cu with its select (device
//   code is not called across .cu files: the build has no relocatable device code).
//
// Pass 2, score_merge_kernel: grid B x ctas_per_row, each CTA P = THREADS / S positions of a row,
// S head slices per position (each thread sums <= kMergeHeads heads, their logit loads in flight
// together and issued before the per-head statistics are reduced): per head the global max M_h and
// denominator S_h from the tile partials, then score_i = mean_h exp(l_hi - M_h) / S_h (Eq. 1-2),
// written to `scores`; then the step after it. Reads the visual logits and the row's tile
// statistics, writes the scores. Ragged rows: scores past the row's own visual count n_b are 0 (a
// CTA with no position below n_b skips the head statistics).
#pragma once

#include "common.cuh"

namespace swiftvlm {

constexpr int kMergeHeads = 8;  // heads summed per thread in pass 2 (loads in flight)
constexpr int kStatTiles = 2;   // tiles per lane and head kept in registers (64 per head)

// Views into the workspace (score_workspace_floats).
struct ScoreWorkspace {
  float* tile_max;     // [B, H, tiles]: max logit of the tile's valid keys (-inf if none)
  float* tile_sum;     // [B, H, tiles]: sum of exp(logit - tile_max) over them
  float* vis_exp;      // [B, H, vis_len]: exp(logit - tile max) of visual key i (0 if masked)
  unsigned* arrivals;  // [B]: pass-2 CTAs of the row done (reset by pass 1)
  int key_tile;
  int64_t tiles;
};

// The workspace's views for a; the key tile and the tile count follow the shapes (tv_score.cu).
ScoreWorkspace workspace_views(float* workspace, const ScoreArgs& a);

// Pass 1 with 16-byte key loads when every key row start is 16-byte aligned (tv_score.cu).
cudaError_t score_partials(const ScoreArgs& a, const ScoreWorkspace& ws, cudaStream_t stream);

// Sample b's keys: rows offset .. offset + len - 1 of its key rows. Padded k: all L. Packed k
// (varlen): cu_seqlens[b] .. cu_seqlens[b + 1] - 1, clamped into [0, k_rows], at most L of them.
struct SampleKeys {
  int64_t offset;
  int64_t len;
};

__device__ __forceinline__ SampleKeys sample_keys(const ScoreArgs& a, int64_t b) {
  if (a.seq_start.ptr == nullptr) return {0, a.L};
  const int64_t lo_raw = load_index(a.seq_start, b, 0);
  const int64_t hi_raw = load_index(a.seq_start, b + 1, 0);
  const int64_t lo = lo_raw < 0 ? 0 : (lo_raw > a.k_rows ? a.k_rows : lo_raw);
  const int64_t hi = hi_raw < lo ? lo : (hi_raw > a.k_rows ? a.k_rows : hi_raw);
  return {lo, hi - lo < a.L ? hi - lo : a.L};
}

// Sample b's visual count: vis_count[b] clamped to [0, vis_len] (ragged), else vis_len.
__device__ __forceinline__ int64_t sample_vis(const ScoreArgs& a, int64_t b) {
  return row_count(a.vis_count, b, a.vis_len, a.vis_len);
}

// vis_start[b] clamped to [-vis_len, L]: every position it names stays as far outside [0, L), and
// vis_start + i cannot overflow.
__device__ __forceinline__ int64_t load_vis_start(const ScoreArgs& a, int64_t b) {
  const int64_t v = load_index(a.vis_start, b, 0);
  return v < -a.vis_len ? -a.vis_len : (v > a.L ? a.L : v);
}

// True when sample b has a valid key; every lane of the warp calls it and gets the answer.
__device__ inline bool any_valid_key(const ScoreArgs& a, int64_t b, int lane) {
  const int64_t Lb = sample_keys(a, b).len;
  if (a.key_mask == nullptr) return Lb > 0;
  bool any = false;
  for (int64_t j = lane; j < Lb && !any; j += kWarp) any = a.key_mask[b * a.mask_sb + j * a.mask_sl];
  return __any_sync(kFullMask, any);
}

// Per head h of sample b: the softmax max M_h and denominator S_h over all valid keys from the tile
// partials (Eq. 2), turned into one factor per tile of this CTA's positions (tiles t_lo .. t_lo +
// LT - 1): factor[h * LT + t - t_lo] = exp(m_t - M_h) / S_h, so that key j of tile t has the
// probability e_j * factor (e_j = exp(l_j - m_t), written by pass 1). A group of `lanes` lanes per
// head (kStatTiles tiles each in registers), HEADS heads per group loaded together.
template <int HEADS>
__device__ void head_factors(const ScoreArgs& a, const ScoreWorkspace& ws, int64_t b, int lanes, int64_t t_lo,
                             int LT, float* factor) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const int groups = kWarp / lanes;  // heads per warp
  const int sub = lane % lanes;
  const int first_lane = lane - sub;  // of this lane's group
  const int64_t stride = static_cast<int64_t>(warps) * groups;
  for (int64_t base = static_cast<int64_t>(warp) * groups + lane / lanes; base - lane / lanes < a.H;
       base += stride * HEADS) {  // (base - group: warp-uniform)
    float cm[HEADS][kStatTiles], cs[HEADS][kStatTiles];
#pragma unroll
    for (int hh = 0; hh < HEADS; ++hh) {
      const int64_t h = base + hh * stride;
#pragma unroll
      for (int c = 0; c < kStatTiles; ++c) {
        const int64_t t = c * lanes + sub;
        const bool in = h < a.H && t < ws.tiles;
        cm[hh][c] = in ? ws.tile_max[(b * a.H + h) * ws.tiles + t] : -INFINITY;
        cs[hh][c] = in ? ws.tile_sum[(b * a.H + h) * ws.tiles + t] : 0.0f;
      }
    }
#pragma unroll
    for (int hh = 0; hh < HEADS; ++hh) {
      const int64_t h = base + hh * stride;
      const bool head = h < a.H;
      const float* tmax = ws.tile_max + (b * a.H + (head ? h : 0)) * ws.tiles;
      const float* tsum = ws.tile_sum + (b * a.H + (head ? h : 0)) * ws.tiles;
      float m = -INFINITY;
#pragma unroll
      for (int c = 0; c < kStatTiles; ++c) m = fmaxf(m, cm[hh][c]);
      for (int64_t t = kStatTiles * lanes + sub; head && t < ws.tiles; t += lanes) m = fmaxf(m, tmax[t]);
      m = lanes_max(m, lanes);
      float s = 0.0f;
      if (m != -INFINITY) {  // (an all-masked head: every term would be 0 * exp(nan))
#pragma unroll
        for (int c = 0; c < kStatTiles; ++c) s += cs[hh][c] * expf(cm[hh][c] - m);
        for (int64_t t = kStatTiles * lanes + sub; head && t < ws.tiles; t += lanes) s += tsum[t] * expf(tmax[t] - m);
      }
      s = lanes_sum(s, lanes);  // Eq. 2: softmax denominator over all valid keys
      // Every logit -inf: without a valid key the head adds 0 to the mean; valid keys whose logits
      // are all -inf make it NaN, as torch.softmax. A NaN or +inf logit already made s NaN.
      const bool none_valid = __any_sync(kFullMask, m == -INFINITY) && !any_valid_key(a, b, lane);
      const float head_max = m == -INFINITY ? 0.0f : m;
      const float head_sum = m == -INFINITY ? (none_valid ? 1.0f : NAN) : s;
      for (int lt0 = 0; lt0 < LT; lt0 += lanes) {
        const int lt = lt0 + sub;
        const int64_t t = t_lo + lt;
        const int src = first_lane + static_cast<int>(t % lanes);
        float mt = -INFINITY;  // tile t's max: in the registers of lane t % lanes of the group, else in memory
#pragma unroll
        for (int c = 0; c < kStatTiles; ++c) {
          const float v = __shfl_sync(kFullMask, cm[hh][c], src);
          if (t / lanes == c) mt = v;
        }
        if (head && lt < LT) {
          if (t >= kStatTiles * lanes) mt = tmax[t];
          factor[h * LT + lt] = expf(mt - head_max) / head_sum;  // Eq. 2: exp(m_t - M_h) / S_h
        }
      }
    }
  }
  __syncthreads();
}

// Pass 2's layout: head slices per position, CTAs per row, lanes per head in head_factors, the
// tiles one CTA's positions can span, and score_select's share of the dynamic shared memory (its
// select's candidate list and keys; 0 for tv_score).
struct MergePlan {
  int slices;
  int ctas_per_row;
  int stat_lanes;
  int tiles_per_cta;
  int cand_cap;
  size_t select_smem;  // keys + candidates at the start of the dynamic shared memory
};

// Pass 2's layout for CTAs of `threads` threads: head slices per position (a thread sums at most
// kMergeHeads heads, and a CTA still covers a warp of positions), CTAs per row, lanes per head for
// the statistics (kStatTiles tiles per lane when the row has few tiles), and the tiles one CTA spans.
inline MergePlan merge_plan(const ScoreArgs& a, const ScoreWorkspace& ws, int threads) {
  MergePlan mp{1, 0, 1, 0, 0, 0};
  while (mp.slices * kMergeHeads < a.H && mp.slices < threads / kWarp) mp.slices *= 2;
  const int positions = threads / mp.slices;
  mp.ctas_per_row = static_cast<int>(ceil_div(a.vis_len, positions));
  while (mp.stat_lanes < kWarp && mp.stat_lanes * kStatTiles < ws.tiles) mp.stat_lanes *= 2;
  mp.tiles_per_cta = static_cast<int>(ceil_div(positions, ws.key_tile)) + 1;
  return mp;
}

inline size_t merge_smem(const ScoreArgs& a, const MergePlan& mp, int threads) {
  return mp.select_smem + static_cast<size_t>(a.H * mp.tiles_per_cta + threads) * sizeof(float);
}

// Pass 2, then `after.run<THREADS>(...)` in every CTA once its scores are written, given the CTA's
// row, the row's own visual count and the dynamic shared memory (its first mp.select_smem bytes are
// the step's).
template <int THREADS, typename After>
__global__ void __launch_bounds__(THREADS, 1)
    score_merge_kernel(ScoreArgs a, ScoreWorkspace ws, MergePlan mp, float* scores, After after) {
  SWIFTVLM_DYNAMIC_SMEM(dyn_smem);
  float* factor = reinterpret_cast<float*>(dyn_smem + mp.select_smem);  // [H, tiles_per_cta]
  float* partial = factor + a.H * mp.tiles_per_cta;                    // [THREADS]

  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x / mp.ctas_per_row;
  const int S = mp.slices;
  const int P = THREADS / S;  // positions of this CTA
  const int p = tid % P;
  const int slice = tid / P;  // heads slice, slice + S, ...
  const int64_t i0 = static_cast<int64_t>(blockIdx.x % mp.ctas_per_row) * P;
  const int64_t i = i0 + p;
  const int64_t vs = load_vis_start(a, row);
  const int64_t pos = vs + i;
  const int64_t nvis = sample_vis(a, row);      // ragged: the row's own visual count
  const int64_t Lb = sample_keys(a, row).len;  // packed: the sample's own keys
  const bool busy = i0 < nvis;                  // block-uniform: the CTA has positions of the row
  const bool active = i < nvis && pos >= 0 && pos < Lb;  // outside the sequence or the row: score 0, nothing read
  // The tiles of the CTA's positions inside [0, Lb).
  const int64_t first = vs + i0 < 0 ? 0 : vs + i0;
  const int64_t last = vs + i0 + P - 1 < Lb - 1 ? vs + i0 + P - 1 : Lb - 1;
  const int64_t t_lo = first / ws.key_tile;
  const int LT = last < first ? 0 : static_cast<int>(last / ws.key_tile - t_lo + 1);
  const int lt = active ? static_cast<int>(pos / ws.key_tile - t_lo) : 0;
  const float* e = ws.vis_exp + row * a.H * a.vis_len + i;

  float x[kMergeHeads];  // the first heads' e values, in flight while the factors are computed
#pragma unroll
  for (int u = 0; u < kMergeHeads; ++u) {
    const int64_t h = slice + u * S;
    x[u] = active && h < a.H ? e[h * a.vis_len] : 0.0f;
  }
  if (busy) head_factors<THREADS >= 1024 ? 1 : 4>(a, ws, row, mp.stat_lanes, t_lo, LT, factor);
  float acc = 0.0f;
  for (int64_t h0 = slice; busy; h0 += kMergeHeads * S) {
#pragma unroll
    for (int u = 0; u < kMergeHeads; ++u) {
      const int64_t h = h0 + u * S;
      if (h < a.H) acc = fmaf(x[u], factor[h * LT + lt], acc);  // Eq. 2: p_h = exp(l - m_t) * exp(m_t - M_h) / S_h
    }
    if (h0 + kMergeHeads * S >= a.H) break;
#pragma unroll
    for (int u = 0; u < kMergeHeads; ++u) {
      const int64_t h = h0 + (kMergeHeads + u) * S;
      x[u] = active && h < a.H ? e[h * a.vis_len] : 0.0f;
    }
  }
  partial[tid] = acc;
  __syncthreads();
  if (slice == 0 && i < a.vis_len) {
    float total = 0.0f;
    for (int t = 0; t < S; ++t) total += partial[t * P + p];  // fixed order: deterministic
    scores[row * a.vis_len + i] = active ? total / static_cast<float>(a.H) : 0.0f;  // Eq. 1: mean over the heads
  }
  after.template run<THREADS>(a, ws, mp, scores, row, nvis, dyn_smem);
}

template <int THREADS, typename After>
cudaError_t launch_merge(const ScoreArgs& a, const ScoreWorkspace& ws, const MergePlan& mp, float* scores,
                         const After& after, cudaStream_t stream) {
  auto* kernel = score_merge_kernel<THREADS, After>;
  const size_t smem = merge_smem(a, mp, THREADS);
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = a.B * mp.ctas_per_row;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  SWIFTVLM_LAUNCH(kernel, static_cast<unsigned>(blocks), THREADS, smem, stream, a, ws, mp, scores, after);
  return cudaGetLastError();
}

}  // namespace swiftvlm
