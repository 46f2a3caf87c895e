"""Hydra plugins: the sweeper ``hydra/sweeper=paper`` (union of override rows x Cartesian params, dry
run, projected cost), the local launcher behind ``hydra/launcher=local`` (a queue, one GPU set per
job; see ``local_launcher``) and the SLURM launcher behind ``hydra/launcher=slurm`` (see
``slurm_launcher``)."""
