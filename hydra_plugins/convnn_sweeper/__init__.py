"""Hydra plugins: the sweeper ``hydra/sweeper=paper`` (union of override rows x Cartesian params, dry
run) and the SLURM launcher behind ``hydra/launcher=slurm`` (see ``slurm_launcher``)."""
