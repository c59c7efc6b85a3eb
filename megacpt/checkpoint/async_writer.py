"""checkpoint.async_save: a tag's DeepSpeed files written by a background thread from a host copy, at every ZeRO
stage.

DeepSpeed's engine hands each file of a tag to its checkpoint engine (`save(state_dict, path)`): the model
states and every rank's optimizer partition, whatever the ZeRO stage. `BackgroundWriter`, installed as the
engine's checkpoint engine, copies the state dict's tensors to host memory there, at the step boundary, and
returns; one thread per rank then writes the copy with DeepSpeed's own torch engine (the same `torch.save`
call as a synchronous save, so the files are byte for byte the same) and checksums and fsyncs each file for
the manifest. `finish` waits for the thread and raises what failed in it; checkpoint/save.py calls it before
the manifest and `latest`. One tag at a time: `create` of a tag refuses while another is unfinished.

It does not decide when a save starts or finishes (train/checkpointing.py) and writes no manifest or
`latest` (save.py). Its cost: host memory for one copy of this rank's share of the tag, until it is written.
"""
from __future__ import annotations

import copy
import os
import queue
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine import CheckpointCommitInfo, TorchCheckpointEngine

from megacpt.checkpoint import manifest


def host_copy(state):
    """`state` with every tensor copied to host memory: each storage once (tensors that shared one still share
    it; views keep their offset, size and stride) and `requires_grad` kept, so that `torch.save` writes the
    bytes it would write for `state`. Everything else is deep-copied."""
    storages: dict[int, torch.UntypedStorage] = {}
    memo: dict[int, object] = {}

    def visit(obj) -> None:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in memo:
                memo[id(obj)] = _host_tensor(obj, storages)
        elif isinstance(obj, Mapping):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    visit(state)
    return copy.deepcopy(state, memo)


def _host_tensor(tensor: torch.Tensor, storages: dict[int, torch.UntypedStorage]) -> torch.Tensor:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided or tensor.__dict__:
        raise TypeError(f"cannot copy a {type(tensor).__name__} ({tensor.layout}, attributes "
                        f"{sorted(tensor.__dict__)}) for an asynchronous checkpoint save")
    source = tensor.untyped_storage()
    if source._cdata not in storages:  # the key torch.save itself tells storages apart by
        storages[source._cdata] = torch.UntypedStorage(source.nbytes()).copy_(source)
    copied = torch.empty(0, dtype=tensor.dtype).set_(storages[source._cdata], tensor.storage_offset(),
                                                      tensor.size(), tensor.stride())
    if type(tensor) is torch.nn.Parameter:
        return torch.nn.Parameter(copied, requires_grad=tensor.requires_grad)
    return copied.requires_grad_(tensor.requires_grad)


class BackgroundWriter(TorchCheckpointEngine):
    """DeepSpeed's checkpoint engine interface: `save` copies to host memory and queues the write; `finish`
    waits for the writes of the tag (`create`d) and raises what failed in them."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.name = "megacpt.BackgroundWriter"
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._tag: CheckpointCommitInfo | None = None  # the tag being written, until it is finished
        self._failure: BaseException | None = None  # what failed in the writer (the tag's later files are skipped)
        self._written: dict[str, dict] = {}  # path -> {size, crc32c} of the tag's written files

    def create(self, info: CheckpointCommitInfo) -> None:
        if self._tag is not None:
            raise RuntimeError(f"checkpoint {self._tag.tag} is still unfinished: finish it before saving {info.tag}")
        self._tag, self._failure, self._written = info, None, {}

    def save(self, state_dict, path: str) -> None:
        snapshot = host_copy(state_dict)
        if self._thread is None:
            self._thread = threading.Thread(target=self._write, name="megacpt-checkpoint-writer", daemon=True)
            self._thread.start()
        self._jobs.put((snapshot, path))

    def _write(self) -> None:
        while True:
            snapshot, path = self._jobs.get()
            try:
                if self._failure is None:
                    TorchCheckpointEngine.save(self, snapshot, path)
                    self._written[path] = manifest.entry(Path(path))
            except BaseException as error:  # raised in the loop's thread by finish
                self._failure = error
            finally:
                del snapshot
                self._jobs.task_done()

    def is_decoupled(self) -> bool:
        return True  # DeepSpeed's save_checkpoint leaves the commit to megacpt (checkpoint/save.py)

    def get_commit_info(self) -> None:
        return None  # else DeepSpeed's engine would commit, waiting for the writer, before every optimizer step

    def writing(self) -> bool:
        """Whether files of the tag are still being written (`finish` would wait)."""
        return self._jobs.unfinished_tasks > 0

    def finish(self) -> dict[str, dict]:
        """Wait for the tag's files and raise what failed in writing them; else {file name in the tag: its
        manifest entry} of those this rank wrote. Nothing pending: {}."""
        self._jobs.join()
        tag, self._tag = self._tag, None
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if tag is None:
            return {}
        tag_dir = Path(tag.save_dir) / tag.tag
        return {os.path.relpath(path, tag_dir): entry for path, entry in self._written.items()}

    def commit(self, info: CheckpointCommitInfo) -> bool:
        self.finish()
        return True

    def cleanup(self) -> None:
        self._jobs.join()  # never leave a file cut short when the run ends (also after an error)
