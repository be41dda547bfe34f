"""The fused pre-norm MLP block (`zoo/_mlp.py`) against torch's layers: values and every gradient, for each
activation code, member-major and image-major storage, parameters as views of a flat (M, P) buffer, rows split
over several programs or not, the backward at 64 or 16 rows a step (on CPU through Triton's interpreter)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import block_inputs

from zoo import _mlp
from zoo._triton import available
from zoo.models import ACTIVATIONS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(torch.device(DEVICE)), reason="needs Triton (or its interpreter)")


def _reference(x, lnw, lnb, w1, b1, w2, b2, acts):
    ln = F.layer_norm(x, x.shape[-1:]) * lnw[None, :, None] + lnb[None, :, None]
    z = torch.einsum("bmtd,mfd->bmtf", ln, w1) + b1[None, :, None]
    h = torch.stack([z[:, i] if a == "identity" else ACTIVATIONS[a](z[:, i]) for i, a in enumerate(acts)], 1)
    return x + torch.einsum("bmtf,mdf->bmtd", h, w2) + b2[None, :, None]


@pytest.mark.parametrize("B,T,member_major,block", [(3, 5, True, (64, 64)),  # one program per member
                                                    (3, 50, False, (64, 64)),  # 3 splits
                                                    (3, 50, False, (64, 16))])  # backward: 16 rows, 10 splits
def test_fused_mlp_matches_torch(B, T, member_major, block, monkeypatch):
    monkeypatch.setattr(_mlp, "BLOCK", block)
    names = list(_mlp.CODES)
    M, D, Fh = len(names), 16, 32
    x, ps, gy = block_inputs(B, M, T, D, [(D,), (D,), (Fh, D), (Fh,), (D, Fh), (D,)], member_major, DEVICE)
    xr, pr = x.clone().requires_grad_(), [p.clone().requires_grad_() for p in ps]
    ref = _reference(xr, *pr, names)
    ref_grads = torch.autograd.grad(ref, [xr, *pr], gy)
    xk = x.clone().requires_grad_()
    pk = [p.detach().requires_grad_() for p in ps]  # strided views (member stride = the flat row)
    y = _mlp.residual_mlp(xk, *pk, _mlp.codes(names, DEVICE), 1e-5, False)
    grads = torch.autograd.grad(y, [xk, *pk], gy)
    assert y.stride() == x.stride()
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    for name, a, r in zip(["x", "ln_w", "ln_b", "w1", "b1", "w2", "b2"], grads, ref_grads):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-5), (name, float((a - r).abs().max()))


def test_fused_mlp_refuses_what_it_cannot_run():
    """Activations without a code give no codes (the engine then runs the layers); widths outside 16..128 or
    not powers of two are not supported; a wrong fc1 shape is named."""
    assert _mlp.codes(["tanh", "elu"], "cpu") is None
    assert _mlp.supports(32, 64) and not _mlp.supports(24, 64) and not _mlp.supports(32, 256)
    x = torch.zeros(2, 3, 4, 16)
    with pytest.raises(ValueError, match=r"fc1 weight must be \(M, F, D\) = \(3, F, 16\), got \(3, 32, 8\)"):
        _mlp.residual_mlp(x, *[torch.zeros(3, 16)] * 2, torch.zeros(3, 32, 8), torch.zeros(3, 32),
                          torch.zeros(3, 16, 32), torch.zeros(3, 16), torch.zeros(3, dtype=torch.int32), 1e-5, False)
