// A small CUDA emulation for running csrc/ on the CPU (tests/cuda_emulator.py builds it).
//
// The .cu files compile as host C++ with this directory first on the include path: cuda_runtime.h,
// cuda_fp16.h and cuda_bf16.h here stand in for the toolkit's. Every GPU thread of a block is a
// cooperative fiber (ucontext); a block runs to completion before the next starts. __syncthreads,
// warp shuffles, ballot, any and match are rendezvous between fibers, checked strictly:
//   - a __syncthreads that not every thread of the block reaches (one exited, or waits elsewhere),
//   - a warp operation whose mask names a lane that exited or does not exist, or lanes that wait at
//     different operations,
//   - dynamic shared memory beyond 48 KB without the opt-in (or beyond the opt-in), block or grid
//     sizes beyond the hardware's limits,
// each fail the launch loudly (cudaErrorLaunchFailure / cudaErrorInvalidConfiguration with the
// reason in cudaGetErrorString). Threads run in one of several schedules (emu_set_schedule: forward,
// reverse, random, warps in reverse), so a missing barrier changes the result under some schedule;
// blocks run in the schedule's order (reverse for reverse and warps) or in the order set by
// emu_set_block_order (forward, reverse, or a seeded random permutation of the grid), so code that
// depends on which block finishes last (arrival counters) meets different last blocks.
// Global and shared memory are host memory; static __shared__ variables are function statics.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

using std::isinf;
using std::isnan;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
  cudaErrorInvalidConfiguration = 9,
};
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxThreadsPerBlock;
};

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value);
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, Kernel* kernel) {
  return cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(kernel));
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

namespace emu {

dim3 thread_idx();
dim3 block_idx();
dim3 block_dim();
dim3 grid_dim();
void syncthreads();
unsigned char* dynamic_smem();
bool is_private(const void* p);  // in a fiber's stack or the dynamic shared memory

enum WarpOp { kShflIdx, kShflXor, kShflUp, kShflDown, kBallot, kAny, kAll, kMatchAny };
// The calling lane's result of a warp operation over `mask`; value: the lane's operand (bits).
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int param, int width);

cudaError_t launch_impl(const void* kernel, dim3 grid, dim3 block, size_t smem, std::function<void()> body);

template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A... args) {
  // The arguments stay in this frame, on the host thread's stack (the traffic build leaves that out,
  // as a GPU reads kernel parameters from the constant bank, not global memory).
  auto call = [=]() { kernel(args...); };
  return launch_impl(reinterpret_cast<const void*>(kernel), grid, block, smem, [&call]() { call(); });
}

template <typename T>
uint64_t bits(T v) {
  static_assert(sizeof(T) <= 8, "warp operands up to 64 bits");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

inline void __syncthreads() { ::emu::syncthreads(); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return emu::from_bits<T>(emu::warp_op(emu::kShflIdx, mask, emu::bits(v), src, width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu::from_bits<T>(emu::warp_op(emu::kShflXor, mask, emu::bits(v), lane_mask, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu::from_bits<T>(emu::warp_op(emu::kShflUp, mask, emu::bits(v), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return emu::from_bits<T>(emu::warp_op(emu::kShflDown, mask, emu::bits(v), static_cast<int>(delta), width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(emu::warp_op(emu::kBallot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(emu::warp_op(emu::kAny, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(emu::warp_op(emu::kAll, mask, pred != 0, 0, 32));
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
  return static_cast<unsigned>(emu::warp_op(emu::kMatchAny, mask, emu::bits(v), 0, 32));
}

// A rendezvous of the lanes in mask, checked like the other warp operations.
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_op(emu::kAll, mask, 1, 0, 32); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __float_as_uint(float f) { return emu::from_bits<unsigned>(emu::bits(f)); }
inline float __uint_as_float(unsigned u) { return emu::from_bits<float>(u); }
// Fibers of one block take turns and never yield inside an atomic, and blocks run one after another:
// a plain read-modify-write is atomic, on shared and global memory alike.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <typename T>
T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <typename T>
T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}
// Every write is visible to every later read here (one fiber runs at a time): a fence has nothing to
// order. What a missing fence breaks on a GPU cannot show in this emulation.
inline void __threadfence() {}

// The dynamic shared memory of the running block, exactly as large as the launch asked (the
// sanitizer build catches an access past it).
#define SWIFTVLM_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()
#define SWIFTVLM_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::emu::launch(kernel, dim3(grid), dim3(block), smem, stream, __VA_ARGS__)
