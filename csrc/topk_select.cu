// topk_select: one launch, one CTA per row running select_row (select_rows.cuh) on the input row:
// grid B, 128 / 256 / 1024 threads for rows up to 1024 / 4096 / more scores; reads the row once (16
// loads in flight per thread), writes keep and rest once; the keys and the candidate list stay in
// shared memory (the keys are re-read from the row only when they do not fit, N above ~55,000).
// Ragged rows (per-row k and lengths from device tensors, read by the row's CTA): the CTA selects
// k_b of the row's first n_b scores into keep[b, :k_b] and rest[b, :n_b - k_b] and writes -1 after
// them; the widths (keep K, rest N) are host ints, the shared memory sized for the widest row.
// The op's launchers, topk_select_cuda and topk_select_ragged_cuda (one body: argument checks,
// outputs, the launch on the current stream), are at the end.
#include "launch.h"
#include "select_rows.cuh"

namespace swiftvlm {
namespace {

template <typename T, int THREADS, bool KEYS_IN_SMEM>
__global__ void __launch_bounds__(THREADS, 1)
    topk_rows_kernel(const T* scores, int64_t s_sb, int64_t s_sn, int N, int k, IndexView k_count, IndexView lengths,
                     int rest_width, int64_t* keep, int64_t* rest, int cand_cap) {
  SWIFTVLM_DYNAMIC_SMEM(dyn_smem);
  __shared__ SelectShared sh;
  const int64_t row = blockIdx.x;
  const int n_b = row_count(lengths, row, N, N);
  const int k_b = row_count(k_count, row, n_b < k ? n_b : k, k);  // (a k past the row: clamped)
  uint32_t* keys = reinterpret_cast<uint32_t*>(dyn_smem);
  uint32_t* cand = keys + (KEYS_IN_SMEM ? ceil_div(N, 4) * 4 : 0);
  int64_t* keep_row = keep + row * k;
  int64_t* rest_row = rest + row * rest_width;
  select_row<THREADS, KEYS_IN_SMEM>(StridedRow<T>{scores + row * s_sb, s_sn}, n_b, k_b, keep_row, rest_row, keys, cand,
                                    cand_cap, sh);
  pad_indices<THREADS>(keep_row, k_b, k, rest_row, n_b - k_b, rest_width);
}

template <typename T, int THREADS>
cudaError_t launch_topk(const T* scores, int64_t s_sb, int64_t s_sn, int64_t B, int64_t N, int64_t k,
                        IndexView k_count, IndexView lengths, int64_t rest_width, int64_t* keep, int64_t* rest,
                        cudaStream_t stream) {
  auto* in_smem = topk_rows_kernel<T, THREADS, true>;
  auto* streamed = topk_rows_kernel<T, THREADS, false>;
  size_t limit = 0;
  cudaError_t err = max_dynamic_smem(in_smem, &limit);
  if (err != cudaSuccess) return err;
  const SelectPlan plan = plan_select(N, 0, limit);
  auto* kernel = plan.keys_in_smem ? in_smem : streamed;
  err = allow_dynamic_smem(kernel, plan.smem);
  if (err != cudaSuccess) return err;
  SWIFTVLM_LAUNCH(kernel, static_cast<unsigned>(B), THREADS, plan.smem, stream, scores, s_sb, s_sn,
                  static_cast<int>(N), static_cast<int>(k), k_count, lengths, static_cast<int>(rest_width), keep, rest,
                  plan.cand_cap);
  return cudaGetLastError();
}

}  // namespace

cudaError_t topk_select(DType dtype, const void* scores, int64_t s_sb, int64_t s_sn, int64_t B, int64_t N,
                        int64_t k, IndexView k_count, IndexView lengths, int64_t* keep, int64_t* rest,
                        cudaStream_t stream) {
  if (N > INT32_MAX || B > INT32_MAX || k < 0 || k > N) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const bool ragged = k_count.ptr != nullptr || lengths.ptr != nullptr;
  const int64_t rest_width = ragged ? N : N - k;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_select_threads(N, [&](auto threads) {
      return launch_topk<T, decltype(threads)::value>(static_cast<const T*>(scores), s_sb, s_sn, B, N, k, k_count,
                                                      lengths, rest_width, keep, rest, stream);
    });
  });
}

// ------------------------------------------------------------------------------------ launchers
// The padded form and the ragged one (k_counts [B] kept per row, None: max_k each, of its first
// lengths[b] scores, None: N; keep [B, max_k] and rest [B, N], each row's indices ascending then -1)
// share one body. The ragged form's width is named max_k in its messages.
namespace {

std::tuple<Tensor, Tensor> topk_select_launch(const Tensor& scores, const std::optional<Tensor>& k_counts, int64_t k,
                                              const std::optional<Tensor>& lengths, bool ragged, const char* op) {
  const DeviceGuard guard = device_guard(scores, "scores");
  check_tensor(scores, "scores", 2, scores);
  const DType dtype = float_dtype(scores, "scores");
  const int64_t B = scores.size(0), N = scores.size(1);
  const char* max = ragged ? "max_" : "";
  STD_TORCH_CHECK(k >= 0 && k <= N, max, "k: expected 0 <= ", max, "k <= N");
  STD_TORCH_CHECK(!ragged || k_counts.has_value() || lengths.has_value(),
                  "k, lengths: expected per-row counts (a ragged batch)");
  const IndexView k_view = counts_view(k_counts, "k", B, scores);
  const IndexView len_view = counts_view(lengths, "lengths", B, scores);
  Tensor keep = torch::stable::new_empty(scores, {B, k}, ScalarType::Long);
  Tensor rest = torch::stable::new_empty(scores, {B, ragged ? N : N - k}, ScalarType::Long);
  check_launch(topk_select(dtype, scores.const_data_ptr(), scores.stride(0), scores.stride(1), B, N, k, k_view,
                           len_view, keep.mutable_data_ptr<int64_t>(), rest.mutable_data_ptr<int64_t>(),
                           current_stream(scores)),
               op);
  return {keep, rest};
}

}  // namespace

std::tuple<Tensor, Tensor> topk_select_cuda(const Tensor& scores, int64_t k) {
  return topk_select_launch(scores, std::nullopt, k, std::nullopt, false, "topk_select_cuda");
}

std::tuple<Tensor, Tensor> topk_select_ragged_cuda(const Tensor& scores, const std::optional<Tensor>& k_counts,
                                                   int64_t max_k, const std::optional<Tensor>& lengths) {
  return topk_select_launch(scores, k_counts, max_k, lengths, true, "topk_select_ragged_cuda");
}

}  // namespace swiftvlm
