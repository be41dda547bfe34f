"""weightzoo.hyperrep: SANE-style hyper-representations of zoo weights."""
from ._embed import embed_zoo
from ._fit import fit_run, fit_splits, load_run
from .augment import add_noise, erase_tokens
from .config import FitConfig
from .data import ZooDataModule, layer_stats, split_members
from .model import AEShape, HyperAE, layer_weights, masked_mse, nt_xent, sane_loss
from .module import HyperRepModule
from .tokens import Tokenizer

__all__ = ["embed_zoo", "fit_run", "fit_splits", "load_run", "add_noise", "erase_tokens", "FitConfig", "ZooDataModule",
           "layer_stats", "split_members", "AEShape", "HyperAE", "layer_weights", "masked_mse", "nt_xent", "sane_loss",
           "HyperRepModule", "Tokenizer"]
