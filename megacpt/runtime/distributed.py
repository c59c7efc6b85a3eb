"""Process groups: torch.distributed (one plain process or the deepspeed launcher's world) and megatron's
parallel state, exposed to DeepSpeed through the `mpu` interface it expects.

Device choice happens here, once: CUDA (nccl) when present, otherwise the CPU (gloo) with megatron-core's
CPU fallback installed, DeepSpeed told it runs on the CPU, and each process given its share of the cores.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megacpt.errors import ConfigError
from megacpt.model import cpu_fallback


@dataclass(frozen=True)
class World:
    """Where this process sits: global rank and size, tensor- and data-parallel coordinates, its device."""

    rank: int
    size: int
    tensor_rank: int
    tensor_size: int
    data_rank: int
    data_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def data_group():
        """The process group of this rank's data-parallel peers (megatron's parallel state)."""
        return parallel_state.get_data_parallel_group()


class MegatronMPU:
    """megatron's parallel_state under the names DeepSpeed's `mpu` argument looks up."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_group_ranks = staticmethod(
        lambda: torch.distributed.get_process_group_ranks(parallel_state.get_data_parallel_group()))
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)


def _world_of_one(backend: str) -> None:
    """Start a one-process group on a port the store itself binds (port 0: the OS picks one at bind time).

    Picking a free port first and binding it later loses a race with any other process on a busy machine.
    """
    store = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True)
    os.environ["MASTER_PORT"] = str(store.port)  # DeepSpeed wants the variable set even though the group exists
    torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)


def setup_world(tensor_parallel: int, seed: int) -> World:
    """Join (or create) the process group, build megatron's TP/DP groups and seed every generator.

    A plain `megacpt train` has no launcher environment, so it becomes a world of one (see `_world_of_one`).
    """
    import deepspeed

    alone = "RANK" not in os.environ
    if alone:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    # the node count and index that DeepSpeed's launcher sets and its checkpoint writers read (srun sets neither)
    os.environ.setdefault("CROSS_SIZE", os.environ.get("SLURM_NNODES", "1"))
    os.environ.setdefault("CROSS_RANK", os.environ.get("SLURM_NODEID", "0"))
    world_size = int(os.environ["WORLD_SIZE"])
    data_parallel_size(world_size, tensor_parallel)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        deepspeed_on_cpu()
        cpu_fallback.install_if_needed()
        share_cores()
        device = torch.device("cpu")
    if alone and not torch.distributed.is_initialized():
        _world_of_one("nccl" if on_gpu else "gloo")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
    _seed(seed, parallel_state.get_tensor_model_parallel_rank(), on_gpu)
    return World(
        rank=torch.distributed.get_rank(),
        size=world_size,
        tensor_rank=parallel_state.get_tensor_model_parallel_rank(),
        tensor_size=tensor_parallel,
        data_rank=parallel_state.get_data_parallel_rank(),
        data_size=parallel_state.get_data_parallel_world_size(),
        device=device,
    )


def launcher_world_size() -> int:
    """The launcher's world size (WORLD_SIZE); a plain process is a world of one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel_size(world_size: int, tensor_parallel: int) -> int:
    """What is left of the world for data parallelism; a ConfigError when parallel.tensor does not divide it."""
    if world_size % tensor_parallel:
        how = (f"one plain process; start megacpt under the deepspeed launcher (launch/) with a multiple of "
               f"{tensor_parallel} processes, and check such a start with --dry-run --world-size N"
               if world_size == 1 else f"{world_size} processes")
        raise ConfigError("parallel.tensor", f"is {tensor_parallel}, which does not divide the world size {world_size} "
                          f"({how})")
    return world_size // tensor_parallel


def memory_per_process() -> tuple[int, str]:
    """(bytes, what they are) this process can hold its model in: its GPU's memory, else its share of the RAM."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.cuda.get_device_properties(local_rank).total_memory, f"the memory of GPU {local_rank}"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    processes = _local_processes()
    share = f"1/{processes} of " if processes > 1 else ""
    return ram // processes, f"{share}this machine's RAM (no GPU)"


def _local_processes() -> int:
    """The launcher's processes on this node."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def deepspeed_on_cpu() -> None:
    """Tell DeepSpeed it runs on the CPU, and keep it from JIT-compiling its shared-memory all-reduce.

    Only DeepSpeed's inference all-reduce uses that op; training reduces through gloo. Built, it costs every
    run a compile (about a minute) behind a lock under ~/.cache/torch_extensions that a build killed half-way
    leaves for good, and every process a 69 MB file in /dev/shm that is never removed. DeepSpeed keeps its
    compatible ops in one dict that it consults before building; marking the op incompatible there is enough.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn while detecting it
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
        if usable == os.cpu_count():
            usable //= _local_processes()
        torch.set_num_threads(max(1, usable))
    return torch.get_num_threads()


def _seed(seed: int, tensor_rank: int, on_gpu: bool) -> None:
    """Same default seed on every rank (so CPU-initialised weights agree), a distinct TP-region seed per TP rank."""
    torch.manual_seed(seed)
    if on_gpu:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_fallback.seed_tensor_parallel_rng(seed, tensor_rank)


def teardown_world() -> None:
    """Destroy megatron's groups and the process group (tests run several worlds in one process)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
