// group_merge: cosine-similarity grouping of the rest tokens to Z targets (Eq. 10) and the mean of
// every group (Eq. 11). Three launches, no float atomics, nothing that must start at zero: the
// results do not depend on scheduling.
//
// 1. group_assign_kernel, one block of 256 threads per (sample, tile of BM tokens, tile of BN
//    targets), target tile fastest so the blocks in flight share their token tile in L2. It walks d
//    in chunks of BK columns: the loader threads read the BM token rows and the BN target rows
//    t_z = floor(z R / Z) once (prefetched into registers one chunk ahead), store them to shared
//    memory as fp64 and add their squares to the row norms; then every thread accumulates a TM x TN
//    register tile of fp64 dot products from shared memory (a block with fewer than 256 such
//    threads splits each chunk's columns between k-groups, summed in k-group order at the end).
//    Epilogue: cos = dot * (1 / max(||x_i||, 1e-300)) * (1 / max(||x_t||, 1e-300)) in fp64, rounded
//    once to fp32 as the reference does (scale-safe; exact ties such as parallel vectors resolve
//    alike); each token's best target of the tile (NaN lowest, ties to the lower z) goes to the
//    workspace as a candidate (fp32 similarity, int32 z). The tile shape is the one of four
//    (64x64, 32x32, 16x16, 8x8) that the time model below rates fastest for the shape: large
//    tiles re-read less, small ones fill the GPU when R and Z are small.
//    Reads: h once from DRAM (the tiles' re-reads of the Z target rows and of a token tile across
//    target tiles hit L2); computes R Z d fp64 FMAs plus (BM + BN) d per block for the norms.
// 2. group_sort_kernel, one block per (sample, segment of 256 tokens): the best of each token's
//    candidates (a target keeps its own group) -> group[b, i]; then a stable counting sort of the
//    segment by group (rank by comparison in shared memory) -> the segment's member indices in
//    (group, index) order, and for every z in 0..Z the number of the segment's tokens with a group
//    below z (lower_bound, so members of z in segment s lie at [lb[s][z], lb[s][z + 1])).
// 3. group_mean_kernel, one block per (sample, group, tile of 64 x W columns): the block prefix-sums
//    its group's per-segment counts, gathers the member indices segment by segment (ascending
//    index order overall) and sums their rows in fp32 in that order, exactly as the reference's
//    scatter_add does; mean = sum / count (Eq. 11). Reads only the members' rows: h once more.
// Workspace (group_merge_workspace_bytes): candidates B * ceil(Z / BN) * R * 8 bytes, member
// indices B * R * 4, segment bounds B * ceil(R / 256) * (Z + 1) * 4.
//
// The op's launchers, group_merge_cuda and group_merge_ragged_cuda (one body: argument checks,
// outputs, the launch on the current stream), are at the end; the ragged form's kernels are in
// group_merge_ragged.cu.
#include <algorithm>
#include <cstdlib>

#include "common.cuh"
#include "launch.h"

namespace swiftvlm {
namespace {

constexpr double kNormEps = 1e-300;
constexpr int kAssignThreads = 256;
constexpr int kSeg = 256;  // tokens per sort segment = threads of group_sort_kernel
constexpr int kMeanThreads = 64;
constexpr int kMeanUnroll = 8;  // member rows loaded before they are added (in order)

__host__ __device__ constexpr int floor_pow2(int n) { return n >= 2 ? 2 * floor_pow2(n / 2) : 1; }

// A block's tile: BM tokens x BN targets, each thread TM x TN of them, d in chunks of BK columns.
template <int BM_, int BN_, int TM_, int TN_, int BK_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, TM = TM_, TN = TN_, BK = BK_;
  static constexpr int NTM = BM / TM, NTN = BN / TN;      // threads along tokens / targets
  static constexpr int kPairThreads = NTM * NTN;          // threads of one k-group
  static constexpr int KG = kAssignThreads / kPairThreads;  // k-groups splitting a chunk's columns
  static constexpr int KPER = BK / KG;                    // columns per k-group and chunk
  static constexpr int ROWS = BM + BN;                    // rows staged per chunk
  static constexpr int TPR = floor_pow2(kAssignThreads / ROWS);  // loader threads per row
  static constexpr int EPT = BK / TPR;                    // columns per loader thread and chunk
  // A warp covers LM x LN (token x target) threads: few distinct shared-memory rows per load.
  static constexpr int LN = NTN < 8 ? NTN : 8;
  static constexpr int LM = NTM < kWarp / LN ? NTM : kWarp / LN;
  static constexpr size_t kStageBytes = sizeof(double) * BK * ROWS;
  static constexpr size_t kReduceBytes = sizeof(double) * (KG - 1) * kPairThreads * TM * TN;
  static constexpr size_t kBestBytes = (sizeof(float) + sizeof(int)) * BM * NTN;
  static constexpr size_t kScratchBytes = std::max(kStageBytes, std::max(kReduceBytes, kBestBytes));
  static_assert(kAssignThreads % kPairThreads == 0 && BK % KG == 0, "k-groups split the block and the chunk");
  static_assert(ROWS * TPR <= kAssignThreads && BK % TPR == 0 && EPT % 8 == 0, "whole 16-byte vectors per loader");
  static_assert(NTN % LN == 0 && NTM % LM == 0, "warp tiles cover the thread grid");
};
using TileL = Tile<64, 64, 4, 4, 32>;
using TileM = Tile<32, 32, 2, 2, 32>;
using TileS = Tile<16, 16, 2, 2, 64>;
using TileXS = Tile<8, 8, 2, 2, 128>;

// (s, z) beats (s_best, z_best): higher similarity, ties to the lower z. NaN is mapped to -inf
// before (it ranks lowest; when every similarity is NaN the lowest z wins, as argmax of -inf does).
__device__ __forceinline__ bool beats(float s, int z, float s_best, int z_best) {
  return s > s_best || (s == s_best && z < z_best);
}

// Elements k .. k + W - 1 of a row (zeros past d or for a padding row), as fp32.
template <typename T, int W>
__device__ __forceinline__ void load_cols(const T* row, int64_t k, int64_t d, int64_t sd, float (&x)[W]) {
  if (row != nullptr && k < d) {  // W > 1: d % W == 0 and k % W == 0, so the vector is whole
    if constexpr (W == 1) {
      x[0] = to_float(row[k * sd]);
    } else {
      load_chunk<T, W>(row + k, x);
    }
  } else {
#pragma unroll
    for (int w = 0; w < W; ++w) x[w] = 0.0f;
  }
}

template <typename T, int W, typename P>
__global__ void __launch_bounds__(kAssignThreads)
    group_assign_kernel(const T* __restrict__ h, int64_t h_sb, int64_t h_sr, int64_t h_sd, int64_t R, int64_t d,
                        int64_t Z, int64_t token_tiles, int64_t target_tiles, float* __restrict__ cand_sim,
                        int* __restrict__ cand_z) {
  __shared__ double scratch_words[P::kScratchBytes / sizeof(double)];  // staged rows, then reductions
  unsigned char* scratch = reinterpret_cast<unsigned char*>(scratch_words);
  __shared__ double norm_part[P::TPR][P::ROWS];
  __shared__ double rinv[P::ROWS];
  double(*a)[P::BM] = reinterpret_cast<double(*)[P::BM]>(scratch);  // [BK][BM] tokens, k-major
  double(*bt)[P::BN] = reinterpret_cast<double(*)[P::BN]>(scratch + sizeof(double) * P::BK * P::BM);  // [BK][BN]

  const int64_t zt = blockIdx.x % target_tiles;
  const int64_t mt = (blockIdx.x / target_tiles) % token_tiles;
  const int64_t b = blockIdx.x / (target_tiles * token_tiles);
  const int64_t m0 = mt * P::BM;
  const int64_t z0 = zt * P::BN;
  const int t = threadIdx.x;
  const T* h_b = h + b * h_sb;

  // Loader role: row `row` of the staged tile (token, then target), columns part * EPT + [0, EPT).
  const bool loader = t < P::ROWS * P::TPR;
  const int row = t % P::ROWS;
  const int part = t / P::ROWS;
  const T* src = nullptr;
  if (loader) {
    if (row < P::BM) {
      if (m0 + row < R) src = h_b + (m0 + row) * h_sr;
    } else if (z0 + row - P::BM < Z) {
      src = h_b + ((z0 + row - P::BM) * R / Z) * h_sr;  // target t_z = floor(z R / Z)
    }
  }
  // Compute role: k-group kg, register tile of tokens tm * TM + [0, TM) x targets tn * TN + [0, TN).
  const int pt = t % P::kPairThreads;
  const int kg = t / P::kPairThreads;
  const int tn = (pt / (P::LN * P::LM)) % (P::NTN / P::LN) * P::LN + pt % P::LN;
  const int tm = (pt / (P::LN * P::LM)) / (P::NTN / P::LN) * P::LM + (pt / P::LN) % P::LM;

  float pre[P::EPT];  // the next chunk, loaded while the current one is computed
  auto load_chunk_regs = [&](int64_t chunk) {
#pragma unroll
    for (int v = 0; v < P::EPT / W; ++v) {
      float x[W];
      load_cols<T, W>(src, chunk * P::BK + part * P::EPT + v * W, d, h_sd, x);
#pragma unroll
      for (int w = 0; w < W; ++w) pre[v * W + w] = x[w];
    }
  };

  double acc[P::TM][P::TN] = {};
  double sq = 0.0;  // this loader's share of its row's squared norm
  const int64_t chunks = ceil_div(d, P::BK);
  if (loader && chunks > 0) load_chunk_regs(0);
  for (int64_t c = 0; c < chunks; ++c) {
    if (loader) {
#pragma unroll
      for (int e = 0; e < P::EPT; ++e) {
        const double x = static_cast<double>(pre[e]);
        sq = fma(x, x, sq);
        if (row < P::BM) {
          a[part * P::EPT + e][row] = x;
        } else {
          bt[part * P::EPT + e][row - P::BM] = x;
        }
      }
    }
    __syncthreads();
    if (loader && c + 1 < chunks) load_chunk_regs(c + 1);
#pragma unroll 4
    for (int kk = 0; kk < P::KPER; ++kk) {
      const int k = kg * P::KPER + kk;
      double xa[P::TM];
      double xb[P::TN];
#pragma unroll
      for (int i = 0; i < P::TM; ++i) xa[i] = a[k][tm * P::TM + i];
#pragma unroll
      for (int j = 0; j < P::TN; ++j) xb[j] = bt[k][tn * P::TN + j];
#pragma unroll
      for (int i = 0; i < P::TM; ++i) {
#pragma unroll
        for (int j = 0; j < P::TN; ++j) acc[i][j] = fma(xa[i], xb[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  // Row norms: the loaders' shares in part order; 1 / max(||x||, eps) once per row.
  if (loader) norm_part[part][row] = sq;
  // Dot products: k-groups 1.. hand their partial tiles to k-group 0, which adds them in order.
  double(*red)[P::kPairThreads][P::TM * P::TN] =
      reinterpret_cast<double(*)[P::kPairThreads][P::TM * P::TN]>(scratch);
  if (P::KG > 1 && kg > 0) {
#pragma unroll
    for (int i = 0; i < P::TM; ++i) {
#pragma unroll
      for (int j = 0; j < P::TN; ++j) red[kg - 1][pt][i * P::TN + j] = acc[i][j];
    }
  }
  __syncthreads();
  if (t < P::ROWS) {
    double n = 0.0;
    for (int p = 0; p < P::TPR; ++p) n += norm_part[p][t];
    rinv[t] = 1.0 / fmax(sqrt(n), kNormEps);
  }
  if (P::KG > 1 && kg == 0) {
    for (int g = 1; g < P::KG; ++g) {
#pragma unroll
      for (int i = 0; i < P::TM; ++i) {
#pragma unroll
        for (int j = 0; j < P::TN; ++j) acc[i][j] += red[g - 1][pt][i * P::TN + j];
      }
    }
  }
  __syncthreads();

  // Eq. 10: cos in fp64 with x / max(||x||, eps), rounded once to fp32; best target per token.
  float(*best_sim)[P::NTN] = reinterpret_cast<float(*)[P::NTN]>(scratch);
  int(*best_z)[P::NTN] = reinterpret_cast<int(*)[P::NTN]>(scratch + sizeof(float) * P::BM * P::NTN);
  if (kg == 0) {
#pragma unroll
    for (int i = 0; i < P::TM; ++i) {
      const int m = tm * P::TM + i;
      float s_best = -INFINITY;
      int z_best = static_cast<int>(z0) + tn * P::TN;
#pragma unroll
      for (int j = 0; j < P::TN; ++j) {
        const int n = tn * P::TN + j;
        float s = static_cast<float>(acc[i][j] * rinv[m] * rinv[P::BM + n]);
        if (isnan(s) || z0 + n >= Z) s = -INFINITY;  // NaN ranks lowest; padding targets never win
        if (s > s_best) {  // strict: ties keep the lower z
          s_best = s;
          z_best = static_cast<int>(z0) + n;
        }
      }
      best_sim[m][tn] = s_best;
      best_z[m][tn] = z_best;
    }
  }
  __syncthreads();
  if (t < P::BM && m0 + t < R) {
    float s_best = best_sim[t][0];
    int z_best = best_z[t][0];
    for (int n = 1; n < P::NTN; ++n) {
      if (beats(best_sim[t][n], best_z[t][n], s_best, z_best)) {
        s_best = best_sim[t][n];
        z_best = best_z[t][n];
      }
    }
    const int64_t at = (b * target_tiles + zt) * R + m0 + t;
    cand_sim[at] = s_best;
    cand_z[at] = z_best;
  }
}

__global__ void __launch_bounds__(kSeg)
    group_sort_kernel(const float* __restrict__ cand_sim, const int* __restrict__ cand_z, int64_t R, int64_t Z,
                      int64_t target_tiles, int64_t segments, int64_t* __restrict__ group,
                      int* __restrict__ members, int* __restrict__ lower) {
  __shared__ int keys[kSeg];
  __shared__ int sorted[kSeg];
  const int64_t s = blockIdx.x % segments;
  const int64_t b = blockIdx.x / segments;
  const int t = threadIdx.x;
  const int64_t i = s * kSeg + t;
  const int n = static_cast<int>(R - s * kSeg < kSeg ? R - s * kSeg : kSeg);

  int g = static_cast<int>(Z);  // padding sorts after every group
  if (t < n) {
    float s_best = -INFINITY;
    int z_best = 0;  // every similarity NaN: all tie at -inf and the lowest z wins
#pragma unroll 1
    for (int64_t zt = 0; zt < target_tiles; ++zt) {  // ascending z: strict > keeps the lower one
      const int64_t at = (b * target_tiles + zt) * R + i;
      if (cand_sim[at] > s_best) {
        s_best = cand_sim[at];
        z_best = cand_z[at];
      }
    }
    // Token i is the target of group ceil(i Z / R) when floor(z R / Z) gives i back.
    const int64_t own = (i * Z + R - 1) / R;
    g = own < Z && own * R / Z == i ? static_cast<int>(own) : z_best;
    group[b * R + i] = g;
  }
  keys[t] = g;
  __syncthreads();
  // Stable rank: tokens of a lower group, then tokens of the same group earlier in the segment.
  int rank = 0;
#pragma unroll 8
  for (int j = 0; j < kSeg; ++j) {
    const int k = keys[j];
    rank += (k < g) | ((k == g) & (j < t));
  }
  if (t < n) {
    members[b * R + s * kSeg + rank] = static_cast<int>(i);
    sorted[rank] = g;
  }
  __syncthreads();
  // lower[b][s][z] = #{segment tokens with group < z}, z = 0..Z (binary search in the sorted keys).
  int* lower_s = lower + (b * segments + s) * (Z + 1);
  for (int64_t z = t; z <= Z; z += kSeg) {
    int lo = 0;
    int hi = n;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (sorted[mid] < z) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    lower_s[z] = lo;
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kMeanThreads)
    group_mean_kernel(const T* __restrict__ h, int64_t h_sb, int64_t h_sr, int64_t h_sd, int64_t R, int64_t d,
                      int64_t Z, int64_t segments, int64_t col_tiles, const int* __restrict__ members,
                      const int* __restrict__ lower, T* __restrict__ merged, int32_t* __restrict__ counts) {
  __shared__ int seg_start[kMeanThreads];  // position of the segment's first member in `members`
  __shared__ int seg_off[kMeanThreads];    // members of this group in the earlier segments of the chunk
  __shared__ int rows[kMeanThreads];
  __shared__ int scan_scratch[kScanScratch];
  const int64_t col_tile = blockIdx.x % col_tiles;
  const int64_t z = (blockIdx.x / col_tiles) % Z;
  const int64_t b = blockIdx.x / (col_tiles * Z);
  const int t = threadIdx.x;
  const int64_t c = col_tile * kMeanThreads + t;  // this thread's W-column chunk
  const bool active = c < d / W;
  const T* h_b = h + b * h_sb;
  const int* members_b = members + b * R;

  float acc[W] = {};
  int64_t count = 0;
  for (int64_t s0 = 0; s0 < segments; s0 += kMeanThreads) {
    const int64_t s = s0 + t;
    int begin = 0;
    int end = 0;
    if (s < segments) {
      const int* lower_s = lower + (b * segments + s) * (Z + 1);
      begin = lower_s[z];
      end = lower_s[z + 1];
    }
    int total = 0;
    const int off = block_exclusive_scan(end - begin, &total, scan_scratch);
    seg_start[t] = static_cast<int>(s * kSeg) + begin;
    seg_off[t] = off;
    __syncthreads();
    for (int p0 = 0; p0 < total; p0 += kMeanThreads) {
      const int p = p0 + t;
      if (p < total) {
        int lo = 0;  // the last segment whose first member position is <= p (it holds p)
        int hi = kMeanThreads - 1;
        while (lo < hi) {
          const int mid = (lo + hi + 1) / 2;
          if (seg_off[mid] <= p) {
            lo = mid;
          } else {
            hi = mid - 1;
          }
        }
        rows[t] = members_b[seg_start[lo] + p - seg_off[lo]];
      }
      __syncthreads();
      const int n = total - p0 < kMeanThreads ? total - p0 : kMeanThreads;
      if (active) {
        int m = 0;
        for (; m + kMeanUnroll <= n; m += kMeanUnroll) {  // loads first, then the adds in member order
          float x[kMeanUnroll][W];
#pragma unroll
          for (int u = 0; u < kMeanUnroll; ++u) load_cols<T, W>(h_b + rows[m + u] * h_sr, c * W, d, h_sd, x[u]);
#pragma unroll
          for (int u = 0; u < kMeanUnroll; ++u) {
#pragma unroll
            for (int w = 0; w < W; ++w) acc[w] += x[u][w];
          }
        }
        for (; m < n; ++m) {
          float x[W];
          load_cols<T, W>(h_b + rows[m] * h_sr, c * W, d, h_sd, x);
#pragma unroll
          for (int w = 0; w < W; ++w) acc[w] += x[w];
        }
      }
      __syncthreads();
    }
    count += total;
  }
  if (col_tile == 0 && t == 0) counts[b * Z + z] = static_cast<int32_t>(count);
  if (active) {
    // count >= 1: the target t_z is always a member.
#pragma unroll
    for (int w = 0; w < W; ++w) acc[w] /= static_cast<float>(count);  // Eq. 11
    store_chunk<T, W>(merged + (b * Z + z) * d + c * W, acc);
  }
}

// ------------------------------------------------------------------------------------ host side

enum class TileShape { L, M, S, XS };

// The tile the time model rates fastest: blocks run in waves of one per SM (132, an H100; a
// constant, so the results do not depend on the GPU) and each costs BM BN d FMAs for the dot
// products plus about 2 (BM + BN) d for staging the rows and their norms. Large tiles win when
// there are blocks enough to fill the waves; small ones spread a small R x Z over more SMs.
TileShape pick_tile(int64_t B, int64_t R, int64_t Z) {
#ifdef SWIFTVLM_EMULATION
  if (const char* forced = std::getenv("SWIFTVLM_GROUP_MERGE_TILE")) {  // tests cover every tile shape
    const int bm = std::atoi(forced);
    if (bm == 64) return TileShape::L;
    if (bm == 32) return TileShape::M;
    if (bm == 16) return TileShape::S;
    if (bm == 8) return TileShape::XS;
  }
#endif
  constexpr int64_t kModelSMs = 132;
  const struct {
    TileShape shape;
    int64_t bm, bn;
  } options[] = {{TileShape::L, TileL::BM, TileL::BN},
                 {TileShape::M, TileM::BM, TileM::BN},
                 {TileShape::S, TileS::BM, TileS::BN},
                 {TileShape::XS, TileXS::BM, TileXS::BN}};
  TileShape best = TileShape::L;
  double best_cost = 0.0;
  for (const auto& o : options) {
    const int64_t blocks = B * ceil_div(R, o.bm) * ceil_div(Z, o.bn);
    const double cost = static_cast<double>(ceil_div(blocks, kModelSMs)) * (o.bm * o.bn + 2 * (o.bm + o.bn));
    if (o.shape == TileShape::L || cost < best_cost) {
      best = o.shape;
      best_cost = cost;
    }
  }
  return best;
}

// Calls fn(P{}) with P the Tile of `shape`.
template <typename Fn>
auto with_tile(TileShape shape, Fn&& fn) {
  if (shape == TileShape::M) return fn(TileM{});
  if (shape == TileShape::S) return fn(TileS{});
  if (shape == TileShape::XS) return fn(TileXS{});
  return fn(TileL{});
}

int64_t tile_targets(TileShape shape) {
  return with_tile(shape, [](auto tile) { return static_cast<int64_t>(decltype(tile)::BN); });
}

size_t align16(size_t n) { return (n + 15) / 16 * 16; }

struct WorkspaceLayout {
  size_t cand_sim, cand_z, members, lower, total;  // byte offsets
};

WorkspaceLayout workspace_layout(int64_t B, int64_t R, int64_t Z) {
  const int64_t target_tiles = ceil_div(Z, tile_targets(pick_tile(B, R, Z)));
  const int64_t cands = B * target_tiles * R;
  WorkspaceLayout w{};
  w.cand_sim = 0;
  w.cand_z = align16(w.cand_sim + sizeof(float) * cands);
  w.members = align16(w.cand_z + sizeof(int) * cands);
  w.lower = align16(w.members + sizeof(int) * B * R);
  w.total = align16(w.lower + sizeof(int) * B * ceil_div(R, kSeg) * (Z + 1));
  return w;
}

template <typename T, int W, typename P>
cudaError_t launch_assign(const T* h, int64_t h_sb, int64_t h_sr, int64_t h_sd, int64_t B, int64_t R, int64_t d,
                          int64_t Z, float* cand_sim, int* cand_z, cudaStream_t stream) {
  const int64_t token_tiles = ceil_div(R, P::BM);
  const int64_t target_tiles = ceil_div(Z, P::BN);
  const int64_t blocks = B * token_tiles * target_tiles;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  auto* assign = group_assign_kernel<T, W, P>;
  SWIFTVLM_LAUNCH(assign, static_cast<unsigned>(blocks), kAssignThreads, 0, stream, h, h_sb, h_sr, h_sd, R, d, Z,
                  token_tiles, target_tiles, cand_sim, cand_z);
  return cudaGetLastError();
}

template <typename T, int W>
cudaError_t launch_group_merge(const T* h, int64_t h_sb, int64_t h_sr, int64_t h_sd, int64_t B, int64_t R,
                               int64_t d, int64_t Z, unsigned char* workspace, T* merged, int64_t* group,
                               int32_t* counts, cudaStream_t stream) {
  const TileShape shape = pick_tile(B, R, Z);
  const WorkspaceLayout w = workspace_layout(B, R, Z);
  auto* cand_sim = reinterpret_cast<float*>(workspace + w.cand_sim);
  auto* cand_z = reinterpret_cast<int*>(workspace + w.cand_z);
  auto* members = reinterpret_cast<int*>(workspace + w.members);
  auto* lower = reinterpret_cast<int*>(workspace + w.lower);
  const int64_t target_tiles = ceil_div(Z, tile_targets(shape));
  const int64_t segments = ceil_div(R, kSeg);
  const int64_t col_tiles = std::max<int64_t>(1, ceil_div(d / W, kMeanThreads));  // d == 0 still counts
  const int64_t sort_blocks = B * segments;
  const int64_t mean_blocks = B * Z * col_tiles;
  if (sort_blocks > INT32_MAX || mean_blocks > INT32_MAX) return cudaErrorInvalidConfiguration;

  cudaError_t err = with_tile(shape, [&](auto tile) {
    return launch_assign<T, W, decltype(tile)>(h, h_sb, h_sr, h_sd, B, R, d, Z, cand_sim, cand_z, stream);
  });
  if (err != cudaSuccess) return err;
  SWIFTVLM_LAUNCH(group_sort_kernel, static_cast<unsigned>(sort_blocks), kSeg, 0, stream, cand_sim, cand_z, R, Z,
                  target_tiles, segments, group, members, lower);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  auto* mean = group_mean_kernel<T, W>;
  SWIFTVLM_LAUNCH(mean, static_cast<unsigned>(mean_blocks), kMeanThreads, 0, stream, h, h_sb, h_sr, h_sd, R, d, Z,
                  segments, col_tiles, members, lower, merged, counts);
  return cudaGetLastError();
}

}  // namespace

size_t group_merge_workspace_bytes(int64_t B, int64_t R, int64_t Z) {
  if (B <= 0 || R <= 0 || Z < 1 || Z > R) return 0;
  return workspace_layout(B, R, Z).total;
}

cudaError_t group_merge(DType dtype, const void* h, int64_t h_sb, int64_t h_sr, int64_t h_sd, int64_t B, int64_t R,
                        int64_t d, int64_t Z, void* workspace, void* merged, int64_t* group, int32_t* counts,
                        cudaStream_t stream) {
  if (Z < 1 || Z > R || R > INT32_MAX) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* ht = static_cast<const T*>(h);
    T* out = static_cast<T*>(merged);
    auto* ws = static_cast<unsigned char*>(workspace);
    // merged is contiguous: its rows stay 16-byte aligned when d is a multiple of the vector width.
    const bool vec = h_sd == 1 && aligned16(h) && aligned16(merged) && strides_aligned16(sizeof(T), {h_sb, h_sr}) &&
                     d % kVec<T> == 0;
    return vec ? launch_group_merge<T, kVec<T>>(ht, h_sb, h_sr, h_sd, B, R, d, Z, ws, out, group, counts, stream)
               : launch_group_merge<T, 1>(ht, h_sb, h_sr, h_sd, B, R, d, Z, ws, out, group, counts, stream);
  });
}

// ------------------------------------------------------------------------------------ launchers
// One body for both forms. Padded: num_groups groups of each sample's R rows. Ragged (the kernels of
// group_merge_ragged.cu): num_groups [B] per-sample groups of padded width max_groups (None:
// max_groups each) over the first lengths[b] rows (None: R); group -1 past a sample's rows, merged and
// counts 0 past its groups.
namespace {

std::tuple<Tensor, Tensor, Tensor> group_merge_launch(const Tensor& h_in, const std::optional<Tensor>& group_counts,
                                                      int64_t groups, const std::optional<Tensor>& lengths,
                                                      bool ragged, const char* op) {
  const DeviceGuard guard = device_guard(h_in, "h");
  check_tensor(h_in, "h", 3, h_in);
  const DType dtype = float_dtype(h_in, "h");
  const int64_t B = h_in.size(0), R = h_in.size(1), d = h_in.size(2);
  if (ragged) {
    STD_TORCH_CHECK(groups >= 0 && groups <= R, "max_groups: expected 0 <= max_groups <= R (R = h.shape[1])");
  } else {
    STD_TORCH_CHECK(groups >= 1 && groups <= R, "num_groups: expected 1 <= num_groups <= R (R = h.shape[1])");
    STD_TORCH_CHECK(R <= INT32_MAX, "h: expected at most 2^31 - 1 rest tokens");
  }
  const IndexView groups_view = counts_view(group_counts, "num_groups", B, h_in);
  const IndexView len_view = counts_view(lengths, "lengths", B, h_in);
  // The padded kernels read h in place through its strides (a unit last stride takes the vectorised
  // path); the ragged ones read its rows with unit stride.
  const Tensor h = ragged ? unit_last_stride(h_in) : h_in;
  Tensor merged = torch::stable::new_empty(h, {B, groups, d});
  Tensor group = torch::stable::new_empty(h, {B, R}, ScalarType::Long);
  Tensor counts = torch::stable::new_empty(h, {B, groups}, ScalarType::Int);
  if (ragged) {
    check_launch(group_merge_ragged(dtype, h.const_data_ptr(), h.stride(0), h.stride(1), B, R, d, groups, groups_view,
                                    len_view, merged.mutable_data_ptr(), group.mutable_data_ptr<int64_t>(),
                                    counts.mutable_data_ptr<int32_t>(), current_stream(h)),
                 op);
  } else {
    const auto bytes = static_cast<int64_t>(group_merge_workspace_bytes(B, R, groups));
    Tensor workspace = torch::stable::new_empty(h, {bytes}, ScalarType::Byte);
    check_launch(group_merge(dtype, h.const_data_ptr(), h.stride(0), h.stride(1), h.stride(2), B, R, d, groups,
                             workspace.mutable_data_ptr(), merged.mutable_data_ptr(),
                             group.mutable_data_ptr<int64_t>(), counts.mutable_data_ptr<int32_t>(), current_stream(h)),
                 op);
  }
  return {merged, group, counts};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> group_merge_cuda(const Tensor& h, int64_t num_groups) {
  return group_merge_launch(h, std::nullopt, num_groups, std::nullopt, false, "group_merge_cuda");
}

std::tuple<Tensor, Tensor, Tensor> group_merge_ragged_cuda(const Tensor& h, const std::optional<Tensor>& num_groups,
                                                           int64_t max_groups, const std::optional<Tensor>& lengths) {
  return group_merge_launch(h, num_groups, max_groups, lengths, true, "group_merge_ragged_cuda");
}

}  // namespace swiftvlm
