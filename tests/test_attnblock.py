"""The fused pre-norm attention block (`zoo/_attnblock.py`) against torch's layers: values and every gradient,
one to four heads, causal or not, sequences padded inside a program, member-major and image-major storage,
parameters as views of a flat (M, P) buffer, sequences split over programs (on CPU through Triton's interpreter)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import block_inputs

from zoo import _attnblock
from zoo._triton import available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(torch.device(DEVICE)), reason="needs Triton (or its interpreter)")


def _reference(x, lnw, lnb, wqkv, bqkv, wo, bo, heads, causal):
    B, M, T, D = x.shape
    ln = F.layer_norm(x, (D,)) * lnw[None, :, None] + lnb[None, :, None]
    qkv = torch.einsum("bmtd,med->bmte", ln, wqkv) + bqkv[None, :, None]
    q, k, v = qkv.view(B, M, T, 3, heads, D // heads).permute(3, 0, 1, 4, 2, 5)  # (B, M, h, T, d) each
    y = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(2, 3).reshape(B, M, T, D)
    return x + torch.einsum("bmtd,med->bmte", y, wo) + bo[None, :, None]


# (B, T, heads, causal, member-major): 12 images of 5 tokens a 64-row step (all 3 in one); 3 images of 17; causal,
# 7 of 9; 40 images of 3 tokens over 4 heads (21 a step, split over programs); one image of 40 tokens a step, its
# 24 padding rows a group of their own, causal
@pytest.mark.parametrize("B,T,heads,causal,member_major", [(3, 5, 2, False, True), (3, 17, 2, False, False),
                                                           (2, 9, 1, True, False), (40, 3, 4, False, True),
                                                           (2, 40, 2, True, False)])
def test_fused_attention_block_matches_torch(B, T, heads, causal, member_major):
    M, D = 3, 16
    x, ps, gy = block_inputs(B, M, T, D, [(D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,)], member_major, DEVICE)
    xr, pr = x.clone().requires_grad_(), [p.clone().requires_grad_() for p in ps]
    ref = _reference(xr, *pr, heads, causal)
    ref_grads = torch.autograd.grad(ref, [xr, *pr], gy)
    xk, pk = x.clone().requires_grad_(), [p.detach().requires_grad_() for p in ps]
    y = _attnblock.attention_block(xk, *pk, heads, causal, 1e-5, False)
    grads = torch.autograd.grad(y, [xk, *pk], gy)
    assert y.stride() == x.stride()
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    for name, a, r in zip(["x", "ln_w", "ln_b", "wqkv", "bqkv", "wo", "bo"], grads, ref_grads):
        assert torch.allclose(a, r, atol=2e-4, rtol=1e-5), (name, float((a - r).abs().max()))


def test_fused_attention_block_refuses_what_it_cannot_run():
    """Sequences past MAX_T, widths outside 16..64 or not dividing into heads are not supported; a wrong qkv
    weight shape is named."""
    assert _attnblock.supports(17, 32, 2) and not _attnblock.supports(65, 32, 2)
    assert not _attnblock.supports(17, 128, 2) and not _attnblock.supports(17, 32, 3)
    x = torch.zeros(2, 3, 4, 16)
    with pytest.raises(ValueError, match=r"qkv weight must be \(M, 3 D, D\) = \(3, 48, 16\).*got \(3, 32, 16\)"):
        _attnblock.attention_block(x, *[torch.zeros(3, 16)] * 2, torch.zeros(3, 32, 16), torch.zeros(3, 48),
                                   torch.zeros(3, 16, 16), torch.zeros(3, 16), 2, False, 1e-5, False)
