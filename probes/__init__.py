"""weightzoo.probes: what do the weights reveal? Probes on W, s(W) and hyper-representations."""
from ._probe import COLUMNS, evaluate_probes, markdown_table, member_split, plot_embedding_space, score
from .features import ProbeData, load_probe_data, target_kind, target_values, weight_stats

__all__ = ["COLUMNS", "evaluate_probes", "markdown_table", "member_split", "plot_embedding_space", "score", "ProbeData",
           "load_probe_data", "target_kind", "target_values", "weight_stats"]
