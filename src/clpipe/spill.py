"""Items kept on disk when a run has too many to hold: a million listed files must not cost a
million objects in memory (issue 15: a no-op re-sync of 1,000,000 files in under 200 MB).

:class:`Spill` keeps items in the order they came; :class:`SortedSpill` gives them back
sorted (an external merge sort: sorted runs of ``hold`` items on disk, merged as they are
read). Up to ``hold`` items stay in memory and nothing touches the disk; beyond that,
blocks of items go to one temporary file in ``folder`` (the sync's TempDirectory), which has no name in
the file system (the system removes it when the process ends, however it ends). An item
is anything :mod:`marshal` writes: tuples of str, int, float, bool, bytes and None.

This module sits below both the sources and the sync engine (it imports neither).
"""

from __future__ import annotations

import heapq
import marshal
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HOLD = 50_000  # items held in memory before they go to disk
BLOCK = 1_024  # items per block read back at once (a sorted run is read a block at a time)


class Spill:
    """Items appended, then read back (as often as needed) in the order they came."""

    def __init__(self, folder: str | Path | None = None, hold: int | None = None) -> None:
        self._folder = folder
        self._hold = max(1, HOLD if hold is None else hold)
        self._buffer: list[Any] = []
        self._file: Any = None  # the temporary file, once a block was written
        self._blocks: list[tuple[int, int]] = []  # (offset, length) of each block written
        self._end = 0
        self._count = 0

    def append(self, item: Any) -> None:
        self._buffer.append(item)
        self._count += 1
        if len(self._buffer) >= (self._hold if self._file is None else BLOCK):
            self._spill()

    def __len__(self) -> int:
        return self._count

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def _write(self, items: list) -> tuple[int, int]:
        if self._file is None:
            if self._folder is not None:
                os.makedirs(self._folder, exist_ok=True)
            self._file = tempfile.TemporaryFile(prefix="clpipe-spill-", dir=self._folder)
        data = marshal.dumps(items)
        os.pwrite(self._file.fileno(), data, self._end)  # a full disk raises its OSError here
        block = (self._end, len(data))
        self._end += len(data)
        return block

    def _spill(self) -> None:
        self._blocks += [self._write(self._buffer[i : i + BLOCK]) for i in range(0, len(self._buffer), BLOCK)]
        self._buffer = []

    def _read(self, block: tuple[int, int]) -> list:
        offset, length = block
        return marshal.loads(os.pread(self._file.fileno(), length, offset))

    def __iter__(self) -> Iterator[Any]:
        for block in self._blocks:
            yield from self._read(block)
        yield from self._buffer

    def close(self) -> None:
        """Forget every item and remove the file."""
        self._buffer, self._blocks, self._count, self._end = [], [], 0, 0
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SortedSpill(Spill):
    """Items appended in any order, read back sorted: each ``hold`` items are sorted and
    written as one run (in blocks), and reading merges the runs and what is held."""

    def __init__(self, folder: str | Path | None = None, hold: int | None = None) -> None:
        super().__init__(folder, hold)
        self._runs: list[list[tuple[int, int]]] = []

    def append(self, item: Any) -> None:
        self._buffer.append(item)
        self._count += 1
        if len(self._buffer) >= self._hold:
            self._spill()

    def _spill(self) -> None:
        self._buffer.sort()
        self._runs.append([self._write(self._buffer[i : i + BLOCK]) for i in range(0, len(self._buffer), BLOCK)])
        self._buffer = []

    def _run(self, blocks: list[tuple[int, int]]) -> Iterator[Any]:
        for block in blocks:
            yield from self._read(block)

    def __iter__(self) -> Iterator[Any]:
        self._buffer.sort()
        if not self._runs:
            return iter(self._buffer)
        return heapq.merge(*(self._run(blocks) for blocks in self._runs), self._buffer)

    def close(self) -> None:
        self._runs = []
        super().close()
