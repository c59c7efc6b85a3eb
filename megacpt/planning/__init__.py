"""Planning a run before it starts: capacity (memory, step time, layout), hostfiles, the LR schedule preview."""
