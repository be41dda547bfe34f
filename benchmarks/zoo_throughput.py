"""Zoo-engine throughput against the plain per-model PyTorch loop, same recipe, one run.

Device run (MNIST copied to data/datasets/mnist, carried):
    python benchmarks/zoo_throughput.py --archs cnn_s --members 4096 --variants bf16+compile+fused+graphs
    python benchmarks/zoo_throughput.py --archs cnn_s --members 1000 --batch 10 --check 0 \
        --variants bf16+compile+fused,bf16+compile+fused+graphs       # the Model Zoos batch size
    python benchmarks/zoo_throughput.py --archs cnn_s --members 2560 --batch 10 --check 0 --recipe hyp \
        --variants bf16+compile+fused+graphs,bf16+compile+fused --profile   # HYP step (profile: last variant,
                                                                           # un-graphed so kernels show)
    python benchmarks/zoo_throughput.py --archs cnn_s --members 2560 --batch 10 --check 0 --recipe hyp \
        --eval 10000 --variants bf16+compile+fused+graphs --profile        # one HYP checkpoint's evaluation
    python benchmarks/zoo_throughput.py --archs vit_t --members 4096 --check 2 \
        --variants bf16+compile+fused+graphs --attention bmm,triton --patch conv,matmul --mlp layers,fused
                                                              # attention, patch and MLP-block forms
    python benchmarks/zoo_throughput.py --archs smallcnn,cnn_gap --members 4096 --check 2 \
        --variants bf16+compile+fused+graphs --layout nchw,channels_last   # the direct convs' two layouts
    python benchmarks/zoo_throughput.py --archs smallcnn,cnn_gap --members 4096 --check 2 \
        --variants bf16+compile+fused+graphs --activation layer,fused      # activations in the conv kernels
    python benchmarks/zoo_throughput.py --archs smallcnn --members 4096 --check 0 --recipe zoo \
        --zoo-config configs/zoo/mnist_smallcnn_random.yaml --variants bf16+compile+fused+graphs,bf16+compile+fused \
        --profile                                                         # the random zoo's own members
    python benchmarks/zoo_throughput.py --archs smallcnn --members 5000 --check 64 --recipe zoo \
        --zoo-config configs/zoo/mnist_smallcnn_random.yaml --variants bf16+compile+fused+graphs \
        --dropout layer,fused                     # dropout as its own layer / in the conv kernels, checked 64 members
CPU smoke run (seconds):
    python benchmarks/zoo_throughput.py --dataset digits --archs cnn_gap --members 16 --steps 3 --variants fp32

Prints model-epochs/s for the plain loop (`zoo/solo.py`: one nn.Module, torch.optim.Adam) and for each
engine variant, the ratio, peak GPU memory, and the test accuracy after one epoch of a few members
trained both ways. Model-epochs/s = members x steps / steps_per_epoch / seconds.

Agreement: the engine and the plain loop sum in different orders (grouped vs dense conv, fused kernels),
and training turns that into accuracy differences that grow with lr (an lr 3e-3 member moved 0.002 after
one MNIST epoch in exact fp32). So the check measures the reference's own spread on the same members:
the plain loop in fp32 with another exact conv order (PyTorch's native conv instead of cuDNN / oneDNN),
and the plain loop in the engine's precision (bf16 autocast drift). Tolerance: max(0.002 fp32 / 0.01 bf16,
2 x that spread) on the max |engine - plain fp32| test accuracy over the checked members.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch._inductor.config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo import MemberSpec, Population, ZooConfig, _convpool, _directconv, _mlp, engine, load_dataset  # noqa: E402
from zoo.build import eval_bytes, run_order  # noqa: E402
from zoo.cli import load_config  # noqa: E402
from zoo.config import expand_members  # noqa: E402
from zoo.population import member_order  # noqa: E402
from zoo.solo import accuracy, build_member, train_solo  # noqa: E402

ARCH_KWARGS = {
    "cnn_s": {}, "cnn_l": {}, "cnn_gap": {}, "smallcnn": {}, "mlp": {},
    "vit_t": {"patch": 7, "dim": 32, "depth": 2},
}
VARIANTS = {  # name: (precision, compile, conv, cuda_graphs)
    "fp32": ("fp32", False, "grouped", False), "bf16": ("bf16", False, "grouped", False),
    "fp32+compile": ("fp32", True, "grouped", False), "bf16+compile": ("bf16", True, "grouped", False),
    "bf16+unfold": ("bf16", False, "unfold", False), "bf16+compile+unfold": ("bf16", True, "unfold", False),
    "fp32+fused": ("fp32", False, "fused", False), "bf16+fused": ("bf16", False, "fused", False),
    "bf16+compile+fused": ("bf16", True, "fused", False), "bf16+fused+graphs": ("bf16", False, "fused", True),
    "bf16+compile+fused+graphs": ("bf16", True, "fused", True)}
INDUCTOR = {  # name: torch._inductor.config settings the compiled step is built under
    "default": {},
    "gemm": {"max_autotune_gemm": True},  # Triton GEMM templates autotuned against cuBLAS, bias fused in
    "cdt": {"coordinate_descent_tuning": True},  # pointwise / reduction launch configs tuned per kernel
    "gemm+cdt": {"max_autotune_gemm": True, "coordinate_descent_tuning": True},
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


RECIPE = "adam_tanh"  # set by --recipe
HYP_ACTS = ["gelu", "relu", "sigmoid", "tanh"]  # set by --acts: the hyp recipe's activations
ZOO_CONFIG = None  # set by --zoo-config: the zoo recipe's config file


def members(n: int, batch: int) -> list[MemberSpec]:
    if RECIPE == "adam_tanh":  # the recipe of issue 4: Adam, tanh; lr varies per member so members really differ
        return [MemberSpec(seed=i, activation="tanh", optimizer="adam", lr=(1e-3, 3e-4, 3e-3)[i % 3],
                           batch_size=batch, init="kaiming_uniform") for i in range(n)]
    if RECIPE == "zoo":
        return zoo_members(n, batch, ZOO_CONFIG)
    return hyp_members(n, batch, HYP_ACTS)


def zoo_members(n: int, batch: int, path: str) -> list[MemberSpec]:
    """The first n members a zoo config draws (its activations, optimizers, dropout, train fractions, inits...)
    at batch size `batch`, laid out as zoo.build lays out a population."""
    cfg = load_config(ZooConfig, path)
    if cfg.random:  # draws are sequential: the first n of n_random are the first n of any longer draw
        cfg = dataclasses.replace(cfg, n_random=n)
    ms = [dataclasses.replace(m, batch_size=batch) for m in expand_members(cfg)[:n]]
    if len(ms) < n:
        raise SystemExit(f"--zoo-config {path}: it draws {len(ms)} members, fewer than --members {n}")
    return [ms[j] for j in run_order(ms, range(n))]


HYP_LR = {"adam": 1e-3, "sgd": 1e-2}


def hyp_members(n: int, batch: int, acts, opts=("adam", "sgd")) -> list[MemberSpec]:
    """A Model Zoos HYP-like mix in one population (these activations x optimizers, dropout 0 / 0.5), sorted
    as zoo.build plans it, so each activation and optimizer is one slice."""
    a, o = len(acts), len(opts)
    ms = [MemberSpec(seed=i, activation=acts[i % a], optimizer=opts[i // a % o], lr=HYP_LR[opts[i // a % o]],
                     dropout=0.5 * (i // (o * a) % 2), batch_size=batch, init="kaiming_uniform") for i in range(n)]
    return [ms[j] for j in run_order(ms, range(n))]


def time_solo(arch, data, batch, steps) -> float:
    """Seconds per step of the plain loop (gather batch on device, forward, backward, Adam)."""
    m = members(1, batch)[0]
    model = build_member(arch, ARCH_KWARGS[arch], m, data).train()
    opt = torch.optim.Adam(model.parameters(), lr=m.lr)
    order = member_order(torch.tensor([m.seed], device=data.x_train.device), 1, len(data.y_train))[0]
    def run(n):
        for s in range(n):
            idx = order[s * batch:(s + 1) * batch]
            loss = F.cross_entropy(model(data.normalize(data.x_train[idx])), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    run(10)
    sync(data.x_train.device)
    t0 = time.perf_counter()
    run(steps)
    sync(data.x_train.device)
    return (time.perf_counter() - t0) / steps


EVAL_SAMPLES = 0  # set by --eval: also time one checkpoint's evaluation, train metrics on this many samples


def population(arch, data, n_members, batch, precision, compile_, conv, graphs) -> Population:
    """The engine on the benchmark's recipe; evaluation chunked as `zoo.build` chunks it."""
    return Population(arch, ARCH_KWARGS[arch], members(n_members, batch), data, precision=precision, compile=compile_,
                      conv=conv, cuda_graphs=graphs, train_eval_samples=EVAL_SAMPLES,
                      eval_bytes=eval_bytes(ZooConfig(), data.x_train.device))


def time_engine(arch, data, n_members, batch, steps, precision, compile_, conv, graphs
                ) -> tuple[float, float, float, float]:
    """(seconds per step, seconds per epoch order, peak GiB, seconds per evaluation or nan) for one
    population of n_members."""
    dev = data.x_train.device
    pop = population(arch, data, n_members, batch, precision, compile_, conv, graphs)
    sync(dev)
    t0 = time.perf_counter()
    order = pop.epoch_order(1)
    sync(dev)
    t_order = time.perf_counter() - t0
    pop.run_steps(order, 1, range(6))  # warm-up (compilation, graph capture)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    pop.run_steps(order, 1, range(6, 6 + steps))
    sync(dev)
    t_step = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    t_eval = float("nan")
    if EVAL_SAMPLES:
        pop.evaluate()  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        pop.evaluate()
        sync(dev)
        t_eval = time.perf_counter() - t0
    return t_step, t_order, peak, t_eval


@contextlib.contextmanager
def _native_conv(device: torch.device):
    """Exact fp32 with another summation order: PyTorch's own conv instead of cuDNN (GPU) or oneDNN (CPU)."""
    backend = torch.backends.cudnn if device.type == "cuda" else torch.backends.mkldnn
    was = backend.enabled
    backend.enabled = False
    try:
        yield
    finally:
        backend.enabled = was


def agreement(arch, data, n, batch, precision, compile_, conv, graphs) -> list[tuple[float, float, float, float]]:
    """Test accuracy after one epoch for n members: (engine, plain loop fp32, plain loop fp32 with native
    conv, plain loop in the engine's precision). The last two against the second are the reference spread.
    cuDNN runs exact fp32 (no TF32) with deterministic algorithms."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        pop = population(arch, data, n, batch, precision, compile_, conv, graphs)
        pop.train_epoch(1)
        solo = lambda m, p="fp32": accuracy(train_solo(arch, ARCH_KWARGS[arch], m, data, 1, precision=p), data)
        out = []
        for e, m in zip(pop.evaluate()["test_acc"].tolist(), pop.members):
            fp = solo(m)
            with _native_conv(data.x_train.device):
                native = solo(m)
            out.append((e, fp, native, fp if precision == "fp32" else solo(m, precision)))
    return out


def report_agreement(arch: str, variant: str, quads) -> dict:
    """Print and return the check: max |engine - plain fp32|, the reference spread, the tolerance."""
    diff = max(abs(e - fp) for e, fp, _, _ in quads)
    spread = max(max(abs(nat - fp), abs(same - fp)) for _, fp, nat, same in quads)
    tol = max(0.002 if VARIANTS[variant][0] == "fp32" else 0.01, 2 * spread)
    print(f"{arch} {variant}: test acc after 1 epoch (engine, plain fp32, plain fp32 native conv, plain same "
          f"precision) {[tuple(round(v, 4) for v in q) for q in quads]}: engine vs plain fp32 max |diff| "
          f"{diff:.4f}; reference spread {spread:.4f}; tolerance {tol:.4f}: {'agree' if diff <= tol else 'DISAGREE'}",
          flush=True)
    return {"arch": arch, "check": variant, "results": quads, "max_diff": diff, "spread": spread, "tolerance": tol,
            "agree": diff <= tol}


def dropout_agreement(arch, data, n, batch, variant, modes) -> dict:
    """Test accuracy after one epoch for n members of the recipe, their dropout in each of `modes` (the same
    hashed masks either way: what differs is where they run and the rounding of the dropped maps), against the
    recipe's own spread: the first mode with PyTorch's grouped conv instead of the Triton kernels (another
    summation order, deterministic). Members with large rates and lrs turn last-bit differences into accuracy
    differences over an epoch, so the tolerance is max(0.002 fp32 / 0.01 bf16, 2 x that spread)."""
    precision, compile_, conv, graphs = VARIANTS[variant]
    runs = [(mode, conv) for mode in modes] + [(modes[0], "grouped")]
    accs = []
    for mode, c in runs:
        _directconv.set_dropout_fusion(mode == "fused")
        pop = population(arch, data, n, batch, precision, compile_, c, graphs)
        pop.train_epoch(1)
        accs.append(pop.evaluate()["test_acc"])
    _directconv.set_dropout_fusion(modes[-1] == "fused")
    diffs = [float((a - accs[0]).abs().max()) for a in accs]
    diff, spread = max(diffs[1:-1], default=0.0), diffs[-1]
    tol = max(0.002 if precision == "fp32" else 0.01, 2 * spread)
    print(f"{arch} {variant}: test acc after 1 epoch, {n} members, dropout {' vs '.join(modes)} (conv {conv}) and "
          f"{modes[0]} with grouped conv: median {', '.join(f'{float(a.median()):.4f}' for a in accs)}; max |diff| "
          f"{diff:.4f}; reference spread {spread:.4f}; tolerance {tol:.4f}: {'agree' if diff <= tol else 'DISAGREE'}",
          flush=True)
    return {"arch": arch, "check": f"{variant} dropout", "modes": modes, "max_diff": diff, "spread": spread,
            "tolerance": tol, "agree": diff <= tol,
            "test_acc": {f"{m} {c}": a.tolist() for (m, c), a in zip(runs, accs)}}


def profile(arch, data, n_members, batch, precision, compile_, conv, graphs, rows=40) -> str:
    """Profiler table of 5 training steps, or of one evaluation (`--eval N --profile`)."""
    dev = data.x_train.device
    pop = population(arch, data, n_members, batch, precision, compile_, conv, graphs)
    order = pop.epoch_order(1)
    pop.run_steps(order, 1, range(3))
    if EVAL_SAMPLES:
        pop.evaluate()  # warm-up
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                   if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        pop.evaluate() if EVAL_SAMPLES else pop.run_steps(order, 1, range(3, 8))
        sync(dev)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def _choices(ap: argparse.ArgumentParser, flag: str, noun: str, value: str, allowed) -> list[str]:
    """A comma-separated option's values; an unknown one exits 2 naming the flag and the choices."""
    names = value.split(",")
    for name in names:
        if name not in allowed:
            ap.error(f"{flag}: unknown {noun} {name!r}; choose from {', '.join(allowed)}")
    return names


def _knobs(ap: argparse.ArgumentParser, args) -> list[tuple[str, list, Callable]]:
    """(row label, values, setter) of each kernel choice the command line sweeps, in the order the rows name them;
    a run sets each to every value in turn and ends on the last ones (what the checks and the profile use)."""
    return [
        ("dx", _choices(ap, "--dx", "form", args.dx, _directconv.DX_FORMS), _directconv.set_dx_form),
        ("dw", _choices(ap, "--dw", "form", args.dw, _directconv.DW_FORMS), _directconv.set_dw_form),
        ("layout", _choices(ap, "--layout", "layout", args.layout, _directconv.LAYOUTS), _directconv.set_layout),
        ("act", _choices(ap, "--activation", "mode", args.activation, ("fused", "layer")),
         lambda mode: _directconv.set_activation_fusion(mode == "fused")),
        ("drop", _choices(ap, "--dropout", "mode", args.dropout, ("fused", "layer")),
         lambda mode: _directconv.set_dropout_fusion(mode == "fused")),
        ("attn", _choices(ap, "--attention", "form", args.attention, engine.ATTENTION_FORMS),
         engine.set_attention_form),
        ("patch", _choices(ap, "--patch", "form", args.patch, engine.PATCH_FORMS), engine.set_patch_form),
        ("tokens", _choices(ap, "--tokens", "layout", args.tokens, engine.TOKEN_LAYOUTS), engine.set_token_layout),
        ("mlp", _choices(ap, "--mlp", "form", args.mlp, engine.MLP_FORMS), engine.set_mlp_form),
        ("programs", [int(v) for v in args.block_programs.split(",")], lambda n: setattr(_mlp, "PROGRAMS", n)),
        ("mlp_bwd_rows", [int(v) for v in args.mlp_bwd_rows.split(",")],
         lambda n: setattr(_mlp, "BLOCK", (_mlp.BLOCK[0], n))),
        ("inductor", _choices(ap, "--inductor", "setting", args.inductor, INDUCTOR), lambda _: None),  # patched per run
    ]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-root", default="data/datasets")
    ap.add_argument("--archs", default="cnn_s,cnn_gap,vit_t")
    ap.add_argument("--members", default="4096", help="population sizes, comma-separated")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--solo-steps", type=int, default=200)
    ap.add_argument("--variants", default="fp32,bf16,bf16+compile")
    ap.add_argument("--check", type=int, default=3, help="members trained one epoch both ways")
    ap.add_argument("--profile", action="store_true",
                    help="profile 5 steps of the last variant at each population size (with --eval: one evaluation)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--recipe", choices=["adam_tanh", "hyp", "zoo"], default="adam_tanh",
                    help="hyp: mixed activations/optimizers and dropout; zoo: the first members of --zoo-config "
                         "(neither has the plain-loop agreement check)")
    ap.add_argument("--zoo-config", help="the zoo config whose members --recipe zoo trains")
    ap.add_argument("--acts", default="gelu,relu,sigmoid,tanh",
                    help="the hyp recipe's activations (fewer: fewer activation/optimizer slices per population)")
    ap.add_argument("--eval", type=int, default=0, metavar="N",
                    help="also time one evaluation (train metrics on N samples, test and val on all)")
    ap.add_argument("--dx", default=_directconv.dx_form,
                    help="the direct convs' input-gradient forms to time, comma-separated (checks: the last)")
    ap.add_argument("--dw", default=_directconv.dw_form,
                    help="the direct convs' channels-last weight-gradient forms to time, comma-separated (checks: "
                         "the last)")
    ap.add_argument("--layout", default=_directconv.layout,
                    help="the direct convs' output layouts to time (zoo._directconv.LAYOUTS), comma-separated "
                         "(checks: the last)")
    ap.add_argument("--activation", default="fused" if _directconv.fuse_activation else "layer",
                    help="where the direct convs' activations run, comma-separated (checks: the last): fused (in "
                         "the conv kernels, zoo._directconv.set_activation_fusion) or layer (inductor's own)")
    ap.add_argument("--dropout", default="fused" if _directconv.fuse_dropout else "layer",
                    help="where the dropout after a fused activation runs, comma-separated (checks: the last): fused "
                         "(in the conv kernels, zoo._directconv.set_dropout_fusion) or layer (its own elementwise "
                         "layer); with --recipe hyp / zoo and --check N, N members train one epoch under each")
    ap.add_argument("--resize", type=int, default=None, help="resize images to this side (digits: 28 for vit_t)")
    ap.add_argument("--attention", default=engine.attention_form,
                    help="attention forms to time (zoo.engine.ATTENTION_FORMS), comma-separated; reduce needs compile")
    ap.add_argument("--patch", default=engine.patch_form,
                    help="vit_t patch-embedding forms to time (zoo.engine.PATCH_FORMS), comma-separated")
    ap.add_argument("--tokens", default=engine.token_layout,
                    help="token-stream layouts to time (zoo.engine.TOKEN_LAYOUTS), comma-separated (checks: the last)")
    ap.add_argument("--mlp", default=engine.mlp_form,
                    help="pre-norm MLP block forms to time (zoo.engine.MLP_FORMS), comma-separated (checks: the last)")
    ap.add_argument("--block-programs", default=str(_mlp.PROGRAMS),
                    help="programs the fused transformer blocks aim for per launch (zoo._mlp.PROGRAMS: rows split "
                         "over programs where members are fewer; weight-gradient partial sums per split), "
                         "comma-separated (checks: the last)")
    ap.add_argument("--mlp-bwd-rows", default=str(_mlp.BLOCK[1]),
                    help="rows a step of the fused MLP block's backward (zoo._mlp.BLOCK[1]; powers of two from 16), "
                         "comma-separated (checks: the last)")
    ap.add_argument("--inductor", default="default",
                    help=f"inductor settings to compile under ({', '.join(INDUCTOR)}), comma-separated (checks and "
                         "profile: the last)")
    ap.add_argument("--block-r", type=int, default=0, help="rows per Triton conv program (default: the module's)")
    return ap


def _configure(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """Set the module's recipe globals from the options and check them; returns the knobs to sweep."""
    if args.block_r:
        _convpool.BAND_R = args.block_r
    global RECIPE, EVAL_SAMPLES, HYP_ACTS, ZOO_CONFIG
    RECIPE, EVAL_SAMPLES, HYP_ACTS, ZOO_CONFIG = args.recipe, args.eval, args.acts.split(","), args.zoo_config
    if (RECIPE == "zoo") != (ZOO_CONFIG is not None):
        ap.error("--recipe zoo and --zoo-config go together")
    if RECIPE != "adam_tanh" and args.check and len(args.dropout.split(",")) < 2:
        ap.error(f"--recipe {RECIPE} trains hashed-dropout members the plain loop cannot reproduce; pass --check 0, "
                 f"or --dropout layer,fused to check the two dropout paths against each other")
    if ZOO_CONFIG is not None and not Path(ZOO_CONFIG).is_file():
        ap.error(f"--zoo-config: no such file {ZOO_CONFIG}")
    return _knobs(ap, args)


def _time_arch(arch: str, args: argparse.Namespace, knobs: list, dev: torch.device) -> list[dict]:
    """The plain loop, then every knob / variant / population size of one architecture, then its checks and
    profiles (under the last of each knob); returns the result rows."""
    inductor = knobs[-1][1]
    rows = []
    data = load_dataset(args.dataset, args.data_root, resize=args.resize, device=dev)
    spe = len(data.y_train) // args.batch
    solo = time_solo(arch, data, args.batch, args.solo_steps)
    solo_rate = 1 / (solo * spe)
    print(f"{arch}: plain loop {solo * 1e3:.2f} ms/step = {solo_rate:.3f} model-epochs/s", flush=True)
    rows.append({"arch": arch, "path": "plain loop", "members": 1, "rate": solo_rate, "ms_step": solo * 1e3})
    for *values, variant in itertools.product(*(vals for _, vals, _ in knobs), args.variants.split(",")):
        for (_, _, choose), value in zip(knobs, values):
            choose(value)
        ind = values[-1]
        path = variant + "".join(f" {label}={value}" for (label, vals, _), value in zip(knobs, values)
                                 if len(vals) > 1)
        for m in (int(v) for v in args.members.split(",")):
            try:
                with torch._inductor.config.patch(INDUCTOR[ind]):
                    t, t_order, peak, t_eval = time_engine(arch, data, m, args.batch, args.steps,
                                                           *VARIANTS[variant])
            except torch.OutOfMemoryError:
                print(f"{arch} {path} {m}: out of memory", flush=True)
                torch.cuda.empty_cache()
                continue
            rate = m / (t * spe + t_order)  # the per-epoch shuffle counted once per epoch
            rows.append({"arch": arch, "path": path, "members": m, "rate": rate, "ms_step": t * 1e3,
                         "order_s": t_order, "peak_gib": peak, "ratio": rate / solo_rate, "eval_s": t_eval})
            print(f"{arch} {path} M={m}: {t * 1e3:.1f} ms/step, order {t_order:.2f} s/epoch, "
                  f"{rate:.1f} model-epochs/s ({rate / solo_rate:.0f}x), peak {peak:.1f} GiB"
                  + (f", one evaluation {t_eval:.2f} s" if EVAL_SAMPLES else ""), flush=True)
            torch.cuda.empty_cache() if dev.type == "cuda" else None
    return rows + _checks(arch, data, args, inductor[-1])


def _checks(arch: str, data, args: argparse.Namespace, inductor: str) -> list[dict]:
    """The agreement checks (--check) and profiles (--profile) of one architecture under the last variant."""
    rows = []
    last = args.variants.split(",")[-1]
    with torch._inductor.config.patch(INDUCTOR[inductor]):
        for variant in ("fp32", last) if args.check and RECIPE == "adam_tanh" else ():
            rows.append(report_agreement(arch, variant, agreement(arch, data, args.check, args.batch,
                                                                  *VARIANTS[variant])))
        if args.check and RECIPE != "adam_tanh":
            rows.append(dropout_agreement(arch, data, args.check, args.batch, last, args.dropout.split(",")))
        for m in (int(v) for v in args.members.split(",")) if args.profile else ():
            print(f"{arch}, {m} members, {last}, inductor={inductor}:")
            print(profile(arch, data, m, args.batch, *VARIANTS[last]))
    return rows


def _print_table(rows: list[dict]) -> None:
    print("\n| arch | path | members | model-epochs/s | ms/step | ratio | peak GiB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "rate" in r:
            print(f"| {r['arch']} | {r['path']} | {r['members']} | {r['rate']:.2f} | {r['ms_step']:.2f} | "
                  f"{r.get('ratio', 1):.0f} | {r.get('peak_gib', float('nan')):.1f} |")


def main():
    ap = _parser()
    args = ap.parse_args()
    knobs = _configure(ap, args)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(torch.cuda.get_device_name(), "torch", torch.__version__)
    rows = [row for arch in args.archs.split(",") for row in _time_arch(arch, args, knobs, dev)]
    _print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
