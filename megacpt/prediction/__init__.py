"""Loss laws with LR annealing, the loss curves of runs, and the predict command."""
