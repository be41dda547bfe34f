"""Sequence members (gpt_t with memory neurons) on generated sequence data: models, data, population, build."""
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import zoo
from zoo import MemberSpec, Population, UsageError, create_model, init_weights, load_config
from zoo.build import build
from zoo.models import Activation, MemoryMLP
from zoo.sequences import SequenceSpec, make_sequences
from zoo.solo import train_solo

MEM = SequenceSpec(task="memorize", n_sequences=4, length=20, context=8, vocab=12)
KW = {"dim": 16, "depth": 1, "heads": 2, "fc_mem_dim": 4, "mem_lr_scale": 3.0}


def _members(n=3, **kw):
    return [MemberSpec(seed=5 + i, lr=2e-3 * (1 + i), weight_decay=1e-3 * i, activation="gelu", batch_size=8,
                       init="xavier_uniform", **kw) for i in range(n)]


@pytest.mark.parametrize("task", ["memorize", "modular", "continual", "continual_memorize"])
def test_generators_are_deterministic_per_seed(task):
    a, b = make_sequences(SequenceSpec(task=task, seed=3)), make_sequences(SequenceSpec(task=task, seed=3))
    c = make_sequences(SequenceSpec(task=task, seed=4))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_train, c.x_train) or not torch.equal(a.y_train, c.y_train)
    assert a.x_train.dtype == torch.int64 and int(a.x_train.max()) < a.num_classes


def test_memorize_windows_are_next_token_pairs_of_one_sequence():
    d = make_sequences(MEM)
    assert d.x_train.shape == (4 * 13, 8) and d.num_groups == 4
    assert torch.equal(d.x_train[:, 1:], d.y_train[:, :-1])  # the target is the next token
    assert torch.equal(d.x_train[1, :-1], d.x_train[0, 1:])  # consecutive windows of one sequence


def test_modular_answers_and_split():
    d = make_sequences(SequenceSpec(task="modular", modulus=7, train_split=0.5))
    x, y = torch.cat([d.x_train, d.x_test]), torch.cat([d.y_train, d.y_test])
    assert len(x) == 49 and len({tuple(r) for r in x.tolist()}) == 49  # every pair once, train and test disjoint
    assert torch.equal(y[:, -1], (x[:, 0] + x[:, 2]) % 7) and (y[:, :-1] == -1).all()
    c = make_sequences(SequenceSpec(task="continual", modulus=7))
    b = c.groups("test") == 1
    assert c.task_names == ("a", "b") and torch.equal(c.y_test[b, -1], (c.x_test[b, 0] - c.x_test[b, 2]) % 7)


@pytest.mark.parametrize("bad,words", [({"task": "sort"}, "sequence.task"), ({"length": 4, "context": 8},
                                       "sequence.length"), ({"modulus": 1}, "sequence.modulus"),
                                       ({"train_split": 1.0}, "train_split"), ({"colour": 3}, "sequence.colour")])
def test_bad_sequence_settings_fail_with_one_line(bad, words):
    with pytest.raises(UsageError, match=words):
        SequenceSpec.of(bad)


def test_memory_mlp_without_memory_is_the_plain_mlp():
    mlp = MemoryMLP(16, 32, 0, "gelu")
    plain = nn.Sequential(nn.Linear(16, 32), Activation("gelu"), nn.Linear(32, 16))
    plain[0].load_state_dict(mlp.fc.state_dict())
    plain[2].load_state_dict(mlp.proj.state_dict())
    x = torch.randn(3, 5, 16)
    assert [n for n, _ in mlp.named_parameters()] == ["fc.weight", "fc.bias", "proj.weight", "proj.bias"]
    assert torch.equal(mlp(x), plain(x))


def test_fresh_memory_neurons_leave_the_block_unchanged():
    """Memory neurons start silent: a gpt_t with fc_mem_dim > 0 computes what the same net without them does."""
    g = lambda: torch.Generator().manual_seed(0)
    with_mem = init_weights(create_model("gpt_t", input_size=8, num_classes=12, fc_mem_dim=4), "xavier_uniform", 1, g())
    plain = create_model("gpt_t", input_size=8, num_classes=12)
    plain.load_state_dict({k: v for k, v in with_mem.state_dict().items() if "mem_" not in k})
    x = torch.randint(0, 12, (3, 8))
    assert torch.equal(with_mem(x), plain(x))


def test_causal_attention_does_not_see_the_future():
    net = init_weights(create_model("gpt_t", input_size=8, num_classes=12), "xavier_uniform", 1,
                       torch.Generator().manual_seed(0)).eval()
    x = torch.randint(0, 12, (2, 8))
    x2 = x.clone()
    x2[:, 5:] = (x2[:, 5:] + 1) % 12
    assert torch.allclose(net(x)[:, :5], net(x2)[:, :5]) and not torch.allclose(net(x)[:, 5:], net(x2)[:, 5:])


def test_causal_attention_forms_agree(monkeypatch):
    """gpt_t members' logits are the same with attention as batched matmuls, as summed broadcast products and
    as torch's fused attention, our Triton kernel and the whole pre-norm block in one kernel
    (zoo.engine.ATTENTION_FORMS), causal mask included."""
    import zoo.engine as engine

    monkeypatch.setattr(engine, "attention_form", engine.attention_form)
    data = make_sequences(MEM)
    pop = Population("gpt_t", KW, _members(), data, conv="fused")  # the Triton path (interpreted on CPU)
    logits = {}
    for form in engine.ATTENTION_FORMS:
        engine.set_attention_form(form)
        logits[form] = pop.forward(data.x_test[:16, None], train=False)  # (B, M, T, V)
    for form in ("reduce", "sdpa", "triton", "block"):
        assert float((logits[form] - logits["bmm"]).norm() / logits["bmm"].norm()) < 1e-5, form


@pytest.mark.parametrize("tied", [False, True])
def test_population_matches_plain_loop(tied):
    """Same seeds, same batches: gpt_t members (memory neurons at their own lr) equal the plain loop."""
    data = make_sequences(MEM)
    kw = {**KW, "tied": tied}
    members = _members()
    pop = Population("gpt_t", kw, members, data)
    pop.train_epoch(1, max_steps=6)
    x = data.x_test[:16]
    logits = pop.forward(x[:, None], train=False)  # (B, M, T, V)
    for i, m in enumerate(members):
        solo = train_solo("gpt_t", kw, m, data, epochs=1, max_steps=6).eval()
        with torch.no_grad():
            ref = solo(x)
        assert float((logits[:, i] - ref).norm() / ref.norm()) < 5e-4, i
        flat = torch.cat([t.reshape(-1) for t in solo.state_dict().values()])
        # attention's key bias has a zero true gradient (softmax is shift-invariant per query): Adam turns the
        # rounding noise there into steps of size lr, so it is left out of the weight comparison
        key_bias = pop.net.layout["1.body.1.qkv.bias"].offset + torch.arange(16, 32)
        keep = torch.ones_like(flat, dtype=torch.bool).index_fill_(0, key_bias, False)
        assert float((pop.flat_weights()[i] - flat)[keep].norm() / flat.norm()) < 5e-4, i


def test_unused_memory_neurons_stay_zero_and_members_memorise_their_sequence():
    data = make_sequences(MEM)
    members = [MemberSpec(seed=i, lr=3e-3, activation="gelu", batch_size=8, class_subset=str(i), mem_neurons=k)
               for i, k in enumerate([0, 2, 4, -1])]
    pop = Population("gpt_t", KW, members, data)
    before = pop.evaluate()["test_acc"]
    for e in range(1, 41):
        pop.train_epoch(e)
    after = pop.evaluate()
    assert (after["test_acc"] > 0.7).all() and (after["test_acc"] > before + 0.5).all(), after["test_acc"]
    w = pop.net.layout.tensor(pop.flat_weights(), "2.body.1.mem_fc.weight")  # (M, mem, D)
    used = (w.abs().sum(-1) > 0).sum(-1).tolist()
    assert used == [0, 2, 4, 4]


def test_continual_members_switch_task_and_record_forgetting():
    data = make_sequences(SequenceSpec(task="continual", modulus=7, train_split=0.8))
    pop = Population("gpt_t", KW, _members(2), data, switch=2)
    seen = []
    for e in range(1, 5):
        pop.train_epoch(e)
        seen.append(set(data.groups("train")[pop.mine.pool[0]].tolist()))
    assert seen == [{0}, {0}, {1}, {1}]  # task A up to the switch epoch, then task B
    out = pop.evaluate()
    assert {"test_a_acc", "test_b_acc", "forgetting"} <= set(out) and torch.isfinite(out["forgetting"]).all()


def test_memorising_a_second_sequence_forgets_the_first():
    data = make_sequences(SequenceSpec(task="continual_memorize", length=20, context=8, vocab=12))
    members = [MemberSpec(seed=i, lr=3e-3, activation="gelu", batch_size=4) for i in range(2)]
    pop = Population("gpt_t", KW, members, data, switch=15)
    for e in range(1, 31):
        pop.train_epoch(e)
        if e == 15:
            learned = pop.evaluate()
    out = pop.evaluate()
    assert (learned["test_a_acc"] > 0.6).all() and (out["test_b_acc"] > 0.6).all()
    assert (out["forgetting"] > 0.3).all() and torch.allclose(out["forgetting"], pop.best_a - out["test_a_acc"])


def test_build_writes_a_sequence_zoo_that_every_reader_opens(tmp_path):
    cfg = load_config(zoo.ZooConfig, "configs/zoo/seq_continual.yaml",
                      ["n_random=3", "epochs=2", "checkpoints=[0,1,2]", "sequence.switch_epoch=1"])
    out = build(cfg, tmp_path / "c.h5", progress=False)
    with zoo.open(out) as z:
        assert z.spec.input_shape == (16,) and z.architecture == "gpt_t" and z.usable().all()
        assert {"test_a_acc", "forgetting"} <= set(z.metric_names)
        assert np.isfinite(z.metric("forgetting")).all() and set(z.field("mem_neurons")) <= {0, 16}
        net = z.model(0, -1)  # a plain module that reproduces its recorded accuracy
        d = z.dataset()
        with torch.no_grad():
            logits = net(d.x_test)
        hit = ((logits.argmax(-1) == d.y_test) & (d.y_test >= 0)).sum(1) / (d.y_test >= 0).sum(1)
        assert abs(float(hit.float().mean()) - float(z.metric("test_acc")[0, -1])) < 1e-5


def test_evaluate_with_class_subsets_reproduces_what_the_build_recorded(tmp_path):
    """Each member memorises its own sequence: zoo.evaluate on the member's class_subset gives the recorded
    test_acc; over every sequence of the bank it would not."""
    cfg = load_config(zoo.ZooConfig, "configs/zoo/seq_memory.yaml", ["n_random=4", "epochs=3", "checkpoints=[0,3]",
                                                                        "sequence.n_sequences=4"])
    cfg = dataclasses.replace(cfg, random={**cfg.random, "class_subset": {"subset": [4, 1]}})
    with zoo.open(build(cfg, tmp_path / "m.h5", progress=False)) as z:
        W, acts = z.weight_rows(range(4), -1), z.activations()
        mine = zoo.evaluate(z.spec, W, z.dataset(), acts, class_subsets=list(z.field("class_subset")))
        every = zoo.evaluate(z.spec, W, z.dataset(), acts)
        assert np.allclose(mine["test_acc"], z.metric("test_acc")[:, -1], atol=1e-6)
        assert not np.allclose(every["test_acc"], z.metric("test_acc")[:, -1], atol=1e-3)


def test_build_rejects_bad_sequence_configs_with_one_line(tmp_path):
    for args, words in ((["sequence.task=sort"], "sequence.task"), (["dataset=digits", "sequence.task=modular"],
                        "dataset: sequence"), (["fixed.label_noise=0.1"], "label_noise"),
                        (["architecture_kwargs.fc_mem_dim=4"], "mem_neurons=16")):
        r = subprocess.run([sys.executable, "-m", "zoo.build", "--config", "configs/zoo/seq_modular.yaml",
                            "--out", str(tmp_path / "x.h5"), "--quiet", "n_random=2", "epochs=1", "checkpoints=[0,1]",
                            *args],
                           capture_output=True, text=True)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert not list(tmp_path.iterdir())


MEMORIA = {"dim": 16, "depth": 2, "heads": 2, "segment": 4, "memoria": True, "fc_mem_dim": 2}


def test_memoria_members_match_the_plain_module_one_memory_each(monkeypatch):
    """The engine keeps one Memoria memory per member: its logits equal each member's own module (Memoria's
    random tie-breaking between equally induced long-term memories fixed, the only difference)."""
    monkeypatch.setattr(torch, "rand_like", lambda t, **k: torch.full_like(t, 0.5, **k))
    spec = zoo.ModelSpec("gpt_t", MEMORIA, (16,), 12)
    mods = [init_weights(spec.create("gelu"), "xavier_uniform", 1, torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():  # a read that matters
        for m in mods:
            m[1].read.o.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(9))
    flat = torch.stack([torch.cat([t.reshape(-1) for t in m.state_dict().values()]) for m in mods])
    x = torch.randint(0, 12, (6, 16), generator=torch.Generator().manual_seed(0))
    out = zoo.BatchedNet(spec, ["gelu"] * 3).forward(x[:, None], flat)
    with torch.no_grad():
        ref = torch.stack([m(x) for m in mods], 1)
    assert float((out - ref).abs().max()) < 1e-4
    # segment 2 sees segment 1 only through the memory: change segment 1, and segment 2's output changes, unless
    # the memory read is switched off
    x2 = x.clone()
    x2[:, :4] = (x2[:, :4] + 1) % 12
    with torch.no_grad():
        assert not torch.allclose(mods[0](x)[:, 4:8], mods[0](x2)[:, 4:8])
        mods[0][1].read.o.weight.zero_()
        mods[0][1].read.o.bias.zero_()
        assert torch.allclose(mods[0](x)[:, 4:8], mods[0](x2)[:, 4:8])


def test_memoria_path_trains_a_tiny_population():
    data = make_sequences(SequenceSpec(task="memorize", n_sequences=2, length=20, context=16, vocab=12))
    members = [MemberSpec(seed=i, lr=3e-3, activation="gelu", batch_size=2, class_subset=str(i)) for i in range(2)]
    pop = Population("gpt_t", MEMORIA, members, data, cuda_graphs=True, compile=False)
    before = pop.evaluate()["train_loss"]
    for e in range(1, 4):
        pop.train_epoch(e)
    after = pop.evaluate()
    assert torch.isfinite(after["train_loss"]).all() and (after["train_loss"] < before).all()
    assert not pop.cuda_graphs  # Memoria's bookkeeping is not graph-capturable


def test_members_without_memoria_have_no_memory_read():
    data = make_sequences(SequenceSpec(task="memorize", n_sequences=2, length=20, context=16, vocab=12))
    members = [MemberSpec(seed=i, lr=3e-3, activation="gelu", batch_size=2, memoria=on) for i, on in
               enumerate([False, True])]
    pop = Population("gpt_t", MEMORIA, members, data)
    pop.train_epoch(1)
    read = [e for e in pop.net.layout if ".read." in e.name]
    w = torch.cat([pop.flat_weights()[:, e.slice] for e in read], 1)
    assert read and (w[0] == 0).all() and (w[1] != 0).any()


def test_memoria_without_the_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "memoria", None)  # import fails as if not installed
    net = create_model("gpt_t", input_size=8, num_classes=12, **{**MEMORIA, "segment": 4})
    with pytest.raises(UsageError, match="memoria-pytorch"):
        net(torch.zeros(1, 8, dtype=torch.long))
