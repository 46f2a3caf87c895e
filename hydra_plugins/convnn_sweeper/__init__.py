"""Hydra sweeper plugin ``hydra/sweeper=paper``: union of override rows x Cartesian params, dry run."""
