"""The benchmark scripts run (their CPU smoke runs) and report what their docstrings promise."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-W", "error", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_zoo_throughput_reports_rates_and_agreement(tmp_path):
    out = _run("benchmarks/zoo_throughput.py", "--dataset", "digits", "--archs", "cnn_gap", "--members", "8",
               "--steps", "2", "--solo-steps", "5", "--variants", "fp32", "--check", "2",
               "--json", str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())
    rates = [r for r in rows if "rate" in r]
    assert [r["path"] for r in rates] == ["plain loop", "fp32"] and all(r["rate"] > 0 for r in rates)
    checks = [r for r in rows if "check" in r]
    assert checks and all(len(q) == 4 for c in checks for q in c["results"])
    assert all(c["agree"] and c["tolerance"] >= 0.002 for c in checks)
    assert "| cnn_gap | fp32 | 8 |" in out


def test_zoo_throughput_times_each_attention_form(tmp_path):
    """--attention bmm,triton --block-programs 1,2048 times vit_t (MLP blocks fused) once per pair, each row named by
    them (the forms train the same members: test_population.py). Batch 4: 68 rows a member, which 2048 programs
    split over two programs a member and 1 does not."""
    _run("benchmarks/zoo_throughput.py", "--dataset", "digits", "--resize", "28", "--archs", "vit_t", "--members",
         "2", "--steps", "1", "--solo-steps", "3", "--variants", "fp32+fused", "--check", "0", "--attention",
         "bmm,triton", "--patch", "matmul", "--mlp", "fused", "--block-programs", "1,2048", "--batch", "4", "--json",
         str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["path"] for r in rows] == ["plain loop"] + [f"fp32+fused attn={f} programs={p}" for f in ("bmm", "triton")
                                                          for p in (1, 2048)]
    assert all(r["rate"] > 0 for r in rows)


def test_zoo_throughput_times_each_mlp_backward_row_block(tmp_path):
    """--mlp-bwd-rows 64,16 times vit_t (MLP blocks fused) once per row block of the MLP's backward, each row named
    by it (the kernels against torch: test_mlp.py)."""
    _run("benchmarks/zoo_throughput.py", "--dataset", "digits", "--resize", "28", "--archs", "vit_t", "--members",
         "2", "--steps", "1", "--solo-steps", "3", "--variants", "fp32+fused", "--check", "0", "--attention", "bmm",
         "--patch", "matmul", "--mlp", "fused", "--mlp-bwd-rows", "64,16", "--batch", "2", "--json",
         str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["path"] for r in rows] == ["plain loop"] + [f"fp32+fused mlp_bwd_rows={n}" for n in (64, 16)]
    assert all(r["rate"] > 0 for r in rows)


def test_zoo_throughput_checks_the_dropout_paths_against_each_other(tmp_path):
    """--recipe zoo --dropout layer,fused --check 2: smallcnn's random-zoo members (dropout drawn per member)
    timed with their dropout as its own layer and fused into the conv kernels, and 2 members trained one epoch
    each way agree within the recipe's spread (the first way again on PyTorch's grouped conv). Without the second
    mode the check is refused (the plain loop cannot reproduce hashed dropout). The run is the command's plumbing,
    outside Triton's interpreter (an epoch there takes minutes), where both modes run the same layers; the fused
    kernels against the layers: test_convpool.py."""
    args = ["benchmarks/zoo_throughput.py", "--dataset", "digits", "--resize", "28", "--archs", "smallcnn",
            "--members", "4", "--steps", "1", "--solo-steps", "2", "--variants", "fp32+fused", "--recipe", "zoo",
            "--zoo-config", "configs/zoo/mnist_smallcnn_random.yaml", "--check", "2", "--batch", "64"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    _run(*args, "--dropout", "layer,fused", "--json", str(tmp_path / "r.json"), env=env)
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r.get("path") for r in rows] == ["plain loop", "fp32+fused drop=layer", "fp32+fused drop=fused", None]
    check = rows[-1]
    assert check["modes"] == ["layer", "fused"] and check["agree"] and check["max_diff"] == 0.0
    assert list(check["test_acc"]) == ["layer fused", "fused fused", "layer grouped"]
    assert [len(a) for a in check["test_acc"].values()] == [2, 2, 2]
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2 and "--dropout layer,fused to check the two dropout paths" in r.stderr


def test_attention_kernels_times_every_form():
    """The attention timings (interpreter smoke run) list each form once, every one within rounding of fp32."""
    out = _run("benchmarks/attention_kernels.py", "--members", "2", "--batch", "2", "--iters", "1", "--dtype", "fp32",
               "--seq", "1,4")
    rows = [ln.split(" | ") for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| form")]
    assert [r[0][2:] for r in rows] == ["bmm", "sdpa", "triton seq=1", "triton seq=4"]
    assert all(float(r[-1].rstrip(" |")) < 1e-4 for r in rows)


def test_block_kernels_time_each_launch_shape():
    """The fused blocks' timings (interpreter smoke run): the torch layers, then one row per grid entry, the fused
    kernels' y and dx within rounding of the fp32 layers."""
    out = _run("benchmarks/block_kernels.py", "--members", "2", "--batch", "2", "--iters", "1", "--fp32",
               "--mlp-grid", "4/16/1,8/32/2", "--attn-grid", "4/2/32")
    rows = [ln.split(" | ") for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| form")]
    assert [r[0][2:] for r in rows] == ["layers (torch)", "fused warps=4 BLOCK=16 programs=1/member",
                                        "fused warps=8 BLOCK=32 programs=2/member", "layers (torch, sdpa)",
                                        "fused warps=4 programs=2/member rows=32"]
    fused = [r for r in rows if r[0].startswith("| fused")]
    assert all(float(r[-2]) < 1e-4 and float(r[-1].rstrip(" |")) < 1e-4 for r in fused)


def test_kernel_registers_reports_the_compiled_kernels():
    """The fused MLP block compiled for sm_90a without a GPU: one row each way, registers within the hardware's
    255 a thread, and the forward (after the activation became one branch per program) at most 200."""
    out = _run("benchmarks/kernel_registers.py", "--kernels", "mlp", "--warps", "4")
    rows = {r[0][2:].strip(): [int(v) for v in r[2:4]] for r in
            (ln.split(" | ") for ln in out.splitlines() if ln.startswith("| mlp"))}
    assert set(rows) == {"mlp forward BLOCK=64", "mlp backward BLOCK=64"}
    assert all(0 < regs <= 255 for regs, _ in rows.values())
    assert rows["mlp forward BLOCK=64"][0] <= 200 and rows["mlp forward BLOCK=64"][1] == 0


def test_kernel_registers_compiles_the_recorded_conv_launches():
    """cnn_gap conv3's launches of a training step, recorded from the host code on meta tensors and compiled for
    sm_90a: forward, the joint weight gradient and the input gradient, none spilling."""
    out = _run("benchmarks/kernel_registers.py", "--kernels", "conv", "--convs", "cnn_gap.conv3", "--dw", "joint")
    rows = {r[0][2:].strip(): [int(v) for v in r[2:4]] for r in
            (ln.split(" | ") for ln in out.splitlines() if ln.startswith("| cnn_gap"))}
    assert list(rows) == ["cnn_gap.conv3 _fwd_kernel", "cnn_gap.conv3 _dw_joint_kernel",
                          "cnn_gap.conv3 _dx_phase_kernel"]
    assert all(regs <= 200 and spill == 0 for regs, spill in rows.values())


def test_zoo_throughput_times_both_layouts_and_activation_modes(tmp_path):
    """--layout nchw,channels_last and --activation layer,fused time each combination, each row named by it;
    an unknown layout or mode exits 2."""
    _run("benchmarks/zoo_throughput.py", "--dataset", "digits", "--archs", "cnn_gap", "--members", "4", "--steps",
         "2", "--solo-steps", "3", "--variants", "fp32", "--check", "0", "--layout", "nchw,channels_last",
         "--activation", "layer,fused", "--json", str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["path"] for r in rows] == ["plain loop"] + [f"fp32 layout={lay} act={a}" for lay in
                                                          ("nchw", "channels_last") for a in ("layer", "fused")]
    for flag, message in [("--layout=nhwc", "--layout: unknown layout 'nhwc'"),
                          ("--activation=epilogue", "--activation: unknown mode 'epilogue'")]:
        bad = subprocess.run([sys.executable, "benchmarks/zoo_throughput.py", flag], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_zoo_throughput_times_a_zoo_configs_own_members(tmp_path, monkeypatch):
    """--recipe zoo trains the first members a zoo config draws (the random smallcnn zoo: mixed activations,
    optimizers, dropout, train fractions) in build order; --recipe zoo without a config exits 2."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import zoo_throughput

    ms = zoo_throughput.zoo_members(16, 64, str(ROOT / "configs/zoo/mnist_smallcnn_random.yaml"))
    assert len({m.activation for m in ms}) == 2 and len({m.optimizer for m in ms}) == 3
    assert {m.batch_size for m in ms} == {64} and len({m.train_fraction for m in ms}) > 1
    assert [(m.activation, m.optimizer) for m in ms] == sorted((m.activation, m.optimizer) for m in ms)
    _run("benchmarks/zoo_throughput.py", "--dataset", "digits", "--resize", "28", "--archs", "smallcnn", "--members",
         "4", "--steps", "2", "--solo-steps", "3", "--variants", "fp32", "--check", "0", "--recipe", "zoo",
         "--zoo-config", "configs/zoo/mnist_smallcnn_random.yaml", "--json", str(tmp_path / "r.json"))
    assert [r["path"] for r in json.loads((tmp_path / "r.json").read_text())] == ["plain loop", "fp32"]
    bad = subprocess.run([sys.executable, "benchmarks/zoo_throughput.py", "--recipe", "zoo"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--recipe zoo and --zoo-config go together" in bad.stderr


def test_directconv_kernels_times_both_layouts():
    """The per-layer kernel timings (interpreter smoke run) list every call, channels-last and fused-activation
    ones included, each channels-last weight-gradient form."""
    out = _run("benchmarks/directconv_kernels.py", "--members", "2", "--batch", "2", "--iters", "1", "--dtype",
               "fp32", "--no-torch", "--layers", "cnn_gap.conv3")
    calls = [ln.split(" | ")[1] for ln in out.splitlines() if ln.startswith("| cnn_gap.conv3")]
    assert calls == ["fwd", "dw", "dx masked", "dx polyphase", "dx polyphase_joint", "fwd cl", "dw cl", "fwd cl act",
                     "dw cl act taps", "dw cl act joint", "dx polyphase cl", "dx polyphase_joint cl"]


def test_population_size_drift_is_zero_on_cpu():
    """On CPU the sums a member sees do not depend on how many members share its population."""
    out = _run("benchmarks/population_size_drift.py", "--steps", "1,2")
    lines = [ln for ln in out.splitlines() if ln.startswith("step")]
    assert len(lines) == 2
    assert all("population 256 vs 128: median 0 q90 0 max 0 |" in ln for ln in lines), lines


def test_join_speed_times_both_copies(tmp_path):
    out = _run("benchmarks/join_speed.py", "--members", "16", "--checkpoints", "3", "--dir", str(tmp_path))
    assert "join (shard 0 by H5Ocopy, shard 1 as stored chunks):" in out and "x faster" in out
    assert list(tmp_path.iterdir()) == []  # the shard files were temporary


def test_step_kernels_grow_with_activation_and_optimizer_slices():
    """One slice against 4 activations x 2 optimizers (two compiles; the script's default adds a middle mix)."""
    out = _run("-W", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",  # inductor's import
               "benchmarks/step_kernels.py", "--members", "16", "--mixes", "tanh:adam;gelu,relu,sigmoid,tanh:adam,sgd")
    counts = [int(ln.split(": ")[1].split()[0]) for ln in out.splitlines() if "generated kernels" in ln]
    assert len(counts) == 2 and 0 < counts[0] < counts[1], out


def test_triton_jit_threads_compiles_one_specialization_per_size():
    import torch  # CPU: conftest runs Triton's interpreter (inherited), which compiles nothing
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = _run("benchmarks/triton_jit_threads.py", "--n", "2", "--device", device)
    assert "2 band-kernel compiles: serial" in out and "speed-up" in out


def test_probe_scale_times_the_probe_stage_on_a_synthetic_zoo():
    """The planted linear read-out of the weights is found by the W probe, and the epoch by every column."""
    out = _run("benchmarks/probe_scale.py", "--members", "400", "--targets", "test_acc", "epoch", "--device", "cpu")
    assert "400 members x 4 checkpoints (1600 rows, 4970 weights): write" in out and "probes" in out
    table = {ln.split()[0]: [float(v) for v in ln.split()[1:]] for ln in out.splitlines()
             if ln.split() and ln.split()[0] in ("epoch", "test_acc")}
    assert min(table["epoch"]) > 0.5 and table["test_acc"][0] > 0.1, out  # columns: W linear, s(W) gbm, s(W) linear


def test_speed_targets_script_runs_each_step_and_summarises(tmp_path):
    """The one-call speed run (CPU smoke: cnn_gap on digits, fp32): cnn_gap's step and the dw kernels', each
    with its exit code; the summary keeps both dw forms' rates and the kernel rows; a step past the deadline is
    skipped, not started."""
    import os
    env = {**os.environ, "OUT": str(tmp_path), "ARCHS": "cnn_gap", "MEMBERS": "4", "CHECK": "0", "DW": "taps,joint",
           "ZOO_ARGS": "--dataset digits --steps 2 --solo-steps 3 --variants fp32",
           "KERNEL_ARGS": "--members 2 --batch 2 --iters 1 --dtype fp32"}
    done = subprocess.run(["bash", "benchmarks/speed_targets.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = (tmp_path / "steps.txt").read_text().splitlines()
    assert [ln.split()[:2] for ln in steps] == [["cnn_gap", "rc=0"], ["dw_kernels", "rc=0"]]
    summary = (tmp_path / "summary.md").read_text()
    assert "| cnn_gap | fp32 dw=taps | 4 |" in summary and "| cnn_gap | fp32 dw=joint | 4 |" in summary
    assert "dw cl act joint" in summary
    late = subprocess.run(["bash", "benchmarks/speed_targets.sh"], cwd=ROOT, env={**env, "DEADLINE": "0"},
                          capture_output=True, text=True, timeout=60)
    assert late.returncode == 0 and (tmp_path / "steps.txt").read_text().splitlines() == [
        "cnn_gap skipped: deadline", "dw_kernels skipped: deadline"]


def test_full_zoo_script_runs_every_stage_on_one_split(tmp_path):
    """build (on two ranks, as on a several-GPU host) -> split -> baseline probes beside the fit -> embed ->
    embedding probes (and the categorical targets' probes), on digits at 16x16."""
    import os
    env = {**os.environ, "N": "24", "EPOCHS": "1", "WORK": str(tmp_path), "OUT": str(tmp_path / "out"), "NPROC": "2",
           "ZOO_OVER": "dataset=digits resize=16 precision=fp32 compile=false train_eval_samples=200",
           "FIT_MINUTES": "0.05", "FIT_OVER": "d_model=32 n_layers=1 n_heads=2 d_latent=8 d_proj=8 num_workers=0",
           "PROBE_OVER": "bootstrap=5", "DEADLINE": "900", "PROBE_THREADS": "1", "CAT_TARGETS": "optimizer"}
    done = subprocess.run(["bash", "benchmarks/full_zoo_smallcnn.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    out = tmp_path / "out"
    times = (out / "times.txt").read_text()
    assert done.returncode == 0, done.stderr[-2000:] + times
    stages = [ln.split() for ln in times.splitlines()]  # "<stage> rc <code> <seconds> s"
    assert all(st[2] == "0" for st in stages), times
    assert sorted(st[0] for st in stages) == ["build", "embed", "fit", "gap_noise", "probes_base", "probes_cat",
                                               "probes_emb"], times
    assert "| all | 48 |" in (out / "gap_noise.md").read_text()  # 24 members x 2 checkpoints
    zoos = sorted(p.name for p in (tmp_path / "zoos").iterdir())  # the two ranks' shards joined and removed
    assert "mnist_smallcnn_random_n24_e1.h5" in zoos and not [n for n in zoos if ".shard" in n], zoos
    assert "for each process" in (out / "build.log").read_text()  # torchrun's banner: several ranks started
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gap_noise import sizes_from_zoo
    _, pool, test = sizes_from_zoo(str(tmp_path / "zoos" / "mnist_smallcnn_random_n24_e1.h5"))
    assert (pool, test) == (200, 1797 // 5)  # train_eval_samples=200; digits' test split
    assert "| optimizer | acc |" in (out / "probes_cat" / "table.md").read_text()
    split = json.loads((out / "split.json").read_text())["test_members"]
    for name in ("base", "emb"):
        assert json.loads((out / f"probes_{name}" / "split.json").read_text())["test_members"] == split
        assert "| train_fraction | R² |" in (out / f"probes_{name}" / "table.md").read_text()
    assert "| test_acc | 0.949 |" in (out / "targets.md").read_text()


def test_full_zoo_script_builds_a_zoo_over_several_calls(tmp_path):
    """MAX_POPULATIONS=1 with two populations: the first call stops after one (a .partial file), the second
    resumes and finishes the zoo, and neither runs the pipeline; the finished zoo holds every member.
    RESUME_ONLY=1 with nothing to resume exits at once (rc 3) and builds nothing."""
    import os

    import h5py
    env = {**os.environ, "N": "8", "EPOCHS": "2", "CHECKPOINTS": "[0,2]", "WORK": str(tmp_path),
           "OUT": str(tmp_path / "out"), "MAX_POPULATIONS": "1", "DEADLINE": "600",
           "ZOO_OVER": "dataset=digits resize=16 precision=fp32 compile=false train_eval_samples=100 "
                       "population_size=4"}
    zoo = tmp_path / "zoos" / "mnist_smallcnn_random_n8_e2.h5"
    fresh = subprocess.run(["bash", "benchmarks/full_zoo_smallcnn.sh"], cwd=ROOT, env={**env, "RESUME_ONLY": "1"},
                           capture_output=True, text=True, timeout=60)
    assert fresh.returncode == 3 and "no partial build" in fresh.stderr and not zoo.parent.exists()
    for state, resume in (("paused", ""), ("finished", "1")):
        done = subprocess.run(["bash", "benchmarks/full_zoo_smallcnn.sh"], cwd=ROOT, env={**env, "RESUME_ONLY": resume},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / "out" / "times.txt").read_text().splitlines()[-1] == f"build {state} after 1 population(s)"
    assert zoo.exists() and not Path(f"{zoo}.partial").exists() and not (tmp_path / "out" / "split.json").exists()
    with h5py.File(zoo, "r") as f:
        assert f["models/done"][:].all() and len(f["models/done"]) == 8


def test_hr21_targets_table_picks_the_best_embedding_and_compares_intervals(tmp_path):
    """The target table takes each target's best embedding cell over every run, baselines from the run that
    has them; "met" is against HR21's number, ">= s(W) linear" flags overlapping intervals."""
    import pandas as pd

    def write(name, rows):
        (tmp_path / name).mkdir()
        pd.DataFrame(rows, columns=["target", "kind", "column", "r2", "r2_lo", "r2_hi", "kendall_tau",
                                    "kendall_tau_lo", "kendall_tau_hi"]).to_csv(tmp_path / name / "results.csv")
    write("base", [("test_acc", "continuous", "s(W) linear", 0.80, 0.78, 0.82, 0.6, 0.58, 0.62),
                   ("test_acc", "continuous", "s(W) gbm", 0.97, 0.96, 0.98, 0.8, 0.79, 0.81),
                   ("lr", "continuous", "s(W) linear", 0.40, 0.35, 0.45, None, None, None)])
    write("a", [("test_acc", "continuous", "emb linear", 0.90, 0.89, 0.91, 0.70, 0.69, 0.71),
                ("lr", "continuous", "emb seq linear", 0.38, 0.33, 0.43, None, None, None)])
    write("b", [("test_acc", "continuous", "emb seq linear", 0.95, 0.94, 0.96, 0.61, 0.60, 0.63),
                ("optimizer", "categorical", "emb linear", None, None, None, None, None, None)])
    out = _run("benchmarks/hr21_targets.py", *(f"{n}={tmp_path / n}" for n in ("base", "a", "b")),
               "--out", str(tmp_path / "targets.md"))
    assert (tmp_path / "targets.md").read_text() == out
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in out.splitlines()[2:]}
    assert rows.keys() == {"test_acc", "lr", "test_acc (Kendall τ; StatNN on CIFAR10-GS)"}
    assert "(emb seq, b)" in rows["test_acc"] and rows["test_acc"].endswith("| 0.800 | 0.970 | yes | yes |")
    assert "(emb seq, a)" in rows["lr"] and rows["lr"].endswith("| yes | no (intervals overlap) |")
    kendall = rows["test_acc (Kendall τ; StatNN on CIFAR10-GS)"]
    assert "(emb, a)" in kendall and kendall.endswith("| no | yes |")


def test_gap_noise_recovers_the_share_of_sampling_noise(tmp_path):
    """A synthetic zoo whose gap is binomial noise alone has a noise share near 1 and R² ceiling near 0; one with
    a true gap of variance 0.03^2 on top has the ceiling that variance leaves; bad input exits 2 naming it."""
    import numpy as np
    import pandas as pd
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gap_noise import noise_table

    rng = np.random.default_rng(0)
    n, pool, test = 4000, 2000, 5000
    frac = rng.uniform(0.1, 1.0, n)
    p = rng.uniform(0.5, 0.95, n)
    true_gap = rng.uniform(0, 0.03 * np.sqrt(12), n)  # variance 0.03^2
    for gap, expect in ((0.0, 0.0), (true_gap, None)):
        p_train = np.clip(p + gap, 0, 1)
        t = pd.DataFrame({"epoch": rng.integers(0, 2, n), "train_fraction": frac, "diverged": False,
                          "train_acc": rng.binomial(np.floor(frac * pool).astype(int), p_train) / np.floor(frac * pool),
                          "test_acc": rng.binomial(test, p) / test})
        row = noise_table(t, pool, test).set_index("epoch").loc["all"]
        if expect is not None:
            assert abs(row["noise share"] - 1) < 0.08 and row["R² ceiling"] < 0.08, row
        else:
            truth = 0.03 ** 2 / (0.03 ** 2 + row["noise std"] ** 2)
            assert abs(row["R² ceiling"] - truth) < 0.05 and row["R² ceiling"] > 0.3, (row, truth)
    t.to_parquet(tmp_path / "zoo.parquet")
    assert "| all | 4000 |" in _run("benchmarks/gap_noise.py", str(tmp_path / "zoo.parquet"), "--train-pool",
                                    str(pool), "--test", str(test))
    t.drop(columns="train_acc").to_parquet(tmp_path / "bad.parquet")
    done = subprocess.run([sys.executable, "benchmarks/gap_noise.py", str(tmp_path / "bad.parquet"), "--train-pool",
                           "10", "--test", "10"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and "lacks column(s) train_acc" in done.stderr
