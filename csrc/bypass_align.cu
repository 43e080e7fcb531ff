// bypass_align: restore the bypassed tokens with their group's drift, h + (now - then)
// (Eq. 12-13), in one gather-add pass; the into-form scatters the rows into dst. A row whose group
// id is negative (-1 pads a ragged batch) gets no drift: copied, or, into dst, not written.
// A thread handles one W-column chunk of one row: 16-byte loads and stores when every tensor allows
// them, else one element (any strides).
// The op's launchers, bypass_align_cuda and bypass_align_into_cuda (argument checks, the output, the
// launch on the current stream), are at the end.
#include "common.cuh"
#include "launch.h"

namespace swiftvlm {
namespace {

constexpr int kBypassThreads = 256;

template <typename T, int W>
__global__ void __launch_bounds__(kBypassThreads) bypass_align_kernel(BypassArgs a) {
  const T* h_rest = static_cast<const T*>(a.h_rest.ptr);
  const T* now = static_cast<const T*>(a.merged_now.ptr);
  const T* then = static_cast<const T*>(a.merged_then.ptr);
  T* out = static_cast<T*>(a.out);
  const int64_t nchunks = a.d / W;
  const int64_t total = a.B * a.R * nchunks;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kBypassThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kBypassThreads + threadIdx.x; idx < total; idx += step) {
    const int64_t col = (idx % nchunks) * W;
    const int64_t i = (idx / nchunks) % a.R;
    const int64_t b = idx / (nchunks * a.R);
    // A negative group id (-1: ragged padding) has no drift: the row is copied, or, into dst, skipped.
    const int64_t g_raw = load_index(a.group, b, i);
    int64_t row = i;
    if (a.rows.ptr != nullptr) {
      row = load_index(a.rows, b, i);
      if (row < 0 || row >= a.M || g_raw < 0) continue;  // no such destination row: nothing is written
    }
    // Ids past the last group are clamped, as the reference does.
    const int64_t g = g_raw >= a.Z ? a.Z - 1 : g_raw;
    float x[W];
    load_chunk<T, W>(h_rest + b * a.h_rest.sb + i * a.h_rest.sr + col * a.h_rest.sd, x);
    if (g >= 0) {
      float x_now[W];
      float x_then[W];
      load_chunk<T, W>(now + b * a.merged_now.sb + g * a.merged_now.sr + col * a.merged_now.sd, x_now);
      load_chunk<T, W>(then + b * a.merged_then.sb + g * a.merged_then.sr + col * a.merged_then.sd, x_then);
#pragma unroll
      for (int w = 0; w < W; ++w) x[w] = x[w] + (x_now[w] - x_then[w]);  // Eq. 12-13
    }
    store_chunk<T, W>(out + b * a.out_sb + row * a.out_sr + col * a.out_sd, x);
  }
}

template <typename T, int W>
cudaError_t launch_bypass_align(const BypassArgs& a, cudaStream_t stream) {
  return launch_grid_stride<kBypassThreads>(bypass_align_kernel<T, W>, a.B * a.R * (a.d / W), stream, a);
}

// A chunk of W > 1 columns needs unit column strides and 16-byte aligned row starts everywhere.
bool vector_ok(const BypassArgs& a, size_t elem_size, int vec) {
  const RowsView views[] = {a.h_rest, a.merged_now, a.merged_then};
  for (const RowsView& v : views) {
    if (v.sd != 1 || !aligned16(v.ptr) || !strides_aligned16(elem_size, {v.sb, v.sr})) return false;
  }
  return a.out_sd == 1 && aligned16(a.out) && strides_aligned16(elem_size, {a.out_sb, a.out_sr}) && a.d % vec == 0;
}

}  // namespace

cudaError_t bypass_align(const BypassArgs& a, cudaStream_t stream) {
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return vector_ok(a, sizeof(T), kVec<T>) ? launch_bypass_align<T, kVec<T>>(a, stream)
                                            : launch_bypass_align<T, 1>(a, stream);
  });
}

// ------------------------------------------------------------------------------------ launchers
namespace {

// Checks the inputs shared by both bypass forms; the destination is filled in by the caller.
BypassArgs bypass_args(const Tensor& h_rest, const Tensor& group, const Tensor& merged_now, const Tensor& merged_then) {
  check_tensors(h_rest, {{h_rest, "h_rest", 3}, {group, "group", 2}, {merged_now, "merged_now", 3},
                         {merged_then, "merged_then", 3}});
  BypassArgs a{};
  a.dtype = float_dtype(h_rest, "h_rest");
  check_same_dtype(merged_now, "merged_now", h_rest, "h_rest");
  check_same_dtype(merged_then, "merged_then", h_rest, "h_rest");
  a.B = h_rest.size(0);
  a.R = h_rest.size(1);
  a.d = h_rest.size(2);
  a.Z = merged_now.size(1);
  STD_TORCH_CHECK(group.size(0) == a.B && group.size(1) == a.R, "group: expected shape [B, R] (h_rest is [B, R, d])");
  STD_TORCH_CHECK(merged_now.size(0) == a.B && merged_now.size(2) == a.d, "merged_now: expected shape [B, Z, d]");
  STD_TORCH_CHECK(merged_then.size(0) == a.B && merged_then.size(1) == a.Z && merged_then.size(2) == a.d,
                  "merged_then: expected the shape of merged_now");
  // Z == 0 with R > 0: a ragged batch whose samples all have no group (every id -1); a row whose id
  // is >= 0 then gets no drift (the kernel clamps ids into [0, Z), which is empty), never a read past merged.
  a.h_rest = rows_view(h_rest);
  a.merged_now = rows_view(merged_now);
  a.merged_then = rows_view(merged_then);
  a.group = index_view(group, "group");
  return a;
}

}  // namespace

Tensor bypass_align_cuda(const Tensor& h_rest, const Tensor& group, const Tensor& merged_now,
                         const Tensor& merged_then) {
  const DeviceGuard guard = device_guard(h_rest, "h_rest");
  BypassArgs a = bypass_args(h_rest, group, merged_now, merged_then);
  Tensor out = torch::stable::new_empty(h_rest, {a.B, a.R, a.d});
  a.out = out.mutable_data_ptr();
  a.out_sb = out.stride(0);
  a.out_sr = out.stride(1);
  a.out_sd = out.stride(2);
  a.M = a.R;
  check_launch(bypass_align(a, current_stream(h_rest)), "bypass_align_cuda");
  return out;
}

void bypass_align_into_cuda(const Tensor& dst, const Tensor& rows, const Tensor& h_rest, const Tensor& group,
                            const Tensor& merged_now, const Tensor& merged_then) {
  const DeviceGuard guard = device_guard(h_rest, "h_rest");
  BypassArgs a = bypass_args(h_rest, group, merged_now, merged_then);
  check_tensors(h_rest, {{dst, "dst", 3}, {rows, "rows", 2}});
  check_same_dtype(dst, "dst", h_rest, "h_rest");
  STD_TORCH_CHECK(dst.size(0) == a.B && dst.size(2) == a.d, "dst: expected shape [B, M, d] (h_rest is [B, R, d])");
  STD_TORCH_CHECK(rows.size(0) == a.B && rows.size(1) == a.R, "rows: expected shape [B, R]");
  a.out = dst.mutable_data_ptr();
  a.out_sb = dst.stride(0);
  a.out_sr = dst.stride(1);
  a.out_sd = dst.stride(2);
  a.rows = index_view(rows, "rows");
  a.M = dst.size(1);
  check_launch(bypass_align(a, current_stream(h_rest)), "bypass_align_into_cuda");
}

}  // namespace swiftvlm
