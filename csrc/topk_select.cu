// topk_select: one block per row, radix select + prefix-sum compaction (select_rows.cuh).
#include "select_rows.cuh"

namespace swiftvlm {
namespace {

// Scores of a [B, N] input of element type T with any strides.
template <typename T>
struct InputRowScores {
  const T* scores;
  int64_t sb, sn;

  struct Row {
    const T* p;
    int64_t sn;
    __device__ float score(int i) const { return to_float(p[i * sn]); }
    __device__ void store(int /*i*/, float /*s*/) const {}
    __device__ float stored(int i) const { return score(i); }
  };

  __device__ Row prepare(int row, float* /*smem*/) const { return Row{scores + row * sb, sn}; }
};

}  // namespace

cudaError_t topk_select(DType dtype, const void* scores, int64_t s_sb, int64_t s_sn, int64_t B, int64_t N,
                        int64_t k, int64_t* keep, int64_t* rest, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const InputRowScores<T> src{static_cast<const T*>(scores), s_sb, s_sn};
    return launch_select_rows(src, 0, B, N, k, keep, rest, stream);
  });
}

}  // namespace swiftvlm
