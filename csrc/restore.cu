// restore: undo a compact after the layers in between, in one pass (python_ref/restore.py).
// The items of sample b are the n rows of the restored sequence (copied from h where inverse >= 0)
// and its R rest tokens (h_rest + merged_now - merged_then, Eq. 12-13, written to their rows); the
// two sets of rows are disjoint. A thread handles one W-column chunk of one item.
// Ragged blocks (compact_ragged's outputs): rows whose inverse is below -1 (-2: a block's padding rows)
// are written as zeros, rest entries whose slot or group is -1 are skipped.
// Z = 0 (nothing merged: an ALVTS stage's skipped tokens rejoining after its layer): each rest token
// is h_rest copied unchanged; group is not read.
// The op's launcher, restore_cuda (argument checks, the output, the launch on the current stream), is
// at the end.
#include "common.cuh"
#include "launch.h"

namespace swiftvlm {
namespace {

constexpr int kRestoreThreads = 256;

__device__ __forceinline__ int64_t clamp_row(int64_t r, int64_t rows) { return r < 0 ? 0 : (r >= rows ? rows - 1 : r); }

// One chunk copied as stored (no float round trip): a W > 1 chunk is one aligned 16-byte vector.
template <typename T, int W>
__device__ __forceinline__ void copy_chunk(T* dst, const T* src) {
  if constexpr (W == 1) {
    *dst = *src;
  } else {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(kRestoreThreads) restore_kernel(RestoreArgs a) {
  const T* h = static_cast<const T*>(a.h.ptr);
  const T* h_rest = static_cast<const T*>(a.h_rest.ptr);
  const T* then = static_cast<const T*>(a.merged_then.ptr);
  T* out = static_cast<T*>(a.out);
  const int64_t rows = a.B * a.n_cur;
  const int64_t nchunks = a.d / W;
  const int64_t items = a.n + a.R;
  const int64_t total = a.B * items * nchunks;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kRestoreThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kRestoreThreads + threadIdx.x; idx < total; idx += step) {
    const int64_t col = (idx % nchunks) * W;
    const int64_t i = (idx / nchunks) % items;
    const int64_t b = idx / (nchunks * items);
    float x[W];
    if (i < a.n) {  // a carried row
      const int64_t src = load_index(a.inverse, b, i);
      if (src == -1) continue;  // a rest token's row: written by its rest item
      if (src < 0) {            // a ragged block's padding row (-2): zero
#pragma unroll
        for (int w = 0; w < W; ++w) x[w] = 0.0f;
        store_chunk<T, W>(out + (b * a.n + i) * a.d + col, x);
        continue;
      }
      const int64_t r = clamp_row(src, rows);
      load_chunk<T, W>(h + (r / a.n_cur) * a.h.sb + (r % a.n_cur) * a.h.sr + col * a.h.sd, x);
      store_chunk<T, W>(out + (b * a.n + i) * a.d + col, x);
      continue;
    }
    const int64_t q = i - a.n;
    const int64_t slot = load_index(a.rest, b, q);
    const int64_t row = load_index(a.vis_start, b, 0) + slot;
    // no such row, or a ragged padding entry (slot -1): nothing is written
    if (row < 0 || row >= a.n || slot < 0) continue;
    const T* rest = h_rest + b * a.h_rest.sb + q * a.h_rest.sr + col * a.h_rest.sd;
    if (a.Z < 1) {  // nothing merged: the token as it was set aside, bit for bit
      copy_chunk<T, W>(out + (b * a.n + row) * a.d + col, rest);
      continue;
    }
    const int64_t g_raw = load_index(a.group, b, q);
    if (g_raw < 0) continue;  // a ragged padding entry (group -1)
    const int64_t g = g_raw >= a.Z ? a.Z - 1 : g_raw;
    const int64_t now = clamp_row(load_index(a.merged_rows, b, g), rows);
    float x_now[W];
    float x_then[W];
    load_chunk<T, W>(rest, x);
    load_chunk<T, W>(h + (now / a.n_cur) * a.h.sb + (now % a.n_cur) * a.h.sr + col * a.h.sd, x_now);
    load_chunk<T, W>(then + b * a.merged_then.sb + g * a.merged_then.sr + col * a.merged_then.sd, x_then);
#pragma unroll
    for (int w = 0; w < W; ++w) x[w] = x[w] + (x_now[w] - x_then[w]);  // Eq. 12-13
    store_chunk<T, W>(out + (b * a.n + row) * a.d + col, x);
  }
}

template <typename T, int W>
cudaError_t launch_restore(const RestoreArgs& a, cudaStream_t stream) {
  return launch_grid_stride<kRestoreThreads>(restore_kernel<T, W>, a.B * (a.n + a.R) * (a.d / W), stream, a);
}

}  // namespace

cudaError_t restore(const RestoreArgs& a, cudaStream_t stream) {
  if (a.n_cur < 1 && a.B * a.n > 0) return cudaErrorInvalidValue;  // nothing to restore from
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = kVec<T>;
    const RowsView views[] = {a.h, a.h_rest, a.merged_then};
    bool vec = a.d % V == 0 && aligned16(a.out) && strides_aligned16(sizeof(T), {a.d});
    for (const RowsView& v : views) vec = vec && v.sd == 1 && aligned16(v.ptr) && strides_aligned16(sizeof(T), {v.sb, v.sr});
    return vec ? launch_restore<T, V>(a, stream) : launch_restore<T, 1>(a, stream);
  });
}

// ------------------------------------------------------------------------------------ launcher
Tensor restore_cuda(const Tensor& h, const Tensor& inverse, const Tensor& vis_start, const Tensor& rest_idx,
                    const Tensor& h_rest, const Tensor& group, const Tensor& merged_rows, const Tensor& merged_then) {
  const DeviceGuard guard = device_guard(h, "h");
  check_tensors(h, {{h, "h", 3}, {inverse, "inverse", 2}, {vis_start, "vis_start", 1}, {rest_idx, "rest_idx", 2},
                    {h_rest, "h_rest", 3}, {group, "group", 2}, {merged_rows, "merged_rows", 2},
                    {merged_then, "merged_then", 3}});
  RestoreArgs a{};
  a.dtype = float_dtype(h, "h");
  check_same_dtype(h_rest, "h_rest", h, "h");
  check_same_dtype(merged_then, "merged_then", h, "h");
  a.B = h.size(0);
  a.n_cur = h.size(1);
  a.d = h.size(2);
  a.n = inverse.size(1);
  a.R = rest_idx.size(1);
  a.Z = merged_then.size(1);
  STD_TORCH_CHECK(inverse.size(0) == a.B && vis_start.size(0) == a.B && rest_idx.size(0) == a.B,
                  "inverse, vis_start, rest_idx: expected batch size B");
  STD_TORCH_CHECK(h_rest.size(0) == a.B && h_rest.size(1) == a.R && h_rest.size(2) == a.d,
                  "h_rest: expected shape [B, R, d]");
  STD_TORCH_CHECK(group.size(0) == a.B && group.size(1) == a.R, "group: expected shape [B, R]");
  STD_TORCH_CHECK(merged_rows.size(0) == a.B && merged_rows.size(1) == a.Z, "merged_rows: expected shape [B, Z]");
  STD_TORCH_CHECK(merged_then.size(0) == a.B && merged_then.size(2) == a.d, "merged_then: expected shape [B, Z, d]");
  a.h = rows_view(h);
  a.h_rest = rows_view(h_rest);
  a.merged_then = rows_view(merged_then);
  a.inverse = index_view(inverse, "inverse");
  a.vis_start = index_view(vis_start, "vis_start");
  a.rest = index_view(rest_idx, "rest_idx");
  a.group = index_view(group, "group");
  a.merged_rows = index_view(merged_rows, "merged_rows");
  Tensor out = torch::stable::new_empty(h, {a.B, a.n, a.d});
  a.out = out.mutable_data_ptr();
  check_launch(restore(a, current_stream(h)), "restore_cuda");
  return out;
}

}  // namespace swiftvlm
