"""Checkpoint tools that work without a training engine: convert, reshard, merge, generate, offline I/O."""
