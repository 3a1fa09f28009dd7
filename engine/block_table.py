"""The decoded list blocks of one modality as a table of addresses, for the compiled batch
search (engine/table_kernels.py: batch_guaranteed_topk): row = inverted list number, one column per
array of the block (kernels.FIELDS), plus each list's row count.

A batch hands the kernel this table and its queries' probed list numbers, and one compiled
call then searches a whole piece of the batch; before, each query's blocks were passed as
tuples of arrays, ~45 µs of Python per query that held the GIL while the other search thread
waited for it. The arrays stay alive as long as the table (it keeps a reference to each), and
the blocks are views into the reader's LMDB map, so a table must not outlive its reader
(engine/list_search.py keeps it; engine/batch.py drops both in close()). Rows are filled
once, when a list is first searched, under a lock; a row is complete before it is marked
loaded, and a kernel reads only rows its own caller saw loaded, so threads that fill and
threads that search do not meet.
"""
from __future__ import annotations

import threading

import numpy as np

from engine.table_kernels import FIELDS


class BlockTable:
    """Addresses of list blocks' arrays by list number; `read(number)` gives a list's Block
    (indexer/lists.py: ListBlocks.read, format 4 or later)."""

    def __init__(self, nlist: int, read):
        self.read = read
        self.addresses = np.zeros((nlist, len(FIELDS)), np.int64)
        self.rows = np.zeros(nlist, np.int64)
        self.loaded = np.zeros(nlist, bool)
        self.code_type = None          # numpy scalar type of the bound's codes: int16 or float32
        self._arrays: list = [None] * nlist
        self._lock = threading.Lock()

    @classmethod
    def of_blocks(cls, blocks: list) -> tuple["BlockTable", np.ndarray]:
        """(a table of the given blocks, their list numbers 0..n−1): for one query's blocks."""
        table = cls(len(blocks), blocks.__getitem__)
        numbers = np.arange(len(blocks))
        table.ensure(numbers)
        return table, numbers

    def ensure(self, lists: np.ndarray) -> None:
        """Fill the rows of `lists` (any shape; -1 ignored) not filled yet."""
        need = np.unique(lists[lists >= 0])
        need = need[~self.loaded[need]]
        if len(need):
            with self._lock:
                for number in need.tolist():
                    if not self.loaded[number]:
                        self._fill(number, self.read(number))

    def _fill(self, number: int, block) -> None:
        if not len(block.ids):
            self.loaded[number] = True     # rows = 0: never read
            return
        # the kernels read C-contiguous, aligned arrays (a small LMDB value may sit at an
        # address aligned to 2 bytes only: such arrays are copied)
        arrays = [np.require(getattr(block, name), requirements="CA") for name in FIELDS]
        code_type = arrays[FIELDS.index("codes")].dtype.type
        if self.code_type is None:
            self.code_type = code_type
        elif code_type is not self.code_type:
            raise ValueError(f"list {number}: codes of {code_type.__name__}, the others "
                             f"{self.code_type.__name__}")
        self._arrays[number] = arrays
        self.addresses[number] = [a.ctypes.data for a in arrays]
        self.rows[number] = len(block.ids)
        self.loaded[number] = True
