import pytest
import torch

from zoo import Layout, UsageError, create_model, init_weights, list_models
from zoo.models import INITS, flatten_state

SHAPES = {"cnn_s": (1, 28), "cnn_l": (3, 32), "cnn_gap": (1, 28), "smallcnn": (1, 32), "mlp": (1, 8), "vit_t": (3, 28),
          "gpt_t": (1, 12)}  # gpt_t: token ids, context 12
KWARGS = {"gpt_t": {"fc_mem_dim": 3}}


def input_shape(name: str) -> tuple[int, ...]:
    """One sample's shape: (C, H, W) images, (T,) token ids for gpt_t."""
    c, size = SHAPES[name]
    return (size,) if name == "gpt_t" else (c, size, size)


def sample_input(name: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "gpt_t":  # token ids in (vocabularies here have >= 7 tokens), logits per position out
        return torch.randint(0, 7, (n, *input_shape(name)), generator=g)
    return torch.randn(n, *input_shape(name), generator=g)


@pytest.mark.parametrize("name", list_models())
def test_registry_forward_and_gradients(name):
    c, size = SHAPES[name]
    model = create_model(name, in_channels=c, input_size=size, num_classes=7, dropout=0.1, **KWARGS.get(name, {}))
    init_weights(model, "kaiming_uniform", 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():  # memory neurons start silent (zero output weights): wake them so mem_fc is reached
        for pname, p in model.named_parameters():
            if "mem_proj" in pname:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    out = model(sample_input(name, 5))
    assert out.shape == ((5, size, 7) if name == "gpt_t" else (5, 7)) and torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_every_registry_entry_is_covered():
    assert set(SHAPES) == set(list_models())


@pytest.mark.parametrize("name,count", [("cnn_s", 2464), ("cnn_gap", 4970)])
def test_reference_parameter_counts(name, count):
    model = create_model(name, in_channels=1, input_size=28, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == count


def test_cnn_l_matches_reference_on_32px():
    model = create_model("cnn_l", in_channels=3, input_size=32, num_classes=10)
    assert model[13].in_features == 60  # 15 channels x 2 x 2 after three conv+pool stages


def test_unknown_name_and_bad_shape_raise():
    with pytest.raises(UsageError, match="unknown architecture 'cnn_xl'"):
        create_model("cnn_xl")
    with pytest.raises(UsageError, match=r"cannot take input shape \(1, 8, 8\)"):
        create_model("cnn_s", in_channels=1, input_size=8)
    with pytest.raises(UsageError, match="unknown activation"):
        create_model("mlp", activation="swish")


@pytest.mark.parametrize("init", INITS)
def test_inits_are_seeded_and_distinct(init):
    make = lambda seed: flatten_state(init_weights(create_model("cnn_s"), init, 1.0,
                                                   torch.Generator().manual_seed(seed)))
    a, b, c = make(1), make(1), make(2)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()


def test_layout_round_trip():
    model = create_model("vit_t", in_channels=1, input_size=28, num_classes=10)
    layout = Layout.of(model)
    flat = flatten_state(model)
    rebuilt = create_model("vit_t", in_channels=1, input_size=28, num_classes=10)
    rebuilt.load_state_dict(layout.unflatten(flat))
    assert torch.equal(flatten_state(rebuilt), flat)


@pytest.mark.parametrize("name", list_models())
def test_init_sets_every_parameter(name):
    # Population re-initialises one module per member (init_flat): no value may survive from the last member
    model = create_model(name, in_channels=1, input_size=28, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    init_weights(model, "kaiming_uniform", 1.0, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_smallcnn_is_the_small_cnn_zoo_network_with_valid_padding():
    import torch.nn as nn

    net = create_model("smallcnn", in_channels=1, input_size=28)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    assert all(c.padding == (0, 0) and c.stride == (2, 2) for c in convs)
    sizes, x = [], torch.zeros(1, 1, 28, 28)
    for m in net[:-2]:
        x = m(x)
        if isinstance(m, nn.Conv2d):
            sizes.append(x.shape[-1])
    assert sizes == [13, 6, 2] and sum(p.numel() for p in net.parameters()) == 4970
    padded = create_model("cnn_gap", in_channels=1, input_size=28)
    assert [m.padding for m in padded if isinstance(m, nn.Conv2d)] == [(1, 1)] * 3
