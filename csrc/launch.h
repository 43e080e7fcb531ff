// Host helpers shared by the ops' launchers (the `<op>_cuda` functions of ops.h, each in its op's .cu):
// argument checks with the ops' error messages, views of torch tensors for the kernels' host API
// (swiftvlm.cuh), the device guard and the current stream. Host code over torch's stable ABI, included
// by every op's .cu.
#pragma once

#include "ops.h"  // first: it defines USE_CUDA before any torch header

#include <cstdint>
#include <initializer_list>
#include <optional>

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/shim_utils.h>

#include "swiftvlm.cuh"

namespace swiftvlm {

using torch::headeronly::ScalarType;

#ifdef SWIFTVLM_EMULATION
struct DeviceGuard {
  explicit DeviceGuard(int) {}
};
inline cudaStream_t current_stream(const Tensor&) { return nullptr; }
inline bool on_device(const Tensor& t) { return t.is_cpu(); }
#else
using DeviceGuard = torch::stable::accelerator::DeviceGuard;
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}
inline bool on_device(const Tensor& t) { return t.is_cuda(); }
#endif

inline void check_launch(cudaError_t err, const char* op) {
  const char* hint = err == cudaErrorInvalidConfiguration
                         ? " (the shapes need more blocks or shared memory than one launch has)"
                         : "";
  STD_TORCH_CHECK(err == cudaSuccess, "swiftvlm::", op, ": CUDA error: ", cudaGetErrorString(err), hint);
}

inline void check_cuda(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(on_device(t), name, ": expected a CUDA tensor");
}

// t is a CUDA tensor of `rank` dimensions on ref's device.
inline void check_tensor(const Tensor& t, const char* name, int64_t rank, const Tensor& ref) {
  check_cuda(t, name);
  STD_TORCH_CHECK(t.get_device_index() == ref.get_device_index(), name, ": expected the device of the other inputs");
  STD_TORCH_CHECK(t.dim() == rank, name, ": expected a ", rank, "-D tensor, got ", t.dim(), " dimensions");
}

// One tensor argument and the rank it must have, for check_tensors.
struct TensorRank {
  const Tensor& t;
  const char* name;
  int64_t rank;
};

// check_tensor of every argument, in order.
inline void check_tensors(const Tensor& ref, std::initializer_list<TensorRank> args) {
  for (const TensorRank& arg : args) check_tensor(arg.t, arg.name, arg.rank, ref);
}

// The op's first tensor checked to be a CUDA tensor, its device current while the guard lives.
inline DeviceGuard device_guard(const Tensor& t, const char* name) {
  check_cuda(t, name);
  return DeviceGuard(t.get_device_index());
}

inline DType float_dtype(const Tensor& t, const char* name) {
  const ScalarType s = t.scalar_type();
  STD_TORCH_CHECK(s == ScalarType::Float || s == ScalarType::Half || s == ScalarType::BFloat16, name,
                  ": expected dtype float32, float16 or bfloat16");
  if (s == ScalarType::Float) return DType::F32;
  return s == ScalarType::Half ? DType::F16 : DType::BF16;
}

inline void check_same_dtype(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  STD_TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected the dtype of ", ref_name);
}

inline IndexView index_view(const Tensor& t, const char* name) {
  const ScalarType s = t.scalar_type();
  STD_TORCH_CHECK(s == ScalarType::Long || s == ScalarType::Int, name, ": expected dtype int64 or int32");
  return {t.const_data_ptr(), s == ScalarType::Long, t.stride(0), t.dim() > 1 ? t.stride(1) : 0};
}

// The kernels read the last dimension with unit stride; other layouts get one contiguous copy.
inline Tensor unit_last_stride(const Tensor& t) {
  return t.stride(t.dim() - 1) == 1 ? t : torch::stable::contiguous(t);
}

inline RowsView rows_view(const Tensor& t) { return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

inline constexpr IndexView kNoIndex{nullptr, false, 0, 0};

// Per-sample counts of a ragged batch: an int tensor [B] (none: kNoIndex).
inline IndexView counts_view(const std::optional<Tensor>& counts, const char* name, int64_t B, const Tensor& ref) {
  if (!counts.has_value()) return kNoIndex;
  check_tensor(*counts, name, 1, ref);
  STD_TORCH_CHECK(counts->size(0) == B, name, ": expected shape [B] (one count per sample)");
  return index_view(*counts, name);
}

// key_mask bool [B, L] (True = valid), or none: ptr nullptr.
struct MaskView {
  const bool* ptr;
  int64_t sb, sl;
};

inline MaskView mask_view(const std::optional<Tensor>& key_mask, int64_t B, int64_t L, const Tensor& ref) {
  if (!key_mask.has_value()) return {nullptr, 0, 0};
  const Tensor& m = *key_mask;
  check_tensor(m, "key_mask", 2, ref);
  STD_TORCH_CHECK(m.scalar_type() == ScalarType::Bool, "key_mask: expected dtype bool (True = valid key)");
  STD_TORCH_CHECK(m.size(0) == B && m.size(1) == L, "key_mask: expected shape [B, L]");
  return {static_cast<const bool*>(m.const_data_ptr()), m.stride(0), m.stride(1)};
}

// ------------------------------------------------------------------------------------ scoring
// The inputs of tv_score and score_select (tv_score.cu, score_select.cu).
struct ScoreInputs {
  Tensor q, k;  // head dim with unit stride (copies when the caller's was not)
  ScoreArgs args;
};

// vis_len: the visual width (ragged: the padded width of the per-sample counts vis_count). Packed keys
// (cu_seqlens given): k is [total, Hkv, D] and max_seqlen bounds every sample's keys.
inline ScoreInputs score_inputs(const Tensor& q_in, const Tensor& k_in, const Tensor& vis_start, int64_t vis_len,
                                double scale, const std::optional<Tensor>& key_mask,
                                const std::optional<Tensor>& vis_count, const std::optional<Tensor>& cu_seqlens,
                                int64_t max_seqlen) {
  const bool packed = cu_seqlens.has_value();
  check_tensors(q_in, {{q_in, "q", 3}, {k_in, "k", packed ? 3 : 4}, {vis_start, "vis_start", 1}});
  const DType dtype = float_dtype(q_in, "q");
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
    STD_TORCH_CHECK(k_in.size(0) == B && k_in.size(3) == D,
                    "k: expected shape [B, Hkv, L, D] for q of shape [B, H, D]");
  }
  STD_TORCH_CHECK(H >= 1 && Hkv >= 1 && H % Hkv == 0, "k: expected Hkv >= 1 KV heads dividing the H >= 1 query heads");
  STD_TORCH_CHECK(vis_start.size(0) == B, "vis_start: expected shape [B]");
  STD_TORCH_CHECK(vis_len >= 0 && (packed || vis_len <= L), "vis_len: expected 0 <= vis_len <= L");

  ScoreInputs in{unit_last_stride(q_in), unit_last_stride(k_in), {}};
  ScoreArgs& a = in.args;
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
  const MaskView mask = mask_view(key_mask, B, L, q_in);
  a.key_mask = mask.ptr;
  a.mask_sb = mask.sb;
  a.mask_sl = mask.sl;
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
inline Tensor score_workspace(const Tensor& q, const ScoreArgs& a, const std::optional<Tensor>& given) {
  const auto floats = static_cast<int64_t>(score_workspace_floats(a.B, a.H, a.Hkv, a.L, a.D, a.vis_len));
  if (!given.has_value()) return torch::stable::new_empty(q, {floats}, ScalarType::Float);
  const Tensor& w = *given;
  check_tensor(w, "workspace", 1, q);
  STD_TORCH_CHECK(w.scalar_type() == ScalarType::Float && w.is_contiguous() && w.numel() >= floats,
                  "workspace: expected a contiguous float32 tensor of at least ", floats, " elements");
  return w;
}

}  // namespace swiftvlm
