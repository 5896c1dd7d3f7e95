"""Launching at scale: the trainer's exit status for launchers, Hydra sweeps through submitit.

The shell side lives in ``launch/`` (``torchrun.sh``, ``slurm/pretrain.sbatch``); what a
launcher must know from the trainer, and what runs inside a sweep job, lives here.
"""
