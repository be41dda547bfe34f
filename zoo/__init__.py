"""weightzoo.zoo: build model zoos (populations of small trained networks) and read them back."""
__version__ = "0.1.0"

from ._config import UsageError
from .config import MemberSpec, ZooConfig, expand_members
from .data import ImageData, load_dataset
from .models import create_model, init_weights, list_models, register, unflatten
from .population import Population
from .store import Zoo, open_zoo

open = open_zoo  # zoo.open(path)

__all__ = ["UsageError", "MemberSpec", "ZooConfig", "expand_members", "ImageData", "load_dataset", "create_model",
           "init_weights", "list_models", "register", "unflatten", "Population", "Zoo", "open", "open_zoo", "__version__"]
