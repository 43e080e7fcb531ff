// compact: rebuild a sequence after a pruning stage in one pass (python_ref/compact.py).
// The items of sample b are its n rows, numbered: the n - M text rows, the k kept tokens, the R rest
// tokens. Every destination is arithmetic on the item's own slot, no search: kept #q at slot s lands
// at block position q + ceil((s - q) Z / R) (the targets among the s - q rest tokens before it), and
// group target z (rest #floor(z R / Z)) at slot s at z + (s - floor(z R / Z)).
// A thread copies one W-column chunk of one item; the chunk-0 thread writes the index outputs.
//
// Ragged batches (compact_ragged_kernel, python_ref compact_ragged): the same arithmetic with each
// sample's own k_b, r_b (its valid keep / rest entries) and Z_b (num_merged[b]), over n + K + Zw items
// per sample: text rows; kept entries (an invalid one, q >= k_b, writes the zero padding row Z_b + q of
// the new block); rest entries (an invalid one, q >= r_b, writes a zero rest_h row and marks the old
// padding slot n_b + q - r_b -2 in inverse); the padding groups z in [Z_b, Zw), whose zero row sits at
// block position K + z (merged_rows names it). Grid B x ctas_per_sample, 256 threads: a CTA owns
// `items` consecutive items of one sample (about 4 chunk copies per thread) and first finds k_b and
// r_b, the lengths of the id prefixes of its keep and rest rows, by a 32-ary search per row (one warp
// each, 3 rounds of 32 loads for a row of 2880; L2 hits after the first CTA) - device counts, no host
// read. (Rows that are not a prefix of ids then -1, outside score_select's layout, still never read or
// write out of bounds: every slot and position is clamped.) Reads h's rows once, writes each output
// once.
//
// The op's launchers, compact_cuda and compact_ragged_cuda (one body: argument checks, outputs, the
// launch on the current stream), are at the end.
#include <algorithm>

#include "common.cuh"
#include "launch.h"

namespace swiftvlm {
namespace {

constexpr int kCompactThreads = 256;
constexpr int kCopiesPerThread = 4;  // compact_ragged_kernel

__device__ __forceinline__ int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

struct Placement {
  int64_t src_row;   // row of h
  int64_t dst_row;   // row of h_new, -1: none
  int64_t rest;      // rest index, -1: not a rest token
  int64_t target;    // group target z, -1: not a target
  bool carries;      // its own state stays in the sequence (text, kept)
};

__device__ __forceinline__ Placement place(const CompactArgs& a, int64_t b, int64_t i) {
  const int64_t M = a.k + a.R, m_new = a.k + a.Z;
  // Out-of-range starts and slots (unchecked values on a GPU) are clamped: never out of bounds.
  const int64_t start = clamp(load_index(a.vis_start, b, 0), 0, a.n - M);
  const auto slot = [&](const IndexView& v, int64_t q) { return clamp(load_index(v, b, q), 0, M - 1); };
  const auto in_block = [&](int64_t pos) { return start + clamp(pos, 0, m_new - 1); };
  Placement p{0, -1, -1, -1, false};
  if (i < a.n - M) {  // text: rows after the block move by m_new - M
    const bool after = i >= start;
    p.src_row = after ? i + M : i;
    p.dst_row = after ? i + m_new : i;
    p.carries = true;
  } else if (i < a.n - a.R) {
    const int64_t q = i - (a.n - M);
    const int64_t s = slot(a.keep, q);
    const int64_t targets_before = a.Z > 0 ? ((s - q) * a.Z + a.R - 1) / a.R : 0;
    p.src_row = start + s;
    p.dst_row = in_block(q + targets_before);
    p.carries = true;
  } else {
    const int64_t q = i - (a.n - a.R);
    const int64_t s = slot(a.rest, q);
    p.src_row = start + s;
    p.rest = q;
    const int64_t z = a.Z > 0 ? (q * a.Z + a.R - 1) / a.R : 0;
    if (a.Z > 0 && z < a.Z && (z * a.R) / a.Z == q) {
      p.target = z;
      p.dst_row = in_block(z + (s - q));
    }
  }
  return p;
}

template <typename T, int W>
__global__ void __launch_bounds__(kCompactThreads) compact_kernel(CompactArgs a) {
  const T* h = static_cast<const T*>(a.h.ptr);
  T* h_new = static_cast<T*>(a.h_new);
  T* rest_h = static_cast<T*>(a.rest_h);
  const int64_t n_new = a.n - a.R + a.Z;
  const int64_t nchunks = std::max<int64_t>(a.d / W, 1);  // d = 0: one chunk writes the indices
  const int64_t total = a.B * a.n * nchunks;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kCompactThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kCompactThreads + threadIdx.x; idx < total; idx += step) {
    const int64_t chunk = idx % nchunks;
    const int64_t i = (idx / nchunks) % a.n;
    const int64_t b = idx / (nchunks * a.n);
    const Placement p = place(a, b, i);
    if (a.d > 0) {
      const int64_t col = chunk * W;
      float x[W];
      load_chunk<T, W>(h + b * a.h.sb + p.src_row * a.h.sr + col * a.h.sd, x);
      if (p.dst_row >= 0) store_chunk<T, W>(h_new + (b * n_new + p.dst_row) * a.d + col, x);
      if (p.rest >= 0) store_chunk<T, W>(rest_h + (b * a.R + p.rest) * a.d + col, x);
    }
    if (chunk == 0) {
      if (p.dst_row >= 0) a.src[b * n_new + p.dst_row] = b * a.n + p.src_row;
      a.inverse[b * a.n + p.src_row] = p.carries ? b * n_new + p.dst_row : -1;
      if (p.target >= 0) a.merged_rows[b * a.Z + p.target] = b * n_new + p.dst_row;
    }
  }
}

// One item of a ragged sample (see the header); counts k_b, r_b, Z_b, the clamped start.
struct RaggedSample {
  int64_t kb, rb, zb, start;
};

__device__ __forceinline__ Placement place_ragged(const CompactArgs& a, const RaggedSample& s, int64_t b, int64_t i,
                                                  bool* zero_row, int64_t* pad_mark, int64_t* group_z) {
  const int64_t K = a.k, M = a.R, Zw = a.Z, m_new = K + Zw, T = a.n - M;
  const auto in_block = [&](int64_t pos) { return s.start + clamp(pos, 0, m_new - 1); };
  Placement p{s.start, -1, -1, -1, false};
  *zero_row = false;
  *pad_mark = -1;
  *group_z = -1;
  if (i < T) {  // text: rows after the block move by m_new - M
    const bool after = i >= s.start;
    p.src_row = after ? i + M : i;
    p.dst_row = after ? i + m_new : i;
    p.carries = true;
  } else if (i < T + K) {  // kept entry q: a valid one at q + ceil((slot - q) Z_b / r_b), else padding row Z_b + q
    const int64_t q = i - T;
    if (q < s.kb) {
      const int64_t slot = clamp(load_index(a.keep, b, q), 0, M - 1);
      const int64_t targets_before = s.zb > 0 ? ((slot - q) * s.zb + s.rb - 1) / s.rb : 0;
      p.src_row = s.start + slot;
      p.dst_row = in_block(q + targets_before);
      p.carries = true;
    } else {
      p.dst_row = in_block(s.zb + q);
      *zero_row = true;
    }
  } else if (i < T + K + M) {  // rest entry q: rest_h row q; group target z when floor(z r_b / Z_b) == q
    const int64_t q = i - T - K;
    p.rest = q;
    if (q < s.rb) {
      const int64_t slot = clamp(load_index(a.rest, b, q), 0, M - 1);
      p.src_row = s.start + slot;
      const int64_t z = s.zb > 0 ? (q * s.zb + s.rb - 1) / s.rb : 0;
      if (s.zb > 0 && z < s.zb && (z * s.rb) / s.zb == q) {
        p.target = z;
        *group_z = z;
        p.dst_row = in_block(z + (slot - q));
      }
    } else {
      *zero_row = true;  // (a zero rest_h row)
      const int64_t old = s.kb + s.rb + (q - s.rb);  // one old padding slot per invalid entry, while any is left
      if (old < M) *pad_mark = s.start + old;
    }
  } else {  // padding group z >= Z_b: the zero row at block position K + z
    const int64_t z = i - T - K - M;
    if (z >= s.zb) {
      p.dst_row = in_block(K + z);
      *zero_row = true;
      *group_z = z;
    }
  }
  return p;
}

// The valid entries of row b of an index table of width W (its ids then -1: a prefix of ids >= 0), by
// one warp in a 32-ary search: each round the lanes test 32 evenly spaced entries of the open range and
// keep the gap between the last valid and the first invalid one; ceil(log32 W) + 1 rounds (3 for
// 2880), 32 loads each, instead of reading all W. Every lane of the warp calls it and gets the count.
__device__ __forceinline__ int64_t valid_prefix(const IndexView& v, int64_t b, int64_t W) {
  const int lane = threadIdx.x % kWarp;
  int64_t lo = 0, hi = W;  // entries before lo are valid, those from hi on are not
  while (lo < hi) {
    const int64_t step = ceil_div(hi - lo, kWarp);
    const int64_t p = lo + lane * step;
    const unsigned valid = __ballot_sync(kFullMask, p < hi && load_index(v, b, p) >= 0);
    const int c = __popc(valid);  // lanes 0 .. c - 1 found ids (the prefix form)
    if (c == 0) {
      hi = lo;
    } else {
      const int64_t next_hi = lo + c * step;
      lo = lo + (c - 1) * step + 1;
      hi = next_hi < hi ? next_hi : hi;
    }
  }
  return lo;
}

template <typename T, int W>
__global__ void __launch_bounds__(kCompactThreads) compact_ragged_kernel(CompactArgs a, int64_t ctas_per_sample,
                                                                         int64_t items_per_cta) {
  __shared__ int64_t valid[2];
  const T* h = static_cast<const T*>(a.h.ptr);
  T* h_new = static_cast<T*>(a.h_new);
  T* rest_h = static_cast<T*>(a.rest_h);
  const int64_t K = a.k, M = a.R, Zw = a.Z;
  const int64_t n_new = a.n - M + K + Zw;
  const int64_t b = blockIdx.x / ctas_per_sample;
  const int64_t first = (blockIdx.x % ctas_per_sample) * items_per_cta;
  const int64_t items = a.n + K + Zw;  // (n - M) text rows, K kept entries, M rest entries, Zw groups
  // The sample's valid entries k_b and r_b (python_ref counts keep_idx >= 0 and rest_idx >= 0; in
  // score_select's layout they lead each row): warp 0 searches the keep row, warp 1 the rest row.
  const int warp = threadIdx.x / kWarp;
  if (warp < 2) {
    const int64_t count = valid_prefix(warp == 0 ? a.keep : a.rest, b, warp == 0 ? K : M);
    if (threadIdx.x % kWarp == 0) valid[warp] = count;
  }
  __syncthreads();
  RaggedSample s;
  s.kb = valid[0];
  s.rb = valid[1];
  s.zb = clamp(load_index(a.num_merged, b, 0), 0, Zw < s.rb ? Zw : s.rb);
  s.start = clamp(load_index(a.vis_start, b, 0), 0, a.n - M);

  const int64_t nchunks = std::max<int64_t>(a.d / W, 1);  // d = 0: one chunk writes the indices
  const int64_t last = first + items_per_cta < items ? first + items_per_cta : items;
  for (int64_t idx = first * nchunks + threadIdx.x; idx < last * nchunks; idx += kCompactThreads) {
    const int64_t chunk = idx % nchunks;
    const int64_t i = idx / nchunks;
    bool zero_row = false;
    int64_t pad_mark = -1, group_z = -1;
    const Placement p = place_ragged(a, s, b, i, &zero_row, &pad_mark, &group_z);
    if (a.d > 0) {
      const int64_t col = chunk * W;
      float x[W];
      if (zero_row || (p.dst_row < 0 && p.rest < 0)) {  // (a real group's pad item: writes nothing)
#pragma unroll
        for (int w = 0; w < W; ++w) x[w] = 0.0f;
      } else {
        load_chunk<T, W>(h + b * a.h.sb + p.src_row * a.h.sr + col * a.h.sd, x);
      }
      if (p.dst_row >= 0) store_chunk<T, W>(h_new + (b * n_new + p.dst_row) * a.d + col, x);
      if (p.rest >= 0) store_chunk<T, W>(rest_h + (b * M + p.rest) * a.d + col, x);
    }
    if (chunk == 0) {
      if (p.dst_row >= 0) a.src[b * n_new + p.dst_row] = b * a.n + p.src_row;
      if (p.carries || (p.rest >= 0 && !zero_row)) a.inverse[b * a.n + p.src_row] = p.carries ? b * n_new + p.dst_row : -1;
      if (pad_mark >= 0) a.inverse[b * a.n + pad_mark] = -2;  // the old block's padding rows: restore zeroes them
      if (group_z >= 0) a.merged_rows[b * Zw + group_z] = b * n_new + p.dst_row;
    }
  }
}

template <typename T, int W>
cudaError_t launch_compact_ragged(const CompactArgs& a, cudaStream_t stream) {
  const int64_t items = a.n + a.k + a.Z;
  if (a.B * a.n == 0) return cudaSuccess;
  const int64_t nchunks = std::max<int64_t>(a.d / W, 1);
  // ~4 chunk copies per thread: enough CTAs to keep the copies in flight at batch 1 (LLaVA-1.5: ~430).
  const int64_t items_per_cta = std::max<int64_t>(1, kCopiesPerThread * kCompactThreads / nchunks);
  const int64_t ctas_per_sample = ceil_div(items, items_per_cta);
  if (a.B * ctas_per_sample > INT32_MAX) return cudaErrorInvalidConfiguration;
  auto* kernel = compact_ragged_kernel<T, W>;
  SWIFTVLM_LAUNCH(kernel, static_cast<unsigned>(a.B * ctas_per_sample), kCompactThreads, 0, stream, a,
                  ctas_per_sample, items_per_cta);
  return cudaGetLastError();
}

template <typename T, int W>
cudaError_t launch_compact(const CompactArgs& a, cudaStream_t stream) {
  const int64_t nchunks = std::max<int64_t>(a.d / W, 1);  // d = 0: one chunk writes the indices
  return launch_grid_stride<kCompactThreads>(compact_kernel<T, W>, a.B * a.n * nchunks, stream, a);
}

}  // namespace

cudaError_t compact(const CompactArgs& a, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    const bool vec = a.h.sd == 1 && a.d % V == 0 && aligned16(a.h.ptr) && aligned16(a.h_new) &&
                     aligned16(a.rest_h) && strides_aligned16(sizeof(T), {a.h.sb, a.h.sr, a.d});
    if (a.num_merged.ptr != nullptr) {
      return vec ? launch_compact_ragged<T, V>(a, stream) : launch_compact_ragged<T, 1>(a, stream);
    }
    return vec ? launch_compact<T, V>(a, stream) : launch_compact<T, 1>(a, stream);
  });
}

// ------------------------------------------------------------------------------------ launchers
// One body for both forms. Padded: keep_idx [B, k] and rest_idx [B, R] partition the visual block of
// k + R slots, Z = num_merged. Ragged (python_ref compact_ragged): keep_idx [B, K] and rest_idx [B, M]
// each sample's slots then -1, num_merged [B] the per-sample Z_b of padded width max_merged;
// h_new [B, n - M + K + max_merged, d], rest_h [B, M, d], merged_rows [B, max_merged]; the counts are
// read on the device.
namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> compact_launch(const Tensor& h, const Tensor& vis_start,
                                                                  const Tensor& keep_idx, const Tensor& rest_idx,
                                                                  const std::optional<Tensor>& num_merged,
                                                                  int64_t merged_width, const char* op) {
  const bool ragged = num_merged.has_value();
  const DeviceGuard guard = device_guard(h, "h");
  check_tensors(h, {{h, "h", 3}, {vis_start, "vis_start", 1}, {keep_idx, "keep_idx", 2}, {rest_idx, "rest_idx", 2}});
  CompactArgs a{};
  a.dtype = float_dtype(h, "h");
  a.B = h.size(0);
  a.n = h.size(1);
  a.d = h.size(2);
  a.k = keep_idx.size(1);
  a.R = rest_idx.size(1);  // ragged: the block's width M
  a.Z = merged_width;
  STD_TORCH_CHECK(vis_start.size(0) == a.B, "vis_start: expected shape [B]");
  STD_TORCH_CHECK(keep_idx.size(0) == a.B && rest_idx.size(0) == a.B, "keep_idx, rest_idx: expected batch size B");
  if (ragged) {
    STD_TORCH_CHECK(a.k <= a.R && a.R <= a.n, "keep_idx, rest_idx: expected K <= M <= n");
    STD_TORCH_CHECK(a.Z >= 0 && a.Z <= a.R, "max_merged: expected 0 <= max_merged <= M");
  } else {
    STD_TORCH_CHECK(a.k + a.R <= a.n, "keep_idx, rest_idx: expected k + R <= n");
    STD_TORCH_CHECK(a.Z >= 0 && a.Z <= a.R, "num_merged: expected 0 <= num_merged <= R");
  }
  a.h = rows_view(h);
  a.vis_start = index_view(vis_start, "vis_start");
  a.keep = index_view(keep_idx, "keep_idx");
  a.rest = index_view(rest_idx, "rest_idx");
  a.num_merged = counts_view(num_merged, "num_merged", a.B, h);
  const int64_t block = ragged ? a.R : a.k + a.R;  // the visual block's rows
  const int64_t n_new = a.n - block + a.k + a.Z;
  Tensor h_new = torch::stable::new_empty(h, {a.B, n_new, a.d});
  Tensor src = torch::stable::new_empty(h, {a.B, n_new}, ScalarType::Long);
  Tensor rest_h = torch::stable::new_empty(h, {a.B, a.R, a.d});
  Tensor merged_rows = torch::stable::new_empty(h, {a.B, a.Z}, ScalarType::Long);
  Tensor inverse = torch::stable::new_empty(h, {a.B, a.n}, ScalarType::Long);
  a.h_new = h_new.mutable_data_ptr();
  a.src = src.mutable_data_ptr<int64_t>();
  a.rest_h = rest_h.mutable_data_ptr();
  a.merged_rows = merged_rows.mutable_data_ptr<int64_t>();
  a.inverse = inverse.mutable_data_ptr<int64_t>();
  check_launch(compact(a, current_stream(h)), op);
  return {h_new, src, rest_h, merged_rows, inverse};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> compact_cuda(const Tensor& h, const Tensor& vis_start,
                                                                const Tensor& keep_idx, const Tensor& rest_idx,
                                                                int64_t num_merged) {
  return compact_launch(h, vis_start, keep_idx, rest_idx, std::nullopt, num_merged, "compact_cuda");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> compact_ragged_cuda(const Tensor& h, const Tensor& vis_start,
                                                                       const Tensor& keep_idx, const Tensor& rest_idx,
                                                                       const Tensor& num_merged, int64_t max_merged) {
  return compact_launch(h, vis_start, keep_idx, rest_idx, num_merged, max_merged, "compact_ragged_cuda");
}

}  // namespace swiftvlm
