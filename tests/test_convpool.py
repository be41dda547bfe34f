"""The Triton conv + max-pool kernels against PyTorch's conv2d + max_pool2d (values and all gradients).

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py)."""
import dataclasses

import pytest
import torch

from zoo import MemberSpec, Population
from zoo._convpool import _reference, available, conv_pool
from zoo._directconv import LAYOUTS

pytestmark = pytest.mark.skipif(not available(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                                reason="needs Triton (GPU, or its CPU interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, M, C, H, O, k, stride, padding, pool): cnn_s's two stages, a 2x2 kernel, and an odd conv output whose
# last row and column the pool drops (band kernels); cnn_gap's stride-2 padded conv, smallcnn's valid one on
# an even size (the last input column feeds no output), a patch embedding, and 16 -> 16 channels (K = 144 in
# several chunks) on the direct kernels; 5x5 stride 2 (phases of 3 x 3, 3 x 2 and 2 x 2 taps) and 3x3 stride 3
# (one tap per phase) for the input gradient's polyphase split
GEOMETRIES = [(3, 2, 1, 12, 8, 5, 1, 0, 2), (2, 3, 8, 12, 6, 5, 1, 0, 2), (2, 2, 2, 7, 3, 2, 1, 0, 1),
              (2, 2, 2, 9, 4, 3, 1, 0, 2), (2, 2, 3, 9, 5, 3, 2, 1, 1), (2, 2, 3, 8, 5, 3, 2, 0, 1),
              (2, 2, 1, 8, 6, 4, 4, 0, 1), (1, 2, 16, 7, 16, 3, 2, 0, 1), (2, 2, 3, 11, 4, 5, 2, 2, 1),
              (2, 2, 2, 10, 3, 3, 3, 1, 1)]


DIRECT = [g for g in GEOMETRIES if g[-1] == 1 and g[-3] > 1]  # the direct kernels' geometries
CASES = [(g, "masked") for g in GEOMETRIES] + [(g, f) for g in DIRECT for f in ("polyphase", "polyphase_joint")]


@pytest.fixture
def dx_form(request, monkeypatch):
    """The direct convs' input-gradient form for one test (the module default is restored after)."""
    import zoo._directconv as dc
    monkeypatch.setattr(dc, "dx_form", dc.dx_form)
    dc.set_dx_form(request.param)
    return request.param


@pytest.mark.parametrize("geometry,dx_form", CASES, indirect=["dx_form"])
def test_conv_pool_matches_torch(geometry, dx_form):
    B, M, C, H, O, k, stride, padding, pool = geometry
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in
               [(B, M, C, H, H), (M, O, C, k, k), (M, O)])
    z = conv_pool(x, w, b, stride, padding, pool)
    ref = _reference(x, w, b, stride, padding, pool)
    assert z.shape == ref.shape
    gz = torch.randn(z.shape, generator=g).to(DEVICE)
    grads = torch.autograd.grad((z * gz).sum(), [x, w, b])
    ref_grads = torch.autograd.grad((ref * gz).sum(), [x, w, b])
    for name, a, r in zip(["z", "dx", "dw", "db"], [z, *grads], [ref, *ref_grads]):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-4), (name, float((a - r).abs().max()))


@pytest.mark.parametrize("C", [3, 16])
def test_weight_and_bias_gradients_sum_row_splits(C):
    """Enough rows that the direct weight-gradient kernel splits them over a grid axis (here 5 splits of 128
    rows): dw and db, summed over splits in the kernel's fixed order, match torch's, for the K-chunk kernel
    (3 contiguous channels) and the all-taps one (16 channels stored channels-last)."""
    import triton

    import zoo._directconv as dc
    B, M, H, O = 16, 2, 13, 4
    assert triton.cdiv(B * 6 * 6, dc.BLOCK_R_DW) == 5  # 3x3 stride 2, no padding: 6 x 6 outputs per image
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in
               [(B, M, C, H, H), (M, O, C, 3, 3), (M, O)])
    gz = torch.randn(B, M, O, 6, 6, generator=g).to(DEVICE)
    xs = _channels_last(x) if C == 16 else x
    assert dc._readable(xs)[1] == (C == 16)
    grads = torch.autograd.grad((conv_pool(xs, w, b, 2, 0, 1) * gz).sum(), [w, b])
    refs = torch.autograd.grad((_reference(x, w, b, 2, 0, 1) * gz).sum(), [w, b])
    for name, a, r in zip(["dw", "db"], grads, refs):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-4), (name, float((a - r).abs().max()))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_shared_input_matches_per_member_input(geometry):
    """x (B, 1, ...) is every member's input (evaluation): the forward kernel reads it with member stride 0;
    with gradients on, it is expanded and gets the summed input gradient."""
    B, M, C, H, O, k, stride, padding, pool = geometry
    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*s, generator=g).to(DEVICE) for s in [(B, 1, C, H, H), (M, O, C, k, k), (M, O)])
    each = conv_pool(x.expand(-1, M, -1, -1, -1).contiguous(), w, b, stride, padding, pool)
    with torch.no_grad():
        assert torch.allclose(conv_pool(x, w, b, stride, padding, pool), each, atol=1e-5)
        assert torch.allclose(_reference(x, w, b, stride, padding, pool), each, atol=1e-4)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(conv_pool(x, w, b, stride, padding, pool).square().sum(), [x])
    ref = _reference(x.expand(-1, M, -1, -1, -1), w, b, stride, padding, pool)
    (rx,) = torch.autograd.grad(ref.square().sum(), [x])
    assert torch.allclose(gx, rx, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dx_form", ["masked"], indirect=True)
def test_strided_convs_without_pool_run_the_direct_kernels(dx_form):
    """A stride-2 conv without pool goes to the implicit-GEMM kernels (forward; dw and dx in the backward),
    a pooled one to the band kernels."""
    import zoo._convpool as cp
    import zoo._directconv as dc
    from zoo._triton import recording

    x = torch.randn(2, 2, 3, 9, 9, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 4, 3, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.zeros(2, 4, device=DEVICE, requires_grad=True)
    with recording() as launches:
        conv_pool(x, w, b, 2, 1, 1).sum().backward()
        conv_pool(x, w, b, 1, 0, 2)
    kernels = [k for k, _, _ in launches]
    assert kernels == [dc._fwd_kernel, dc._dw_kernel, dc._dx_kernel, cp._band_fwd_kernel]


@pytest.mark.parametrize("dx_form", ["polyphase", "polyphase_joint"], indirect=True)
def test_polyphase_input_gradient_launches_one_grid_over_phases(dx_form):
    """The polyphase forms run their own kernel in one launch: one phase per program, or all S x S of a pixel
    block's ("polyphase_joint"); an unknown form is refused by name."""
    import zoo._directconv as dc
    from zoo._triton import recording

    x = torch.randn(2, 2, 3, 9, 9, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 4, 3, 3, 3, device=DEVICE, requires_grad=True)
    with recording() as launches:
        conv_pool(x, w, torch.zeros(2, 4, device=DEVICE), 2, 1, 1).sum().backward()
    assert [k for k, _, _ in launches] == [dc._fwd_kernel, dc._dw_kernel, dc._dx_phase_kernel]
    assert launches[-1][1][-1] == (4 if dx_form == "polyphase_joint" else 1)  # NP: phases per program
    with pytest.raises(ValueError, match="unknown direct-conv dx form 'phases'.*masked, polyphase"):
        dc.set_dx_form("phases")


@pytest.fixture
def layout(request, monkeypatch):
    """The direct convs' output layout for one test (the module default is restored after)."""
    import zoo._directconv as dc
    monkeypatch.setattr(dc, "layout", dc.layout)
    dc.set_layout(request.param)
    return request.param


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """The same (B, M, C, H, W) values stored with each pixel's channels side by side."""
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


# cnn_gap's 16 -> 16 stride-2 padded conv (K = 9 taps of 16 channels), and 32 -> 16 channels with a 5x5 kernel
# (polyphase phases of 3 x 3, 3 x 2 and 2 x 2 taps)
CL_GEOMETRIES = [(2, 2, 16, 9, 16, 3, 2, 1, 1), (1, 2, 32, 7, 16, 5, 2, 2, 1)]


@pytest.mark.parametrize("layout", ["channels_last"], indirect=True)
@pytest.mark.parametrize("dx_form", ["masked", "polyphase", "polyphase_joint"], indirect=True)
@pytest.mark.parametrize("geometry", CL_GEOMETRIES)
def test_channels_last_matches_torch(geometry, dx_form, layout):
    """Under the channels-last layout z and dx come out channels-last, and the kernels read x and gz stored
    either way (channels-last: one tap's C channels a row at a time); values and gradients match torch's."""
    import zoo._directconv as dc
    B, M, C, H, O, k, stride, padding, pool = geometry
    g = torch.Generator().manual_seed(3)
    x0, w, b = (torch.randn(*s, generator=g).to(DEVICE) for s in [(B, M, C, H, H), (M, O, C, k, k), (M, O)])
    xr = x0.clone().requires_grad_()
    ref = _reference(xr, w, b, stride, padding, pool)
    gz0 = torch.randn(ref.shape, generator=g).to(DEVICE)
    ref_grads = torch.autograd.grad(ref, [xr], gz0)
    for store in (lambda t: t, _channels_last):
        x = store(x0).requires_grad_()
        z = conv_pool(x, w, b, stride, padding, pool)
        (dx,) = torch.autograd.grad(z, [x], store(gz0))
        assert dc._readable(x)[1] == (store is _channels_last)
        assert z.permute(0, 1, 3, 4, 2).is_contiguous() and dx.permute(0, 1, 3, 4, 2).is_contiguous()
        for name, a, r in [("z", z, ref), ("dx", dx, ref_grads[0])]:
            assert torch.allclose(a, r, atol=1e-4, rtol=1e-4), (name, float((a - r).abs().max()))
    with pytest.raises(ValueError, match="unknown direct-conv layout 'nhwc'.*nchw, channels_last"):
        dc.set_layout("nhwc")


# the layout and activation flags of each direct kernel
DW_FLAGS = ("GCL", "ACT", "YCL", "WRITE_GZ", "DROP")
FLAGS = {"_fwd_kernel": ("XCL", "ZCL", "ACT", "DROP"), "_dw_kernel": DW_FLAGS, "_dw_taps_kernel": DW_FLAGS,
         "_dw_joint_kernel": DW_FLAGS, "_dx_phase_kernel": ("GCL", "XCL")}


def _flags(launches) -> list[tuple]:
    """(kernel name, its FLAGS' values) of each recorded launch."""
    named = [(k.__name__, dict(zip(k.arg_names, args))) for k, args, _ in launches]
    return [(name, *(a[f] for f in FLAGS[name])) for name, a in named]


@pytest.mark.parametrize("layout", ["channels_last"], indirect=True)
@pytest.mark.parametrize("fuse", [False, True])
def test_channels_last_passes_through_the_layers_between_convs(layout, fuse, digits28, monkeypatch):
    """smallcnn with two activations and dropout: every conv after the first reads its input channels-last
    (the activation join keeps the layout), and the backward kernels read channels-last gradients. With the
    activation fused, every conv runs its members' activations and every dw kernel their derivatives, and
    the two that feed an input gradient write the pre-activation gradient for it, and each conv's dropout runs
    in its kernels too (the mask in the forward's epilogue, redrawn in dw)."""
    import zoo._directconv as dc
    from zoo._triton import recording

    monkeypatch.setattr(dc, "fuse_activation", fuse)
    members = [MemberSpec(seed=i, batch_size=8, dropout=0.5, activation=a) for i, a in enumerate(["tanh", "relu"])]
    pop = Population("smallcnn", {}, members, digits28.to(DEVICE), conv="fused")
    xb, y, _, key = pop._batch(pop.epoch_order(1), 1, 0)
    with recording() as launches:
        pop._loss(pop.flat.detach().requires_grad_(True), xb, y, key)[0].backward()
    f, dw = fuse, f"_dw_{dc.dw_form}_kernel"
    # forward (x, z); dw (x, gz, y; write gz; a channels-last x runs every tap in one program, in the module's
    # dw form); dx (gz, dx); conv1's input has one channel. conv3's output gradient comes from the average pool
    # and dropout, contiguous; an unfused activation's backward keeps its output's channels-last layout
    assert _flags(launches) == [("_fwd_kernel", False, True, f, f), ("_fwd_kernel", True, True, f, f),
                                ("_fwd_kernel", True, True, f, f), (dw, not f, f, f, f, f),
                                ("_dx_phase_kernel", True, True), (dw, True, f, f, f, f),
                                ("_dx_phase_kernel", True, True), ("_dw_kernel", True, f, f, False, f)]


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_fake_functions_give_the_kernels_strides(layout):
    """The custom ops' fake functions (what compile plans with) return the shapes and strides the kernels
    write, for inputs stored either way (torch.library.opcheck runs both and compares)."""
    g = torch.Generator().manual_seed(5)
    x0, w, b = (torch.randn(*s, generator=g).to(DEVICE) for s in [(2, 2, 16, 9, 9), (2, 16, 16, 3, 3), (2, 16)])
    gz = torch.randn(2, 2, 16, 5, 5, generator=g).to(DEVICE)
    ops = torch.ops.weightzoo
    act = torch.tensor([2, 1], dtype=torch.int32, device=DEVICE)  # tanh, relu
    drop = (torch.tensor([7, 9], device=DEVICE), torch.tensor([2**31, 0], device=DEVICE),
            torch.tensor([0.5, 1.0], device=DEVICE))  # key, threshold, keep: rates 0.5 and 0
    no_drop = (None, None, None)
    cl = layout == "channels_last"
    for store in (lambda t: t, _channels_last):
        x = store(x0)
        y = ops.direct_conv(x, w, b, 2, 1, cl, act, *drop)  # what the fused backward reads: stored as the layout says
        for op, args in [(ops.direct_conv, (x, w, b, 2, 1, cl, None, *no_drop)),
                         (ops.direct_conv, (x, w, b, 2, 1, cl, act, *no_drop)),
                         (ops.direct_conv, (x, w, b, 2, 1, cl, act, *drop)),
                         (ops.direct_conv_dx, (store(gz), w, x, 2, 1, cl)),
                         (ops.direct_conv_dw, (store(gz), x, w, 2, 1, None, None, *no_drop, cl, False)),
                         (ops.direct_conv_dw, (store(gz), x, w, 2, 1, y, act, *drop, cl, True))]:
            assert torch.library.opcheck(op, args, test_utils="test_faketensor") == {"test_faketensor": "SUCCESS"}


@pytest.mark.parametrize("layout", ["channels_last"], indirect=True)
@pytest.mark.parametrize("fused", [False, True])
def test_compiled_channels_last_convs_match_eager(layout, fused):
    """Two direct convs with an activation between them (inductor's, or fused into the first conv's kernels),
    compiled: the fake functions give compile the strides the kernels write, so inductor's kernels around them
    read the channels-last tensors right, and the fused backward gets the output it saved."""
    from zoo._directconv import activation_codes
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 1, 9, 9, generator=g).to(DEVICE)
    params = [torch.randn(*s, generator=g).to(DEVICE).requires_grad_() for s in
              [(2, 16, 1, 3, 3), (2, 16), (2, 16, 16, 3, 3), (2, 16)]]
    act = activation_codes(["tanh", "tanh"], DEVICE)

    def loss(x, w1, b1, w2, b2):
        h = conv_pool(x, w1, b1, 2, 1, 1, act=act) if fused else torch.tanh(conv_pool(x, w1, b1, 2, 1, 1))
        return conv_pool(h, w2, b2, 2, 1, 1).square().sum()
    eager = torch.autograd.grad(loss(x, *params), params)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, *params), params)
    for a, r in zip(compiled, eager):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-4), float((a - r).abs().max())


def test_compiled_convs_follow_a_layout_change(monkeypatch):
    """The layout reaches the ops as an argument: a function compiled under one layout and called under the other
    retraces (its cached graph planned other strides; an H200 run failed on that before) and writes the new one."""
    import zoo._directconv as dc
    monkeypatch.setattr(dc, "layout", dc.layout)
    g = torch.Generator().manual_seed(6)
    x, w, b = (torch.randn(*s, generator=g).to(DEVICE) for s in [(2, 2, 16, 9, 9), (2, 16, 16, 3, 3), (2, 16)])
    f = torch.compile(lambda x, w, b: torch.tanh(conv_pool(x, w, b, 2, 1, 1)), fullgraph=True)
    ref = torch.tanh(_reference(x, w, b, 2, 1, 1))
    for name in ("nchw", "channels_last", "nchw"):
        dc.set_layout(name)
        y = f(x, w, b)
        assert torch.allclose(y, ref, atol=1e-4), name
        assert y.is_contiguous() == (name == "nchw"), (name, y.stride())


def test_large_batches_launch_in_pieces(monkeypatch):
    """CUDA allows 65,535 blocks on a grid's second axis (an H100 evaluation chunk of 60,000 MNIST images
    needs 67,500): the forward launches whole-image pieces, here 4 + 1 images (2 blocks of 16 rows each)."""
    import zoo._convpool as cp

    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*s, generator=g).to(DEVICE) for s in [(5, 1, 1, 12, 12), (3, 8, 1, 5, 5), (3, 8)])
    whole = conv_pool(x, w, b, 1, 0, 2)
    band = cp.band_plan(1, 12, 12, 8, 5, 1, 2)
    assert band.Hq * band.NXC == 8  # rows per image
    monkeypatch.setattr(cp, "MAX_GRID_Y", 2)
    monkeypatch.setattr(cp, "BAND_R", 16)
    grids, kernel = [], cp._band_fwd_kernel

    class Spy:  # records each launch grid (the interpreter itself has no grid limit)
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]
    monkeypatch.setattr(cp, "_band_fwd_kernel", Spy())
    assert torch.allclose(conv_pool(x, w, b, 1, 0, 2), whole, atol=1e-6)
    assert grids == [(3, 2), (3, 1)]
    assert torch.allclose(whole, _reference(x, w, b, 1, 0, 2), atol=1e-5)


def test_first_layer_gets_no_input_gradient():
    x = torch.randn(2, 2, 1, 12, 12, device=DEVICE)
    w = torch.randn(2, 8, 1, 5, 5, device=DEVICE, requires_grad=True)
    z = conv_pool(x, w, torch.zeros(2, 8, device=DEVICE), 1, 0, 2)
    (gw,) = torch.autograd.grad(z.sum(), [w])
    assert gw.shape == w.shape and x.grad is None


def test_ties_go_to_the_first_position_like_max_pool():
    """A blank image gives equal conv outputs in every pool window: the gradient goes where torch sends it."""
    x = torch.zeros(1, 1, 1, 8, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(1, 2, 1, 3, 3, device=DEVICE)
    b = torch.randn(1, 2, device=DEVICE)
    gx = torch.autograd.grad(conv_pool(x, w, b, 1, 0, 2).sum(), [x])[0]
    rx = torch.autograd.grad(_reference(x, w, b, 1, 0, 2).sum(), [x])[0]
    assert torch.allclose(gx, rx, atol=1e-5)


@pytest.mark.parametrize("arch,kw,data_name", [("cnn_s", {}, "digits28"), ("cnn_gap", {}, "digits"),
                                              ("smallcnn", {}, "digits28"),
                                              ("vit_t", {"patch": 4, "dim": 16, "depth": 1}, "digits")])
def test_fused_population_matches_grouped(arch, kw, data_name, request, monkeypatch):
    """Every registry architecture with a conv on the kernels (vit_t: its attention kernel; its patch embedding
    runs as a matmul, test_population.py)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # cuDNN's default TF32 is off by ~4e-5
    data = request.getfixturevalue(data_name).to(DEVICE)
    acts = ["tanh", "relu", "leaky_relu", "sigmoid"]  # smallcnn / cnn_gap: fused into the direct convs
    members = [MemberSpec(seed=i, lr=1e-3 * (i + 1), batch_size=16, dropout=0.2 * i, init="xavier_uniform",
                          activation=a) for i, a in enumerate(acts)]
    pops = [Population(arch, kw, members, data, conv=c) for c in ("grouped", "fused")]
    for p in pops:
        p.train_epoch(1, max_steps=2)
    # compare function, not weights: vit_t's attention key bias has a zero true gradient, so Adam turns
    # rounding differences there into O(lr) weight differences that do not change any output
    x = data.normalize(data.x_test[:64])[:, None]
    a, b = (p.forward(x, train=False) for p in pops[::-1])
    assert float((a - b).norm() / b.norm()) < 1e-5


@pytest.mark.parametrize("arch,conv", [("cnn_s", "grouped"), ("cnn_s", "fused"), ("smallcnn", "fused")])
def test_training_loss_compiles_to_one_graph(arch, conv, digits28):
    """A graph break would make torch.compile recompile per layer and fall back to eager (seen on the H100)."""
    import torch._dynamo

    members = [MemberSpec(seed=i, batch_size=8, dropout=0.5, activation=a, optimizer=o)
               for i, (a, o) in enumerate([("tanh", "adam"), ("relu", "sgd")])]
    pop = Population(arch, {}, members, digits28.to(DEVICE), conv=conv, precision="bf16")
    pop._prepare_kernels()  # as compile=True does: dynamo fails its guard if the plan cache fills while it traces
    xb, y, _, key = pop._batch(pop.epoch_order(1), 1, 0)
    explained = torch._dynamo.explain(pop._loss)(pop.flat.detach().requires_grad_(True), xb, y, key)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_compiled_step_matches_eager(digits28):
    """The whole compiled step (forward, the traced backward glue around the kernels, optimizer) on the
    kernels equals the eager step, and so does the compiled evaluation (shared-input kernel). The backward
    is traced under fake tensors: a global index map used there fails only here (seen on the H100)."""
    members = [MemberSpec(seed=i, batch_size=8, dropout=0.5 * i, activation=a, optimizer=o)
               for i, (a, o) in enumerate([("tanh", "adam"), ("relu", "sgd")])]
    data = dataclasses.replace(digits28, x_test=digits28.x_test[:40], y_test=digits28.y_test[:40]).to(DEVICE)
    pops = [Population("cnn_s", {}, members, data, conv="fused", compile=c, train_eval_samples=40)
            for c in (False, True)]
    for p in pops:
        p.train_epoch(1, max_steps=2)
    assert torch.allclose(pops[0].flat, pops[1].flat, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(pops[0].state, pops[1].state))  # in place
    assert torch.equal(pops[0].t, pops[1].t) and pops[1].t.tolist() == [2.0, 2.0]
    assert not torch.equal(pops[0].flat, Population("cnn_s", {}, members, data).flat)  # it trained
    eager, compiled = (p.evaluate() for p in pops)
    for k in eager:
        assert torch.allclose(eager[k], compiled[k], atol=1e-5), k


def test_too_many_channels_for_one_tile_falls_back_to_pytorch():
    """N = P*P*XQ*pow2(O) must fit one GEMM tile (<= 256): 128 channels with a 2x2 pool do not."""
    from zoo._convpool import band_plan

    assert band_plan(3, 8, 8, 128, 3, 1, 2) is None and band_plan(3, 8, 8, 32, 3, 1, 2) is not None
    x, w, b = torch.randn(2, 2, 3, 8, 8), torch.randn(2, 128, 3, 3, 3), torch.randn(2, 128)
    assert torch.allclose(conv_pool(x, w, b, 1, 0, 2), _reference(x, w, b, 1, 0, 2), atol=1e-5)


@pytest.mark.parametrize("geometry", [(1, 28, 28, 8, 5, 1, 2), (8, 12, 12, 6, 5, 1, 2), (6, 4, 4, 4, 2, 1, 1),
                                      (1, 30, 30, 16, 3, 2, 1), (16, 16, 16, 16, 3, 2, 1), (1, 28, 28, 32, 7, 7, 1),
                                      (6, 16, 16, 8, 5, 1, 1)])
def test_fold_is_the_adjoint_of_the_band_matrix(geometry):
    """<band_matrix(w), G> == <w, fold(G)> for any G: the weight gradient folded from the band-matrix gradient
    is exact, for every conv geometry in the registry (cnn_s, cnn_gap, vit_t) and cnn_s's input-gradient conv."""
    from zoo._convpool import _band_maps, band_matrix, band_plan

    C, H, W, O, KS, S, P = geometry
    band = band_plan(C, H, W, O, KS, S, P)
    w = torch.randn(3, O, C, KS, KS, dtype=torch.float64)
    g = torch.randn(3, band.KB, band.N, dtype=torch.float64)
    folded = g.reshape(3, -1)[:, _band_maps(band, w.device)[2]].sum(-1)  # (M, O*C*KS*KS)
    lhs = (band_matrix(w, band, torch.float64) * g).sum((1, 2))
    assert torch.allclose(lhs, (w.reshape(3, -1) * folded).sum(1))
    # and the band matrix holds every weight exactly P*P*XQ times (once per pool position and pooled column)
    assert torch.equal(_band_maps(band, w.device)[0].sum(), torch.tensor(O * C * KS * KS * P * P * band.XQ))


@pytest.mark.skipif(not available(torch.device(DEVICE)), reason="needs Triton (GPU or its interpreter)")
def test_recorded_launches_do_not_run_and_dedupe_by_specialization():
    """`recording` collects the kernels' launches without running them; `distinct` keeps one per
    specialization (dtypes and alignment of tensors, values of the rest), which `precompile` compiles."""
    from zoo._triton import distinct, recording

    x, w, b = (torch.randn(*s, device=DEVICE) for s in [(3, 2, 1, 12, 12), (2, 4, 1, 3, 3), (2, 4)])
    with recording() as launches:
        z = conv_pool(x, w, b, 1, 1, 2)
        conv_pool(x, w, b, 1, 1, 2)  # the same specialization again
        conv_pool(x[:, :, :, :8, :8].contiguous(), w, b, 1, 1, 2)  # another geometry (constexprs)
    assert len(launches) == 3 and len(distinct(launches)) == 2
    assert z.shape == (3, 2, 4, 6, 6)
    assert not torch.allclose(z, _reference(x, w, b, 1, 1, 2), atol=1e-3)  # not run: z holds no result
    assert len(distinct(launches[:1] * 5)) == 1


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
@pytest.mark.parametrize("dx_form", ["polyphase"], indirect=True)
@pytest.mark.parametrize("geometry", [(2, 5, 16, 9, 16, 3, 2, 1, 1), (2, 5, 3, 9, 4, 3, 2, 0, 1)])
def test_fused_activations_match_torch(geometry, dx_form, layout):
    """Each member's activation in the forward kernel and its derivative in dw (from the output): the values
    and the x, w, b gradients match torch's conv followed by the activation, for every fused activation at
    once (one per member), in both layouts, with and without an input gradient."""
    from zoo._directconv import ACTIVATION_CODES, activation_codes
    from zoo.models import ACTIVATIONS
    B, M, C, H, O, k, stride, padding, pool = geometry
    names = list(ACTIVATION_CODES)[:M]
    assert len(names) == M
    fns = {**ACTIVATIONS, "identity": lambda t: t}
    g = torch.Generator().manual_seed(7)
    x0, w, b = (torch.randn(*s, generator=g).to(DEVICE) for s in [(B, M, C, H, H), (M, O, C, k, k), (M, O)])
    gy = torch.randn(B, M, O, 5 if padding else 4, 5 if padding else 4, generator=g).to(DEVICE)
    for needs_dx in (True, False):
        x, wr, br = x0.clone().requires_grad_(needs_dx), w.clone().requires_grad_(), b.clone().requires_grad_()
        z = _reference(x, wr, br, stride, padding, pool)
        ref = torch.cat([fns[n](z[:, i: i + 1]) for i, n in enumerate(names)], 1)
        inputs = [x, wr, br] if needs_dx else [wr, br]
        ref_grads = torch.autograd.grad(ref, inputs, gy)
        y = conv_pool(x, wr, br, stride, padding, pool, act=activation_codes(names, DEVICE))
        grads = torch.autograd.grad(y, inputs, gy)
        names_out = ["y", "dx", "dw", "db"] if needs_dx else ["y", "dw", "db"]
        for name, a, r in zip(names_out, [y, *grads], [ref, *ref_grads]):
            assert torch.allclose(a, r, atol=1e-4, rtol=1e-4), (name, needs_dx, float((a - r).abs().max()))


@pytest.mark.parametrize("dw_form", ["taps", "joint"])
@pytest.mark.parametrize("geometry", [(2, 5, 16, 9, 16, 3, 2, 1, 1), (1, 5, 16, 7, 32, 3, 2, 0, 1),
                                      (1, 5, 16, 7, 16, 5, 2, 2, 1)])
def test_channels_last_weight_gradient_forms_match_torch(geometry, dw_form, monkeypatch):
    """A channels-last input's weight gradient, each tap's product alone ("taps") or every tap side by side in one
    product ("joint"; a 5x5 layer's operand is too wide for it and runs the taps form), each member's activation
    derivative fused: that form's kernel runs, and y, dx, dw and db match torch's conv followed by the activation;
    an unknown form is refused by name."""
    import zoo._directconv as dc
    from zoo._triton import recording
    from zoo.models import ACTIVATIONS

    monkeypatch.setattr(dc, "dw_form", dc.dw_form)
    dc.set_dw_form(dw_form)
    B, M, C, H, O, k, stride, padding, pool = geometry
    names = list(dc.ACTIVATION_CODES)[:M]
    fns = {**ACTIVATIONS, "identity": lambda t: t}
    g = torch.Generator().manual_seed(11)
    # inputs at half scale: the sigmoid member's exp would overflow on the 5x5 layer's sums (a warning, so an error)
    x0, w, b = (0.5 * torch.randn(*s, generator=g).to(DEVICE) for s in [(B, M, C, H, H), (M, O, C, k, k), (M, O)])
    xr, wr, br = x0.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    z = _reference(xr, wr, br, stride, padding, pool)
    ref = torch.cat([fns[n](z[:, i: i + 1]) for i, n in enumerate(names)], 1)
    gy = torch.randn(ref.shape, generator=g).to(DEVICE)
    ref_grads = torch.autograd.grad(ref, [xr, wr, br], gy)
    x = _channels_last(x0).requires_grad_()
    wk, bk = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = conv_pool(x, wk, bk, stride, padding, pool, act=dc.activation_codes(names, DEVICE))
    with recording() as launches:
        torch.autograd.grad(y, [x, wk, bk], gy, retain_graph=True)
    kernel = "_dw_joint_kernel" if dw_form == "joint" and k == 3 else "_dw_taps_kernel"
    assert kernel in [kern.__name__ for kern, _, _ in launches]
    grads = torch.autograd.grad(y, [x, wk, bk], gy)
    for name, a, r in zip(["y", "dx", "dw", "db"], [y, *grads], [ref, *ref_grads]):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-4), (name, float((a - r).abs().max()))
    with pytest.raises(ValueError, match="unknown direct-conv dw form 'rows'.*taps, joint"):
        dc.set_dw_form("rows")


def test_activations_without_a_fused_form_run_as_their_own_layer(digits28, monkeypatch):
    """gelu / silu need their input for the derivative: a population with one of them keeps the activation
    layer, as does `set_activation_fusion(False)`; codes follow a reassigned `act_runs` (hyperrep does that)."""
    import zoo._directconv as dc
    from zoo._triton import recording
    from zoo.engine import runs

    def act_flags(names):
        members = [MemberSpec(seed=i, batch_size=4, activation=a) for i, a in enumerate(names)]
        pop = Population("smallcnn", {}, members, digits28.to(DEVICE), conv="fused")
        xb, y, _, key = pop._batch(pop.epoch_order(1), 1, 0)
        with recording() as launches:
            pop._loss(pop.flat.detach(), xb, y, key)
        return pop, [f[3] for f in _flags(launches)]  # the forward kernels' ACT

    pop, flags = act_flags(["gelu", "tanh"])
    assert pop.net.act_codes is None and flags == [False] * 3
    pop.net.act_runs = runs(["relu", "tanh"])
    assert pop.net.act_codes.tolist() == [1, 2] and pop.net.size == 2
    assert act_flags(["relu", "tanh"])[1] == [True] * 3
    monkeypatch.setattr(dc, "fuse_activation", True)
    dc.set_activation_fusion(False)
    assert act_flags(["relu", "tanh"])[1] == [False] * 3


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
@pytest.mark.parametrize("geometry", [(2, 5, 16, 9, 16, 3, 2, 1, 1), (3, 5, 3, 9, 4, 3, 2, 0, 1)])
def test_fused_dropout_matches_the_dropout_layer(geometry, layout):
    """The engine's hashed dropout after each member's activation, in the direct kernels: the output and the x,
    w, b gradients match torch's conv, the activation and `zoo.engine._dropout`'s mask (hash of the member's key
    and the element's index over (B, O, Ho, Wo)) scaled by 1 / keep, for a rate per member (0 keeps all)."""
    import zoo._directconv as dc
    from zoo._rng import hash32
    from zoo.models import ACTIVATIONS
    B, M, C, H, O, k, stride, padding, pool = geometry
    names, rates = ["relu", "tanh", "sigmoid", "leaky_relu", "tanh"], torch.tensor([0.5, 0.3, 0.7, 0.1, 0.0])
    g = torch.Generator().manual_seed(5)
    x0, w, b = (0.5 * torch.randn(*s, generator=g).to(DEVICE) for s in [(B, M, C, H, H), (M, O, C, k, k), (M, O)])
    keys = torch.randint(0, 2**31, (M,), generator=g, dtype=torch.int64).to(DEVICE)
    drop = dc.Dropout(keys, torch.ceil(rates.double() * 2**32).long().to(DEVICE), (1 - rates).to(DEVICE))
    xr, wr, br = x0.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    z = _reference(xr, wr, br, stride, padding, pool)
    act = torch.cat([ACTIVATIONS[n](z[:, i: i + 1]) for i, n in enumerate(names)], 1)
    elem = torch.arange(z[:, 0].numel(), device=DEVICE).view(B, 1, *z.shape[2:])
    kept = hash32(keys.view(1, M, 1, 1, 1), 0, elem ^ 0x5BD1E995) >= drop.thr.view(1, M, 1, 1, 1)
    ref = act * kept / drop.keep.view(1, M, 1, 1, 1)
    gy = torch.randn(ref.shape, generator=g).to(DEVICE)
    ref_grads = torch.autograd.grad(ref, [xr, wr, br], gy)
    y = conv_pool(xr, wr, br, stride, padding, pool, act=dc.activation_codes(names, DEVICE), dropout=drop)
    grads = torch.autograd.grad(y, [xr, wr, br], gy)
    for name, a, r in zip(["y", "dx", "dw", "db"], [y, *grads], [ref, *ref_grads]):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-4), (name, float((a - r).abs().max()))
    frac = kept.float().mean(dim=(0, 2, 3, 4))  # each member's kept fraction is near its 1 - rate
    assert (frac - (1 - rates.to(DEVICE))).abs().max() < 0.1 and frac[-1] == 1
    with pytest.raises(ValueError, match="dropout needs the fused activation"):
        conv_pool(xr, wr, br, stride, padding, pool, dropout=drop)
    with pytest.raises(ValueError, match=r"dropout.thr must be \(5,\) torch.int64, got \(5,\) torch.float64"):
        conv_pool(xr, wr, br, stride, padding, pool, act=dc.activation_codes(names, DEVICE),
                  dropout=drop._replace(thr=drop.thr.double()))


@pytest.mark.parametrize("layout", LAYOUTS, indirect=True)
def test_population_fuses_dropout_into_the_convs(layout, digits28, monkeypatch):
    """smallcnn members with their own dropout rates: with dropout fused into the convs, the training loss and
    every gradient equal the separate dropout layers' (the same hashed masks, the same layer count, so the
    classifier's masks after them too); evaluation (dropout off) runs without it."""
    import zoo._directconv as dc
    from zoo._triton import recording

    monkeypatch.setattr(dc, "fuse_dropout", dc.fuse_dropout)
    members = [MemberSpec(seed=i, batch_size=8, dropout=r, activation=a)
               for i, (r, a) in enumerate([(0.5, "tanh"), (0.2, "relu"), (0.0, "tanh")])]
    pop = Population("smallcnn", {}, members, digits28.to(DEVICE), conv="fused")
    xb, y, _, key = pop._batch(pop.epoch_order(1), 1, 0)
    out = {}
    for fuse in (False, True):
        dc.set_dropout_fusion(fuse)
        flat = pop.flat.detach().clone().requires_grad_(True)
        loss, losses = pop._loss(flat, xb, y, key)
        loss.backward()
        out[fuse] = losses.detach(), flat.grad
        with recording() as launches:  # recorded launches do not run: the flags only
            pop._loss(pop.flat.detach().requires_grad_(True), xb, y, key)[0].backward()
        assert [f[-1] for f in _flags(launches) if f[0] != "_dx_phase_kernel"] == [fuse] * 6
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5), (out[True][0], out[False][0])
    assert torch.allclose(out[True][1], out[False][1], atol=1e-5, rtol=1e-4), \
        float((out[True][1] - out[False][1]).abs().max())
    with torch.no_grad(), recording() as launches:
        pop.forward(pop.data.normalize(xb), False, pop.views(pop.flat))
    assert [f[-1] for f in _flags(launches)] == [False] * 3
