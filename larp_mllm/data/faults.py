"""Data faults: the clips a long job could not use, counted by kind, and one clear stop when too many are bad.

The kinds (``FAULT_KINDS``) are decided in one place, ``ClipDataset.__getitem__`` (larp_mllm.data.clips):

    missing      no such file
    unreadable   the file cannot be opened or decoded (corrupt, not a video, a container no decoder reads)
    too_short    fewer frames than a clip needs, with padding off
    wrong_size   the decoded clip does not have the shape the job asked for

Every job that reads clips counts them with one ``DataFaults``:

    faults = DataFaults(0.5, min_items=min_items_to_judge(batch_size, len(ds)), name="training data")
    for epoch in range(epochs):
        for batch in loader:          # ClipBatch (collate_clips): the faults travel with the batch
            faults.update(batch)      # warns about the first few; DataFaultError once the bad share is too high
        faults.end_epoch(epoch)       # judges the whole epoch, logs its counts, starts the next one
    logger.info("data: %s", faults.summary())  # "158 good, 2 missing, 1 unreadable, 0 too_short, 0 wrong_size"

Counting happens on collated batches in the main process, so it is right with any number of DataLoader workers.
With several processes, ``reduce`` sums the per-process count vectors (an all-reduce): every process then judges the
same global counts and all stop together.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from larp_mllm.data.clips import ClipBatch, Skipped

__all__ = ["FaultKind", "FAULT_KINDS", "DEFAULT_MAX_BAD_FRACTION", "DataFaultError", "DataFaults",
           "min_items_to_judge", "check_files_exist"]

FaultKind = Literal["missing", "unreadable", "too_short", "wrong_size"]
FAULT_KINDS: tuple[FaultKind, ...] = ("missing", "unreadable", "too_short", "wrong_size")
DEFAULT_MAX_BAD_FRACTION = 0.5  # every job stops when more than half of the items it read were bad
_KEYS = ("good", *FAULT_KINDS)  # the layout of a count vector
_EXAMPLES = 5  # paths named in an error message

logger = logging.getLogger("larp.data")


class DataFaultError(RuntimeError):
    """Too large a share of the data could not be used; the message names the counts by kind and a few paths."""


def min_items_to_judge(batch_size: int, num_items: int) -> int:
    """Items to see before a share of faults is judged: two batches and at least 16 items, or every item when the
    data set is smaller (a handful of clips says little about the share)."""
    return max(1, min(num_items, max(2 * batch_size, 16)))


def _format(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in _KEYS if k in counts)


class DataFaults:
    """Good items and faults by kind, per epoch and over the run, with warnings and a stop above a threshold.

    Args:
        max_bad_fraction: stop (DataFaultError) when more than this share of the items seen in an epoch was bad;
            with 1.0 only an epoch in which not one item could be used stops.
        min_items: the share is judged once this many items were seen in the epoch (``min_items_to_judge``), and at
            every ``end_epoch``.
        warn_first: log one warning line (path and kind) for each of the first this many faults of this process.
        name: what the data is called in messages ("training data").
        option: the setting that holds ``max_bad_fraction``, named in the error ("max_bad_data_fraction").
        reduce: sums a count vector over all processes (an all-reduce); None for a single process. When given,
            every process must call ``update`` / ``check`` / ``end_epoch`` equally often.
    """

    def __init__(self, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, *, min_items: int = 1,
                 warn_first: int = 5, name: str = "data", option: str = "max_bad_fraction",
                 reduce: Callable[[list[int]], list[int]] | None = None, log: logging.Logger | None = None):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"{option} must lie in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction, self.min_items, self.warn_first = max_bad_fraction, max(1, min_items), warn_first
        self.name, self.option, self.reduce, self.log = name, option, reduce, log or logger
        self.epoch = [0] * len(_KEYS)  # this process's counts in the current epoch: good, then FAULT_KINDS
        self.seen = [0] * len(_KEYS)  # the current epoch's counts over all processes, as of the last check
        self.done = [0] * len(_KEYS)  # finished epochs, all processes
        self.index = [0] * len(_KEYS)  # faults found before reading (videos a chunk index left out)
        self.examples: list[str] = []  # the first few "path (kind: reason)" of this process
        self.warned = 0

    # ---------------------------------------------------------------------------------------------------- counting
    def _count(self, faults: Iterable[Skipped], into: list[int]) -> None:
        for f in faults:
            into[_KEYS.index(f.kind)] += 1
            line = f"{f.path} ({f.kind}: {f.reason})"
            if len(self.examples) < _EXAMPLES:
                self.examples.append(line)
            if self.warned < self.warn_first:
                self.warned += 1
                more = "; further faults are counted, not listed" if self.warned == self.warn_first else ""
                self.log.warning("%s: skipped %s%s", self.name, line, more)

    def update(self, batch: ClipBatch) -> None:
        """Count a collated batch's good clips and its faults, warn about the first few, then ``check``."""
        self.epoch[0] += int(batch.video.shape[0])
        self._count(batch.faults, self.epoch)
        self.check()

    def add_index_faults(self, faults: Sequence[Skipped], num_videos: int) -> None:
        """Count the faults found before reading (``ClipDataset.index_faults``: videos left out of a chunk index)
        and judge them at once as a share of the `num_videos` indexed. The same on every process: not reduced."""
        self._count(faults, self.index)
        self._judge([num_videos - len(faults), *self.index[1:]], "videos indexed")

    # ---------------------------------------------------------------------------------------------------- judging
    def check(self, final: bool = False) -> None:
        """DataFaultError when more than ``max_bad_fraction`` of this epoch's items (all processes) were bad; judged
        once ``min_items`` were seen, or whenever `final` (the epoch's end)."""
        self.seen = [int(v) for v in self.reduce(list(self.epoch))] if self.reduce else list(self.epoch)
        if sum(self.seen) and (final or sum(self.seen) >= self.min_items):
            self._judge(self.seen, "clips seen in this epoch" if final else "clips seen so far in this epoch", final)

    def _judge(self, counts: list[int], what: str, final: bool = True) -> None:
        total, bad = sum(counts), sum(counts[1:])
        if not total or (bad / total <= self.max_bad_fraction and not (final and bad == total)):
            return
        kinds = ", ".join(f"{k} {n}" for k, n in zip(FAULT_KINDS, counts[1:]))
        share = f"{bad / total:.0%} > {self.option}={self.max_bad_fraction:g}" if bad / total > self.max_bad_fraction \
            else "not one could be used"
        advice = "Fix or remove these files" + (f", or raise {self.option}" if self.max_bad_fraction < 1 else "")
        raise DataFaultError(f"{self.name}: {bad} of {total} {what} could not be used ({share}): {kinds}; e.g. "
                             f"{'; '.join(self.examples) or '-'}. {advice}")

    def end_epoch(self, epoch: int | None = None) -> dict[str, int]:
        """Judge the whole epoch (``check(final=True)``), log its counts (a warning when there were faults), start
        the next epoch; returns the finished epoch's counts ({"good": n, "missing": n, ...}, all processes)."""
        self.check(final=True)
        counts = dict(zip(_KEYS, self.seen))
        head = self.name if epoch is None else f"{self.name}, epoch {epoch}"
        self.log.log(logging.WARNING if sum(self.seen[1:]) else logging.INFO, "%s: %s", head, _format(counts))
        self.done = [a + b for a, b in zip(self.done, self.seen)]
        self.epoch, self.seen = [0] * len(_KEYS), [0] * len(_KEYS)
        return counts

    # ---------------------------------------------------------------------------------------------------- reports
    def counts(self) -> dict[str, int]:
        """Good items and faults by kind over the run so far (all processes; the current epoch as of its last check;
        faults found before reading included)."""
        return dict(zip(_KEYS, (d + s + i for d, s, i in zip(self.done, self.seen, self.index))))

    def scalars(self, prefix: str = "data/") -> dict[str, float]:
        """``counts()`` as logging scalars: {"data/good": ..., "data/missing": ..., ...}."""
        return {f"{prefix}{k}": float(v) for k, v in self.counts().items()}

    def summary(self) -> str:
        """One line: "158 good, 2 missing, 1 unreadable, 0 too_short, 0 wrong_size" (``counts()``)."""
        return _format(self.counts())


def check_files_exist(paths: Sequence[str | os.PathLike], max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, *,
                      name: str = "data", option: str = "max_bad_fraction", log: logging.Logger | None = None) -> int:
    """Stat every file before a job starts (cheap next to reading them). DataFaultError, naming the counts and the
    first few missing paths, when more than `max_bad_fraction` of them are missing; otherwise a warning when some
    are. Returns the number of missing files."""
    missing = [str(p) for p in paths if not os.path.exists(p)]
    if not missing:
        return 0
    share = len(missing) / len(paths)
    head = f"{name}: {len(missing)} of {len(paths)} files are missing ({share:.0%}"
    examples = ", ".join(missing[:_EXAMPLES])
    if share > max_bad_fraction:
        raise DataFaultError(f"{head} > {option}={max_bad_fraction:g}), e.g. {examples}; check the paths (for a "
                             "CSV, also the folder they are relative to)")
    (log or logger).warning("%s), e.g. %s; they are skipped and counted as missing", head, examples)
    return len(missing)
