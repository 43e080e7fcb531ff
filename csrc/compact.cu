// compact: rebuild a sequence after a pruning stage in one pass (python_ref/compact.py).
// The items of sample b are its n rows, numbered: the n - M text rows, the k kept tokens, the R rest
// tokens. Every destination is arithmetic on the item's own slot, no search: kept #q at slot s lands
// at block position q + ceil((s - q) Z / R) (the targets among the s - q rest tokens before it), and
// group target z (rest #floor(z R / Z)) at slot s at z + (s - floor(z R / Z)).
// A thread copies one W-column chunk of one item; the chunk-0 thread writes the index outputs.
#include <algorithm>

#include "common.cuh"

namespace swiftvlm {
namespace {

constexpr int kCompactThreads = 256;

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

template <typename T, int W>
cudaError_t launch_compact(const CompactArgs& a, cudaStream_t stream) {
  const int64_t total = a.B * a.n * std::max<int64_t>(a.d / W, 1);
  if (total == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kCompactThreads), INT32_MAX);
  auto* kernel = compact_kernel<T, W>;
  SWIFTVLM_LAUNCH(kernel, static_cast<unsigned>(blocks), kCompactThreads, 0, stream, a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t compact(const CompactArgs& a, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    const bool vec = a.h.sd == 1 && a.d % V == 0 && aligned16(a.h.ptr) && aligned16(a.h_new) &&
                     aligned16(a.rest_h) && strides_aligned16(sizeof(T), {a.h.sb, a.h.sr, a.d});
    return vec ? launch_compact<T, V>(a, stream) : launch_compact<T, 1>(a, stream);
  });
}

}  // namespace swiftvlm
