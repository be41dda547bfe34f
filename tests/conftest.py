import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU (before zoo imports triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from zoo import load_dataset
from zoo.build import DEFAULT_ZOO
from zoo.cli import load_config
from zoo.config import ZooConfig

TINY = ["epochs=2", "checkpoints=[0,1,2]", "seeds=1", "grid.init=[kaiming_uniform]", "grid.activation=[tanh,relu]",
        "grid.optimizer=[adam,sgd]", "grid.lr=[0.003,0.03]", "grid.dropout=[0.0,0.2]"]


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits28():
    return load_dataset("digits", resize=28)


def tiny_config(*overrides: str) -> ZooConfig:
    """16 members on digits, 2 epochs: a zoo in about a second."""
    return load_config(ZooConfig, None, TINY + list(overrides), DEFAULT_ZOO)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    from zoo.build import build
    return build(tiny_config(), tmp_path_factory.mktemp("zoo") / "tiny.h5", progress=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_pipeline(tmp_path_factory):
    """The README's first command in a temporary directory: default zoo -> default hyperrep -> embeddings."""
    import os

    from hyperrep import FitConfig, embed_zoo, fit_run
    from zoo.build import build

    os.environ["WEIGHTZOO_QUIET"] = "1"
    root = tmp_path_factory.mktemp("pipeline")
    zoo_path = build(load_config(ZooConfig, None, [], DEFAULT_ZOO), root / "digits_default.h5", progress=False)
    run = fit_run(load_config(FitConfig, "configs/hyperrep/default.yaml", [f"zoo={zoo_path}", f"out={root / 'hr'}"]))
    return zoo_path, embed_zoo(zoo_path, run, progress=False)


def block_inputs(B: int, M: int, T: int, D: int, shapes: list[tuple[int, ...]], member_major: bool, device):
    """(x (B, M, T, D), per-member parameters of `shapes` as strided views of one flat (M, P) buffer, the first a
    layer-norm weight near 1, an output gradient like x) for the fused-block tests; member_major stores x as
    (M, B, T, D)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, B, T, D, generator=g).permute(1, 0, 2, 3) if member_major else torch.randn(B, M, T, D,
                                                                                                  generator=g)
    sizes = [torch.Size(s).numel() for s in shapes]
    flat = torch.randn(M, sum(sizes) + 3, generator=g) * 0.3  # 3 spare columns: member stride != member size
    flat[:, :D] += 1.0
    ps = [v.view(M, *s) for v, s in zip(flat[:, :sum(sizes)].split(sizes, 1), shapes)]
    gy = torch.randn(B, M, T, D, generator=g)
    return x.to(device), [p.to(device) for p in ps], gy.to(device)
