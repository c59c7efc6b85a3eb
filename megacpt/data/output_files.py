"""Files that belong together (PREFIX.bin + .idx, PREFIX.model + .vocab) appear complete or not at all.

The writer writes under a temporary prefix next to the outputs; only when it returns are the files renamed
into place, the last suffix last (give the one readers look for first last: .idx, .model). On any error, or
Ctrl-C, the temporaries are removed and what was on disk before is untouched. There is no locking: two runs
writing the same prefix at the same time race.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from megacpt.errors import UserError
from megacpt.files import check_output, replace_durably


@contextmanager
def atomic_outputs(prefix: str, suffixes: Sequence[str], overwrite: bool, inputs: Sequence[str]) -> Iterator[str]:
    """Yield a temporary prefix to write PREFIX+suffix files under; publish them when the block succeeds.

    The outputs follow files.check_output (existing ones only with `overwrite`, never one of the `inputs`),
    checked here, before the caller spends any work.
    """
    finals = [Path(prefix + suffix) for suffix in suffixes]
    for final in finals:
        if final.is_dir():
            raise UserError(f"output {final} is a directory")
        check_output(final, "output", overwrite, inputs)
    try:
        finals[0].parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {finals[0].parent}: {e.strerror}") from None
    temp_prefix = f"{prefix}.tmp-{os.getpid()}"
    temps = [Path(temp_prefix + suffix) for suffix in suffixes]
    try:
        yield temp_prefix
        finals[-1].unlink(missing_ok=True)  # an old marker file must never sit beside new data
        for temp, final in zip(temps, finals):
            replace_durably(temp, final)
    except BaseException:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise
