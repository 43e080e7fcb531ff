// Host API of the SwiftVLM CUDA kernels: raw pointers, sizes, strides (in elements) and a stream.
// Plain C++ over the CUDA runtime types, without device code or torch: each op's launcher
// (csrc/<op>.cu) calls it with its checked tensors' pointers and strides. Every function launches
// asynchronously on `stream`, never synchronises, and returns cudaGetLastError() after its launches.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace swiftvlm {

// Element type of the floating-point tensors; all math is fp32.
enum class DType { F32, F16, BF16 };

// Integer ids of dtype int32 or int64, element [b, r] at ptr + b * sb + r * sr.
struct IndexView {
  const void* ptr;
  bool is_int64;
  int64_t sb, sr;
};

// Inputs of the last-token visual score (docs/semantics.md, tv_score).
// Ragged batches: vis_count.ptr != nullptr gives each sample's visual count (clamped to [0, vis_len],
// vis_len being the padded width; scores 0 past it). Packed keys (varlen): seq_start.ptr != nullptr
// is cu_seqlens [B + 1]: sample b's keys are rows seq_start[b] .. seq_start[b + 1] - 1 of k [k_rows,
// Hkv, D] (k_sb = 0, k_sl the row stride), at most L of them (L: max_seqlen, or k_rows).
struct ScoreArgs {
  DType dtype;                         // of q and k
  const void* q;                       // [B, H, D], D contiguous
  int64_t q_sb, q_sh;
  const void* k;                       // [B, Hkv, L, D], D contiguous (packed: [k_rows, Hkv, D])
  int64_t k_sb, k_sh, k_sl;
  IndexView vis_start;                 // [B] (sr unused)
  const bool* key_mask;                // [B, L], true = valid key; nullptr = all valid
  int64_t mask_sb, mask_sl;
  int64_t B, H, Hkv, L, D, vis_len;
  float scale;
  IndexView vis_count;                 // [B] per-sample visual counts (ptr nullptr: vis_len each)
  IndexView seq_start;                 // [B + 1] cu_seqlens of packed keys (ptr nullptr: padded k)
  int64_t k_rows;                      // packed: rows of k
};

// 4-byte scratch that tv_score and score_select need: B * H * (2 * tiles + vis_len) + B floats,
// tiles = ceil(L / key tile) (64 to 512 keys, chosen from the shapes). Its content on entry does not
// matter: the counters in it are reset by the first launch of the op (CUDA-graph replays reuse it).
size_t score_workspace_floats(int64_t B, int64_t H, int64_t Hkv, int64_t L, int64_t D, int64_t vis_len);

// scores: fp32 [B, vis_len] contiguous. Two launches: split-K partial softmax, then merge.
cudaError_t tv_score(const ScoreArgs& a, float* workspace, float* scores, cudaStream_t stream);

// topk_select(tv_score(a), keep), two launches: split-K partial softmax, then the merge, whose last
// CTA per row runs the select. scores fp32 [B, vis_len], keep_idx int64 [B, keep], rest_idx int64
// [B, vis_len - keep], contiguous. Ragged (keep_count.ptr != nullptr, per-sample kept counts, keep
// their padded width; a.vis_count per-sample visual counts): rest_idx is [B, vis_len], each row's
// indices ascending then -1.
cudaError_t score_select(const ScoreArgs& a, int64_t keep, IndexView keep_count, float* workspace, float* scores,
                         int64_t* keep_idx, int64_t* rest_idx, cudaStream_t stream);

// Inputs of attention_importance (docs/semantics.md): q [B, H, L, E] and k [B, Hk, L, E] with any
// strides (in elements; read in place), H % Hk == 0. width: the outputs' width (ragged: the padded
// width of the per-sample visual counts vis_count, each clamped to [0, width]; ptr nullptr: width each).
struct ImportanceArgs {
  DType dtype;                         // of q and k
  const void* q;
  int64_t q_sb, q_sh, q_sl, q_se;
  const void* k;
  int64_t k_sb, k_sh, k_sl, k_se;
  IndexView vis_start;                 // [B] (sr unused)
  IndexView vis_count;                 // [B] per-sample visual counts (ptr nullptr: width each)
  const bool* key_mask;                // [B, L], true = a valid row (key and query row); nullptr = all valid
  int64_t mask_sb, mask_sl;
  int64_t B, H, Hk, L, E, width;
  float scale;
};

// 4-byte scratch of attention_importance: each row's softmax max and 1 / sum [B, H, L] each, per-block
// flags and the per-head-group partial sums [B, parts, 2, width] (parts = Hk x ceil(G / 16)); no
// initial value needed.
size_t importance_workspace_floats(int64_t B, int64_t H, int64_t Hk, int64_t L, int64_t width);

// t2v, v2v: fp32 [B, width] contiguous. Three launches: row log-sum-exp, visual column sums, means.
cudaError_t attention_importance(const ImportanceArgs& a, float* workspace, float* t2v, float* v2v,
                                 cudaStream_t stream);

// scores [B, N] of dtype with any strides; keep int64 [B, k], rest int64 [B, N - k], contiguous.
// Ragged (k_count.ptr or lengths.ptr != nullptr): row b selects k_count[b] (else k) of its first
// lengths[b] (else N) scores; keep is [B, k] (k the padded width), rest [B, N], each row's indices
// ascending then -1.
cudaError_t topk_select(DType dtype, const void* scores, int64_t s_sb, int64_t s_sn, int64_t B,
                        int64_t N, int64_t k, IndexView k_count, IndexView lengths, int64_t* keep, int64_t* rest,
                        cudaStream_t stream);

// h [B, R, d] (any strides, in elements) -> merged [B, Z, d] contiguous of h's dtype, group int64
// [B, R], counts int32 [B, Z]. Three launches: assign (token x target tiles), sort (member lists per
// segment of tokens), per-(b, z, d-tile) mean. `workspace` holds group_merge_workspace_bytes(B, R, Z)
// bytes of scratch (no initial value needed).
size_t group_merge_workspace_bytes(int64_t B, int64_t R, int64_t Z);
cudaError_t group_merge(DType dtype, const void* h, int64_t h_sb, int64_t h_sr, int64_t h_sd, int64_t B,
                        int64_t R, int64_t d, int64_t Z, void* workspace, void* merged, int64_t* group,
                        int32_t* counts, cudaStream_t stream);

// Ragged (group_merge_ragged.cu): sample b groups its first lengths[b] rows (ptr nullptr: R) into
// num_groups[b] groups (ptr nullptr: Zw each); merged [B, Zw, d] and counts [B, Zw] are 0 past them,
// group [B, R] is -1 past the sample's rows. Two launches; the counts are read on the device.
cudaError_t group_merge_ragged(DType dtype, const void* h, int64_t h_sb, int64_t h_sr, int64_t B, int64_t R,
                               int64_t d, int64_t Zw, IndexView num_groups, IndexView lengths, void* merged,
                               int64_t* group, int32_t* counts, cudaStream_t stream);

// A [batch, row, column] view with strides in elements.
struct RowsView {
  const void* ptr;
  int64_t sb, sr, sd;
};

// out[b, row(b, i), :] = h_rest[b, i, :] + merged_now[b, g, :] - merged_then[b, g, :],
// g = group[b, i] clamped to [0, Z) as the reference does. rows.ptr == nullptr: row(b, i) = i;
// else row(b, i) = rows[b, i], and rows outside [0, M) are skipped. One launch.
struct BypassArgs {
  DType dtype;
  RowsView h_rest, merged_now, merged_then;
  IndexView group;
  void* out;
  int64_t out_sb, out_sr, out_sd;
  IndexView rows;                      // ptr == nullptr: out row i
  int64_t B, R, d, Z, M;
};
cudaError_t bypass_align(const BypassArgs& a, cudaStream_t stream);

// compact (python_ref/compact.py): h [B, n, d] whose visual block of M = k + R rows starts at
// vis_start[b]; keep [B, k] / rest [B, R] ascending block slots partitioning 0..M-1; Z merged rows.
// Outputs (contiguous): h_new [B, n - R + Z, d] of h's dtype, src int64 [B, n - R + Z],
// rest_h [B, R, d], merged_rows int64 [B, Z], inverse int64 [B, n]. One launch.
// Ragged (num_merged.ptr != nullptr; python_ref compact_ragged): keep [B, k = K] and rest [B, R = M]
// hold each sample's slots then -1 (M the block's width), num_merged [B] the per-sample Z_b, Z = Zw
// their padded width; h_new is [B, n - M + K + Zw, d], rest_h [B, M, d], merged_rows [B, Zw].
struct CompactArgs {
  DType dtype;
  RowsView h;
  IndexView vis_start, keep, rest;   // vis_start: sr unused
  void* h_new;
  int64_t* src;
  void* rest_h;
  int64_t* merged_rows;
  int64_t* inverse;
  int64_t B, n, d, k, R, Z;
  IndexView num_merged;              // [B] ragged per-sample merged counts (ptr nullptr: Z each, not ragged)
};
cudaError_t compact(const CompactArgs& a, cudaStream_t stream);

// restore (python_ref/restore.py): out [B, n, d] contiguous of h's dtype from h [B, n_cur, d]:
// out[b, r] = h[inverse[b, r]] (flattened rows) where inverse >= 0, 0 where inverse < -1 (a ragged
// block's padding rows, -2); rest token i of sample b at row vis_start[b] + rest[b, i]: h_rest +
// h[merged_rows[b, g]] - merged_then[b, g], g = group[b, i] clamped to [0, Z), fp32 math; with Z = 0
// (nothing merged) h_rest copied unchanged, group not read. Entries with rest or group -1 (ragged
// padding) are skipped. Ids out of range are clamped or skipped, never read or written out of bounds.
// One launch.
struct RestoreArgs {
  DType dtype;
  RowsView h, h_rest, merged_then;
  IndexView inverse, vis_start, rest, group, merged_rows;
  void* out;
  int64_t B, n, n_cur, d, R, Z;
};
cudaError_t restore(const RestoreArgs& a, cudaStream_t stream);

}  // namespace swiftvlm
