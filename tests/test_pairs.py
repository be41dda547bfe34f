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
    """32 members: every recipe twice (two seeds), so other_init pairs exist."""
    return build(tiny_config("seeds=2"), tmp_path_factory.mktemp("pairs") / "z.h5", progress=False)


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
    with zoo.open(seeded_zoo) as z:
        pairs = pick_pairs(z, ["other_init", "other_hparams", "checkpoints"], 8, 0, -1)
        ms, acts = z.members(), z.activations()
        assert set(pairs["relation"]) == {"other_init", "other_hparams", "checkpoints"}
        for r in pairs.itertuples():
            a, b = ms[r.member_a], ms[r.member_b]
            same_recipe = {k: v for k, v in vars(a).items() if k != "seed"} == \
                {k: v for k, v in vars(b).items() if k != "seed"}
            assert acts[r.member_a] == acts[r.member_b]
            if r.relation == "checkpoints":
                assert r.member_a == r.member_b and r.slot_a < r.slot_b == z.n_checkpoints - 1
            else:
                assert same_recipe == (r.relation == "other_init") and a.seed != b.seed


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
