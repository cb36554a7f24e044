"""Where a run's worker runs: the Executor protocol, `local` (process groups here) and `slurm`
(sbatch/squeue/scancel), and the event file both tail.
"""
