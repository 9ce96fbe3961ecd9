"""Loading a sweep's results, scaling-law fits, frontiers and figures."""
from analysis.results import load_curves, load_layers, load_recovery, load_runs, load_table

__all__ = ["load_runs", "load_curves", "load_layers", "load_recovery", "load_table"]
