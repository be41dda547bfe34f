"""weightzoo.hyperrep: SANE-style hyper-representations of zoo weights."""
from .augment import Coupling, Permuter, add_noise, erase_tokens, find_couplings
from .config import FitConfig
from .data import ZooDataModule, layer_stats, split_members
from ._embed import embed_zoo
from ._fit import fit_run, load_run
from .model import AEShape, HyperAE, masked_mse, nt_xent, sane_loss
from .module import HyperRepModule
from .tokens import Tokenizer

__all__ = ["Coupling", "Permuter", "add_noise", "erase_tokens", "find_couplings", "FitConfig", "ZooDataModule",
           "layer_stats", "split_members", "embed_zoo", "fit_run", "load_run", "AEShape", "HyperAE", "masked_mse",
           "nt_xent", "sane_loss", "HyperRepModule", "Tokenizer"]
