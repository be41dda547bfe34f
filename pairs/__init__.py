"""Pairs of members: which can be merged? Pick pairs with known relations, interpolate and average them (raw and
after weight matching) with the batched evaluator, and write a Parquet pair table beside the zoo."""
from ._pairs import barrier, pair_table, path_metrics, pick_pairs
from .config import RELATIONS, PairsConfig

__all__ = ["PairsConfig", "RELATIONS", "pick_pairs", "path_metrics", "barrier", "pair_table"]
