// score_select: topk_select(tv_score(...), keep) in tv_score's two launches (tv_score.cu; the passes
// in tv_score.cuh), the select running after pass 2 in the same launch. This file: that select step,
// score_select's run of the two passes, and its launchers.
//
// Pass 1 as tv_score (it also resets each row's arrival counter). Pass 2 with the select after it
// (SelectAfterMerge): every CTA fences its scores and counts itself in the row's arrival counter; the
// CTA that arrives last runs select_row (select_rows.cuh) on the row's scores, so the top-k and the
// keep / rest compaction need no third launch. Pass 2 runs on the select's CTA size (128 / 256 /
// 1024 threads for rows up to 1024 / 4096 / more scores, as topk_select); the select's keys and
// candidates take the start of its dynamic shared memory. Writes the scores and the indices.
//
// Ragged batches (per-sample counts read on the device): the select runs on the row's n_b scores
// with its own keep count k_b, then writes -1 after its k_b kept and n_b - k_b rest indices (keep
// [B, K], rest [B, vis_len]).
#include "launch.h"
#include "select_rows.cuh"
#include "tv_score.cuh"

namespace swiftvlm {
namespace {

// The select after pass 2: keep k of the row's scores (ragged: keep_count[b] of its own n_b) into
// keep [B, k] and rest [B, rest_width].
template <bool KEYS_IN_SMEM>
struct SelectAfterMerge {
  int k;
  IndexView keep_count;
  int rest_width;
  int64_t* keep;
  int64_t* rest;

  template <int THREADS>
  __device__ void run(const ScoreArgs& a, const ScoreWorkspace& ws, const MergePlan& mp, const float* scores,
                      int64_t row, int64_t nvis, unsigned char* dyn_smem) const {
    __shared__ SelectShared sh;
    __shared__ int is_last;
    // The last CTA of the row to finish selects. As a grid barrier does: the block's writes, then
    // thread 0's fence and count; the CTA that completes the count fences again and reads them all.
    __syncthreads();
    if (threadIdx.x == 0) {
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
};

template <int THREADS>
cudaError_t launch_merge_select(const ScoreArgs& a, const ScoreWorkspace& ws, float* scores, int64_t keep,
                                IndexView keep_count, int64_t* keep_idx, int64_t* rest_idx, cudaStream_t stream) {
  MergePlan mp = merge_plan(a, ws, THREADS);
  size_t limit = 0;
  const cudaError_t err = max_dynamic_smem(score_merge_kernel<THREADS, SelectAfterMerge<true>>, &limit);
  if (err != cudaSuccess) return err;
  const SelectPlan plan = plan_select(a.vis_len, merge_smem(a, mp, THREADS), limit);
  mp.cand_cap = plan.cand_cap;
  mp.select_smem = plan.smem;
  const bool ragged = a.vis_count.ptr != nullptr || keep_count.ptr != nullptr;
  const int rest_width = static_cast<int>(ragged ? a.vis_len : a.vis_len - keep);
  const int k = static_cast<int>(keep);
  return plan.keys_in_smem
             ? launch_merge<THREADS>(a, ws, mp, scores,
                                     SelectAfterMerge<true>{k, keep_count, rest_width, keep_idx, rest_idx}, stream)
             : launch_merge<THREADS>(a, ws, mp, scores,
                                     SelectAfterMerge<false>{k, keep_count, rest_width, keep_idx, rest_idx}, stream);
}

}  // namespace

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

// ------------------------------------------------------------------------------------ launchers
// The padded form and the ragged / packed one (per-sample counts vis_count and keep_count [B] with the
// host-int padded widths vis_len and keep; packed keys when cu_seqlens is given) share one body. The
// ragged form's widths are named max_<name> in its messages.
namespace {

std::tuple<Tensor, Tensor, Tensor> score_select_launch(
    const Tensor& q, const Tensor& k, const Tensor& vis_start, const std::optional<Tensor>& vis_count,
    const std::optional<Tensor>& keep_counts, int64_t vis_len, int64_t keep, double scale,
    const std::optional<Tensor>& key_mask, const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen,
    const std::optional<Tensor>& workspace_in, const char* op) {
  const bool ragged = keep_counts.has_value();
  const DeviceGuard guard = device_guard(q, "q");
  const ScoreInputs in = score_inputs(q, k, vis_start, vis_len, scale, key_mask, vis_count, cu_seqlens, max_seqlen);
  const char* max = ragged ? "max_" : "";
  STD_TORCH_CHECK(keep >= 0 && keep <= vis_len, max, "keep: expected 0 <= ", max, "keep <= ", max, "vis_len");
  const int64_t B = in.args.B;
  const IndexView keep_count = counts_view(keep_counts, "keep", B, q);
  const Tensor workspace = score_workspace(q, in.args, workspace_in);
  Tensor scores = torch::stable::new_empty(q, {B, vis_len}, ScalarType::Float);
  Tensor keep_idx = torch::stable::new_empty(q, {B, keep}, ScalarType::Long);
  Tensor rest_idx = torch::stable::new_empty(q, {B, ragged ? vis_len : vis_len - keep}, ScalarType::Long);
  check_launch(score_select(in.args, keep, keep_count, workspace.mutable_data_ptr<float>(),
                            scores.mutable_data_ptr<float>(), keep_idx.mutable_data_ptr<int64_t>(),
                            rest_idx.mutable_data_ptr<int64_t>(), current_stream(q)),
               op);
  return {keep_idx, rest_idx, scores};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> score_select_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start,
                                                     int64_t vis_len, int64_t keep, double scale,
                                                     const std::optional<Tensor>& key_mask,
                                                     const std::optional<Tensor>& workspace) {
  return score_select_launch(q, k, vis_start, std::nullopt, std::nullopt, vis_len, keep, scale, key_mask, std::nullopt,
                             0, workspace, "score_select_cuda");
}

std::tuple<Tensor, Tensor, Tensor> score_select_ragged_cuda(
    const Tensor& q, const Tensor& k, const Tensor& vis_start, const Tensor& vis_len, const Tensor& keep,
    int64_t max_vis_len, int64_t max_keep, double scale, const std::optional<Tensor>& key_mask,
    const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen, const std::optional<Tensor>& workspace) {
  return score_select_launch(q, k, vis_start, vis_len, keep, max_vis_len, max_keep, scale, key_mask, cu_seqlens,
                             max_seqlen, workspace, "score_select_ragged_cuda");
}

}  // namespace swiftvlm
