"""Launchers: ``python -m franca.run.train`` submits pretraining to SLURM through submitit (one task per GPU)."""
