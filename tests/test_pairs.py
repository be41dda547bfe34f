"""Pairs of members: selection by relation, the linear path, naive and weight-matched averages, the CLI."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config

import zoo
from pairs import PairsConfig, barrier, pair_table, path_metrics, pick_pairs
from zoo import Permuter
from zoo.build import build
from zoo.cli import load_config


@pytest.fixture(scope="module")
def seeded_zoo(tmp_path_factory):
    """64 members: every recipe with two seeds, each seed with two data orders (other_order, other_init pairs)."""
    return build(tiny_config("seeds=2", "data_orders=2"), tmp_path_factory.mktemp("pairs") / "z.h5", progress=False)


def test_barrier_is_the_largest_shortfall_from_the_line():
    acc = np.array([[0.9, 0.5, 0.7], [0.8, 0.8, 0.8]])
    assert np.allclose(barrier(acc, higher_is_better=True), [0.3, 0.0])
    assert np.allclose(barrier(np.array([[1.0, 3.0, 2.0]]), higher_is_better=False), [1.5])


def test_a_member_with_itself_has_no_barrier_and_its_average_is_itself(seeded_zoo):
    with zoo.open(seeded_zoo) as z:
        W = z.weight_rows([0, 1], -1)
        path = path_metrics(z.spec, W, W, z.dataset(), z.activations()[:2], 11)
        rec = z.metric("test_acc")[[0, 1], -1]
    assert np.allclose(path["acc"], rec[:, None], atol=1e-6)  # every point, the average (a = 0.5) too
    assert np.abs(barrier(path["loss"], False)).max() < 1e-5 and np.abs(barrier(path["acc"], True)).max() < 1e-6


def test_weight_matching_recovers_a_permuted_copy_exactly(seeded_zoo):
    with zoo.open(seeded_zoo) as z:
        W = torch.from_numpy(z.weights(3, -1))
        perm = Permuter.of(z.spec)
        copy = W[perm.random_index(torch.Generator().manual_seed(0))]
        assert not torch.equal(copy, W) and torch.equal(perm.align(copy, W), W)
        naive = path_metrics(z.spec, W[None].numpy(), copy[None].numpy(), z.dataset(), [z.activations()[3]], 5)
    assert barrier(naive["loss"], False)[0] > 0.1  # the same function, but the straight line between leaves it


def test_pairs_have_the_relation_they_are_labelled_with(seeded_zoo):
    relations = ["other_order", "other_init", "other_hparams", "checkpoints"]
    with zoo.open(seeded_zoo) as z:
        pairs = pick_pairs(z, relations, 8, 0, -1)
        ms, acts = z.members(), z.activations()
        assert set(pairs["relation"]) == set(relations)
        recipe = lambda m: {k: v for k, v in vars(m).items() if k not in ("seed", "data_seed")}
        for r in pairs.itertuples():
            a, b = ms[r.member_a], ms[r.member_b]
            assert acts[r.member_a] == acts[r.member_b]
            if r.relation == "checkpoints":
                assert r.member_a == r.member_b and r.slot_a < r.slot_b == z.n_checkpoints - 1
                continue
            assert (recipe(a) == recipe(b)) == (r.relation != "other_hparams") and a.order_seed != b.order_seed
            if r.relation != "other_hparams":
                assert (a.seed == b.seed) == (r.relation == "other_order")
        one_init = pairs[pairs["relation"] == "other_order"]
        assert all(np.array_equal(z.weights(a, 0), z.weights(b, 0))
                   for a, b in zip(one_init.member_a, one_init.member_b))


def test_pair_table_beside_the_zoo_matching_helps(seeded_zoo, tmp_path):
    cfg = load_config(PairsConfig, None, [f"zoo={seeded_zoo}", f"out={tmp_path / 'p.parquet'}", "n_per_relation=6",
                                          "alphas=5", f"zoo_b={seeded_zoo}",
                                          "relations=[other_init,other_hparams,checkpoints,other_dataset]"])
    out = pair_table(cfg, progress=False)
    t = pd.read_parquet(out)
    assert len(t) == 24 and {"naive_avg_acc", "matched_avg_acc", "naive_barrier_loss", "matched_barrier_acc",
                             "l2", "l2_matched", "cosine", "acc_a", "acc_b"} <= set(t.columns)
    assert b"weightzoo" in pq.read_schema(out).metadata
    same = t[t["relation"] == "other_dataset"]  # a member with its twin in the same zoo: itself
    assert np.allclose(same["naive_barrier_acc"], 0, atol=1e-6) and np.allclose(same["l2"], 0)
    oi = t[t["relation"] == "other_init"]
    assert (oi["l2_matched"] <= oi["l2"] + 1e-4).all()


def test_bad_pair_requests_are_one_line_and_write_nothing(seeded_zoo, tmp_path):
    cases = [(["relations=[twins]"], "relations"), (["relations=[other_dataset]"], "--zoo-b"),
             (["alphas=2"], "alphas"), (["--zoo", str(tmp_path / "none.h5")], "none.h5")]  # the last --zoo wins
    for args, words in cases:
        r = subprocess.run([sys.executable, "-m", "pairs.build", "--zoo", str(seeded_zoo), "--out",
                            str(tmp_path / "p.parquet"), "--quiet", *args], capture_output=True, text=True)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not (tmp_path / "p.parquet").exists()


# ---- tethers ----

def test_all_ones_tethers_are_the_plain_layers():
    from zoo.models.tether import tether_layers
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 5))
    tethered = tether_layers(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(),
                                                 torch.nn.Linear(4 * 36, 5)), 0.5)
    tethered.load_state_dict({**plain.state_dict(), **{k: v for k, v in tethered.state_dict().items()
                                                       if k.endswith("tether")}})
    x = torch.randn(3, 1, 8, 8)
    assert all((t == 1).all() for k, t in tethered.state_dict().items() if k.endswith("tether"))
    assert torch.equal(tethered(x), plain(x))


def test_the_merge_rule_fires_exactly_when_its_conditions_hold():
    from zoo.population import choose_merges
    compat = torch.tensor([[0, 5, 1, 4], [5, 0, 3, 2], [1, 3, 0, 6], [4, 2, 6, 0]], dtype=torch.float)
    every = torch.ones(4, dtype=torch.bool)
    assert choose_merges(every, compat, 0.5, 4) == [(2, 3), (0, 1)]  # most compatible first, each member once
    assert choose_merges(every, compat, 5.5, 4) == [(2, 3)]  # compatibility above the threshold only
    assert choose_merges(torch.tensor([True, True, False, True]), compat, 0.5, 4) == [(0, 1)]  # ready members only
    assert choose_merges(every, compat, 0.5, 1) == [(2, 3)]  # at most max_merges per epoch
    assert choose_merges(torch.zeros(4, dtype=torch.bool), compat, 0.5, 4) == []
    T = torch.tensor([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0]])  # members 0 and 1 share a tether: no merge between them
    assert choose_merges(torch.ones(3, dtype=torch.bool), T @ T.T, 0.5, 4) == [(0, 2)]


def test_tethers_are_not_trained_and_a_tethered_population_is_the_plain_loop(digits):
    from zoo import MemberSpec, Population
    from zoo.solo import train_solo
    kw = {"tethered": True, "tether_scale": 0.5}
    members = [MemberSpec(seed=i, lr=3e-3, batch_size=32, init="xavier_uniform") for i in range(2)]
    pop = Population("cnn_gap", kw, members, digits)
    tethers = lambda: torch.cat([pop.net.layout.tensor(pop.flat, f"{n}.tether").flatten(1)
                                 for n in pop.net.tethered], 1)
    before = tethers().clone()
    assert 0.4 < float(before.std()) < 0.6 and not torch.equal(before[0], before[1])  # 1 + 0.5 N(0, 1), per seed
    pop.train_epoch(1, max_steps=5)
    assert torch.equal(tethers(), before)
    x = digits.normalize(digits.x_test[:32])
    logits = pop.forward(x[:, None], train=False)
    for i, m in enumerate(members):
        solo = train_solo("cnn_gap", kw, m, digits, epochs=1, max_steps=5).eval()
        with torch.no_grad():
            assert float((logits[:, i] - solo(x)).norm() / solo(x).norm()) < 5e-4


def test_a_build_merges_tethers_records_partners_and_plots_the_merges(tmp_path):
    from pairs.tethers import plot_merges
    cfg = tiny_config("architecture_kwargs.tethered=true", "tether_merge=true", "merge_compat=0.5",
                      "merge_loss_delta=10", "max_merges_per_epoch=2", "checkpoints=[0,1,2]")
    with zoo.open(build(cfg, tmp_path / "t.h5", progress=False)) as z:
        merges, partner = z.metric("tether_merges"), z.metric("tether_partner")
        assert merges[:, 0].sum() == 0 and merges[:, 1].sum() == 0  # no loss change to compare after one epoch
        assert merges[:, -1].sum() == 4  # epoch 2: two merges of two members each (everyone ready, compatible)
        for m in np.flatnonzero(merges[:, -1]):
            p = int(partner[m, -1])
            assert int(partner[p, -1]) == m  # partners name each other
            T = lambda i: np.concatenate([z.state_dict(i, -1)[f"{n}.tether"].flatten().numpy()
                                          for n in zoo.BatchedNet(z.spec, ["relu"]).tethered])
            assert np.array_equal(T(m), T(p))  # merged: one tether
    assert plot_merges(tmp_path / "t.h5").stat().st_size > 1000
    with pytest.raises(zoo.UsageError, match="tethered=true"):
        tiny_config("tether_merge=true")


# ---- predictors of mergeability ----

def test_pair_splits_share_no_member_and_predictors_run(seeded_zoo, tmp_path):
    from hyperrep.embeddings import Embeddings
    from pairs.predict import pair_split, predict
    cfg = load_config(PairsConfig, None, [f"zoo={seeded_zoo}", f"out={tmp_path / 'p.parquet'}", "n_per_relation=40",
                                          "alphas=3"])
    pairs = pd.read_parquet(pair_table(cfg, progress=False))
    side = pair_split(pairs, 0.4, 0)
    train = set(pairs.loc[side == 0, ["member_a", "member_b"]].to_numpy().ravel())
    test = set(pairs.loc[side == 1, ["member_a", "member_b"]].to_numpy().ravel())
    assert train and test and not train & test
    with zoo.open(seeded_zoo) as z:  # stand-in embeddings: the first 8 weights of each member and checkpoint
        e = np.stack([z.weight_rows(range(z.n_models), s)[:, :8] for s in range(z.n_checkpoints)], 1)
    emb = Embeddings(tmp_path / "e.h5", e, np.zeros(len(e), np.int64), np.arange(e.shape[1]), "", "", "")
    results = predict(pairs, emb, test_fraction=0.4, n_boot=20)
    assert set(results["features"]) >= {"cosine", "l2", "agreement", "pairwise (all)", "embeddings |ea-eb|, ea*eb"}
    assert np.isfinite(results.loc[results["target"] == "naive_barrier_loss", "r2"]).all()
    from pairs.predict import plot_barriers
    assert plot_barriers(pairs, tmp_path / "barriers.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["cnn_s", "mlp"])
def test_permutations_of_tethered_members_move_the_tethers_and_keep_the_function(name):
    from zoo.models import flatten_state, init_weights
    spec = zoo.ModelSpec(name, {"tethered": True}, (1, 28, 28) if name == "cnn_s" else (1, 8, 8), 10)
    net = init_weights(spec.create("tanh"), "xavier_uniform", 1, torch.Generator().manual_seed(0)).eval()
    perm, flat = Permuter.of(spec), flatten_state(net)
    moved = flat[perm.random_index(torch.Generator().manual_seed(1))]
    other = spec.create("tanh").eval()
    other.load_state_dict(spec.layout().unflatten(moved))
    x = torch.randn(4, *spec.input_shape)
    with torch.no_grad():
        assert torch.allclose(other(x), net(x), atol=1e-5)
    assert torch.equal(perm.align(moved, flat), flat)
