// tv_score and score_select: the last token's softmax attention over all valid keys, averaged over
// the heads and read at the visual keys (Eq. 1-2), as a split-K softmax in two launches.
//
// Pass 1, score_partial_kernel: grid B x Hkv x tiles, one 256-thread block per (sample, KV head,
// tile of key_tile keys; key_tile 64..512, the largest that still gives ~1024 blocks). The block
// stages scale * q of the G = H / Hkv query heads that share the KV head and the tile's key-mask
// bytes in shared memory while its first key loads are already in flight: no key load waits for a
// mask byte. A sub-warp of C lanes (C = D / W rounded up to a power of two, at most 32; W elements
// per 16-byte load, or 1 for unaligned views) computes one key's G dots, 32 / C keys per warp and
// step; each thread keeps kKeyBatch keys' loads in flight and prefetches the next batch. Masked keys
// are read like the others and replaced by -inf with a select (their K rows may hold anything);
// keys past L are not read. Per head the block writes the tile's max and sum of exp, and the
// logits of its visual keys; block (b, 0, 0) also resets row b's arrival counter for pass 2.
// Reads K once (2 * Hkv * L * D bytes for bf16), writes 4 * H * (vis_len + 2 * tiles) bytes.
//
// Pass 2, score_merge_kernel: grid B x ctas_per_row, each CTA P = THREADS / S positions of a row,
// S head slices per position (each thread sums <= kMergeHeads heads, their logit loads in flight
// together and issued before the per-head statistics are reduced): per head the global max M_h and
// denominator S_h from the tile partials, then score_i = mean_h exp(l_hi - M_h) / S_h (Eq. 1-2),
// written to `scores`. tv_score stops there. score_select (SELECT): every CTA fences its scores and
// counts itself in the row's arrival counter; the CTA that arrives last runs select_row
// (select_rows.cuh) on the row's scores, so the top-k and the keep / rest compaction need no third
// launch. Reads the visual logits and the row's tile statistics, writes the scores (and indices).
//
// Ragged and packed batches (the same two launches; widths are host ints, counts device tensors read
// by each block, never on the host): vis_count[b] gives row b's own visual count n_b <= vis_len (the
// padded width): pass 1 writes e only for its first n_b positions, pass 2 scores them and writes 0
// past them (a CTA with no position below n_b skips the head statistics), and the select runs on the
// row's n_b scores with its own keep count k_b, then writes -1 after its k_b kept and n_b - k_b rest
// indices (keep [B, K], rest [B, vis_len]). Packed keys (varlen, seq_start = cu_seqlens): sample b's
// keys are read in place at rows cu_seqlens[b] + j of k [total, Hkv, D], j < L_b = its length (at
// most L = max_seqlen); a pass-1 tile at or past L_b writes max -inf / sum 0 and exits at once, so a
// batch of short samples costs its keys, not B x L. Per sample the arithmetic is that of the sample
// alone whenever key_tile_for picks the same tile for the batch as for one sample (always when
// B x Hkv x ceil(L / 128) < 1024, e.g. LLaVA-1.5 batch 2; a larger batch may get larger tiles, whose
// partial sums round differently), so a ragged row is then bit-equal to its sample run alone.
//
// GQA: the per-head visual logits go through the workspace (8 * H * vis_len bytes written and read
// back) because M_h and S_h are known only once every tile of the KV head is done; reducing the G
// heads of a group before writing would need them earlier (a grid-wide wait, or a second read of K).
#include "select_rows.cuh"

namespace swiftvlm {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kScoreWarps = kScoreThreads / kWarp;
constexpr int kMinKeyTile = 64;
constexpr int kMaxKeyTile = 512;
constexpr int64_t kPass1Blocks = 1024;  // ~8 blocks per SM on a 132-SM GPU: larger tiles only above
constexpr size_t kPass1SmemGoal = 48 * 1024;
constexpr int kKeyBatch = 8;            // keys per thread whose loads are in flight together
constexpr int kMergeThreads = 256;      // tv_score's pass 2
constexpr int kMergeHeads = 8;          // heads summed per thread in pass 2 (loads in flight)
constexpr int kStatTiles = 2;           // tiles per lane and head kept in registers (64 per head)

// Keys per pass-1 block: the largest power of two in [64, 512] that keeps ~kPass1Blocks blocks and
// the block's shared memory (G * (D + key_tile) floats) within 48 KB when it can.
int64_t key_tile_for(int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t D) {
  const int64_t G = H / Hkv;
  int64_t kt = kMinKeyTile;
  while (kt < kMaxKeyTile && B * Hkv * ceil_div(L, 2 * kt) >= kPass1Blocks &&
         static_cast<size_t>(G * (D + 2 * kt)) * sizeof(float) + 2 * kt <= kPass1SmemGoal) {
    kt *= 2;
  }
  return kt;
}

// Key tiles of pass 1: at least one, so that pass 1 always runs (and resets the arrival counters).
int64_t num_tiles(int64_t L, int64_t key_tile) { return L > key_tile ? ceil_div(L, key_tile) : 1; }

// Views into the workspace (score_workspace_floats).
struct ScoreWorkspace {
  float* tile_max;     // [B, H, tiles]: max logit of the tile's valid keys (-inf if none)
  float* tile_sum;     // [B, H, tiles]: sum of exp(logit - tile_max) over them
  float* vis_exp;      // [B, H, vis_len]: exp(logit - tile max) of visual key i (0 if masked)
  unsigned* arrivals;  // [B]: pass-2 CTAs of the row done (reset by pass 1)
  int key_tile;
  int64_t tiles;
};

ScoreWorkspace workspace_views(float* workspace, const ScoreArgs& a) {
  ScoreWorkspace ws;
  ws.key_tile = static_cast<int>(key_tile_for(a.B, a.H, a.Hkv, a.L, a.D));
  ws.tiles = num_tiles(a.L, ws.key_tile);
  const int64_t per_stat = a.B * a.H * ws.tiles;
  ws.tile_max = workspace;
  ws.tile_sum = workspace + per_stat;
  ws.vis_exp = workspace + 2 * per_stat;
  ws.arrivals = reinterpret_cast<unsigned*>(workspace + 2 * per_stat + a.B * a.H * a.vis_len);
  return ws;
}

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

// Sum over the C lanes of each aligned C-lane group (every lane of the warp calls it).
template <int C>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = C / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename T, int W, int C>
__global__ void __launch_bounds__(kScoreThreads, 3) score_partial_kernel(ScoreArgs a, ScoreWorkspace ws) {
  static_assert(C >= 1 && C <= kWarp && (C & (C - 1)) == 0, "a key's lanes: a power of two up to a warp");
  constexpr int kKeysPerWarp = kWarp / C;
  constexpr int kKeysPerStep = kScoreWarps * kKeysPerWarp;
  SWIFTVLM_DYNAMIC_SMEM(dyn_smem);
  const int G = static_cast<int>(a.H / a.Hkv);
  const int D = static_cast<int>(a.D);
  const int KT = ws.key_tile;
  float* q_s = reinterpret_cast<float*>(dyn_smem);                        // [G, D] scale * q
  float* logit_s = q_s + G * D;                                           // [G, KT]
  unsigned char* valid_s = reinterpret_cast<unsigned char*>(logit_s + G * KT);  // [KT]

  const int64_t tile = blockIdx.x % ws.tiles;
  const int64_t g = (blockIdx.x / ws.tiles) % a.Hkv;
  const int64_t b = blockIdx.x / (ws.tiles * a.Hkv);
  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int sub_lane = lane % C;                            // lane within the key's group
  const int key_in_step = warp * kKeysPerWarp + lane / C;   // the thread's key within a step
  const int nchunks = D / W;
  const int rounds = nchunks > C ? static_cast<int>(ceil_div(nchunks, C)) : 1;  // chunks per lane and key (D == 0: one empty round)
  const int steps = static_cast<int>(ceil_div(KT, kKeysPerStep));
  const int64_t j0 = tile * KT;
  const SampleKeys keys = sample_keys(a, b);
  const int64_t Lb = keys.len;  // the sample's keys: j < Lb
  const T* k_head = static_cast<const T*>(a.k) + b * a.k_sb + g * a.k_sh + keys.offset * a.k_sl;
  if (tid == 0 && g == 0 && tile == 0) ws.arrivals[b] = 0;  // pass 2 of this launch counts from 0
  if (j0 >= Lb) {  // a tile past the sample's keys (ragged and packed batches): nothing to read
    for (int h = tid; h < G; h += kScoreThreads) {
      ws.tile_max[(b * a.H + g * G + h) * ws.tiles + tile] = -INFINITY;
      ws.tile_sum[(b * a.H + g * G + h) * ws.tiles + tile] = 0.0f;
    }
    return;
  }

  // Batch (s0, r): chunk r * C + sub_lane of the keys of steps s0 .. s0 + kKeyBatch - 1, all loads
  // in flight together. Keys past the tile or past L, and chunks past D, load nothing (and add 0).
  using Raw = RawChunk<T, W>;
  auto load_batch = [&](int s0, int r, Raw (&raw)[kKeyBatch]) {
    const int c = r * C + sub_lane;
#pragma unroll
    for (int u = 0; u < kKeyBatch; ++u) {
      const int jl = (s0 + u) * kKeysPerStep + key_in_step;
      const int64_t j = j0 + jl;
      if (s0 + u < steps && jl < KT && j < Lb && c < nchunks) {
        raw[u].load(k_head + j * a.k_sl + c * W);
      } else {
        raw[u].clear();
      }
    }
  };
  Raw raw[kKeyBatch];
  load_batch(0, 0, raw);  // in flight while q and the mask bytes are staged

  const T* q = static_cast<const T*>(a.q) + b * a.q_sb + g * G * a.q_sh;
  for (int idx = tid; idx < G * D; idx += kScoreThreads) {
    q_s[idx] = to_float(q[(idx / D) * a.q_sh + idx % D]) * a.scale;  // Eq. 2: scale * q
  }
  for (int jl = tid; jl < KT; jl += kScoreThreads) {
    const int64_t j = j0 + jl;
    valid_s[jl] = j < Lb && (a.key_mask == nullptr || a.key_mask[b * a.mask_sb + j * a.mask_sl]);
  }
  for (int idx = tid; idx < G * KT; idx += kScoreThreads) logit_s[idx] = 0.0f;
  __syncthreads();

  // Key loop: batches of kKeyBatch keys per thread (rounds > 1: the head dim in several passes).
  for (int s0 = 0, r = 0; s0 < steps;) {
    if (s0 > 0 || r > 0) load_batch(s0, r, raw);
    const int c = r * C + sub_lane;
#pragma unroll
    for (int u = 0; u < kKeyBatch; ++u) {
      if (s0 + u < steps) {  // warp-uniform
        const int jl = (s0 + u) * kKeysPerStep + key_in_step;
        float kf[W];
        raw[u].to_float(kf);
        for (int h = 0; h < G; ++h) {
          float dot = 0.0f;
          if (c < nchunks) {
            const float* qh = q_s + h * D + c * W;
#pragma unroll
            for (int w = 0; w < W; ++w) dot = fmaf(kf[w], qh[w], dot);
          }
          dot = group_sum<C>(dot);  // Eq. 2: scale * <q_h, k_j>, this round's chunks
          if (sub_lane == 0 && jl < KT) logit_s[h * KT + jl] += dot;
        }
      }
    }
    if (++r == rounds) {
      r = 0;
      s0 += kKeyBatch;
    }
  }
  __syncthreads();

  // Per head: the tile's max m and sum of exp(l - m), and e = exp(l - m) of its visual keys (pass 2
  // scales them by exp(m - M_h) / S_h).
  const int64_t vs = load_vis_start(a, b);
  const int64_t nvis = sample_vis(a, b);
  for (int h = warp; h < G; h += kScoreWarps) {
    const int64_t head = g * G + h;
    float* logits = logit_s + h * KT;
    float m = -INFINITY;
    for (int jl = lane; jl < KT; jl += kWarp) {
      const float l = valid_s[jl] ? logits[jl] : -INFINITY;  // masked and padding keys: -inf, whatever K held
      logits[jl] = l;
      m = fmaxf(m, l);
    }
    m = warp_max(m);
    float* vis_row = ws.vis_exp + (b * a.H + head) * a.vis_len;
    float s = 0.0f;
    for (int jl = lane; jl < KT; jl += kWarp) {
      const float l = logits[jl];
      const float x = l == -INFINITY ? 0.0f : expf(l - m);  // (an all-masked tile: m = -inf, all 0)
      s += x;
      const int64_t j = j0 + jl;
      if (j < Lb && j >= vs && j - vs < nvis) vis_row[j - vs] = x;
    }
    s = warp_sum(s);  // Eq. 2: this tile's share of the softmax denominator
    if (lane == 0) {
      ws.tile_max[(b * a.H + head) * ws.tiles + tile] = m;
      ws.tile_sum[(b * a.H + head) * ws.tiles + tile] = s;
    }
  }
}

// True when sample b has a valid key; every lane of the warp calls it and gets the answer.
__device__ bool any_valid_key(const ScoreArgs& a, int64_t b, int lane) {
  const int64_t Lb = sample_keys(a, b).len;
  if (a.key_mask == nullptr) return Lb > 0;
  bool any = false;
  for (int64_t j = lane; j < Lb && !any; j += kWarp) any = a.key_mask[b * a.mask_sb + j * a.mask_sl];
  return __any_sync(kFullMask, any);
}

// Max / sum over the `lanes` lanes of each aligned group of a warp (every lane calls it).
__device__ __forceinline__ float lanes_max(float v, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
__device__ __forceinline__ float lanes_sum(float v, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
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
// tiles one CTA's positions can span, and the select's share of the dynamic shared memory.
struct MergePlan {
  int slices;
  int ctas_per_row;
  int stat_lanes;
  int tiles_per_cta;
  int cand_cap;
  size_t select_smem;  // keys + candidates at the start of the dynamic shared memory
};

template <int THREADS, bool SELECT, bool KEYS_IN_SMEM>
__global__ void __launch_bounds__(THREADS, 1)
    score_merge_kernel(ScoreArgs a, ScoreWorkspace ws, MergePlan mp, float* scores, int k, IndexView keep_count,
                       int rest_width, int64_t* keep, int64_t* rest) {
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
  if constexpr (SELECT) {
    __shared__ SelectShared sh;
    __shared__ int is_last;
    // The last CTA of the row to finish selects. As a grid barrier does: the block's writes, then
    // thread 0's fence and count; the CTA that completes the count fences again and reads them all.
    __syncthreads();
    if (tid == 0) {
      is_last = 1;
      if (mp.ctas_per_row > 1) {
        __threadfence();
        is_last = atomicAdd(&ws.arrivals[row], 1u) == static_cast<unsigned>(mp.ctas_per_row - 1);
        if (is_last) __threadfence();
      }
    }
    __syncthreads();
    if (!is_last) return;
    const int W = static_cast<int>(a.vis_len);
    const int N = static_cast<int>(nvis);
    const int k_row = row_count(keep_count, row, N < k ? N : k, k);  // ragged: the row's own keep
    uint32_t* keys = reinterpret_cast<uint32_t*>(dyn_smem);
    uint32_t* cand = keys + (KEYS_IN_SMEM ? ceil_div(W, 4) * 4 : 0);
    int64_t* keep_row = keep + row * k;
    int64_t* rest_row = rest + row * rest_width;
    select_row<THREADS, KEYS_IN_SMEM>(StridedRow<float, true>{scores + row * W, 1}, N, k_row, keep_row, rest_row, keys,
                                      cand, mp.cand_cap, sh);
    pad_indices<THREADS>(keep_row, k_row, k, rest_row, N - k_row, rest_width);
  }
}

// Pass 1 for one element type, load width W and key group C.
template <typename T, int W, int C>
cudaError_t launch_score_partial(const ScoreArgs& a, const ScoreWorkspace& ws, cudaStream_t stream) {
  const int64_t G = a.H / a.Hkv;
  const size_t smem = static_cast<size_t>(G * (a.D + ws.key_tile)) * sizeof(float) + ws.key_tile;
  auto* kernel = score_partial_kernel<T, W, C>;
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = a.B * a.Hkv * ws.tiles;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  if (blocks > 0) SWIFTVLM_LAUNCH(kernel, static_cast<unsigned>(blocks), kScoreThreads, smem, stream, a, ws);
  return cudaGetLastError();
}

template <typename T, int W>
cudaError_t launch_score_partial_w(const ScoreArgs& a, const ScoreWorkspace& ws, cudaStream_t stream) {
  const int64_t nchunks = a.D / W;  // C: lanes per key, one chunk each when the head dim allows
  if (nchunks <= 1) return launch_score_partial<T, W, 1>(a, ws, stream);
  if (nchunks <= 2) return launch_score_partial<T, W, 2>(a, ws, stream);
  if (nchunks <= 4) return launch_score_partial<T, W, 4>(a, ws, stream);
  if (nchunks <= 8) return launch_score_partial<T, W, 8>(a, ws, stream);
  if (nchunks <= 16) return launch_score_partial<T, W, 16>(a, ws, stream);
  return launch_score_partial<T, W, 32>(a, ws, stream);
}

// Pass 1 with 16-byte key loads when every key row start is 16-byte aligned.
cudaError_t score_partials(const ScoreArgs& a, const ScoreWorkspace& ws, cudaStream_t stream) {
  if (a.H <= 0 || a.Hkv <= 0 || a.H % a.Hkv != 0 || a.D > INT32_MAX / (a.H / a.Hkv)) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = aligned16(a.k) && strides_aligned16(sizeof(T), {a.k_sb, a.k_sh, a.k_sl}) && a.D % kVec<T> == 0;
    return vec ? launch_score_partial_w<T, kVec<T>>(a, ws, stream) : launch_score_partial_w<T, 1>(a, ws, stream);
  });
}

// Pass 2's layout for CTAs of `threads` threads: head slices per position (a thread sums at most
// kMergeHeads heads, and a CTA still covers a warp of positions), CTAs per row, lanes per head for
// the statistics (kStatTiles tiles per lane when the row has few tiles), and the tiles one CTA spans.
MergePlan merge_plan(const ScoreArgs& a, const ScoreWorkspace& ws, int threads) {
  MergePlan mp{1, 0, 1, 0, 0, 0};
  while (mp.slices * kMergeHeads < a.H && mp.slices < threads / kWarp) mp.slices *= 2;
  const int positions = threads / mp.slices;
  mp.ctas_per_row = static_cast<int>(ceil_div(a.vis_len, positions));
  while (mp.stat_lanes < kWarp && mp.stat_lanes * kStatTiles < ws.tiles) mp.stat_lanes *= 2;
  mp.tiles_per_cta = static_cast<int>(ceil_div(positions, ws.key_tile)) + 1;
  return mp;
}

size_t merge_smem(const ScoreArgs& a, const MergePlan& mp, int threads) {
  return mp.select_smem + static_cast<size_t>(a.H * mp.tiles_per_cta + threads) * sizeof(float);
}

template <int THREADS, bool SELECT, bool KEYS_IN_SMEM>
cudaError_t launch_merge(const ScoreArgs& a, const ScoreWorkspace& ws, const MergePlan& mp, float* scores,
                         int64_t keep, IndexView keep_count, int64_t* keep_idx, int64_t* rest_idx, cudaStream_t stream) {
  auto* kernel = score_merge_kernel<THREADS, SELECT, KEYS_IN_SMEM>;
  const size_t smem = merge_smem(a, mp, THREADS);
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = a.B * mp.ctas_per_row;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const bool ragged = a.vis_count.ptr != nullptr || keep_count.ptr != nullptr;
  const int rest_width = static_cast<int>(ragged ? a.vis_len : a.vis_len - keep);
  SWIFTVLM_LAUNCH(kernel, static_cast<unsigned>(blocks), THREADS, smem, stream, a, ws, mp, scores,
                  static_cast<int>(keep), keep_count, rest_width, keep_idx, rest_idx);
  return cudaGetLastError();
}

template <int THREADS>
cudaError_t launch_merge_select(const ScoreArgs& a, const ScoreWorkspace& ws, float* scores, int64_t keep,
                                IndexView keep_count, int64_t* keep_idx, int64_t* rest_idx, cudaStream_t stream) {
  MergePlan mp = merge_plan(a, ws, THREADS);
  size_t limit = 0;
  const cudaError_t err = max_dynamic_smem(score_merge_kernel<THREADS, true, true>, &limit);
  if (err != cudaSuccess) return err;
  const SelectPlan plan = plan_select(a.vis_len, merge_smem(a, mp, THREADS), limit);
  mp.cand_cap = plan.cand_cap;
  mp.select_smem = plan.smem;
  return plan.keys_in_smem
             ? launch_merge<THREADS, true, true>(a, ws, mp, scores, keep, keep_count, keep_idx, rest_idx, stream)
             : launch_merge<THREADS, true, false>(a, ws, mp, scores, keep, keep_count, keep_idx, rest_idx, stream);
}

}  // namespace

size_t score_workspace_floats(int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t vis_len) {
  const int64_t tiles = num_tiles(L, key_tile_for(B, H, Hkv, L, D));
  return static_cast<size_t>(B * H * (2 * tiles + vis_len) + B);
}

cudaError_t tv_score(const ScoreArgs& a, float* workspace, float* scores, cudaStream_t stream) {
  if (a.B == 0 || a.vis_len == 0) return cudaSuccess;
  if (a.vis_len > INT32_MAX || a.B > INT32_MAX) return cudaErrorInvalidValue;
  const ScoreWorkspace ws = workspace_views(workspace, a);
  const cudaError_t err = score_partials(a, ws, stream);
  if (err != cudaSuccess) return err;
  const MergePlan mp = merge_plan(a, ws, kMergeThreads);
  return launch_merge<kMergeThreads, false, false>(a, ws, mp, scores, 0, IndexView{nullptr, false, 0, 0}, nullptr,
                                                   nullptr, stream);
}

cudaError_t score_select(const ScoreArgs& a, int64_t keep, IndexView keep_count, float* workspace, float* scores,
                         int64_t* keep_idx, int64_t* rest_idx, cudaStream_t stream) {
  if (a.B == 0 || a.vis_len == 0) return cudaSuccess;
  if (a.vis_len > INT32_MAX || a.B > INT32_MAX || keep < 0 || keep > a.vis_len) return cudaErrorInvalidValue;
  const ScoreWorkspace ws = workspace_views(workspace, a);
  const cudaError_t err = score_partials(a, ws, stream);
  if (err != cudaSuccess) return err;
  return dispatch_select_threads(a.vis_len, [&](auto threads) {
    return launch_merge_select<decltype(threads)::value>(a, ws, scores, keep, keep_count, keep_idx, rest_idx, stream);
  });
}

}  // namespace swiftvlm
