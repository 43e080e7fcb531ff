// Kernels with the bugs the CUDA emulation must catch (tests/test_cuda_emulated.py): each entry point
// launches one and returns the launch's error code; swiftvlm_emu_message() says why.
#include <cuda_runtime.h>

namespace {

__global__ void exits_before_barrier(int* out) {
  if (threadIdx.x == 5) return;  // one thread leaves: the barrier below never completes
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void full_mask_shuffle(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_after_exit(int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void uses_dynamic_smem(int* out) {
  SWIFTVLM_DYNAMIC_SMEM(smem);
  smem[threadIdx.x] = 1;
  out[threadIdx.x] = smem[threadIdx.x];
}

// Thread 0 publishes a value in shared memory; everyone reads it. Without the barrier, the readers
// that run before thread 0 see the old value (under the reverse schedule: all of them but thread 0).
template <bool BARRIER>
__global__ void publish(int* out) {
  __shared__ int value;
  if (threadIdx.x == 0) value = 0;
  __syncthreads();
  if (threadIdx.x == 0) value = 42;
  if (BARRIER) __syncthreads();
  out[threadIdx.x] = value;
}

// Thread 0 of each block takes the next ticket: out[block] = its place in the order blocks ran.
__global__ void take_ticket(int* out, int* counter) {
  if (threadIdx.x == 0) out[blockIdx.x] = atomicAdd(counter, 1);
}

}  // namespace

extern "C" {

const char* swiftvlm_emu_message() { return cudaGetErrorString(cudaErrorLaunchFailure); }

int swiftvlm_emu_exits_before_barrier(int* out) {
  auto* k = exits_before_barrier;
  SWIFTVLM_LAUNCH(k, 1, 64, 0, nullptr, out);
  return cudaGetLastError();
}
int swiftvlm_emu_partial_warp_shuffle(int* out) {
  auto* k = full_mask_shuffle;
  SWIFTVLM_LAUNCH(k, 1, 48, 0, nullptr, out);  // the second warp has 16 lanes: the mask names 16 absent ones
  return cudaGetLastError();
}
int swiftvlm_emu_shuffle_after_exit(int* out) {
  auto* k = shuffle_after_exit;
  SWIFTVLM_LAUNCH(k, 1, 32, 0, nullptr, out);
  return cudaGetLastError();
}
int swiftvlm_emu_dynamic_smem(int* out, int bytes, int optin) {
  auto* k = uses_dynamic_smem;
  if (optin && cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, optin) != cudaSuccess) {
    return cudaGetLastError();
  }
  SWIFTVLM_LAUNCH(k, 1, 32, static_cast<size_t>(bytes), nullptr, out);
  return cudaGetLastError();
}
int swiftvlm_emu_block_size(int* out, int threads) {
  auto* k = uses_dynamic_smem;
  SWIFTVLM_LAUNCH(k, 1, threads, 4096, nullptr, out);
  return cudaGetLastError();
}
int swiftvlm_emu_publish(int* out, int barrier) {
  if (barrier) {
    auto* k = publish<true>;
    SWIFTVLM_LAUNCH(k, 1, 64, 0, nullptr, out);
  } else {
    auto* k = publish<false>;
    SWIFTVLM_LAUNCH(k, 1, 64, 0, nullptr, out);
  }
  return cudaGetLastError();
}
int swiftvlm_emu_block_tickets(int* out, int blocks) {
  auto* k = take_ticket;
  out[blocks] = 0;  // the counter, after the tickets
  SWIFTVLM_LAUNCH(k, blocks, 32, 0, nullptr, out, out + blocks);
  return cudaGetLastError();
}
}
