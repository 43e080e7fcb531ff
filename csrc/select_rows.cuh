// Top-k of one row split into keep / rest indices, both in position order (docs/semantics.md, topk_select), as a
// __device__ function that one CTA runs for its row: the plain topk_select kernel calls it for an
// input row (topk_select.cu), and score_select's merge kernel calls it in the last CTA of each row on
// the scores the row's CTAs have just written (score_select.cu).
//
// The select, for N scores and k kept (THREADS threads, fp32 order keys, NaN lowest):
//   sweep 1   every score is loaded (kLoadBatch per thread in flight), turned into its order key,
//             kept in shared memory when the keys fit (KEYS_IN_SMEM), and counted in a histogram of
//             its top kDigit1Bits bits; a block scan finds the bin holding the k-th largest key.
//   sweep 2   the keys of that bin are gathered into a candidate list (order irrelevant: only
//             their counts are used next).
//   digits 2, 3  two histograms of kDigitBits bits each over the candidates (or over every key with
//             the prefix test, when the list overflowed) give the k-th largest key exactly
//             (`threshold`) and how many keys equal to it are kept (`need`, ties: lower index).
//   compaction  each thread owns kSelectItems consecutive positions; one block scan of the packed
//             (greater, equal) counts gives every position its slot in keep or in rest.
// k == 0 and k == N skip all of it. Reads N scores, writes N indices; everything else stays on chip.
#pragma once

#include "common.cuh"

namespace swiftvlm {

constexpr int kDigit1Bits = 12;
constexpr int kDigit1Bins = 1 << kDigit1Bits;
constexpr int kDigitBits = 10;  // digits 2 and 3: 12 + 10 + 10 = 32 bits
constexpr int kDigitBins = 1 << kDigitBits;
constexpr int kLoadBatch = 16;    // scores per thread loaded together in sweep 1
constexpr int kSelectItems = 16;  // consecutive positions per thread in the compaction (keys in smem)
constexpr int kMaxSelectThreads = 1024;
static_assert(kDigitBins % kMaxSelectThreads == 0 && kDigit1Bins % kMaxSelectThreads == 0,
              "every thread owns the same number of bins in the bin search");

// Calls fn(std::integral_constant<int, THREADS>{}) with the threads of a select CTA for rows of N
// scores: few warps for short rows, whose select is mostly per-warp work (scans, bin searches), up
// to 1024 for long ones (16 scores per thread up to 16384).
template <typename Fn>
cudaError_t dispatch_select_threads(int64_t N, Fn&& fn) {
  if (N <= 1024) return fn(std::integral_constant<int, 128>{});
  if (N <= 4096) return fn(std::integral_constant<int, 256>{});
  return fn(std::integral_constant<int, kMaxSelectThreads>{});
}
// Order-preserving 32-bit key of an fp32 score: NaN lowest (0, below -inf), -0.0 == +0.0.
__device__ __forceinline__ uint32_t order_key(float s) {
  const uint32_t u = __float_as_uint(s + 0.0f);  // -0.0 + 0.0 = +0.0
  const uint32_t key = u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
  return isnan(s) ? 0u : key;
}

// The select's static shared memory (the kernel that runs select_row declares it).
struct SelectShared {
  int hist[kDigit1Bins];
  int scan[kScanScratch];
  unsigned long long scan_pair[kScanScratch];
  int chosen_bin;
  int chosen_remaining;
};

// Adds one key to hist[bin] (bin < 0: nothing). Lanes with the same bin add once, by the lowest of
// them (no peer in lanes_below = (1 << lane) - 1): scores cluster in few bins, and one shared counter
// hit by every lane would serialise. Every lane of the warp calls it.
__device__ __forceinline__ void histogram_add(int* hist, int bin, unsigned lanes_below) {
  const unsigned peers = __match_any_sync(kFullMask, bin);
  if (bin >= 0 && (peers & lanes_below) == 0u) atomicAdd(&hist[bin], __popc(peers));
}

// The bin holding the remaining-th largest key (bins ordered high to low) and its rank inside the
// bin, into sh.chosen_bin / sh.chosen_remaining. Every thread calls it; 1 <= remaining <= total.
template <int THREADS>
__device__ __forceinline__ void find_bin(const int* hist, int nbins, int remaining, SelectShared& sh) {
  const int per_thread = nbins / THREADS;
  const int top = nbins - 1 - threadIdx.x * per_thread;  // this thread's bins: top, top - 1, ...
  int count = 0;
  for (int u = 0; u < per_thread; ++u) count += hist[top - u];
  int total = 0;
  const int above = block_exclusive_scan(count, &total, sh.scan);  // keys in higher bins
  if (above < remaining && remaining <= above + count) {
    int acc = above;
    for (int u = 0; u < per_thread; ++u) {
      const int c = hist[top - u];
      if (remaining <= acc + c) {
        sh.chosen_bin = top - u;
        sh.chosen_remaining = remaining - acc;
        break;
      }
      acc += c;
    }
  }
  __syncthreads();
}

// (keys greater than threshold) << 32 | (keys equal to it) among the first `inside` of key[]
// (FULL: all of them, no bounds test).
template <int ITEMS, bool FULL>
__device__ __forceinline__ unsigned long long count_greater_equal(const uint32_t (&key)[ITEMS], int inside,
                                                                  uint32_t threshold) {
  unsigned greater = 0, equal = 0;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    if (FULL || it < inside) {
      greater += key[it] > threshold ? 1u : 0u;
      equal += key[it] == threshold ? 1u : 0u;
    }
  }
  return static_cast<unsigned long long>(greater) << 32 | equal;
}

// Writes positions first.. (their keys in key[]) to keep or rest: greater keys and the first `need`
// equal ones (equal_rank: equal keys at earlier positions) are kept; slot: kept positions before
// `first`.
template <int ITEMS, bool FULL>
__device__ __forceinline__ void write_positions(const uint32_t (&key)[ITEMS], int inside, int first, uint32_t threshold,
                                                int need, int equal_rank, int slot, int64_t* __restrict__ keep,
                                                int64_t* __restrict__ rest) {
  int64_t* to_keep = keep + slot;
  int64_t* to_rest = rest + (first - slot);  // first - (kept positions before first) = rest positions before it
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    if (FULL || it < inside) {
      const bool equal = key[it] == threshold;
      const bool take = key[it] > threshold || (equal && equal_rank < need);  // ties: lower index first
      equal_rank += equal ? 1 : 0;
      *(take ? to_keep : to_rest) = first + it;
      to_keep += take ? 1 : 0;
      to_rest += take ? 0 : 1;
    }
  }
}

// A row of N scores of element type T at p[i * sn]. VOLATILE: read past the caches other CTAs of the
// launch may have filled (score_select's last CTA reads the scores the others have just written).
template <typename T, bool VOLATILE = false>
struct StridedRow {
  const T* p;
  int64_t sn;

  __device__ static float load(const T* q) {
    if constexpr (VOLATILE) {
      static_assert(sizeof(T) == sizeof(float), "volatile rows are fp32 scores");
      return *reinterpret_cast<const volatile float*>(q);
    } else {
      return to_float(*q);
    }
  }
  __device__ float score(int i) const { return load(p + i * sn); }
};

// Selects k of row's N scores into keep[0, k) and rest[0, N - k). keys: N order keys of shared
// memory when KEYS_IN_SMEM (16-byte aligned); cand: cand_cap keys of shared memory for the
// candidate list. Every thread of the CTA calls it.
template <int THREADS, bool KEYS_IN_SMEM, typename Row>
__device__ void select_row(const Row& row, int N, int k, int64_t* __restrict__ keep, int64_t* __restrict__ rest,
                           uint32_t* keys, uint32_t* cand, int cand_cap, SelectShared& sh) {
  const int tid = threadIdx.x;
  const unsigned lanes_below = (1u << (tid % kWarp)) - 1u;
  if (k == 0 || k == N) {  // nothing to rank: every position goes to one side, in order
    int64_t* out = k == 0 ? rest : keep;
    for (int i = tid; i < N; i += THREADS) out[i] = i;
    return;
  }
  auto key_at = [&](int i) -> uint32_t {
    if constexpr (KEYS_IN_SMEM) {
      return keys[i];
    } else {
      return order_key(row.score(i));
    }
  };
  // Sweeps 2 and the compaction: a thread owns kItems consecutive positions from `first`; returns
  // how many of them are inside the row.
  constexpr int kItems = KEYS_IN_SMEM ? kSelectItems : kSelectItems / 2;  // (global loads need more registers)
  auto load_keys = [&](int first, uint32_t (&key)[kItems]) -> int {
    const int inside = N - first < 0 ? 0 : (N - first < kItems ? N - first : kItems);
    if (KEYS_IN_SMEM && inside == kItems) {
#pragma unroll
      for (int v = 0; v < kItems / 4; ++v) {
        const uint4 four = reinterpret_cast<const uint4*>(keys + first)[v];
        key[4 * v] = four.x;
        key[4 * v + 1] = four.y;
        key[4 * v + 2] = four.z;
        key[4 * v + 3] = four.w;
      }
    } else {
#pragma unroll
      for (int it = 0; it < kItems; ++it) key[it] = it < inside ? key_at(first + it) : 0u;
    }
    return inside;
  };

  for (int b = tid; b < kDigit1Bins; b += THREADS) sh.hist[b] = 0;
  __syncthreads();
  // Sweep 1: order keys and the histogram of their top digit; kLoadBatch loads in flight per thread.
  const int64_t step = static_cast<int64_t>(THREADS) * row.sn;
  for (int base = 0; base < N; base += THREADS * kLoadBatch) {
    const int mine = static_cast<int>(ceil_div(N - base - tid, THREADS));  // this thread's scores here
    const int batch = N - base < THREADS * kLoadBatch ? static_cast<int>(ceil_div(N - base, THREADS))
                                                      : kLoadBatch;  // warp-uniform
    const auto* p = row.p + (base + tid) * row.sn;
    float s[kLoadBatch];
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u, p += step) s[u] = u < mine ? Row::load(p) : 0.0f;
    __syncwarp();  // keeps the compiler from sinking each load to its use: all of them stay in flight
#pragma unroll
    for (int u = 0; u < kLoadBatch; ++u) {
      if (u < batch) {
        const uint32_t key = order_key(s[u]);
        if (KEYS_IN_SMEM && u < mine) keys[base + u * THREADS + tid] = key;
        histogram_add(sh.hist, u < mine ? static_cast<int>(key >> (32 - kDigit1Bits)) : -1, lanes_below);
      }
    }
  }
  __syncthreads();
  find_bin<THREADS>(sh.hist, kDigit1Bins, k, sh);
  const uint32_t bin1 = static_cast<uint32_t>(sh.chosen_bin);
  int remaining = sh.chosen_remaining;  // rank of the wanted key among the keys of bin1

  // Sweep 2: the keys of bin1 into the candidate list, in position order (a block scan of the
  // per-thread counts places them).
  int n_cand = 0;
  for (int base = 0; base < N; base += THREADS * kItems) {
    const int first = base + tid * kItems;
    uint32_t key[kItems] = {};
    unsigned match = 0;  // bit it: key[it] is in bin1
    if (first < N) {     // (threads past the row only join the scan)
      const int inside = load_keys(first, key);
#pragma unroll
      for (int it = 0; it < kItems; ++it) {
        match |= (it < inside && (key[it] >> (32 - kDigit1Bits)) == bin1) ? 1u << it : 0u;
      }
    }
    int total = 0;
    int slot = n_cand + block_exclusive_scan(__popc(match), &total, sh.scan);
    n_cand += total;
    if (match != 0u) {
#pragma unroll
      for (int it = 0; it < kItems; ++it) {
        if ((match >> it & 1u) && slot < cand_cap) cand[slot] = key[it];
        slot += match >> it & 1u;
      }
    }
  }
  __syncthreads();
  const bool from_cand = n_cand <= cand_cap;  // else digits 2 and 3 sweep every key again
  const int len = from_cand ? n_cand : N;

  // Digits 2 and 3: histograms of the keys that share the prefix found so far.
  uint32_t prefix = bin1 << (32 - kDigit1Bits);
  for (int shift = 32 - kDigit1Bits - kDigitBits; shift >= 0; shift -= kDigitBits) {
    for (int b = tid; b < kDigitBins; b += THREADS) sh.hist[b] = 0;
    __syncthreads();
    const uint32_t prefix_mask = ~((2u << (shift + kDigitBits - 1)) - 1u);  // the bits above this digit
    for (int base = 0; base < len; base += THREADS) {
      const int i = base + tid;
      int bin = -1;
      if (i < len) {
        const uint32_t key = from_cand ? cand[i] : key_at(i);
        if ((key & prefix_mask) == prefix) bin = static_cast<int>((key >> shift) & (kDigitBins - 1));
      }
      histogram_add(sh.hist, bin, lanes_below);
    }
    __syncthreads();
    find_bin<THREADS>(sh.hist, kDigitBins, remaining, sh);
    prefix |= static_cast<uint32_t>(sh.chosen_bin) << shift;
    remaining = sh.chosen_remaining;
  }
  const uint32_t threshold = prefix;  // the k-th largest key
  const int need = remaining;         // keys equal to it that are kept (>= 1)

  // Compaction in position order: the kept positions before a thread's first position are the
  // greater keys before it plus min(equal keys before it, need).
  int greater_before = 0;  // over the earlier chunks
  int equal_before = 0;
  for (int base = 0; base < N; base += THREADS * kItems) {
    const int first = base + tid * kItems;
    uint32_t key[kItems] = {};
    int inside = 0;
    unsigned long long counts = 0;
    if (first < N) {  // (threads past the row only join the scan)
      inside = load_keys(first, key);
      counts = inside == kItems ? count_greater_equal<kItems, true>(key, inside, threshold)
                                : count_greater_equal<kItems, false>(key, inside, threshold);
    }
    // One scan of (greater << 32 | equal): each half stays below 2^31, so no carry crosses.
    unsigned long long total = 0;
    const unsigned long long before = block_exclusive_scan(counts, &total, sh.scan_pair);
    const int equal_rank = equal_before + static_cast<int>(before & 0xffffffffu);
    const int slot = greater_before + static_cast<int>(before >> 32) + (equal_rank < need ? equal_rank : need);
    greater_before += static_cast<int>(total >> 32);
    equal_before += static_cast<int>(total & 0xffffffffu);
    if (inside == kItems) {
      write_positions<kItems, true>(key, inside, first, threshold, need, equal_rank, slot, keep, rest);
    } else if (inside > 0) {
      write_positions<kItems, false>(key, inside, first, threshold, need, equal_rank, slot, keep, rest);
    }
  }
}

// A ragged row's padding: -1 after its own indices, keep[k, K) and rest[r, rest_width). Every thread
// of the CTA calls it (disjoint from what select_row writes: no barrier needed between them).
template <int THREADS>
__device__ __forceinline__ void pad_indices(int64_t* __restrict__ keep, int k, int K, int64_t* __restrict__ rest,
                                            int r, int rest_width) {
  for (int i = k + static_cast<int>(threadIdx.x); i < K; i += THREADS) keep[i] = -1;
  for (int i = r + static_cast<int>(threadIdx.x); i < rest_width; i += THREADS) rest[i] = -1;
}

// Where a select CTA keeps its keys and candidates: N keys in shared memory and a candidate list as
// long as the row when `limit` bytes (beside the caller's `extra`) allow; else as many candidates as
// fit, and the keys re-read from the row when even they do not fit beside a 1024-entry list.
struct SelectPlan {
  bool keys_in_smem;
  int cand_cap;
  size_t smem;  // keys + candidates (keys first: 16-byte aligned)
};

inline SelectPlan plan_select(int64_t N, size_t extra, size_t limit) {
  constexpr size_t kMinCand = 1024;
  const size_t keys = static_cast<size_t>(ceil_div(N, 4) * 4) * sizeof(uint32_t);
  const size_t room = limit > extra ? limit - extra : 0;
  SelectPlan p{keys + kMinCand * sizeof(uint32_t) <= room, 0, 0};
  const size_t left = (room - (p.keys_in_smem ? keys : 0)) / sizeof(uint32_t);
  p.cand_cap = static_cast<int>(left < static_cast<size_t>(N) ? left : static_cast<size_t>(N));
  p.smem = (p.keys_in_smem ? keys : 0) + static_cast<size_t>(p.cand_cap) * sizeof(uint32_t);
  return p;
}

}  // namespace swiftvlm
