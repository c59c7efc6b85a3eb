"""Sweeps: one config expanded over a grid of values and seeds (grid), its runs trained one after another or
as a SLURM job array (execute, slurm), and the runs reported side by side (report). The demo's arms use the
same code."""
