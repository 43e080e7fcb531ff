// attention_importance (docs/semantics.md; ALVTS' importance): at each visual key, the mean over the
// heads and over the sample's valid text rows (t2v) / valid visual rows (v2v) of the causal softmax
// probability each row gives it. Flash-style in three launches: never [B, H, L, L], O(L^2 E) work,
// O(B H L) scratch. Deterministic: no atomics, every sum in a fixed order.
//
// Tiles. A row tile stacks kStack = 64 (head, row) pairs: HS = min(pow2(G), 16) of the G = H / Hk query
// heads of one key head x 64 / HS rows, so those heads share every key tile the block loads (more
// heads per key head: several head groups, parts = Hk x head groups). A block of 16 x 16 threads
// computes a 64 x 64 tile of logits as an SGEMM micro-kernel: both sides' features staged in shared
// memory kChunk at a time as fp32 (any E; any strides: q and k are read in place, element by element,
// coalesced when E is unit-stride), each thread 4 rows x 4 keys of fp32 FMAs in feature order.
//
// Launch 1, importance_stats_kernel: grid B x parts x row tiles. Per row, the softmax statistics over
// its valid keys m <= j: each thread a running max and sum of exp over its 4 keys of every key tile,
// merged over the 16 threads of the row at the end (a fixed butterfly); the row's max logit M_j and
// 1 / S_j (S_j = sum exp(logit - M_j)) are stored (1 / S_j = 0 for a row before the sample's first
// valid key: it has no probabilities). Not a log-sum-exp M_j + log S_j: rounding it would lose the
// low bits of large logits. One flag per block: a row of it that has a valid key has a NaN softmax (a
// NaN or +inf logit, or -inf at every valid key), which makes the reference's probabilities NaN at
// every key of the sample.
// Launch 2, importance_columns_kernel: grid B x parts x tiles of 64 VISUAL keys (vis_start[b] + i,
// i below the sample's count: only the columns the outputs need). The row tiles from the tile's first
// key on (causal); exp(logit - M_j) / S_j of every valid row j >= m, summed per key into text and visual
// sums (each thread over its rows in order, then the 16 threads of a key in order): partial sums
// [B, parts, 2, width].
// Launch 3, importance_means_kernel: grid B x ceil(width / 256). The sample's valid text and visual
// rows counted from key_mask, its flags, the partial sums over the parts in order; means = sum / (H x
// count) (IEEE division), 0 without such rows, NaN for a flagged sample, 0 past a ragged sample's own
// count and at positions outside [0, L).
// The tiles depend only on G, so a sample of a ragged batch gets the same sums in the same order as
// alone (bit-equal). Parallelism as the Triton kernels': enough blocks for a layer's heads (LLaVA-1.5,
// 32 heads: 352 and 288), not for the selector's one head at batch 1 (11 and 9).
#include "common.cuh"
#include "launch.h"

namespace swiftvlm {
namespace {

constexpr int kThreads = 256;
constexpr int kSide = 16;             // the block is kSide x kSide threads
constexpr int kStack = 64;            // (head, row) pairs per row tile
constexpr int kKeys = 64;             // keys per key tile
constexpr int kPer = kStack / kSide;  // rows and keys per thread
constexpr int kChunk = 32;            // features staged per step
constexpr int kPitch = kChunk + 1;    // shared-memory pitch: the 16 key reads of a half-warp hit 16 banks
constexpr int kMaxHeadSlots = 16;
constexpr int kMeansThreads = 256;
// The tile kernels ask for 2 blocks per SM (at most 128 registers): left to choose, ptxas picked as few
// as 64 registers for some instantiations and spilled.
constexpr int kMinBlocks = 2;
static_assert(kKeys == kStack && kThreads == kSide * kSide, "square tiles, one thread per 4 x 4 outputs");

// How the G query heads of a key head stack into row tiles.
struct Stacking {
  int64_t G;
  int head_slots;  // heads per row tile (HS, a power of two)
  int row_shift;   // log2 of the rows per row tile (kStack / HS)
  int64_t rows;
  int64_t head_groups;
  int64_t parts;       // Hk x head_groups
  int64_t row_tiles;
};

Stacking stacking(int64_t H, int64_t Hk, int64_t L) {
  Stacking st{H / Hk, 1, 0, 0, 0, 0, 0};
  while (st.head_slots < st.G && st.head_slots < kMaxHeadSlots) st.head_slots *= 2;
  st.rows = kStack / st.head_slots;
  while ((int64_t{1} << st.row_shift) < st.rows) ++st.row_shift;
  st.head_groups = ceil_div(st.G, st.head_slots);
  st.parts = Hk * st.head_groups;
  st.row_tiles = ceil_div(L, st.rows);
  return st;
}

struct ImportanceWorkspace {
  float* row_max;  // [B, H, L]: each row's max logit M_j
  float* inv_sum;  // [B, H, L]: 1 / S_j (0: no valid key; NaN: a NaN softmax)
  int* flags;      // [B, parts, row_tiles]: 1 if a row of the launch-1 block has a NaN softmax
  float* partial;  // [B, parts, 2, width]: text and visual sums per visual key
};

ImportanceWorkspace workspace_views(float* w, const ImportanceArgs& a, const Stacking& st) {
  const int64_t rows = a.B * a.H * a.L;
  float* flags = w + 2 * rows;
  return {w, w + rows, reinterpret_cast<int*>(flags), flags + a.B * st.parts * st.row_tiles};
}

// The sample, key head and first query head (within the key head's G) of a block's part index.
struct Part {
  int64_t b, kv, g0;
};

__device__ __forceinline__ Part part_of(int64_t part, const Stacking& st) {
  return {part / st.parts, (part % st.parts) / st.head_groups, (part % st.head_groups) * st.head_slots};
}

// Stacked slot s of a row tile starting at row0: query head g0 + s / rows, row row0 + s % rows.
__device__ __forceinline__ int64_t slot_head(const Part& p, const Stacking& st, int s) {
  return p.g0 + (s >> st.row_shift);
}
__device__ __forceinline__ int64_t slot_row(int64_t row0, const Stacking& st, int s) {
  return row0 + (s & ((1 << st.row_shift) - 1));
}

__device__ __forceinline__ bool row_valid(const ImportanceArgs& a, int64_t b, int64_t row) {
  return a.key_mask == nullptr || a.key_mask[b * a.mask_sb + row * a.mask_sl];
}

// vis_start[b] clamped to [-width, L]: the rows and keys it names stay as far outside [0, L), no overflow.
__device__ __forceinline__ int64_t importance_vis_start(const ImportanceArgs& a, int64_t b) {
  const int64_t v = load_index(a.vis_start, b, 0);
  return v < -a.width ? -a.width : (v > a.L ? a.L : v);
}

// The 64 x 64 logits tile: acc[u][v] += <q of slot ty + 16 u, k of key key0 + tx + 16 v> for the row
// tile at row0 and the keys key0 .. key0 + 63 (those in [key_lo, key_hi) loaded, the others 0).
// Every thread of the block calls it (it holds barriers).
template <typename T>
__device__ void tile_dots(const ImportanceArgs& a, const Stacking& st, const Part& p, int64_t row0, int64_t key0,
                          int64_t key_lo, int64_t key_hi, float* q_s, float* k_s, float (&acc)[kPer][kPer]) {
  const T* q = static_cast<const T*>(a.q) + p.b * a.q_sb + p.kv * st.G * a.q_sh;  // the key head's query heads
  const T* k = static_cast<const T*>(a.k) + p.b * a.k_sb + p.kv * a.k_sh;
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  for (int64_t e0 = 0; e0 < a.E; e0 += kChunk) {
    // Each warp stages whole 32-feature rows: one feature per lane, coalesced when E is unit-stride.
    const int col = threadIdx.x % kChunk;
    const int64_t f = e0 + col;
    for (int s = threadIdx.x / kChunk; s < kStack; s += kThreads / kChunk) {
      const int64_t g = slot_head(p, st, s);
      const int64_t row = slot_row(row0, st, s);
      const bool in = f < a.E && g < st.G && row < a.L;
      q_s[s * kPitch + col] = in ? to_float(q[g * a.q_sh + row * a.q_sl + f * a.q_se]) : 0.0f;
    }
    for (int s = threadIdx.x / kChunk; s < kKeys; s += kThreads / kChunk) {
      const int64_t key = key0 + s;
      const bool in = f < a.E && key >= key_lo && key < key_hi;
      k_s[s * kPitch + col] = in ? to_float(k[key * a.k_sl + f * a.k_se]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int e = 0; e < kChunk; ++e) {
      float qv[kPer], kv[kPer];
#pragma unroll
      for (int u = 0; u < kPer; ++u) qv[u] = q_s[(ty + kSide * u) * kPitch + e];
#pragma unroll
      for (int v = 0; v < kPer; ++v) kv[v] = k_s[(tx + kSide * v) * kPitch + e];
#pragma unroll
      for (int u = 0; u < kPer; ++u) {
#pragma unroll
        for (int v = 0; v < kPer; ++v) acc[u][v] = fmaf(qv[u], kv[v], acc[u][v]);
      }
    }
    __syncthreads();  // the tile is read before the next chunk overwrites it
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    importance_stats_kernel(ImportanceArgs a, Stacking st, ImportanceWorkspace ws) {
  __shared__ float q_s[kStack * kPitch];
  __shared__ float k_s[kKeys * kPitch];
  __shared__ int bad_s[kThreads / kWarp];
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  const int64_t tile = blockIdx.x % st.row_tiles;
  const Part p = part_of(blockIdx.x / st.row_tiles, st);
  const int64_t row0 = tile * st.rows;

  int64_t row[kPer];
  bool ok[kPer];
  float run_max[kPer], run_sum[kPer];
  int has_key[kPer];
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    row[u] = slot_row(row0, st, ty + kSide * u);
    ok[u] = slot_head(p, st, ty + kSide * u) < st.G && row[u] < a.L;
    run_max[u] = -INFINITY;
    run_sum[u] = 0.0f;
    has_key[u] = 0;
  }
  const int64_t hi = row0 + st.rows < a.L ? row0 + st.rows : a.L;  // keys up to the tile's last row
  for (int64_t key0 = 0; key0 < hi; key0 += kKeys) {
    bool key_ok[kPer];
#pragma unroll
    for (int v = 0; v < kPer; ++v) {
      const int64_t key = key0 + tx + kSide * v;
      key_ok[v] = key < a.L && row_valid(a, p.b, key);
    }
    float acc[kPer][kPer] = {};
    tile_dots<T>(a, st, p, row0, key0, 0, a.L, q_s, k_s, acc);
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      float logit[kPer];
      bool allowed[kPer];
      float tile_max = -INFINITY;
#pragma unroll
      for (int v = 0; v < kPer; ++v) {
        allowed[v] = ok[u] && key_ok[v] && key0 + tx + kSide * v <= row[u];  // causal, valid keys
        logit[v] = acc[u][v] * a.scale;
        if (allowed[v]) tile_max = fmaxf(tile_max, logit[v]);
        has_key[u] |= allowed[v];
      }
      const float new_max = fmaxf(run_max[u], tile_max);
      const float shift = new_max == -INFINITY ? 0.0f : new_max;  // no finite logit yet: avoid -inf - -inf
      float s = run_sum[u] * expf(run_max[u] - shift);
#pragma unroll
      for (int v = 0; v < kPer; ++v) {
        if (allowed[v]) s += expf(logit[v] - shift);  // a NaN or +inf logit makes s NaN
      }
      run_sum[u] = s;
      run_max[u] = new_max;
    }
  }
  // Merge the 16 threads of each row; -inf at every valid key (sum 0) or a NaN / +inf logit (sum
  // NaN): torch.softmax's NaN row.
  int bad = 0;
#pragma unroll
  for (int u = 0; u < kPer; ++u) {
    const float m = lanes_max(run_max[u], kSide);  // the kSide threads of a row: aligned lanes of a warp
    const float shift = m == -INFINITY ? 0.0f : m;
    const float s = lanes_sum(run_sum[u] * expf(run_max[u] - shift), kSide);
    const bool has = lanes_max(static_cast<float>(has_key[u]), kSide) > 0.0f;
    const float inv = !has ? 0.0f : (s == 0.0f ? NAN : 1.0f / s);
    if (tx == 0 && ok[u]) {
      const int64_t at = (p.b * a.H + p.kv * st.G + slot_head(p, st, ty + kSide * u)) * a.L + row[u];
      ws.row_max[at] = has ? m : 0.0f;
      ws.inv_sum[at] = inv;
    }
    bad |= ok[u] && isnan(inv);
  }
  bad = __any_sync(kFullMask, bad);
  if (threadIdx.x % kWarp == 0) bad_s[threadIdx.x / kWarp] = bad;
  __syncthreads();
  if (threadIdx.x == 0) {
    int any = 0;
    for (int w = 0; w < kThreads / kWarp; ++w) any |= bad_s[w];
    ws.flags[blockIdx.x] = any;  // block order = [B, parts, row_tiles]
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    importance_columns_kernel(ImportanceArgs a, Stacking st, ImportanceWorkspace ws) {
  __shared__ float q_s[kStack * kPitch];
  __shared__ float k_s[kKeys * kPitch];
  __shared__ float sums_s[2][kSide][kKeys];
  const int tx = threadIdx.x % kSide;
  const int ty = threadIdx.x / kSide;
  const int64_t key_tiles = ceil_div(a.width, kKeys);
  const int64_t part = blockIdx.x / key_tiles;
  const Part p = part_of(part, st);
  const int64_t i0 = blockIdx.x % key_tiles * kKeys;
  const int64_t vs = importance_vis_start(a, p.b);
  const int64_t nb = row_count(a.vis_count, p.b, a.width, a.width);
  if (i0 >= nb) return;  // past the sample's visual keys: nothing to sum (block-uniform)
  // keys vs + i0 + n for n < 64, loaded where i < nb and inside [0, L)
  const int64_t key0 = vs + i0;
  const int64_t key_lo = key0 > 0 ? key0 : 0;
  const int64_t end = vs + nb < a.L ? vs + nb : a.L;
  bool key_ok[kPer];
#pragma unroll
  for (int v = 0; v < kPer; ++v) {
    const int64_t key = key0 + tx + kSide * v;
    key_ok[v] = key >= key_lo && key < end && row_valid(a, p.b, key);
  }
  float text[kPer] = {}, visual[kPer] = {};
  for (int64_t row0 = key_lo / st.rows * st.rows; row0 < a.L; row0 += st.rows) {  // rows j >= the first key
    float acc[kPer][kPer] = {};
    tile_dots<T>(a, st, p, row0, key0, key_lo, end, q_s, k_s, acc);
#pragma unroll
    for (int u = 0; u < kPer; ++u) {  // the rows' statistics read after the dots: fewer live registers
      const int64_t g = slot_head(p, st, ty + kSide * u);
      const int64_t row = slot_row(row0, st, ty + kSide * u);
      if (g >= st.G || row >= a.L || !row_valid(a, p.b, row)) continue;  // (no barrier below)
      const int64_t at = (p.b * a.H + p.kv * st.G + g) * a.L + row;
      const float row_max = ws.row_max[at];
      const float inv_sum = ws.inv_sum[at];
      const bool is_visual = row >= vs && row < vs + nb;
#pragma unroll
      for (int v = 0; v < kPer; ++v) {
        if (key_ok[v] && key0 + tx + kSide * v <= row) {
          const float prob = expf(acc[u][v] * a.scale - row_max) * inv_sum;  // the row's softmax probability
          visual[v] += is_visual ? prob : 0.0f;
          text[v] += is_visual ? 0.0f : prob;
        }
      }
    }
  }
#pragma unroll
  for (int v = 0; v < kPer; ++v) {
    sums_s[0][ty][tx + kSide * v] = text[v];
    sums_s[1][ty][tx + kSide * v] = visual[v];
  }
  __syncthreads();
  if (threadIdx.x < 2 * kKeys) {
    const int kind = threadIdx.x / kKeys;  // 0 text, 1 visual
    const int n = threadIdx.x % kKeys;
    float total = 0.0f;
    for (int t = 0; t < kSide; ++t) total += sums_s[kind][t][n];  // fixed order: deterministic
    if (i0 + n < nb) ws.partial[(part * 2 + kind) * a.width + i0 + n] = total;
  }
}

// Sum of v over the block, in a fixed order (every thread calls it; scratch: one int per warp).
__device__ int block_sum(int v, int* scratch) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < static_cast<int>(blockDim.x) / kWarp; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

__global__ void __launch_bounds__(kMeansThreads) importance_means_kernel(ImportanceArgs a, Stacking st,
                                                                         ImportanceWorkspace ws, float* t2v,
                                                                         float* v2v) {
  __shared__ int scratch[kMeansThreads / kWarp];
  const int64_t ctas = ceil_div(a.width, kMeansThreads);
  const int64_t b = blockIdx.x / ctas;
  const int64_t i = blockIdx.x % ctas * kMeansThreads + threadIdx.x;
  const int64_t vs = importance_vis_start(a, b);
  const int64_t nb = row_count(a.vis_count, b, a.width, a.width);
  int text_rows = 0, visual_rows = 0, bad = 0;
  for (int64_t r = threadIdx.x; r < a.L; r += kMeansThreads) {
    const bool valid = row_valid(a, b, r);
    const bool vis = r >= vs && r < vs + nb;
    text_rows += valid && !vis;
    visual_rows += valid && vis;
  }
  const int64_t flags = st.parts * st.row_tiles;
  for (int64_t f = threadIdx.x; f < flags; f += kMeansThreads) bad |= ws.flags[b * flags + f];
  text_rows = block_sum(text_rows, scratch);
  visual_rows = block_sum(visual_rows, scratch);
  bad = block_sum(bad, scratch);
  if (i >= a.width) return;
  const bool inside = i < nb && vs + i >= 0 && vs + i < a.L;
  float text = 0.0f, visual = 0.0f;
  for (int64_t part = 0; inside && part < st.parts; ++part) {  // the head groups in order
    text += ws.partial[((b * st.parts + part) * 2) * a.width + i];
    visual += ws.partial[((b * st.parts + part) * 2 + 1) * a.width + i];
  }
  const float heads = static_cast<float>(a.H);
  t2v[b * a.width + i] = inside && text_rows > 0 ? (bad ? NAN : text / (heads * static_cast<float>(text_rows))) : 0.0f;
  v2v[b * a.width + i] =
      inside && visual_rows > 0 ? (bad ? NAN : visual / (heads * static_cast<float>(visual_rows))) : 0.0f;
}

// Launches of one kernel over `blocks` blocks (none when there are none).
template <typename Kernel, typename... Args>
cudaError_t launch_blocks(Kernel* kernel, int64_t blocks, int threads, cudaStream_t stream, const Args&... args) {
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  if (blocks > 0) SWIFTVLM_LAUNCH(kernel, static_cast<unsigned>(blocks), threads, 0, stream, args...);
  return cudaGetLastError();
}

}  // namespace

size_t importance_workspace_floats(int64_t B, int64_t H, int64_t Hk, int64_t L, int64_t width) {
  const Stacking st = stacking(H, Hk, L);
  return static_cast<size_t>(2 * B * H * L + B * st.parts * (st.row_tiles + 2 * width));
}

cudaError_t attention_importance(const ImportanceArgs& a, float* workspace, float* t2v, float* v2v,
                                 cudaStream_t stream) {
  if (a.B == 0 || a.width == 0) return cudaSuccess;
  if (a.H <= 0 || a.Hk <= 0 || a.H % a.Hk != 0 || a.width > a.L) return cudaErrorInvalidValue;
  const Stacking st = stacking(a.H, a.Hk, a.L);
  const ImportanceWorkspace ws = workspace_views(workspace, a, st);
  cudaError_t err = dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const cudaError_t e =
        launch_blocks(importance_stats_kernel<T>, a.B * st.parts * st.row_tiles, kThreads, stream, a, st, ws);
    if (e != cudaSuccess) return e;
    return launch_blocks(importance_columns_kernel<T>, a.B * st.parts * ceil_div(a.width, kKeys), kThreads, stream, a,
                         st, ws);
  });
  if (err != cudaSuccess) return err;
  return launch_blocks(importance_means_kernel, a.B * ceil_div(a.width, kMeansThreads), kMeansThreads, stream, a, st,
                       ws, t2v, v2v);
}

// ------------------------------------------------------------------------------------ launchers
// The padded form (width = vis_len) and the ragged one (per-sample counts vis_count [B], padded width
// max_vis_len) share one body.
namespace {

std::tuple<Tensor, Tensor> importance_launch(const Tensor& q, const Tensor& k, const Tensor& vis_start,
                                             const std::optional<Tensor>& vis_count, int64_t width, double scale,
                                             const std::optional<Tensor>& key_mask, const char* op) {
  const DeviceGuard guard = device_guard(q, "q");
  check_tensors(q, {{q, "q", 4}, {k, "k", 4}, {vis_start, "vis_start", 1}});
  const DType dtype = float_dtype(q, "q");
  check_same_dtype(k, "k", q, "q");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), E = q.size(3), Hk = k.size(1);
  STD_TORCH_CHECK(k.size(0) == B && k.size(2) == L && k.size(3) == E,
                  "k: expected shape [B, Hk, L, E] for q of shape [B, H, L, E]");
  STD_TORCH_CHECK(H >= 1 && Hk >= 1 && H % Hk == 0, "k: expected Hk >= 1 key heads dividing the H >= 1 query heads");
  STD_TORCH_CHECK(vis_start.size(0) == B, "vis_start: expected shape [B]");
  STD_TORCH_CHECK(width >= 0 && width <= L, "vis_len: expected 0 <= vis_len <= L");
  const MaskView mask = mask_view(key_mask, B, L, q);
  // q and k read in place through all four strides (no contiguous copy)
  const ImportanceArgs a{dtype,
                         q.const_data_ptr(), q.stride(0), q.stride(1), q.stride(2), q.stride(3),
                         k.const_data_ptr(), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
                         index_view(vis_start, "vis_start"), counts_view(vis_count, "vis_len", B, q),
                         mask.ptr, mask.sb, mask.sl,
                         B, H, Hk, L, E, width, static_cast<float>(scale)};
  const auto floats = static_cast<int64_t>(importance_workspace_floats(a.B, a.H, a.Hk, a.L, width));
  Tensor workspace = torch::stable::new_empty(q, {floats}, ScalarType::Float);
  Tensor t2v = torch::stable::new_empty(q, {a.B, width}, ScalarType::Float);
  Tensor v2v = torch::stable::new_empty(q, {a.B, width}, ScalarType::Float);
  check_launch(attention_importance(a, workspace.mutable_data_ptr<float>(), t2v.mutable_data_ptr<float>(),
                                    v2v.mutable_data_ptr<float>(), current_stream(q)),
               op);
  return {t2v, v2v};
}

}  // namespace

std::tuple<Tensor, Tensor> attention_importance_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start,
                                                     int64_t vis_len, double scale,
                                                     const std::optional<Tensor>& key_mask) {
  return importance_launch(q, k, vis_start, std::nullopt, vis_len, scale, key_mask, "attention_importance_cuda");
}

std::tuple<Tensor, Tensor> attention_importance_ragged_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start,
                                                            const Tensor& vis_len, int64_t max_vis_len, double scale,
                                                            const std::optional<Tensor>& key_mask) {
  return importance_launch(q, k, vis_start, vis_len, max_vis_len, scale, key_mask,
                           "attention_importance_ragged_cuda");
}

}  // namespace swiftvlm
