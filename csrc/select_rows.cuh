// Block-per-row top-k split into keep / rest indices, both in position order (SPEC topk_select).
// The scores come from a Source, so the same select serves plain score rows (topk_select) and
// scores merged on the fly from split-K partials (score_select).
//
// A Source has `prepare(row, smem)`, which every thread calls once first: it may fill `smem` (its
// share of the dynamic shared memory, then __syncthreads()) and returns the row's view with
//   score(i)       the fp32 score of position i
//   store(i, s)    keeps the score where stored() reads it back (no-op for an input row)
//   stored(i)      the score of position i after the first pass (global memory)
#pragma once

#include "common.cuh"

namespace swiftvlm {

constexpr int kSelectThreads = 512;
constexpr int kSelectItems = 4;  // consecutive positions per thread in the compaction pass
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
static_assert(kSelectThreads >= kRadixBins, "one thread per radix bin in the bin search");
// Above every order_key (NaN maps to 0, +inf to 0xff800000): the threshold when k == 0.
constexpr uint32_t kAboveAllKeys = 0xffffffffu;

// Order-preserving 32-bit key of an fp32 score: NaN lowest (below -inf), -0.0 == +0.0.
__device__ __forceinline__ uint32_t order_key(float s) {
  if (isnan(s)) return 0u;
  const uint32_t u = __float_as_uint(s == 0.0f ? 0.0f : s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Keys live in dynamic shared memory when they fit (KEYS_IN_SMEM), else they are re-read from the
// Source's stored scores (global memory / L2) in every pass.
template <bool KEYS_IN_SMEM, typename Source>
__global__ void __launch_bounds__(kSelectThreads)
    select_rows_kernel(Source src, int N, int k, int64_t* __restrict__ keep, int64_t* __restrict__ rest) {
  SWIFTVLM_DYNAMIC_SMEM(dyn_smem);
  __shared__ int hist[kRadixBins];
  __shared__ int scan_scratch[kScanScratch];
  __shared__ uint32_t chosen_bin;
  __shared__ int chosen_remaining;

  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  uint32_t* keys = reinterpret_cast<uint32_t*>(dyn_smem);
  const size_t key_bytes = KEYS_IN_SMEM ? static_cast<size_t>(N) * sizeof(uint32_t) : 0;
  const auto scores = src.prepare(row, reinterpret_cast<float*>(dyn_smem + key_bytes));

  for (int i = tid; i < N; i += kSelectThreads) {
    const float s = scores.score(i);
    scores.store(i, s);
    if constexpr (KEYS_IN_SMEM) keys[i] = order_key(s);
  }
  __syncthreads();
  auto key_at = [&](int i) -> uint32_t {
    if constexpr (KEYS_IN_SMEM) {
      return keys[i];
    } else {
      return order_key(scores.stored(i));
    }
  };

  // Radix select, most significant byte first: after the passes, `threshold` is the k-th largest
  // key and `need` (>= 1) how many keys equal to it are kept.
  uint32_t threshold = kAboveAllKeys;
  int need = 0;
  if (k > 0) {
    uint32_t prefix = 0;
    uint32_t prefix_mask = 0;
    int remaining = k;  // rank of the wanted key among the keys that match the prefix
    for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
      for (int b = tid; b < kRadixBins; b += kSelectThreads) hist[b] = 0;
      __syncthreads();
      for (int base = 0; base < N; base += kSelectThreads) {
        const int i = base + tid;
        int bin = -1;
        if (i < N) {
          const uint32_t key = key_at(i);
          if ((key & prefix_mask) == prefix) bin = static_cast<int>((key >> shift) & (kRadixBins - 1));
        }
        // Lanes with the same bin add once: scores cluster in few top bins, and one shared
        // counter hit by every lane would serialise.
        const unsigned peers = __match_any_sync(kFullMask, bin);
        if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
      }
      __syncthreads();
      // Thread t reads bin 255 - t, so the exclusive scan counts the keys in higher bins.
      const int bin = kRadixBins - 1 - tid;
      const int count = tid < kRadixBins ? hist[bin] : 0;
      int matching = 0;
      const int above = block_exclusive_scan(count, &matching, scan_scratch);
      if (tid < kRadixBins && above < remaining && remaining <= above + count) {
        chosen_bin = static_cast<uint32_t>(bin);
        chosen_remaining = remaining - above;
      }
      __syncthreads();
      prefix |= chosen_bin << shift;
      prefix_mask |= static_cast<uint32_t>(kRadixBins - 1) << shift;
      remaining = chosen_remaining;
    }
    threshold = prefix;
    need = remaining;
  }

  // Compaction in position order: a thread owns kSelectItems consecutive positions; block-wide
  // prefix sums give each kept position its slot in keep[row] and each other one its slot in rest.
  int64_t* keep_row = keep + static_cast<int64_t>(row) * k;
  int64_t* rest_row = rest + static_cast<int64_t>(row) * (N - k);
  int equal_before = 0;  // keys equal to the threshold at earlier positions (earlier chunks)
  int kept_before = 0;
  for (int base = 0; base < N; base += kSelectThreads * kSelectItems) {
    const int first = base + tid * kSelectItems;
    uint32_t key[kSelectItems];
    int n_equal = 0;
#pragma unroll
    for (int it = 0; it < kSelectItems; ++it) {
      const int i = first + it;
      key[it] = i < N ? key_at(i) : 0u;
      n_equal += (i < N && key[it] == threshold) ? 1 : 0;
    }
    int chunk_total = 0;
    int equal_rank = equal_before + block_exclusive_scan(n_equal, &chunk_total, scan_scratch);
    equal_before += chunk_total;

    bool take[kSelectItems];
    int n_take = 0;
#pragma unroll
    for (int it = 0; it < kSelectItems; ++it) {
      const int i = first + it;
      bool t = false;
      if (i < N) {
        if (key[it] > threshold) {
          t = true;
        } else if (key[it] == threshold) {
          t = equal_rank < need;  // ties at the threshold: lower index first
          ++equal_rank;
        }
      }
      take[it] = t;
      n_take += t ? 1 : 0;
    }
    int slot = kept_before + block_exclusive_scan(n_take, &chunk_total, scan_scratch);
    kept_before += chunk_total;
#pragma unroll
    for (int it = 0; it < kSelectItems; ++it) {
      const int i = first + it;
      if (i >= N) break;
      if (take[it]) {
        keep_row[slot++] = i;
      } else {
        rest_row[i - slot] = i;  // i - (kept positions before i) = rest positions before i
      }
    }
  }
}

// Host side: launches select_rows_kernel for `rows` rows of N scores, keeping the keys in shared
// memory when `extra_smem` (the Source's share) plus N keys fit the device's opt-in limit.
template <typename Source>
cudaError_t launch_select_rows(const Source& src, size_t extra_smem, int64_t rows, int64_t N, int64_t k,
                               int64_t* keep, int64_t* rest, cudaStream_t stream) {
  if (N > INT32_MAX || rows > INT32_MAX || k < 0 || k > N) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  auto* in_smem = select_rows_kernel<true, Source>;
  auto* streamed = select_rows_kernel<false, Source>;
  size_t limit = 0;
  cudaError_t err = max_dynamic_smem(in_smem, &limit);
  if (err != cudaSuccess) return err;
  const size_t with_keys = extra_smem + static_cast<size_t>(N) * sizeof(uint32_t);
  auto* kernel = with_keys <= limit ? in_smem : streamed;
  const size_t smem = with_keys <= limit ? with_keys : extra_smem;
  err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  SWIFTVLM_LAUNCH(kernel, static_cast<unsigned>(rows), kSelectThreads, smem, stream, src, static_cast<int>(N),
                  static_cast<int>(k), keep, rest);
  return cudaGetLastError();
}

}  // namespace swiftvlm
