// Device and host helpers shared by the SwiftVLM kernels (compiled by nvcc only).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "swiftvlm.cuh"

// The two seams of the CPU emulation (tests/cuda_emu), which defines them its own way: a kernel's
// dynamic shared memory, and a launch (the kernel as a variable: a template's commas would split
// the macro's arguments).
#ifndef SWIFTVLM_LAUNCH
#define SWIFTVLM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define SWIFTVLM_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace swiftvlm {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- element conversion (fp32 math)
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Elements per 16-byte vector access.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// Loads W consecutive elements as fp32: one 16-byte load when W fills 16 bytes (caller guarantees
// alignment), else one scalar load.
template <typename T, int W>
__device__ __forceinline__ void load_chunk(const T* p, float (&out)[W]) {
  static_assert(W == 1 || W == kVec<T>, "a chunk is one element or one 16-byte vector");
  if constexpr (W == 1) {
    out[0] = to_float(*p);
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T elems[W];
    memcpy(elems, &raw, sizeof(raw));
#pragma unroll
    for (int w = 0; w < W; ++w) out[w] = to_float(elems[w]);
  }
}

// A chunk as loaded, before conversion: one 16-byte vector (W == kVec<T>) or one element, so that
// several loads can be in flight before any of them is used.
template <typename T, int W>
struct RawChunk {
  static_assert(W == 1 || W == kVec<T>, "a chunk is one element or one 16-byte vector");
  using Bits = typename std::conditional<W == 1, T, uint4>::type;
  Bits bits;

  __device__ __forceinline__ void load(const T* p) { bits = *reinterpret_cast<const Bits*>(p); }
  __device__ __forceinline__ void clear() { memset(&bits, 0, sizeof(bits)); }
  __device__ __forceinline__ void to_float(float (&out)[W]) const {
    T elems[W];
    memcpy(elems, &bits, sizeof(bits));
#pragma unroll
    for (int w = 0; w < W; ++w) out[w] = swiftvlm::to_float(elems[w]);
  }
};

template <typename T, int W>
__device__ __forceinline__ void store_chunk(T* p, const float (&in)[W]) {
  static_assert(W == 1 || W == kVec<T>, "a chunk is one element or one 16-byte vector");
  if constexpr (W == 1) {
    *p = from_float<T>(in[0]);
  } else {
    T elems[W];
#pragma unroll
    for (int w = 0; w < W; ++w) elems[w] = from_float<T>(in[w]);
    uint4 raw;
    memcpy(&raw, elems, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// Id [b, r] of an int32 or int64 tensor.
__device__ __forceinline__ int64_t load_index(const IndexView& v, int64_t b, int64_t r) {
  const int64_t off = b * v.sb + r * v.sr;
  return v.is_int64 ? static_cast<const int64_t*>(v.ptr)[off] : static_cast<const int32_t*>(v.ptr)[off];
}

// A per-row count of a ragged batch: counts[b] (or `fallback` without counts) clamped to [0, hi].
__device__ __forceinline__ int row_count(const IndexView& counts, int64_t b, int64_t hi, int64_t fallback) {
  const int64_t v = counts.ptr == nullptr ? fallback : load_index(counts, b, 0);
  return static_cast<int>(v < 0 ? 0 : (v > hi ? hi : v));
}

// ---------------------------------------------------------------- reductions and scans
// Butterfly reductions: every lane ends with the result, in a fixed order (deterministic).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Max / sum over the `lanes` lanes of each aligned group of a warp (every lane calls it; lanes a power
// of two up to 32), in a fixed order.
__device__ __forceinline__ float lanes_max(float v, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}
__device__ __forceinline__ float lanes_sum(float v, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Scratch of block_exclusive_scan: one slot per warp plus the total.
constexpr int kScanScratch = kWarp + 1;

// Exclusive prefix sum of one value per thread over the block (V: int, or a 64-bit integer that
// packs two counts); *total gets the block sum. Every thread of the block must call it;
// blockDim.x must be a multiple of 32.
template <typename V>
__device__ __forceinline__ V block_exclusive_scan(V v, V* total, V* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int num_warps = blockDim.x / kWarp;
  V incl = v;
#pragma unroll
  for (int o = 1; o < kWarp; o <<= 1) {
    const V n = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += n;
  }
  if (lane == kWarp - 1) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const V w = lane < num_warps ? scratch[lane] : V(0);
    V wincl = w;
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const V n = __shfl_up_sync(kFullMask, wincl, o);
      if (lane >= o) wincl += n;
    }
    if (lane < num_warps) scratch[lane] = wincl - w;
    if (lane == kWarp - 1) scratch[kWarp] = wincl;
  }
  __syncthreads();
  const V excl = scratch[warp] + incl - v;
  *total = scratch[kWarp];
  __syncthreads();  // scratch is reused by the next call
  return excl;
}

// ---------------------------------------------------------------- host helpers

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// True when every stride (in elements of `elem_size` bytes) keeps 16-byte alignment.
inline bool strides_aligned16(size_t elem_size, std::initializer_list<int64_t> strides) {
  for (const int64_t s : strides) {
    if ((s * static_cast<int64_t>(elem_size)) % 16 != 0) return false;
  }
  return true;
}

// Calls fn(T{}) with T the element type of `dtype`.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32:
      return fn(float{});
    case DType::F16:
      return fn(__half{});
    case DType::BF16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Launches a grid-stride kernel of THREADS-thread blocks over `total` work items, nothing when there
// are none: a block per THREADS items, at most INT32_MAX blocks (the kernel strides over the rest).
template <int THREADS, typename... Params, typename... Args>
cudaError_t launch_grid_stride(void (*kernel)(Params...), int64_t total, cudaStream_t stream, const Args&... args) {
  if (total == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, THREADS), INT32_MAX);
  SWIFTVLM_LAUNCH(kernel, static_cast<unsigned>(blocks), THREADS, 0, stream, args...);
  return cudaGetLastError();
}

// Largest dynamic shared memory a block of `kernel` may opt into on the current device.
template <typename Kernel>
cudaError_t max_dynamic_smem(Kernel* kernel, size_t* bytes) {
  int device = 0;
  int optin = 0;
  cudaFuncAttributes attr;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  *bytes = static_cast<size_t>(optin) > attr.sharedSizeBytes ? optin - attr.sharedSizeBytes : 0;
  return cudaSuccess;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory (above 48 KB needs an opt-in).
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel* kernel, size_t bytes) {
  constexpr size_t kDefaultLimit = 48 * 1024;
  if (bytes <= kDefaultLimit) return cudaSuccess;
  size_t limit = 0;
  const cudaError_t err = max_dynamic_smem(kernel, &limit);
  if (err != cudaSuccess) return err;
  if (bytes > limit) return cudaErrorInvalidConfiguration;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace swiftvlm
