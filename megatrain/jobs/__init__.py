"""A training run as a job that launchers manage: the trainer's exit status for them (requeue on
75), Hydra sweep bookkeeping, and sweep jobs under submitit that start their own torchrun.

The shell side lives in the top-level ``launch/`` (``torchrun.sh``, ``slurm/pretrain.sbatch``).
"""
