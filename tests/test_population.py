import pytest
import torch

from zoo import MemberSpec, Population
from zoo.engine import _Ctx, _dropout
from zoo.models import INITS, create_model, flatten_state
from zoo.population import init_flat, init_member, member_order, member_pools, noisy_labels
from zoo.solo import accuracy, train_solo

ARCHS = [("cnn_s", {}, "digits28"), ("cnn_l", {}, "digits28"), ("cnn_gap", {}, "digits"), ("smallcnn", {}, "digits28"),
         ("mlp", {"widths": [32, 16]}, "digits"), ("vit_t", {"patch": 4, "dim": 16, "depth": 1}, "digits")]
LR = {"adam": 1e-3, "sgd": 1e-2, "rmsprop": 1e-3}


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _members(opt, n=3, activation="tanh", **kw):
    return [MemberSpec(seed=10 + i, optimizer=opt, lr=LR[opt] * (1 + i), weight_decay=1e-3 * i,
                       activation=activation, init="xavier_uniform", batch_size=32, **kw) for i in range(n)]


def _flat(model):
    return torch.cat([t.reshape(-1) for t in model.state_dict().values()])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# fp32 tolerance: grouped vs dense convolution reassociates sums (~1e-7 per step); max-pool near-ties of
# saturated tanh units and Adam's division by sqrt(v) amplify that to ~1e-5 after 8 steps. A wrong batch,
# label, init or update rule gives errors of order 1.
TOL = 5e-4


@pytest.mark.parametrize("arch,kw,data_name", ARCHS)
def test_population_init_equals_per_member_init(arch, kw, data_name):
    """One re-initialised module (init_flat) gives each member exactly the weights of its own fresh module."""
    build = lambda: create_model(arch, in_channels=1, input_size=8 if data_name == "digits" else 28, **kw)
    members = [MemberSpec(seed=s, init=i, init_scale=0.5 + s) for s, i in enumerate(INITS)]
    flat = init_flat(build(), members)
    assert flat.shape == (len(INITS), flatten_state(build()).numel())
    for row, m in zip(flat, members):
        assert torch.equal(row, flatten_state(init_member(build, m)))


@pytest.mark.parametrize("arch,kw,data_name", ARCHS)
@pytest.mark.parametrize("opt", ["adam", "sgd", "rmsprop"])
def test_population_matches_plain_loop(arch, kw, data_name, opt, request):
    """Same seed, same batches: a member trained in a population equals the plain PyTorch loop."""
    data = request.getfixturevalue(data_name)
    members = _members(opt)
    members[1] = MemberSpec(**{**vars(members[1]), "label_noise": 0.2, "train_fraction": 0.5})
    # its own data order (data_seed), same init; cnn_l under rmsprop amplifies rounding within 8 steps for some
    # orders (data_seed 777: 2e-2 between the two loops, 13: 2e-6), so the order is one that does not
    members[2] = MemberSpec(**{**vars(members[2]), "data_seed": 13})
    pop = Population(arch, kw, members, data)
    pop.train_epoch(1, max_steps=8)
    x = data.normalize(data.x_test[:64])
    pop_logits = pop.forward(x[:, None], train=False)  # (B, M, K)
    for i, m in enumerate(members):
        solo = train_solo(arch, kw, m, data, epochs=1, max_steps=8).eval()
        with torch.no_grad():
            assert _rel(pop_logits[:, i], solo(x)) < TOL, (arch, opt, i)
        if arch != "vit_t":  # attention's key bias has a zero true gradient: Adam amplifies rounding there
            assert _rel(pop.flat_weights()[i], _flat(solo)) < TOL, (arch, opt, i)


@pytest.mark.parametrize("arch,kw,data_name", [ARCHS[0], ARCHS[4], ARCHS[5]])
def test_mixed_population_matches_plain_loop(arch, kw, data_name, request):
    """Activations and optimizers differ per member inside one population (unsorted: several runs each)."""
    data = request.getfixturevalue(data_name)
    combos = [("tanh", "adam"), ("relu", "sgd"), ("tanh", "rmsprop"), ("gelu", "adam"), ("sigmoid", "sgd")]
    members = [MemberSpec(seed=20 + i, optimizer=o, lr=LR[o], activation=a, init="xavier_uniform", batch_size=32,
                          weight_decay=1e-3) for i, (a, o) in enumerate(combos)]
    pop = Population(arch, kw, members, data)
    assert len(pop.act_runs) == 5 and len(pop.opt_runs) == 5
    pop.train_epoch(1, max_steps=6)
    x = data.normalize(data.x_test[:64])
    logits = pop.forward(x[:, None], train=False)
    for i, m in enumerate(members):
        solo = train_solo(arch, kw, m, data, epochs=1, max_steps=6).eval()
        with torch.no_grad():
            assert _rel(logits[:, i], solo(x)) < TOL, (arch, m.activation, m.optimizer)


def test_mixed_population_equals_separate_populations(digits):
    members = [MemberSpec(seed=i, optimizer=o, lr=LR[o], activation=a, dropout=0.2, batch_size=32)
               for i, (a, o) in enumerate([("relu", "adam"), ("relu", "sgd"), ("tanh", "adam"), ("tanh", "sgd")])]
    mixed = Population("cnn_gap", {}, members, digits)
    mixed.train_epoch(1)
    for i, m in enumerate(members):
        alone = Population("cnn_gap", {}, [m], digits)
        alone.train_epoch(1)
        assert _rel(mixed.flat_weights()[i], alone.flat_weights()[0]) < 1e-5


@pytest.mark.parametrize("arch,data_name", [("cnn_s", "digits28"), ("cnn_gap", "digits")])
def test_unfold_convolution_matches_grouped(arch, data_name, request):
    data = request.getfixturevalue(data_name)
    pops = [Population(arch, {}, _members("adam", 3, dropout=0.2), data, conv=c) for c in ("grouped", "unfold")]
    for p in pops:
        p.train_epoch(1, max_steps=5)
    assert _rel(pops[1].flat_weights(), pops[0].flat_weights()) < TOL


def test_member_does_not_depend_on_population_mates(digits):
    a = _members("adam", 4, dropout=0.3)
    p1, p2 = Population("cnn_gap", {}, a, digits), Population("cnn_gap", {}, [a[3], a[0]], digits)
    for p in (p1, p2):
        p.train_epoch(1)
    assert _rel(p1.flat_weights()[3], p2.flat_weights()[0]) < 1e-5
    assert _rel(p1.flat_weights()[0], p2.flat_weights()[1]) < 1e-5


def test_full_epoch_and_evaluation_match_plain_loop(digits):
    members = _members("sgd", 2)
    pop = Population("cnn_gap", {}, members, digits)
    pop.train_epoch(1)
    metrics = pop.evaluate()
    for i, m in enumerate(members):
        solo = train_solo("cnn_gap", {}, m, digits, epochs=1)
        assert _rel(pop.flat_weights()[i], _flat(solo)) < 1e-4
        assert abs(float(metrics["test_acc"][i]) - accuracy(solo, digits)) < 1e-6


def test_evaluation_does_not_depend_on_chunk_size(digits):
    """Chunks have a fixed size, the last one padded with zero-weight images: the metrics are the same
    whether the chunk divides the split or not (digits' test split has 360 images; 7 does not divide it)."""
    members = _members("adam", 2) + [MemberSpec(seed=3, batch_size=32, class_subset="0,1,2", train_fraction=0.5)]
    pop = Population("cnn_gap", {}, members, digits, train_eval_samples=100, eval_bytes=1 << 40)
    pop.train_epoch(1, max_steps=2)
    assert pop.eval_chunk >= len(digits.x_test)  # one chunk per split
    whole = pop.evaluate()
    pop.evaluator.chunk = 7
    for k, v in pop.evaluate().items():
        assert torch.allclose(v, whole[k], atol=1e-6), k


@pytest.mark.parametrize("compile", [False, True])
def test_diverging_member_is_flagged_and_others_continue(digits, compile):
    """Compiled, the divergence bookkeeping runs inside the optimizer's graph (in-place updates). On the GPU
    when there is one: the fused kernels' path, and the torch there (2.11) fails to compile grouped convs on
    the CPU (an inductor lowering error, "View" bias), which the CPU tests' torch does not."""
    digits = digits.to(torch.device(DEVICE)) if compile else digits
    good = _members("sgd", 2, activation="relu")
    bad = MemberSpec(seed=99, optimizer="sgd", lr=1e8, activation="relu", batch_size=32, init="normal", init_scale=10.0)
    mixed = Population("cnn_gap", {}, [good[0], bad, good[1]], digits, compile=compile)
    alone = Population("cnn_gap", {}, good, digits)
    for p in (mixed, alone):
        p.train_epoch(1)
    assert mixed.diverged.tolist() == [False, True, False]
    w = mixed.flat_weights()
    assert torch.isnan(w[1]).all() and torch.isfinite(w[[0, 2]]).all()
    assert _rel(w[[0, 2]], alone.flat_weights()) < (1e-4 if compile else 1e-5)  # compiled: another sum order
    assert torch.isnan(mixed.evaluate()["test_acc"][1])


def test_per_member_dropout_rates():
    x = torch.ones(4000, 3, 10)  # (B, M, features)
    rates = torch.tensor([0.0, 0.3, 0.7])
    y = _dropout(None, "", x, _Ctx({}, [("relu", 0, 3)], rates, torch.tensor([5, 6, 7])))
    dropped = (y == 0).float().mean(dim=(0, 2))
    assert torch.allclose(dropped, rates, atol=0.01)
    assert torch.allclose(y.mean(dim=(0, 2)), torch.ones(3), atol=0.03)  # inverted dropout keeps the mean


def test_pruning_reaches_sparsity_and_masks_persist(digits):
    members = [MemberSpec(seed=s, prune_fraction=f, batch_size=32) for s, f in [(0, 0.0), (1, 0.5), (2, 0.8)]]
    pop = Population("cnn_gap", {}, members, digits, prune_epochs=[1, 2])
    pop.train_epoch(1)
    assert torch.allclose(pop.sparsity(), torch.tensor([0.0, 0.25, 0.4]), atol=2e-3)
    pop.train_epoch(2)
    zero_after_2 = [(pop.params[i] == 0) for i in pop.prunable]
    assert torch.allclose(pop.sparsity(), torch.tensor([0.0, 0.5, 0.8]), atol=2e-3)
    pop.train_epoch(3)
    assert all(((pop.params[i] == 0) >= z).all() for i, z in zip(pop.prunable, zero_after_2))
    assert torch.allclose(pop.evaluate()["sparsity"], torch.tensor([0.0, 0.5, 0.8]), atol=2e-3)


def test_data_factors(digits):
    y = digits.y_train
    members = [MemberSpec(seed=1, train_fraction=0.25), MemberSpec(seed=2, class_subset="0,1,2"), MemberSpec(seed=3)]
    pool = member_pools(members, y)
    assert int(pool[0].sum()) == int(0.25 * len(y))
    assert set(y[pool[1]].tolist()) == {0, 1, 2} and bool(pool[1].sum() == torch.isin(y, torch.tensor([0, 1, 2])).sum())
    assert bool(pool[2].all())
    idx = torch.arange(len(y))[None].expand(3, -1)
    noisy = noisy_labels(y, idx, torch.tensor([1, 2, 3]), torch.tensor([0.0, 0.5, 1.0]), 10)
    agree = (noisy == y).float().mean(1)
    assert agree[0] == 1.0 and 0.5 < agree[1] < 0.6 and agree[2] < 0.2


def test_class_subset_metrics_use_only_those_classes(digits):
    pop = Population("cnn_gap", {}, [MemberSpec(seed=0, class_subset="3,4", batch_size=16)], digits)
    pop.train_epoch(1)
    pop.train_epoch(2)
    assert float(pop.evaluate()["test_acc"][0]) > 0.8  # two classes: easy


def test_member_order_is_deterministic_and_distinct():
    seeds = torch.tensor([1, 2])
    a, b = member_order(seeds, 1, 100), member_order(seeds, 1, 100)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, member_order(seeds, 2, 100))
    assert torch.equal(a.sort(1).values, torch.arange(100).expand(2, -1))


def test_population_rejects_mixed_batch_sizes(digits):
    with pytest.raises(ValueError, match="shares its batch size"):
        Population("cnn_gap", {}, [MemberSpec(batch_size=16), MemberSpec(batch_size=32)], digits)


def test_graph_batch_from_device_counters_matches_python_ints(digits):
    """The CUDA-graph step reads epoch and step from 0-dim device tensors: same batches, labels, keys."""
    members = _members("adam", 3, label_noise=0.3, dropout=0.2)
    members[2] = MemberSpec(**{**vars(members[2]), "train_fraction": 0.5})
    pop = Population("cnn_gap", {}, members, digits)
    order = pop.epoch_order(3)
    for s in (0, 5, int(pop.n_steps.max()) - 1):
        a = pop._batch(order, 3, s)
        b = pop._batch(order, torch.tensor(3), torch.tensor(s))
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_compiled_graph_batch_matches_eager_batch(digits):
    """The graphed step cuts its batches with the compiled `_batch_fn` (integer hashes fused): the same
    images, labels, active flags and dropout keys as the eager `_batch`, bit for bit."""
    members = _members("adam", 3, label_noise=0.3, dropout=0.2)
    members[2] = MemberSpec(**{**vars(members[2]), "train_fraction": 0.5})
    pop = Population("cnn_gap", {}, members, digits.to(torch.device(DEVICE)), compile=True)
    order = pop.epoch_order(3)
    for s in (0, int(pop.n_steps.max()) - 1):
        a = pop._batch(order, 3, s)
        b = pop._batch_fn(order, torch.tensor(3, device=DEVICE), torch.tensor(s, device=DEVICE))
        assert all(u.dtype == v.dtype and torch.equal(u, v) for u, v in zip(a, b))


def test_patch_forms_train_the_same_members(digits, monkeypatch):
    """vit_t's patch embedding as the conv rule and as one matmul over reshaped patches: same weights and logits
    after training, in training (members' own images) and evaluation (shared images); unknown forms refused."""
    import zoo.engine as engine

    monkeypatch.setattr(engine, "patch_form", engine.patch_form)
    out = {}
    for form in engine.PATCH_FORMS:
        engine.set_patch_form(form)
        pop = Population("vit_t", {"patch": 4, "dim": 16, "depth": 1}, _members("adam"), digits)
        pop.train_epoch(1, max_steps=6)
        out[form] = pop.flat_weights(), pop.forward(digits.normalize(digits.x_test[:32])[:, None], train=False)
    (w_conv, y_conv), (w_mm, y_mm) = out["conv"], out["matmul"]
    # the attention key bias has a zero true gradient: Adam turns rounding there into lr-sized steps (left out)
    key_bias = pop.net.layout["1.body.1.qkv.bias"].offset + torch.arange(16, 32)
    keep = torch.ones(w_mm.shape[1], dtype=torch.bool).index_fill_(0, key_bias, False)
    assert _rel(w_mm[:, keep], w_conv[:, keep]) < 1e-5 and _rel(y_mm, y_conv) < 1e-5
    with pytest.raises(ValueError, match="unknown patch form 'unfold'.*conv, matmul"):
        engine.set_patch_form("unfold")


def test_fused_blocks_train_the_same_members(digits, monkeypatch):
    """vit_t's blocks layer by layer and as one Triton kernel each way (MLP form "fused", attention form "block";
    interpreted on CPU) reach the same weights and logits, for members of two activations (each with its own code
    in the kernel; every code: test_mlp.py) and two dropout rates (the kernels draw the engine's hashed masks);
    an unknown form is refused by name."""
    import zoo.engine as engine

    monkeypatch.setattr(engine, "mlp_form", engine.mlp_form)
    monkeypatch.setattr(engine, "attention_form", engine.attention_form)
    calls = []
    counted = lambda f: lambda *a: calls.append(1) or f(*a)
    monkeypatch.setattr(engine._mlp, "residual_mlp", counted(engine._mlp.residual_mlp))
    monkeypatch.setattr(engine._attnblock, "attention_block", counted(engine._attnblock.attention_block))
    kw = {"patch": 4, "dim": 16, "depth": 1}
    members = [MemberSpec(**{**vars(m), "dropout": d}) for a, d in [("tanh", 0.0), ("gelu", 0.3)]
               for m in _members("adam", 1, a)]
    out = {}
    for mlp, att in [("layers", "triton"), ("fused", "block")]:
        engine.set_mlp_form(mlp)
        engine.set_attention_form(att)
        pop = Population("vit_t", kw, members, digits, conv="fused")
        pop.train_epoch(1, max_steps=4)
        out[mlp] = pop.flat_weights(), pop.forward(digits.normalize(digits.x_test[:32])[:, None], train=False)
    (w_l, y_l), (w_f, y_f) = out["layers"], out["fused"]
    key_bias = pop.net.layout["1.body.1.qkv.bias"].offset + torch.arange(16, 32)  # zero true gradient (above)
    keep = torch.ones(w_l.shape[1], dtype=torch.bool).index_fill_(0, key_bias, False)
    assert _rel(w_f[:, keep], w_l[:, keep]) < 1e-6 and _rel(y_f, y_l) < 1e-5
    assert len(calls) == 10  # both kernels in the fused forms' 4 steps and evaluation, and only there
    with pytest.raises(ValueError, match="unknown mlp form 'mlp'.*layers, fused"):
        engine.set_mlp_form("mlp")


def test_token_layouts_train_the_same_members(digits, monkeypatch):
    """vit_t's token stream image-major and member-major (a (M, B, T, D) buffer seen transposed, as the per-member
    matmuls read it) through the fused blocks (interpreted on CPU) and with dropout: the same weights and logits;
    the stream's strides are the layout's; an unknown layout is refused by name."""
    import zoo.engine as engine
    from zoo.models.layers import PatchEmbed

    monkeypatch.setattr(engine, "token_layout", engine.token_layout)
    monkeypatch.setattr(engine, "attention_form", "block")
    strides = []
    embed = engine.RULES[PatchEmbed]
    monkeypatch.setitem(engine.RULES, PatchEmbed, lambda *a: (lambda t: strides.append(t.stride()) or t)(embed(*a)))
    members = [MemberSpec(**{**vars(m), "dropout": d}) for a, d in [("tanh", 0.0), ("gelu", 0.3)]
               for m in _members("adam", 1, a)]
    out = {}
    for layout in engine.TOKEN_LAYOUTS:
        engine.set_token_layout(layout)
        pop = Population("vit_t", {"patch": 4, "dim": 16, "depth": 1}, members, digits, conv="fused")
        pop.train_epoch(1, max_steps=3)
        out[layout] = pop.flat_weights(), pop.forward(digits.normalize(digits.x_test[:32])[:, None], train=False)
    (w_i, y_i), (w_m, y_m) = out["images"], out["members"]
    assert _rel(w_m, w_i) < 1e-6 and _rel(y_m, y_i) < 1e-6
    first_members = next(i for i, st in enumerate(strides) if st[1] > st[0])  # the first call of the second layout
    assert all(st[0] > st[1] for st in strides[:first_members]) and all(st[1] > st[0] for st in strides[first_members:])
    with pytest.raises(ValueError, match="unknown token layout 'tokens'.*images, members"):
        engine.set_token_layout("tokens")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_match_eager_steps(digits):
    data = digits.to(torch.device("cuda"))
    members = _members("adam", 3, dropout=0.2)
    pops = [Population("cnn_gap", {}, members, data, cuda_graphs=g) for g in (False, True)]
    for p in pops:
        p.train_epoch(1, max_steps=12)
    assert torch.allclose(pops[0].flat_weights(), pops[1].flat_weights(), atol=1e-6)


def test_attention_forms_train_the_same_members(digits, monkeypatch):
    """vit_t members trained with attention as batched matmuls, as broadcast products summed (the form
    inductor fuses), as torch's fused attention, as our Triton kernel and as the whole pre-norm block in one
    kernel each way (both interpreted on CPU) reach the same weights and logits; an unknown form is refused by
    name."""
    import zoo.engine as engine

    monkeypatch.setattr(engine, "attention_form", engine.attention_form)
    calls, blocks = [], []
    monkeypatch.setattr(engine, "triton_attention",
                        lambda *a, f=engine.triton_attention, **k: calls.append(1) or f(*a, **k))
    monkeypatch.setattr(engine._attnblock, "attention_block",
                        lambda *a, f=engine._attnblock.attention_block: blocks.append(1) or f(*a))
    kw = {"patch": 4, "dim": 16, "depth": 1}
    out = {}
    for form in engine.ATTENTION_FORMS:
        engine.set_attention_form(form)
        pop = Population("vit_t", kw, _members("adam"), digits, conv="fused")  # the Triton path (interpreted)
        pop.train_epoch(1, max_steps=4)
        out[form] = pop.flat_weights(), pop.forward(digits.normalize(digits.x_test[:32])[:, None], train=False)
    w_bmm, y_bmm = out["bmm"]
    # the key bias has a zero true gradient, so Adam turns the forms' different rounding there into lr-sized
    # steps (as against the plain loop, test_sequences.py): it is left out of the weight comparison
    key_bias = pop.net.layout["1.body.1.qkv.bias"].offset + torch.arange(16, 32)
    keep = torch.ones(w_bmm.shape[1], dtype=torch.bool).index_fill_(0, key_bias, False)
    for form in ("reduce", "sdpa", "triton", "block"):
        w, y = out[form]
        assert _rel(w[:, keep], w_bmm[:, keep]) < 1e-6 and _rel(y, y_bmm) < 1e-5, form
    assert len(calls) == len(blocks) == 5  # each kernel ran in its form's 4 steps and evaluation, and only there
    assert not torch.equal(w_bmm, _flat(create_model("vit_t", in_channels=1, input_size=8, **kw)))
    with pytest.raises(ValueError, match="unknown attention form 'flash'.*bmm, reduce, sdpa, triton, block"):
        engine.set_attention_form("flash")
