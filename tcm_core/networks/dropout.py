"""Dropout whose masks can be recorded in one pass and replayed, per sample, in later passes.

Why: the consistency target must see the same dropout masks as the graded student pass (the official
code restores the RNG state before each pass). TCM computes each target on a sub-batch, by the
network that owns its time, so RNG replay no longer lines up; instead the graded pass records its
masks and every target pass replays the rows of the samples it holds.

The masks recorded are the very tensors autograd keeps for the backward pass, so recording adds
no memory in the graded pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class DropoutMaskRecord:
    """Masks of one forward pass, in call order; each has the batch as its first dimension."""

    masks: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _Session:
    record: DropoutMaskRecord
    replay_rows: slice | torch.Tensor | None = None  # None: recording; a slice replays a contiguous view
    cursor: int = 0


_ACTIVE: ContextVar[_Session | None] = ContextVar("tcm_dropout_session", default=None)


@contextlib.contextmanager
def record_dropout_masks() -> Iterator[DropoutMaskRecord]:
    """Record the mask of every :class:`MaskDropout` call made inside the block."""
    record = DropoutMaskRecord()
    token = _ACTIVE.set(_Session(record))
    try:
        yield record
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def replay_dropout_masks(record: DropoutMaskRecord, rows: slice | torch.Tensor) -> Iterator[None]:
    """Replay ``record`` for a sub-batch: ``rows`` (a slice: views, no copies; or an index tensor: the
    sub-batch's row j gets the masks of row ``rows[j]``)."""
    token = _ACTIVE.set(_Session(record, replay_rows=rows))
    try:
        yield
    finally:
        session = _ACTIVE.get()
        _ACTIVE.reset(token)
        if session is not None and session.cursor != len(record.masks):
            raise RuntimeError(
                f"dropout replay used {session.cursor} of {len(record.masks)} recorded masks: "
                "the replaying network does not match the recorded one"
            )


class MaskDropout(nn.Module):
    """Inverted dropout (scale 1/(1-p) at train time) that takes part in record/replay sessions."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        session = _ACTIVE.get()
        if session is None:
            return nn.functional.dropout(x, self.p, training=True)
        if session.replay_rows is None:
            # keep with probability 1 - p, scaled by 1/(1 - p): the mask autograd keeps anyway
            mask = torch.rand_like(x).ge_(self.p).div_(1.0 - self.p)  # in place: one buffer, no extra copies
            session.record.masks.append(mask)
        else:
            if session.cursor >= len(session.record.masks):
                raise RuntimeError("dropout replay ran out of recorded masks")
            recorded, rows = session.record.masks[session.cursor], session.replay_rows
            mask = recorded[rows] if isinstance(rows, slice) else recorded.index_select(0, rows)
            session.cursor += 1
            mask = mask.to(x.dtype)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"
