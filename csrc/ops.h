// The host launchers of the swiftvlm CUDA ops (docs/CONTRACT.md "C++ ops"), one per schema of
// torch_bindings.cpp. Each is defined beside its kernels in csrc/<op>.cu: it checks its arguments,
// allocates the outputs and launches on the current CUDA stream (csrc/launch.h holds the helpers they
// share). Only torch's stable ABI is used, so one build serves torch 2.10 and later; nothing here
// waits for the GPU or reads device values.
#pragma once

// The C shim declares its CUDA entry points (the current stream) only under USE_CUDA; these files are
// built only when torch has CUDA, or for the CPU emulation of the kernels (tests/cuda_emu, which
// defines SWIFTVLM_EMULATION: the ops then take CPU tensors, on the CPU dispatch key).
#if !defined(USE_CUDA) && !defined(SWIFTVLM_EMULATION)
#define USE_CUDA
#endif

#include <cstdint>
#include <optional>
#include <tuple>

#include <torch/csrc/stable/tensor.h>

#ifdef SWIFTVLM_EMULATION
#define SWIFTVLM_DEVICE_KEY CPU
#else
#define SWIFTVLM_DEVICE_KEY CUDA
#endif

namespace swiftvlm {

using torch::stable::Tensor;

// tv_score.cu
Tensor tv_score_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start, int64_t vis_len, double scale,
                     const std::optional<Tensor>& key_mask, const std::optional<Tensor>& workspace);
Tensor tv_score_ragged_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start, const Tensor& vis_len,
                            int64_t max_vis_len, double scale, const std::optional<Tensor>& key_mask,
                            const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen,
                            const std::optional<Tensor>& workspace);

// score_select.cu
std::tuple<Tensor, Tensor, Tensor> score_select_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start,
                                                     int64_t vis_len, int64_t keep, double scale,
                                                     const std::optional<Tensor>& key_mask,
                                                     const std::optional<Tensor>& workspace);
std::tuple<Tensor, Tensor, Tensor> score_select_ragged_cuda(
    const Tensor& q, const Tensor& k, const Tensor& vis_start, const Tensor& vis_len, const Tensor& keep,
    int64_t max_vis_len, int64_t max_keep, double scale, const std::optional<Tensor>& key_mask,
    const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen, const std::optional<Tensor>& workspace);

// attention_importance.cu
std::tuple<Tensor, Tensor> attention_importance_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start,
                                                     int64_t vis_len, double scale,
                                                     const std::optional<Tensor>& key_mask);
std::tuple<Tensor, Tensor> attention_importance_ragged_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start,
                                                            const Tensor& vis_len, int64_t max_vis_len, double scale,
                                                            const std::optional<Tensor>& key_mask);

// topk_select.cu
std::tuple<Tensor, Tensor> topk_select_cuda(const Tensor& scores, int64_t k);
std::tuple<Tensor, Tensor> topk_select_ragged_cuda(const Tensor& scores, const std::optional<Tensor>& k_counts,
                                                   int64_t max_k, const std::optional<Tensor>& lengths);

// group_merge.cu (the ragged form's kernels: group_merge_ragged.cu)
std::tuple<Tensor, Tensor, Tensor> group_merge_cuda(const Tensor& h, int64_t num_groups);
std::tuple<Tensor, Tensor, Tensor> group_merge_ragged_cuda(const Tensor& h, const std::optional<Tensor>& num_groups,
                                                           int64_t max_groups, const std::optional<Tensor>& lengths);

// bypass_align.cu
Tensor bypass_align_cuda(const Tensor& h_rest, const Tensor& group, const Tensor& merged_now,
                         const Tensor& merged_then);
void bypass_align_into_cuda(const Tensor& dst, const Tensor& rows, const Tensor& h_rest, const Tensor& group,
                            const Tensor& merged_now, const Tensor& merged_then);

// compact.cu
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> compact_cuda(const Tensor& h, const Tensor& vis_start,
                                                                const Tensor& keep_idx, const Tensor& rest_idx,
                                                                int64_t num_merged);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> compact_ragged_cuda(const Tensor& h, const Tensor& vis_start,
                                                                       const Tensor& keep_idx, const Tensor& rest_idx,
                                                                       const Tensor& num_merged, int64_t max_merged);

// restore.cu
Tensor restore_cuda(const Tensor& h, const Tensor& inverse, const Tensor& vis_start, const Tensor& rest_idx,
                    const Tensor& h_rest, const Tensor& group, const Tensor& merged_rows, const Tensor& merged_then);

}  // namespace swiftvlm
