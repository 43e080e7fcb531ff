// The swiftvlm CUDA ops for torch (docs/CONTRACT.md "C++ ops"): schemas, argument checks, output
// allocation and launches on the current CUDA stream. Only torch's stable ABI is used, so one build
// serves torch 2.10 and later; nothing here waits for the GPU or reads device values.

// The C shim declares its CUDA entry points (the current stream) only under USE_CUDA; this file is
// built only when torch has CUDA, or for the CPU emulation of the kernels (tests/cuda_emu, which
// defines SWIFTVLM_EMULATION: the ops then take CPU tensors, on the CPU dispatch key).
#if !defined(USE_CUDA) && !defined(SWIFTVLM_EMULATION)
#define USE_CUDA
#endif

#include <cstdint>
#include <optional>
#include <tuple>

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include "swiftvlm.cuh"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

#ifdef SWIFTVLM_EMULATION
#define SWIFTVLM_DEVICE_KEY CPU
struct DeviceGuard {
  explicit DeviceGuard(int) {}
};
cudaStream_t current_stream(const Tensor&) { return nullptr; }
bool on_device(const Tensor& t) { return t.is_cpu(); }
#else
#define SWIFTVLM_DEVICE_KEY CUDA
using DeviceGuard = torch::stable::accelerator::DeviceGuard;
cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}
bool on_device(const Tensor& t) { return t.is_cuda(); }
#endif

void check_launch(cudaError_t err, const char* op) {
  const char* hint = err == cudaErrorInvalidConfiguration
                         ? " (the shapes need more blocks or shared memory than one launch has)"
                         : "";
  STD_TORCH_CHECK(err == cudaSuccess, "swiftvlm::", op, ": CUDA error: ", cudaGetErrorString(err), hint);
}

void check_cuda(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(on_device(t), name, ": expected a CUDA tensor");
}

// t is a CUDA tensor of `rank` dimensions on ref's device.
void check_tensor(const Tensor& t, const char* name, int64_t rank, const Tensor& ref) {
  check_cuda(t, name);
  STD_TORCH_CHECK(t.get_device_index() == ref.get_device_index(), name, ": expected the device of the other inputs");
  STD_TORCH_CHECK(t.dim() == rank, name, ": expected a ", rank, "-D tensor, got ", t.dim(), " dimensions");
}

swiftvlm::DType float_dtype(const Tensor& t, const char* name) {
  const ScalarType s = t.scalar_type();
  STD_TORCH_CHECK(s == ScalarType::Float || s == ScalarType::Half || s == ScalarType::BFloat16, name,
                  ": expected dtype float32, float16 or bfloat16");
  if (s == ScalarType::Float) return swiftvlm::DType::F32;
  return s == ScalarType::Half ? swiftvlm::DType::F16 : swiftvlm::DType::BF16;
}

void check_same_dtype(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  STD_TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected the dtype of ", ref_name);
}

swiftvlm::IndexView index_view(const Tensor& t, const char* name) {
  const ScalarType s = t.scalar_type();
  STD_TORCH_CHECK(s == ScalarType::Long || s == ScalarType::Int, name, ": expected dtype int64 or int32");
  return {t.const_data_ptr(), s == ScalarType::Long, t.stride(0), t.dim() > 1 ? t.stride(1) : 0};
}

// The kernels read the last dimension with unit stride; other layouts get one contiguous copy.
Tensor unit_last_stride(const Tensor& t) { return t.stride(t.dim() - 1) == 1 ? t : torch::stable::contiguous(t); }

swiftvlm::RowsView rows_view(const Tensor& t) { return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// ------------------------------------------------------------------------------------ scoring
struct ScoreInputs {
  Tensor q, k;  // head dim with unit stride (copies when the caller's was not)
  swiftvlm::ScoreArgs args;
};

constexpr swiftvlm::IndexView kNoIndex{nullptr, false, 0, 0};

// Per-sample counts of a ragged batch: an int tensor [B] (none: kNoIndex).
swiftvlm::IndexView counts_view(const std::optional<Tensor>& counts, const char* name, int64_t B, const Tensor& ref) {
  if (!counts.has_value()) return kNoIndex;
  check_tensor(*counts, name, 1, ref);
  STD_TORCH_CHECK(counts->size(0) == B, name, ": expected shape [B] (one count per sample)");
  return index_view(*counts, name);
}

// vis_len: the visual width (ragged: the padded width of the per-sample counts vis_count). Packed keys
// (cu_seqlens given): k is [total, Hkv, D] and max_seqlen bounds every sample's keys.
ScoreInputs score_inputs(const Tensor& q_in, const Tensor& k_in, const Tensor& vis_start, int64_t vis_len,
                         double scale, const std::optional<Tensor>& key_mask,
                         const std::optional<Tensor>& vis_count = std::nullopt,
                         const std::optional<Tensor>& cu_seqlens = std::nullopt, int64_t max_seqlen = 0) {
  const bool packed = cu_seqlens.has_value();
  check_tensor(q_in, "q", 3, q_in);
  check_tensor(k_in, "k", packed ? 3 : 4, q_in);
  check_tensor(vis_start, "vis_start", 1, q_in);
  const swiftvlm::DType dtype = float_dtype(q_in, "q");
  check_same_dtype(k_in, "k", q_in, "q");
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(2);
  const int64_t Hkv = k_in.size(1), L = packed ? max_seqlen : k_in.size(2);
  if (packed) {
    STD_TORCH_CHECK(k_in.size(2) == D, "k: expected shape [total, Hkv, D] for q of shape [B, H, D]");
    STD_TORCH_CHECK(max_seqlen >= 0, "max_seqlen: expected a length >= 0");
    STD_TORCH_CHECK(!key_mask.has_value(), "key_mask: packed keys take no key mask");
    check_tensor(*cu_seqlens, "cu_seqlens", 1, q_in);
    STD_TORCH_CHECK(cu_seqlens->size(0) == B + 1, "cu_seqlens: expected shape [B + 1]");
  } else {
    STD_TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D, "k: expected shape [B, Hkv, L, D] for q of shape [B, H, D]");
  }
  STD_TORCH_CHECK(H >= 1 && Hkv >= 1 && H % Hkv == 0, "k: expected Hkv >= 1 KV heads dividing the H >= 1 query heads");
  STD_TORCH_CHECK(vis_start.size(0) == B, "vis_start: expected shape [B]");
  STD_TORCH_CHECK(vis_len >= 0 && (packed || vis_len <= L), "vis_len: expected 0 <= vis_len <= L");

  ScoreInputs in{unit_last_stride(q_in), unit_last_stride(k_in), {}};
  swiftvlm::ScoreArgs& a = in.args;
  a.dtype = dtype;
  a.q = in.q.const_data_ptr();
  a.q_sb = in.q.stride(0);
  a.q_sh = in.q.stride(1);
  a.k = in.k.const_data_ptr();
  a.k_sb = packed ? 0 : in.k.stride(0);
  a.k_sh = in.k.stride(1);
  a.k_sl = in.k.stride(packed ? 0 : 2);
  a.k_rows = packed ? in.k.size(0) : 0;
  a.seq_start = packed ? index_view(*cu_seqlens, "cu_seqlens") : kNoIndex;
  a.vis_count = counts_view(vis_count, "vis_len", B, q_in);
  a.vis_start = index_view(vis_start, "vis_start");
  a.key_mask = nullptr;
  a.mask_sb = a.mask_sl = 0;
  if (key_mask.has_value()) {
    const Tensor& m = *key_mask;
    check_tensor(m, "key_mask", 2, q_in);
    STD_TORCH_CHECK(m.scalar_type() == ScalarType::Bool, "key_mask: expected dtype bool (True = valid key)");
    STD_TORCH_CHECK(m.size(0) == B && m.size(1) == L, "key_mask: expected shape [B, L]");
    a.key_mask = static_cast<const bool*>(m.const_data_ptr());
    a.mask_sb = m.stride(0);
    a.mask_sl = m.stride(1);
  }
  a.B = B;
  a.H = H;
  a.Hkv = Hkv;
  a.L = L;
  a.D = D;
  a.vis_len = vis_len;
  a.scale = static_cast<float>(scale);
  return in;
}

// The scratch of tv_score / score_select: the caller's (any content: the op resets what it counts
// in), or a fresh one.
Tensor score_workspace(const Tensor& q, const swiftvlm::ScoreArgs& a, const std::optional<Tensor>& given) {
  const auto floats = static_cast<int64_t>(swiftvlm::score_workspace_floats(a.B, a.H, a.Hkv, a.L, a.D, a.vis_len));
  if (!given.has_value()) return torch::stable::new_empty(q, {floats}, ScalarType::Float);
  const Tensor& w = *given;
  check_tensor(w, "workspace", 1, q);
  STD_TORCH_CHECK(w.scalar_type() == ScalarType::Float && w.is_contiguous() && w.numel() >= floats,
                  "workspace: expected a contiguous float32 tensor of at least ", floats, " elements");
  return w;
}

Tensor tv_score_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start, int64_t vis_len, double scale,
                     const std::optional<Tensor>& key_mask, const std::optional<Tensor>& workspace_in) {
  check_cuda(q, "q");
  const DeviceGuard guard(q.get_device_index());
  const ScoreInputs in = score_inputs(q, k, vis_start, vis_len, scale, key_mask);
  const Tensor workspace = score_workspace(q, in.args, workspace_in);
  Tensor scores = torch::stable::new_empty(q, {in.args.B, vis_len}, ScalarType::Float);
  check_launch(swiftvlm::tv_score(in.args, workspace.mutable_data_ptr<float>(), scores.mutable_data_ptr<float>(),
                                  current_stream(q)),
               "tv_score_cuda");
  return scores;
}

std::tuple<Tensor, Tensor, Tensor> score_select_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start,
                                                     int64_t vis_len, int64_t keep, double scale,
                                                     const std::optional<Tensor>& key_mask,
                                                     const std::optional<Tensor>& workspace_in) {
  check_cuda(q, "q");
  const DeviceGuard guard(q.get_device_index());
  const ScoreInputs in = score_inputs(q, k, vis_start, vis_len, scale, key_mask);
  STD_TORCH_CHECK(keep >= 0 && keep <= vis_len, "keep: expected 0 <= keep <= vis_len");
  const int64_t B = in.args.B;
  const Tensor workspace = score_workspace(q, in.args, workspace_in);
  Tensor scores = torch::stable::new_empty(q, {B, vis_len}, ScalarType::Float);
  Tensor keep_idx = torch::stable::new_empty(q, {B, keep}, ScalarType::Long);
  Tensor rest_idx = torch::stable::new_empty(q, {B, vis_len - keep}, ScalarType::Long);
  check_launch(swiftvlm::score_select(in.args, keep, kNoIndex, workspace.mutable_data_ptr<float>(),
                                      scores.mutable_data_ptr<float>(), keep_idx.mutable_data_ptr<int64_t>(),
                                      rest_idx.mutable_data_ptr<int64_t>(), current_stream(q)),
               "score_select_cuda");
  return {keep_idx, rest_idx, scores};
}

// Ragged batches: per-sample counts vis_len [B] (and keep [B]) with host-int padded widths; packed
// keys when cu_seqlens is given (k [total, Hkv, D], every sample at most max_seqlen keys).
Tensor tv_score_ragged_cuda(const Tensor& q, const Tensor& k, const Tensor& vis_start, const Tensor& vis_len,
                            int64_t max_vis_len, double scale, const std::optional<Tensor>& key_mask,
                            const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen,
                            const std::optional<Tensor>& workspace_in) {
  check_cuda(q, "q");
  const DeviceGuard guard(q.get_device_index());
  const ScoreInputs in = score_inputs(q, k, vis_start, max_vis_len, scale, key_mask, vis_len, cu_seqlens, max_seqlen);
  const Tensor workspace = score_workspace(q, in.args, workspace_in);
  Tensor scores = torch::stable::new_empty(q, {in.args.B, max_vis_len}, ScalarType::Float);
  check_launch(swiftvlm::tv_score(in.args, workspace.mutable_data_ptr<float>(), scores.mutable_data_ptr<float>(),
                                  current_stream(q)),
               "tv_score_ragged_cuda");
  return scores;
}

std::tuple<Tensor, Tensor, Tensor> score_select_ragged_cuda(
    const Tensor& q, const Tensor& k, const Tensor& vis_start, const Tensor& vis_len, const Tensor& keep,
    int64_t max_vis_len, int64_t max_keep, double scale, const std::optional<Tensor>& key_mask,
    const std::optional<Tensor>& cu_seqlens, int64_t max_seqlen, const std::optional<Tensor>& workspace_in) {
  check_cuda(q, "q");
  const DeviceGuard guard(q.get_device_index());
  const ScoreInputs in = score_inputs(q, k, vis_start, max_vis_len, scale, key_mask, vis_len, cu_seqlens, max_seqlen);
  STD_TORCH_CHECK(max_keep >= 0 && max_keep <= max_vis_len, "max_keep: expected 0 <= max_keep <= max_vis_len");
  const int64_t B = in.args.B;
  const swiftvlm::IndexView keep_count = counts_view(keep, "keep", B, q);
  const Tensor workspace = score_workspace(q, in.args, workspace_in);
  Tensor scores = torch::stable::new_empty(q, {B, max_vis_len}, ScalarType::Float);
  Tensor keep_idx = torch::stable::new_empty(q, {B, max_keep}, ScalarType::Long);
  Tensor rest_idx = torch::stable::new_empty(q, {B, max_vis_len}, ScalarType::Long);
  check_launch(swiftvlm::score_select(in.args, max_keep, keep_count, workspace.mutable_data_ptr<float>(),
                                      scores.mutable_data_ptr<float>(), keep_idx.mutable_data_ptr<int64_t>(),
                                      rest_idx.mutable_data_ptr<int64_t>(), current_stream(q)),
               "score_select_ragged_cuda");
  return {keep_idx, rest_idx, scores};
}

// ------------------------------------------------------------------------------------ selection
std::tuple<Tensor, Tensor> topk_select_cuda(const Tensor& scores, int64_t k) {
  check_cuda(scores, "scores");
  const DeviceGuard guard(scores.get_device_index());
  check_tensor(scores, "scores", 2, scores);
  const swiftvlm::DType dtype = float_dtype(scores, "scores");
  const int64_t B = scores.size(0), N = scores.size(1);
  STD_TORCH_CHECK(k >= 0 && k <= N, "k: expected 0 <= k <= N");
  Tensor keep = torch::stable::new_empty(scores, {B, k}, ScalarType::Long);
  Tensor rest = torch::stable::new_empty(scores, {B, N - k}, ScalarType::Long);
  check_launch(swiftvlm::topk_select(dtype, scores.const_data_ptr(), scores.stride(0), scores.stride(1), B, N, k,
                                     kNoIndex, kNoIndex, keep.mutable_data_ptr<int64_t>(),
                                     rest.mutable_data_ptr<int64_t>(), current_stream(scores)),
               "topk_select_cuda");
  return {keep, rest};
}

// Ragged rows: k_counts [B] kept per row (None: max_k each) of its first lengths[b] scores (None: N);
// keep [B, max_k] and rest [B, N], each row's indices ascending then -1.
std::tuple<Tensor, Tensor> topk_select_ragged_cuda(const Tensor& scores, const std::optional<Tensor>& k_counts,
                                                   int64_t max_k, const std::optional<Tensor>& lengths) {
  check_cuda(scores, "scores");
  const DeviceGuard guard(scores.get_device_index());
  check_tensor(scores, "scores", 2, scores);
  const swiftvlm::DType dtype = float_dtype(scores, "scores");
  const int64_t B = scores.size(0), N = scores.size(1);
  STD_TORCH_CHECK(max_k >= 0 && max_k <= N, "max_k: expected 0 <= max_k <= N");
  STD_TORCH_CHECK(k_counts.has_value() || lengths.has_value(), "k, lengths: expected per-row counts (a ragged batch)");
  const swiftvlm::IndexView k_view = counts_view(k_counts, "k", B, scores);
  const swiftvlm::IndexView len_view = counts_view(lengths, "lengths", B, scores);
  Tensor keep = torch::stable::new_empty(scores, {B, max_k}, ScalarType::Long);
  Tensor rest = torch::stable::new_empty(scores, {B, N}, ScalarType::Long);
  check_launch(swiftvlm::topk_select(dtype, scores.const_data_ptr(), scores.stride(0), scores.stride(1), B, N, max_k,
                                     k_view, len_view, keep.mutable_data_ptr<int64_t>(),
                                     rest.mutable_data_ptr<int64_t>(), current_stream(scores)),
               "topk_select_ragged_cuda");
  return {keep, rest};
}

// ------------------------------------------------------------------------------------ merging
std::tuple<Tensor, Tensor, Tensor> group_merge_cuda(const Tensor& h, int64_t num_groups) {
  check_cuda(h, "h");
  const DeviceGuard guard(h.get_device_index());
  check_tensor(h, "h", 3, h);
  const swiftvlm::DType dtype = float_dtype(h, "h");
  const int64_t B = h.size(0), R = h.size(1), d = h.size(2);
  STD_TORCH_CHECK(num_groups >= 1 && num_groups <= R, "num_groups: expected 1 <= num_groups <= R (R = h.shape[1])");
  STD_TORCH_CHECK(R <= INT32_MAX, "h: expected at most 2^31 - 1 rest tokens");
  Tensor merged = torch::stable::new_empty(h, {B, num_groups, d});
  Tensor group = torch::stable::new_empty(h, {B, R}, ScalarType::Long);
  Tensor counts = torch::stable::new_empty(h, {B, num_groups}, ScalarType::Int);
  const auto bytes = static_cast<int64_t>(swiftvlm::group_merge_workspace_bytes(B, R, num_groups));
  Tensor workspace = torch::stable::new_empty(h, {bytes}, ScalarType::Byte);
  // h is read in place through its strides (a unit last stride takes the vectorised path).
  check_launch(swiftvlm::group_merge(dtype, h.const_data_ptr(), h.stride(0), h.stride(1), h.stride(2), B, R, d,
                                     num_groups, workspace.mutable_data_ptr(), merged.mutable_data_ptr(),
                                     group.mutable_data_ptr<int64_t>(), counts.mutable_data_ptr<int32_t>(),
                                     current_stream(h)),
               "group_merge_cuda");
  return {merged, group, counts};
}

// Ragged: num_groups [B] per-sample groups of padded width max_groups (None: max_groups each) over the
// first lengths[b] rows (None: R); group -1 past a sample's rows, merged and counts 0 past its groups.
std::tuple<Tensor, Tensor, Tensor> group_merge_ragged_cuda(const Tensor& h_in, const std::optional<Tensor>& num_groups,
                                                           int64_t max_groups, const std::optional<Tensor>& lengths) {
  check_cuda(h_in, "h");
  const DeviceGuard guard(h_in.get_device_index());
  check_tensor(h_in, "h", 3, h_in);
  const swiftvlm::DType dtype = float_dtype(h_in, "h");
  const int64_t B = h_in.size(0), R = h_in.size(1), d = h_in.size(2);
  STD_TORCH_CHECK(max_groups >= 0 && max_groups <= R, "max_groups: expected 0 <= max_groups <= R (R = h.shape[1])");
  const swiftvlm::IndexView groups_view = counts_view(num_groups, "num_groups", B, h_in);
  const swiftvlm::IndexView len_view = counts_view(lengths, "lengths", B, h_in);
  const Tensor h = unit_last_stride(h_in);
  Tensor merged = torch::stable::new_empty(h, {B, max_groups, d});
  Tensor group = torch::stable::new_empty(h, {B, R}, ScalarType::Long);
  Tensor counts = torch::stable::new_empty(h, {B, max_groups}, ScalarType::Int);
  check_launch(swiftvlm::group_merge_ragged(dtype, h.const_data_ptr(), h.stride(0), h.stride(1), B, R, d, max_groups,
                                            groups_view, len_view, merged.mutable_data_ptr(),
                                            group.mutable_data_ptr<int64_t>(), counts.mutable_data_ptr<int32_t>(),
                                            current_stream(h)),
               "group_merge_ragged_cuda");
  return {merged, group, counts};
}

// Checks the inputs shared by both bypass forms; the destination is filled in by the caller.
swiftvlm::BypassArgs bypass_args(const Tensor& h_rest, const Tensor& group, const Tensor& merged_now,
                                 const Tensor& merged_then) {
  check_tensor(h_rest, "h_rest", 3, h_rest);
  check_tensor(group, "group", 2, h_rest);
  check_tensor(merged_now, "merged_now", 3, h_rest);
  check_tensor(merged_then, "merged_then", 3, h_rest);
  swiftvlm::BypassArgs a{};
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

Tensor bypass_align_cuda(const Tensor& h_rest, const Tensor& group, const Tensor& merged_now,
                         const Tensor& merged_then) {
  check_cuda(h_rest, "h_rest");
  const DeviceGuard guard(h_rest.get_device_index());
  swiftvlm::BypassArgs a = bypass_args(h_rest, group, merged_now, merged_then);
  Tensor out = torch::stable::new_empty(h_rest, {a.B, a.R, a.d});
  a.out = out.mutable_data_ptr();
  a.out_sb = out.stride(0);
  a.out_sr = out.stride(1);
  a.out_sd = out.stride(2);
  a.M = a.R;
  check_launch(swiftvlm::bypass_align(a, current_stream(h_rest)), "bypass_align_cuda");
  return out;
}

void bypass_align_into_cuda(const Tensor& dst, const Tensor& rows, const Tensor& h_rest, const Tensor& group,
                            const Tensor& merged_now, const Tensor& merged_then) {
  check_cuda(h_rest, "h_rest");
  const DeviceGuard guard(h_rest.get_device_index());
  swiftvlm::BypassArgs a = bypass_args(h_rest, group, merged_now, merged_then);
  check_tensor(dst, "dst", 3, h_rest);
  check_tensor(rows, "rows", 2, h_rest);
  check_same_dtype(dst, "dst", h_rest, "h_rest");
  STD_TORCH_CHECK(dst.size(0) == a.B && dst.size(2) == a.d, "dst: expected shape [B, M, d] (h_rest is [B, R, d])");
  STD_TORCH_CHECK(rows.size(0) == a.B && rows.size(1) == a.R, "rows: expected shape [B, R]");
  a.out = dst.mutable_data_ptr();
  a.out_sb = dst.stride(0);
  a.out_sr = dst.stride(1);
  a.out_sd = dst.stride(2);
  a.rows = index_view(rows, "rows");
  a.M = dst.size(1);
  check_launch(swiftvlm::bypass_align(a, current_stream(h_rest)), "bypass_align_into_cuda");
}

// ------------------------------------------------------------------------------------ compaction
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> compact_cuda(const Tensor& h, const Tensor& vis_start,
                                                                const Tensor& keep_idx, const Tensor& rest_idx,
                                                                int64_t num_merged) {
  check_cuda(h, "h");
  const DeviceGuard guard(h.get_device_index());
  check_tensor(h, "h", 3, h);
  check_tensor(vis_start, "vis_start", 1, h);
  check_tensor(keep_idx, "keep_idx", 2, h);
  check_tensor(rest_idx, "rest_idx", 2, h);
  swiftvlm::CompactArgs a{};
  a.dtype = float_dtype(h, "h");
  a.B = h.size(0);
  a.n = h.size(1);
  a.d = h.size(2);
  a.k = keep_idx.size(1);
  a.R = rest_idx.size(1);
  a.Z = num_merged;
  STD_TORCH_CHECK(vis_start.size(0) == a.B, "vis_start: expected shape [B]");
  STD_TORCH_CHECK(keep_idx.size(0) == a.B && rest_idx.size(0) == a.B, "keep_idx, rest_idx: expected batch size B");
  STD_TORCH_CHECK(a.k + a.R <= a.n, "keep_idx, rest_idx: expected k + R <= n");
  STD_TORCH_CHECK(a.Z >= 0 && a.Z <= a.R, "num_merged: expected 0 <= num_merged <= R");
  a.h = rows_view(h);
  a.vis_start = index_view(vis_start, "vis_start");
  a.keep = index_view(keep_idx, "keep_idx");
  a.rest = index_view(rest_idx, "rest_idx");
  const int64_t n_new = a.n - a.R + a.Z;
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
  check_launch(swiftvlm::compact(a, current_stream(h)), "compact_cuda");
  return {h_new, src, rest_h, merged_rows, inverse};
}

// Ragged (python_ref compact_ragged): keep_idx [B, K] and rest_idx [B, M] each sample's slots then -1,
// num_merged [B] the per-sample Z_b of padded width max_merged. h_new [B, n - M + K + max_merged, d],
// rest_h [B, M, d], merged_rows [B, max_merged]; the counts are read on the device.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> compact_ragged_cuda(const Tensor& h, const Tensor& vis_start,
                                                                       const Tensor& keep_idx, const Tensor& rest_idx,
                                                                       const Tensor& num_merged, int64_t max_merged) {
  check_cuda(h, "h");
  const DeviceGuard guard(h.get_device_index());
  check_tensor(h, "h", 3, h);
  check_tensor(vis_start, "vis_start", 1, h);
  check_tensor(keep_idx, "keep_idx", 2, h);
  check_tensor(rest_idx, "rest_idx", 2, h);
  swiftvlm::CompactArgs a{};
  a.dtype = float_dtype(h, "h");
  a.B = h.size(0);
  a.n = h.size(1);
  a.d = h.size(2);
  a.k = keep_idx.size(1);
  a.R = rest_idx.size(1);  // the block's width M
  a.Z = max_merged;
  STD_TORCH_CHECK(vis_start.size(0) == a.B, "vis_start: expected shape [B]");
  STD_TORCH_CHECK(keep_idx.size(0) == a.B && rest_idx.size(0) == a.B, "keep_idx, rest_idx: expected batch size B");
  STD_TORCH_CHECK(a.k <= a.R && a.R <= a.n, "keep_idx, rest_idx: expected K <= M <= n");
  STD_TORCH_CHECK(a.Z >= 0 && a.Z <= a.R, "max_merged: expected 0 <= max_merged <= M");
  a.h = rows_view(h);
  a.vis_start = index_view(vis_start, "vis_start");
  a.keep = index_view(keep_idx, "keep_idx");
  a.rest = index_view(rest_idx, "rest_idx");
  a.num_merged = counts_view(num_merged, "num_merged", a.B, h);
  const int64_t n_new = a.n - a.R + a.k + a.Z;
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
  check_launch(swiftvlm::compact(a, current_stream(h)), "compact_ragged_cuda");
  return {h_new, src, rest_h, merged_rows, inverse};
}

Tensor restore_cuda(const Tensor& h, const Tensor& inverse, const Tensor& vis_start, const Tensor& rest_idx,
                    const Tensor& h_rest, const Tensor& group, const Tensor& merged_rows, const Tensor& merged_then) {
  check_cuda(h, "h");
  const DeviceGuard guard(h.get_device_index());
  check_tensor(h, "h", 3, h);
  check_tensor(inverse, "inverse", 2, h);
  check_tensor(vis_start, "vis_start", 1, h);
  check_tensor(rest_idx, "rest_idx", 2, h);
  check_tensor(h_rest, "h_rest", 3, h);
  check_tensor(group, "group", 2, h);
  check_tensor(merged_rows, "merged_rows", 2, h);
  check_tensor(merged_then, "merged_then", 3, h);
  swiftvlm::RestoreArgs a{};
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
  check_launch(swiftvlm::restore(a, current_stream(h)), "restore_cuda");
  return out;
}

}  // namespace

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
}

STABLE_TORCH_LIBRARY_IMPL(swiftvlm, SWIFTVLM_DEVICE_KEY, m) {
  m.impl("tv_score_cuda", TORCH_BOX(&tv_score_cuda));
  m.impl("topk_select_cuda", TORCH_BOX(&topk_select_cuda));
  m.impl("score_select_cuda", TORCH_BOX(&score_select_cuda));
  m.impl("group_merge_cuda", TORCH_BOX(&group_merge_cuda));
  m.impl("tv_score_ragged_cuda", TORCH_BOX(&tv_score_ragged_cuda));
  m.impl("score_select_ragged_cuda", TORCH_BOX(&score_select_ragged_cuda));
  m.impl("topk_select_ragged_cuda", TORCH_BOX(&topk_select_ragged_cuda));
  m.impl("group_merge_ragged_cuda", TORCH_BOX(&group_merge_ragged_cuda));
  m.impl("bypass_align_cuda", TORCH_BOX(&bypass_align_cuda));
  m.impl("bypass_align_into_cuda", TORCH_BOX(&bypass_align_into_cuda));
  m.impl("compact_cuda", TORCH_BOX(&compact_cuda));
  m.impl("compact_ragged_cuda", TORCH_BOX(&compact_ragged_cuda));
  m.impl("restore_cuda", TORCH_BOX(&restore_cuda));
}
