"""Loading a sweep's results, scaling-law fits, frontiers and figures."""
from analysis.fits import Fit, convergence, fit_joint, fit_loc, fit_lofn, fit_lr, fits_table, loc_frontier
from analysis.results import load_curves, load_layers, load_recovery, load_runs, load_table
from analysis.selection import best_lr

__all__ = ["load_runs", "load_curves", "load_layers", "load_recovery", "load_table", "Fit", "fit_lofn", "fit_loc",
           "fit_joint", "fit_lr", "fits_table", "convergence", "loc_frontier", "best_lr"]
