// topk_select: one launch, one CTA per row running select_row (select_rows.cuh) on the input row:
// grid B, 128 / 256 / 1024 threads for rows up to 1024 / 4096 / more scores; reads the row once (16
// loads in flight per thread), writes keep and rest once; the keys and the candidate list stay in
// shared memory (the keys are re-read from the row only when they do not fit, N above ~55,000).
#include "select_rows.cuh"

namespace swiftvlm {
namespace {

template <typename T, int THREADS, bool KEYS_IN_SMEM>
__global__ void __launch_bounds__(THREADS, 1)
    topk_rows_kernel(const T* scores, int64_t s_sb, int64_t s_sn, int N, int k, int64_t* keep, int64_t* rest,
                     int cand_cap) {
  SWIFTVLM_DYNAMIC_SMEM(dyn_smem);
  __shared__ SelectShared sh;
  const int64_t row = blockIdx.x;
  uint32_t* keys = reinterpret_cast<uint32_t*>(dyn_smem);
  uint32_t* cand = keys + (KEYS_IN_SMEM ? ceil_div(N, 4) * 4 : 0);
  select_row<THREADS, KEYS_IN_SMEM>(StridedRow<T>{scores + row * s_sb, s_sn}, N, k, keep + row * k,
                                    rest + row * (N - k), keys, cand, cand_cap, sh);
}

template <typename T, int THREADS>
cudaError_t launch_topk(const T* scores, int64_t s_sb, int64_t s_sn, int64_t B, int64_t N, int64_t k,
                        int64_t* keep, int64_t* rest, cudaStream_t stream) {
  auto* in_smem = topk_rows_kernel<T, THREADS, true>;
  auto* streamed = topk_rows_kernel<T, THREADS, false>;
  size_t limit = 0;
  cudaError_t err = max_dynamic_smem(in_smem, &limit);
  if (err != cudaSuccess) return err;
  const SelectPlan plan = plan_select(N, 0, limit);
  auto* kernel = plan.keys_in_smem ? in_smem : streamed;
  err = allow_dynamic_smem(kernel, plan.smem);
  if (err != cudaSuccess) return err;
  SWIFTVLM_LAUNCH(kernel, static_cast<unsigned>(B), THREADS, plan.smem, stream, scores, s_sb, s_sn,
                  static_cast<int>(N), static_cast<int>(k), keep, rest, plan.cand_cap);
  return cudaGetLastError();
}

}  // namespace

cudaError_t topk_select(DType dtype, const void* scores, int64_t s_sb, int64_t s_sn, int64_t B, int64_t N,
                        int64_t k, int64_t* keep, int64_t* rest, cudaStream_t stream) {
  if (N > INT32_MAX || B > INT32_MAX || k < 0 || k > N) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_select_threads(N, [&](auto threads) {
      return launch_topk<T, decltype(threads)::value>(static_cast<const T*>(scores), s_sb, s_sn, B, N, k, keep,
                                                      rest, stream);
    });
  });
}

}  // namespace swiftvlm
