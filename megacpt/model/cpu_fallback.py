"""What megatron-core needs to run on a machine without CUDA; installed once, only when CUDA is absent.

megatron-core 0.16 assumes CUDA in a few spots (REFERENCE.md section 3): rotary embeddings and the global
memory buffer place tensors on `torch.cuda.current_device()`, and the tensor-parallel RNG tracker saves and
restores CUDA generator states. Without CUDA those calls can only fail, so this module points them at the
CPU. It also keeps DeepSpeed from building its CPU shared-memory all-reduce, which training does not use.
Weight init on CPU is handled by `use_cpu_initialization`; the causal mask by megacpt's own SDPA core
attention. Besides the thread share and precision below, nothing else in megacpt special-cases the CPU.
"""
from __future__ import annotations

import contextlib
import os

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
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn while detecting it
    torch.cuda.current_device = lambda: torch.device("cpu")
    # Activation recompute saves and restores "the CUDA generator" next to the CPU one; there is none.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None
    mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _skip_shared_memory_allreduce_build()
    return True


def _skip_shared_memory_allreduce_build() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce when its comm backend starts.

    Only DeepSpeed's inference all-reduce uses that op; training reduces through gloo. Built, it costs every
    run a compile (about a minute) behind a lock under ~/.cache/torch_extensions that a build killed half-way
    leaves for good, and every process a 69 MB file in /dev/shm that is never removed. DeepSpeed keeps its
    compatible ops in one dict that it consults before building; marking the op incompatible there is enough.
    """
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def share_cores() -> int:
    """Give this process its share of the node's cores as torch threads, and return the count.

    torch gives every process as many threads as there are cores, so N launcher processes on one node would
    run N times too many threads. An explicit OMP_NUM_THREADS (DeepSpeed's `--bind_cores_to_rank` sets it)
    wins; a CPU set already narrowed for this process (srun's binding) is used as it is.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        usable = len(os.sched_getaffinity(0))
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        if usable == os.cpu_count():
            usable //= local_processes
        torch.set_num_threads(max(1, usable))
    return torch.get_num_threads()


def seed_tensor_parallel_rng(seed: int, tensor_parallel_rank: int) -> None:
    """Seed the tracker's model-parallel state (distinct per TP rank, as megatron does on GPU)."""
    tracker = mcore_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tensor_parallel_rank)


def adapt_deepspeed_config(ds: dict) -> dict:
    """Without CUDA: fp32 (DeepSpeed's bf16/fp16 engines need a GPU)."""
    if torch.cuda.is_available():
        return ds
    for precision in ("bf16", "fp16"):
        if ds.get(precision, {}).get("enabled"):
            ds[precision] = {"enabled": False}
    return ds
