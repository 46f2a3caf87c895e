"""What a run is and how it survives: its identity and directory, its record, its lock, its
checkpoints, sweep planning and SLURM launching. Nothing here trains."""
