"""What a member *is*: its architecture (`ModelSpec`) and where each tensor sits in its flat weight vector
(`Layout`). Both are frozen, typed, and stored in (and read back from) a zoo file's attributes.

    spec = ModelSpec("cnn_gap", {}, (1, 28, 28), 10)
    net = spec.create(activation="relu")          # a plain nn.Module
    layout = spec.layout()                        # Layout of TensorEntry(name, shape, offset)
    layout["3.weight"].slice, layout.n_params     # where a tensor sits, how long the vector is
    state = layout.unflatten(flat)                # (P,) -> state_dict; layout.flatten(state) inverts it
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .cli import UsageError


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a member's state_dict: its name, shape and offset in the flat vector."""
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    @property
    def module(self) -> str:
        """Name of the module holding the tensor ('3' for '3.weight', '' for a top-level tensor)."""
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""

    @property
    def kind(self) -> str:
        """'weight', 'bias', or the tensor's own name (e.g. 'cls', 'pos')."""
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Layout(Sequence[TensorEntry]):
    """The tensors of a flat weight vector, in state_dict order, contiguous from offset 0."""
    entries: tuple[TensorEntry, ...]

    def __post_init__(self):
        offset = 0
        for e in self.entries:
            if e.offset != offset:
                raise ValueError(f"layout entry '{e.name}' starts at {e.offset}, expected {offset} (entries must be "
                                 f"contiguous, in order)")
            offset += e.size

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.entries)

    def __getitem__(self, key):
        if isinstance(key, str):
            for e in self.entries:
                if e.name == key:
                    return e
            raise KeyError(f"layout has no tensor '{key}'; tensors: {', '.join(self.names)}")
        return self.entries[key]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def n_params(self) -> int:
        return self.entries[-1].offset + self.entries[-1].size if self.entries else 0

    @classmethod
    def of(cls, module: nn.Module) -> "Layout":
        """The layout of a module's state_dict."""
        entries, offset = [], 0
        for name, t in module.state_dict().items():
            entries.append(TensorEntry(name, tuple(t.shape), offset))
            offset += t.numel()
        return cls(tuple(entries))

    def to_json(self) -> str:
        """The on-disk form: a JSON list of {"name", "shape", "offset"} (format weightzoo-zoo/1)."""
        return json.dumps([{"name": e.name, "shape": list(e.shape), "offset": e.offset} for e in self.entries])

    @classmethod
    def from_json(cls, text: str | Sequence[Mapping]) -> "Layout":
        rows = json.loads(text) if isinstance(text, (str, bytes)) else text
        try:
            return cls(tuple(TensorEntry(str(r["name"]), tuple(int(s) for s in r["shape"]), int(r["offset"]))
                             for r in rows))
        except (KeyError, TypeError) as e:
            raise UsageError(f"layout is not a list of {{name, shape, offset}} entries ({e})") from None

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., P) -> {name: (..., *shape)} copies."""
        flat = torch.as_tensor(flat)
        if flat.shape[-1] != self.n_params:
            raise ValueError(f"flat weights have {flat.shape[-1]} values, the layout {self.n_params}")
        lead = flat.shape[:-1]
        return {e.name: flat[..., e.slice].reshape(*lead, *e.shape).clone() for e in self.entries}

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(M, P) -> per-tensor views (M, *shape) that share the buffer, state_dict order."""
        return [flat[:, e.slice].view(-1, *e.shape) for e in self.entries]

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{name: (..., *shape)} -> (..., P), in layout order."""
        parts = []
        for e in self.entries:
            t = state[e.name]
            parts.append(t.reshape(*t.shape[:t.dim() - len(e.shape)], e.size))
        return torch.cat(parts, -1)

    def tensor(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """One tensor of (..., P) weights as a view (..., *shape)."""
        e = self[name]
        return flat[..., e.slice].reshape(*flat.shape[:-1], *e.shape)


@dataclass(frozen=True)
class ModelSpec:
    """A member's network: registry architecture, its keyword arguments, input shape (C, H, W) for images or
    (T,) for token sequences, classes (the vocabulary for sequences). Activation and dropout come from the
    member's hyperparameters (`MemberSpec`)."""
    architecture: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(v) for v in self.input_shape))
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        if len(self.input_shape) not in (1, 3) or min(self.input_shape) < 1:
            raise UsageError(f"input_shape must be (C, H, W) or (T,) with positive sizes, got {self.input_shape}")
        if len(self.input_shape) == 3 and self.input_shape[1] != self.input_shape[2]:
            raise UsageError(f"images are {self.input_shape[1]}x{self.input_shape[2]}; architectures take square "
                             f"images: set resize=N")
        if self.num_classes < 1:
            raise UsageError(f"num_classes must be >= 1, got {self.num_classes}")

    def __hash__(self):
        return hash((self.architecture, json.dumps(self.kwargs, sort_keys=True), self.input_shape, self.num_classes))

    def create(self, activation: str | None = None, dropout: float = 0.0) -> nn.Module:
        """A fresh, uninitialised `nn.Module` of this spec (`zoo.init_weights` seeds it)."""
        from .models import create_model

        C, H = (1, self.input_shape[0]) if len(self.input_shape) == 1 else self.input_shape[:2]  # (T,): H = T
        kw = dict(self.kwargs)
        if activation is not None:
            kw["activation"] = activation
        return create_model(self.architecture, in_channels=C, input_size=H, num_classes=self.num_classes,
                            dropout=dropout, **kw)

    def layout(self) -> Layout:
        return Layout.of(self.create())

    def to_attrs(self) -> dict[str, Any]:
        """The zoo file's root attributes for this spec (format weightzoo-zoo/1)."""
        return {"architecture": self.architecture, "architecture_kwargs": json.dumps(self.kwargs),
                "input_shape": json.dumps(list(self.input_shape)), "num_classes": self.num_classes}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "ModelSpec":
        missing = [k for k in ("architecture", "architecture_kwargs", "input_shape", "num_classes") if k not in attrs]
        if missing:
            raise UsageError(f"zoo attributes lack '{missing[0]}'")
        return cls(str(attrs["architecture"]), json.loads(attrs["architecture_kwargs"]),
                   tuple(json.loads(attrs["input_shape"])), int(attrs["num_classes"]))
