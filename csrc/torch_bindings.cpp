// The swiftvlm CUDA ops for torch (docs/CONTRACT.md "C++ ops"): their schemas and the launcher that
// implements each (ops.h; every launcher sits beside its kernels in csrc/<op>.cu). Only torch's
// stable ABI is used, so one build serves torch 2.10 and later.
#include "ops.h"  // first: it defines USE_CUDA before any torch header

#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(swiftvlm, m) {
  // workspace: optional scratch (score_workspace_floats), overwritten; a fresh one when None.
  m.def(
      "tv_score_cuda(Tensor q, Tensor k, Tensor vis_start, int vis_len, float scale, Tensor? key_mask,"
      " Tensor(a!)? workspace=None) -> Tensor");
  m.def("topk_select_cuda(Tensor scores, int k) -> (Tensor, Tensor)");
  m.def(
      "score_select_cuda(Tensor q, Tensor k, Tensor vis_start, int vis_len, int keep, float scale, Tensor? key_mask,"
      " Tensor(a!)? workspace=None) -> (Tensor, Tensor, Tensor)");
  m.def("group_merge_cuda(Tensor h, int num_groups) -> (Tensor, Tensor, Tensor)");
  m.def(
      "tv_score_ragged_cuda(Tensor q, Tensor k, Tensor vis_start, Tensor vis_len, int max_vis_len, float scale,"
      " Tensor? key_mask, Tensor? cu_seqlens, int max_seqlen, Tensor(a!)? workspace=None) -> Tensor");
  m.def(
      "score_select_ragged_cuda(Tensor q, Tensor k, Tensor vis_start, Tensor vis_len, Tensor keep, int max_vis_len,"
      " int max_keep, float scale, Tensor? key_mask, Tensor? cu_seqlens, int max_seqlen,"
      " Tensor(a!)? workspace=None) -> (Tensor, Tensor, Tensor)");
  m.def("group_merge_ragged_cuda(Tensor h, Tensor? num_groups, int max_groups, Tensor? lengths) -> (Tensor, Tensor, Tensor)");
  m.def("topk_select_ragged_cuda(Tensor scores, Tensor? k, int max_k, Tensor? lengths) -> (Tensor, Tensor)");
  m.def("bypass_align_cuda(Tensor h_rest, Tensor group, Tensor merged_now, Tensor merged_then) -> Tensor");
  m.def(
      "bypass_align_into_cuda(Tensor(a!) dst, Tensor rows, Tensor h_rest, Tensor group, Tensor merged_now,"
      " Tensor merged_then) -> ()");
  m.def(
      "compact_cuda(Tensor h, Tensor vis_start, Tensor keep_idx, Tensor rest_idx, int num_merged)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "compact_ragged_cuda(Tensor h, Tensor vis_start, Tensor keep_idx, Tensor rest_idx, Tensor num_merged,"
      " int max_merged) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "restore_cuda(Tensor h, Tensor inverse, Tensor vis_start, Tensor rest_idx, Tensor h_rest, Tensor group,"
      " Tensor merged_rows, Tensor merged_then) -> Tensor");
  m.def(
      "attention_importance_cuda(Tensor q, Tensor k, Tensor vis_start, int vis_len, float scale, Tensor? key_mask)"
      " -> (Tensor, Tensor)");
  m.def(
      "attention_importance_ragged_cuda(Tensor q, Tensor k, Tensor vis_start, Tensor vis_len, int max_vis_len,"
      " float scale, Tensor? key_mask) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(swiftvlm, SWIFTVLM_DEVICE_KEY, m) {
  m.impl("tv_score_cuda", TORCH_BOX(&swiftvlm::tv_score_cuda));
  m.impl("topk_select_cuda", TORCH_BOX(&swiftvlm::topk_select_cuda));
  m.impl("score_select_cuda", TORCH_BOX(&swiftvlm::score_select_cuda));
  m.impl("group_merge_cuda", TORCH_BOX(&swiftvlm::group_merge_cuda));
  m.impl("tv_score_ragged_cuda", TORCH_BOX(&swiftvlm::tv_score_ragged_cuda));
  m.impl("score_select_ragged_cuda", TORCH_BOX(&swiftvlm::score_select_ragged_cuda));
  m.impl("topk_select_ragged_cuda", TORCH_BOX(&swiftvlm::topk_select_ragged_cuda));
  m.impl("group_merge_ragged_cuda", TORCH_BOX(&swiftvlm::group_merge_ragged_cuda));
  m.impl("bypass_align_cuda", TORCH_BOX(&swiftvlm::bypass_align_cuda));
  m.impl("bypass_align_into_cuda", TORCH_BOX(&swiftvlm::bypass_align_into_cuda));
  m.impl("compact_cuda", TORCH_BOX(&swiftvlm::compact_cuda));
  m.impl("compact_ragged_cuda", TORCH_BOX(&swiftvlm::compact_ragged_cuda));
  m.impl("restore_cuda", TORCH_BOX(&swiftvlm::restore_cuda));
  m.impl("attention_importance_cuda", TORCH_BOX(&swiftvlm::attention_importance_cuda));
  m.impl("attention_importance_ragged_cuda", TORCH_BOX(&swiftvlm::attention_importance_ragged_cuda));
}
