"""The Triton attention kernel (`zoo/_attention.py`) against torch's attention: values and the qkv gradient, the
layouts it reads and writes, its fake function, and under torch.compile. On CPU it runs in Triton's interpreter."""
import pytest
import torch
import torch.nn.functional as F

from zoo._attention import attention, supports
from zoo._convpool import available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(torch.device(DEVICE)), reason="needs Triton (GPU, or its interpreter)")


def _reference(qkv: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    B, M, T, D3 = qkv.shape
    q, k, v = qkv.float().view(B, M, T, 3, heads, D3 // 3 // heads).permute(3, 0, 1, 4, 2, 5)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(2, 3).reshape(B, M, T, D3 // 3)


def _qkv(B, M, T, D3, member_major: bool, dtype=torch.float32) -> torch.Tensor:
    """(B, M, T, 3 D) stored contiguous, or members outermost as batched matmuls over members write it."""
    g = torch.Generator().manual_seed(B * 100 + T)
    if member_major:
        return torch.randn(M, B, T, D3, generator=g).to(DEVICE, dtype).transpose(0, 1)
    return torch.randn(B, M, T, D3, generator=g).to(DEVICE, dtype)


# (B, M, T, heads, d): vit_t's 17 tokens of 16 dims in 2 heads; one head of 8 dims; 33 tokens (TP = 64)
SHAPES = [(3, 5, 17, 2, 16), (2, 3, 9, 1, 8), (2, 2, 33, 2, 16)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("member_major", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_attention_matches_torch(shape, member_major, causal):
    B, M, T, heads, d = shape
    qkv = _qkv(B, M, T, 3 * heads * d, member_major).requires_grad_()
    y = attention(qkv, heads, causal)
    assert y.shape == (B, M, T, heads * d) and y.stride()[1] > y.stride()[0] if member_major else y.is_contiguous()
    gy = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * gy).sum(), qkv)
    ref = _reference(qkv, heads, causal)
    (g_ref,) = torch.autograd.grad((ref * gy).sum(), qkv)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5), float((y - ref).abs().max())
    assert torch.allclose(g, g_ref, atol=1e-5, rtol=1e-5), float((g - g_ref).abs().max())
    assert g.stride() == qkv.stride()  # the gradient is laid out as qkv


def test_bf16_attention_is_close_to_fp32():
    """bf16 operands on tensor cores, fp32 softmax: within bf16 rounding of the exact result."""
    qkv = _qkv(4, 3, 17, 96, False).requires_grad_()
    q16 = qkv.detach().bfloat16().requires_grad_()
    y, y16 = attention(qkv, 2), attention(q16, 2)
    assert y16.dtype == torch.bfloat16
    gy = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * gy).sum(), qkv)
    (g16,) = torch.autograd.grad((y16.float() * gy).sum(), q16)
    rel = lambda a, b: float((a.detach().float() - b.detach()).norm() / b.detach().norm())
    assert rel(y16, y) < 1e-2 and rel(g16, g) < 2e-2


def test_causal_attention_does_not_see_the_future():
    qkv = _qkv(2, 2, 9, 48, False)
    later = qkv.clone()
    later[:, :, 5:] += 1.0
    y, y2 = attention(qkv, 2, True), attention(later, 2, True)
    assert torch.allclose(y[:, :, :5], y2[:, :, :5]) and not torch.allclose(y[:, :, 5:], y2[:, :, 5:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_bias_read_with_the_projection_is_the_biased_projection(causal, dtype):
    """attention(p, bias=b) is attention(p + b.to(dtype)) to the bit, forward and qkv gradient (the kernels round
    the sum to bf16 as torch does; Triton's CPU interpreter rounds toward zero, so there within bf16 rounding);
    b's gradient is the qkv gradient summed over images and tokens. b is a strided view of a flat parameter
    buffer, as the engine's are."""
    B, M, T, heads, d = 3, 4, 17, 2, 16
    p = _qkv(B, M, T, 3 * heads * d, True, dtype).requires_grad_()
    flat = torch.randn(M, 3 * heads * d + 7, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    b = flat[:, 3:3 + 3 * heads * d].requires_grad_()
    y = attention(p, heads, causal, bias=b)
    ref = attention(p + b.to(dtype)[None, :, None], heads, causal)
    rel = lambda a, r: float((a - r).detach().float().norm() / r.detach().float().norm())
    same = torch.equal if dtype == torch.float32 or DEVICE == "cuda" else lambda a, r: rel(a, r) < 3e-2
    assert same(y, ref)
    gy = torch.randn_like(y)
    got, want = (torch.autograd.grad((out.float() * gy).sum(), (p, b)) for out in (y, ref))
    assert same(got[0], want[0]) and got[1].dtype == b.dtype
    assert rel(got[1], want[1]) < (3e-2 if dtype == torch.bfloat16 else 1e-6)
    with pytest.raises(ValueError, match=r"bias must be \(M, 3 D\) = \(4, 96\).*shape \(4, 95\)"):
        attention(p, heads, causal, bias=b[:, :-1])


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("member_major", [False, True])
def test_fake_functions_give_the_kernels_strides(member_major, with_bias):
    qkv = _qkv(2, 3, 9, 48, member_major)
    bias = torch.randn(3, 50, device=DEVICE)[:, 1:49] if with_bias else None
    y, lse = torch.ops.weightzoo.attention(qkv, bias, 2, False)
    ops = [(torch.ops.weightzoo.attention, (qkv, bias, 2, True)),
           (torch.ops.weightzoo.attention_backward, (torch.randn_like(y), qkv, bias, lse, 2, False))]
    for op, args in ops:
        assert torch.library.opcheck(op, args, test_utils="test_faketensor") == {"test_faketensor": "SUCCESS"}


def test_compiled_attention_matches_eager():
    """Projection -> attention (adding the projection's bias) -> projection compiled in one graph: the op's fake
    strides are what its kernel writes, so inductor's kernels around it read them right, forward and backward."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 17, 32, generator=g).to(DEVICE)
    params = [torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in [(2, 96, 32), (2, 32, 32), (2, 96)]]

    def loss(x, w_qkv, w_out, b_qkv):
        qkv = torch.einsum("bmti,moi->bmto", x, w_qkv)
        return torch.einsum("bmti,moi->bmto", attention(qkv, 2, bias=b_qkv), w_out).square().sum()
    eager = torch.autograd.grad(loss(x, *params), params)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, *params), params)
    for a, r in zip(compiled, eager):
        assert torch.allclose(a, r, atol=1e-5 * float(r.abs().max()), rtol=1e-4), float((a - r).abs().max())


def test_long_sequences_are_not_supported():
    assert supports(128, 16) and not supports(129, 16) and not supports(17, 256)
    with pytest.raises(ValueError, match=r"qkv must be \(B, M, T, 3 D\).*shape \(2, 2, 5, 40\)"):
        attention(torch.zeros(2, 2, 5, 40, device=DEVICE), 3)

