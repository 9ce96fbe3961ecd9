"""Loading results, scaling-law fits, frontiers, figures, reports."""
