"""Launchers: `python -m launch.local`, `launch.slurm`, `launch.tpu_pod` and `launch.sweep` (see launch/README.md)."""
