"""What megatron-core needs to run on a machine without CUDA; installed once, only when CUDA is absent.

megatron-core 0.16 assumes CUDA in a few spots: rotary embeddings and the global memory buffer place tensors
on `torch.cuda.current_device()`, and the tensor-parallel RNG tracker saves and restores CUDA generator
states. Without CUDA those calls can only fail, so this module points them at the CPU. Weight init on CPU is
handled by `use_cpu_initialization`; the causal mask by megacpt's own SDPA core attention.

The CPU's other concerns live with their owners: DeepSpeed's precision and comm backend on CPU in
`megacpt.runtime.engine` and `megacpt.runtime.distributed`, each process's share of the cores in
`megacpt.runtime.distributed`.
This module knows nothing of DeepSpeed.
"""
from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mcore_random


class CPURNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """megatron's RNG tracker (named generator states forked around dropout) over the CPU generator."""

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def install_if_needed() -> bool:
    """Point megatron-core's CUDA-only spots at the CPU when CUDA is absent. Returns whether it did."""
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = lambda: torch.device("cpu")
    # Activation recompute saves and restores "the CUDA generator" next to the CPU one; there is none.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None
    mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return True


def seed_tensor_parallel_rng(seed: int, tensor_parallel_rank: int) -> None:
    """Seed the tracker's model-parallel state (distinct per TP rank, as megatron does on GPU)."""
    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tensor_parallel_rank)
