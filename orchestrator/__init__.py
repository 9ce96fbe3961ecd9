"""Sweeps: YAML spec, planning, Ray scheduling, Parquet results store, CLI."""
