"""Launchers: ``dide-submit`` (submitit, SLURM or the local machine).

The sbatch scripts in ``slurm/`` are the other way in; both run the same trainer, which
checkpoints on every rank on a stop signal and exits with ``train.REQUEUE_EXIT_CODE``;
the launcher's only job is to requeue then.  See docs/CLUSTER.md.
"""
