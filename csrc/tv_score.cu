// tv_score: the last token's softmax attention over all valid keys, averaged over the heads and read
// at the visual keys (Eq. 1-2), as a split-K softmax in two launches. This file: pass 1, tv_score's
// run of the two passes, and its launchers; pass 2 and what both passes read are in tv_score.cuh,
// shared with score_select.cu (the same two passes with a select after pass 2).
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
// Pass 2, score_merge_kernel (tv_score.cuh): per head the global max M_h and denominator S_h from the
// tile partials, then score_i = mean_h exp(l_hi - M_h) / S_h (Eq. 1-2), written to `scores`. tv_score
// stops there.
//
// Ragged and packed batches (the same two launches; widths are host ints, counts device tensors read
// by each block, never on the host): vis_count[b] gives row b's own visual count n_b <= vis_len (the
// padded width): pass 1 writes e only for its first n_b positions, pass 2 scores them and writes 0
// past them (a CTA with no position below n_b skips the head statistics). Packed keys (varlen,
// seq_start = cu_seqlens): sample b's keys are read in place at rows cu_seqlens[b] + j of k [total,
// Hkv, D], j < L_b = its length (at most L = max_seqlen); a pass-1 tile at or past L_b writes max
// -inf / sum 0 and exits at once, so a batch of short samples costs its keys, not B x L. Per sample
// the arithmetic is that of the sample alone whenever key_tile_for picks the same tile for the batch
// as for one sample (always when B x Hkv x ceil(L / 128) < 1024, e.g. LLaVA-1.5 batch 2; a larger
// batch may get larger tiles, whose partial sums round differently), so a ragged row is then
// bit-equal to its sample run alone.
//
// GQA: the per-head visual logits go through the workspace (8 * H * vis_len bytes written and read
// back) because M_h and S_h are known only once every tile of the KV head is done; reducing the G
// heads of a group before writing would need them earlier (a grid-wide wait, or a second read of K).
#include "launch.h"
#include "tv_score.cuh"

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

// tv_score's pass 2: nothing after the scores.
struct ScoresOnly {
  template <int THREADS>
  __device__ void run(const ScoreArgs&, const ScoreWorkspace&, const MergePlan&, const float*, int64_t, int64_t,
                      unsigned char*) const {}
};

}  // namespace

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

cudaError_t score_partials(const ScoreArgs& a, const ScoreWorkspace& ws, cudaStream_t stream) {
  if (a.H <= 0 || a.Hkv <= 0 || a.H % a.Hkv != 0 || a.D > INT32_MAX / (a.H / a.Hkv)) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = aligned16(a.k) && strides_aligned16(sizeof(T), {a.k_sb, a.k_sh, a.k_sl}) && a.D % kVec<T> == 0;
    return vec ? launch_score_partial_w<T, kVec<T>>(a, ws, stream) : launch_score_partial_w<T, 1>(a, ws, stream);
  });
}

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
  return launch_merge<kMergeThreads>(a, ws, mp, scores, ScoresOnly{}, stream);
}

// ------------------------------------------------------------------------------------ launchers
// The padded form and the ragged / packed one (per-sample counts vis_count [B] with the host-int padded
// width vis_len; packed keys when cu_seqlens is given: k [total, Hkv, D], every sample at most
// max_seqlen keys) share one body.
namespace {

Tensor tv_score_launch(const Tensor& q, const Tensor& k, const Tensor& vis_start,
                       const std::optional<Tensor>& vis_count, int64_t vis_len, double scale,
                       const std::optional<Tensor>& key_mask, const std::optional<Tensor>& cu_seqlens,
                       int64_t max_seqlen, const std::optional<Tensor>& workspace_in, const char* op) {
  const DeviceGuard guard = device_guard(q, "q");
  const ScoreInputs in = score_inputs(q, k, vis_start, vis_len, scale, key_mask, vis_count, cu_seqlens, max_seqlen);
  const Tensor workspace = score_workspace(q, in.args, workspace_in);
  Tensor scores = torch::stable::new_empty(q, {in.args.B, vis_len}, ScalarType::Float);
  check_launch(
      tv_score(in.args, workspace.mutable_data_ptr<float>(), scores.mutable_data_ptr<float>(), current_stream(q)), op);
  return scores;
}

}  // namespace

Tensor tv_score_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start, int64_t vis_len, double scale,
                     const std::optional<Tensor>& key_mask, const std::optional<Tensor>& workspace) {
  return tv_score_launch(q, k, vis_start, std::nullopt, vis_len, scale, key_mask, std::nullopt, 0, workspace,
                         "tv_score_cuda");
}

Tensor tv_score_ragged_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start, const Tensor& vis_len,
                            int64_t max_vis_len, double scale, const std::optional<Tensor>& key_mask,
                            const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen,
                            const std::optional<Tensor>& workspace) {
  return tv_score_launch(q, k, vis_start, vis_len, max_vis_len, scale, key_mask, cu_seqlens, max_seqlen, workspace,
                         "tv_score_ragged_cuda");
}

}  // namespace swiftvlm
