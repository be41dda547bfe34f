"""weightzoo.zoo: build model zoos (populations of small trained networks), read, write and evaluate them."""
__version__ = "0.2.0"

from .cli import Config, UsageError, load_config, option, run_cli
from .config import HPARAMS, MemberSpec, ZooConfig, expand_members
from .data import DataSpec, ImageData, load_dataset
from .engine import BatchedNet
from .evaluation import Evaluator, evaluate
from .export import ZooDataset
from .models import create_model, flatten_state, init_weights, list_models, register
from .population import Population
from .spec import Layout, ModelSpec, TensorEntry
from .store import Zoo, open_zoo
from .symmetry import Coupling, Permuter, find_couplings
from .writer import ZooWriter

open = open_zoo  # zoo.open(path)

__all__ = ["Config", "UsageError", "load_config", "option", "run_cli", "HPARAMS", "MemberSpec", "ZooConfig",
           "expand_members", "DataSpec", "ImageData", "load_dataset", "BatchedNet", "Evaluator", "evaluate",
           "create_model", "flatten_state", "init_weights", "list_models", "register", "Population", "Layout",
           "ModelSpec", "TensorEntry", "Zoo", "open", "open_zoo", "Coupling", "Permuter", "find_couplings",
           "ZooWriter", "ZooDataset", "__version__"]
