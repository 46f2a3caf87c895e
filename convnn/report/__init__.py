"""``convnn-tables``: run records (local or wandb) -> tables, figures and claims beside the paper's
numbers. Nothing here trains or imports the training app."""
