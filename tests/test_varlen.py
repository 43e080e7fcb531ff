"""The packed (varlen) ops, tv_score_varlen and score_select_varlen: on keys packed without padding
(FlashAttention varlen / vLLM layout, cu_seqlens [B + 1]) they give the padded ragged form's results,
on every backend (the ragged form itself: test_ragged.py)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import python_ref
import swiftvlm_kernels as sk
from conftest import DTYPES
from test_ragged import BACKENDS, TRITON, _cuda_emu_backend  # noqa: F401  (the cuda-emu backend fixture)


@pytest.mark.parametrize("backend", BACKENDS + TRITON)
@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_packed_equals_padded(backend, dtype, data):
    """score_select_varlen / tv_score_varlen on packed keys give the padded ragged form's results."""
    B = data.draw(st.integers(1, 4))
    Hkv, G, D = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 4])), data.draw(st.sampled_from([4, 9]))
    lengths = torch.tensor([data.draw(st.integers(0, 20)) for _ in range(B)])
    vis_len = torch.tensor([data.draw(st.integers(0, int(n))) for n in lengths])
    vis_start = torch.tensor([data.draw(st.integers(0, int(n - v))) for n, v in zip(lengths, vis_len)])
    keep = torch.tensor([data.draw(st.integers(0, int(v))) for v in vis_len])
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    q = torch.randn(B, Hkv * G, D, generator=g).to(dtype)
    k = torch.randn(int(cu[-1]), Hkv, D, generator=g).to(dtype)
    W, K, Lmax = int(vis_len.max()), int(keep.max()), int(lengths.max())
    packed = sk.score_select_varlen(q, k, cu, vis_start, vis_len, keep, max_vis_len=W, max_keep=K, max_seqlen=Lmax,
                                    backend=backend)
    k_padded, mask = python_ref.varlen.unpack(k, cu)
    padded = sk.score_select(q, k_padded, vis_start, vis_len, keep, key_mask=mask, max_vis_len=W, max_keep=K,
                             backend=backend)
    for got, want in zip(packed, padded):
        assert torch.equal(got, want)
    tv = sk.tv_score_varlen(q, k, cu, vis_start, vis_len, max_vis_len=W, backend=backend)
    assert torch.equal(tv, packed[2])
