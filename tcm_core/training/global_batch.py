"""The global batch: how one iteration's ``batch`` samples are cut into loss calls, and what each call draws.

A run is the same (up to float summation order) for any world size and ``batch_gpu`` with the same ``batch``:

* The data indices of the whole global batch come from ONE seeded sampler that every rank advances identically.
* The global batch is cut into chunks of ``batch_gpu`` samples (one loss call each); rank ``r`` of ``W`` handles
  chunks ``r*n .. (r+1)*n - 1`` and accumulates their gradients.
* Chunk ``g`` of iteration ``i`` reseeds torch's global RNG with :func:`chunk_seed` before its loss call, so its
  times, noise and dropout masks depend only on (seed, i, g).
* Stage 2's N_B = ⌊B·ρ⌋ boundary samples are chosen among the B positions of the GLOBAL batch from the
  iteration's own seed (:func:`boundary_positions`), as Algorithm 1 and eq. 11 count them; each chunk gets its
  slice. (The official code draws ⌊B_gpu·ρ⌋ per GPU and per accumulation round, which equals the paper's count
  only when B_gpu·ρ is a whole number: with B = 128 on 8 GPUs and ρ = 0.1 it uses 8 boundary samples, not 12.)

Resuming therefore needs no RNG state.
"""

from __future__ import annotations

import numpy as np
import torch

from tcm_core.losses import BoundaryPlan, num_boundary

BOUNDARY_STREAM = 1  # spawn key of the per-iteration boundary draw (chunk seeds use none: independent streams)


def chunk_seed(seed: int, iteration: int, chunk: int) -> int:
    """Seed of the randomness of chunk ``chunk`` of global iteration ``iteration`` (independent of world size)."""
    words = np.random.SeedSequence([seed, iteration, chunk]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31 | int(words[1])) & ((1 << 63) - 1)


def boundary_positions(seed: int, iteration: int, batch: int, rho: float) -> torch.Tensor:
    """(batch,) bool mask: the N_B = ⌊batch·ρ⌋ boundary positions of iteration ``iteration``'s global batch."""
    words = np.random.SeedSequence([seed, iteration], spawn_key=(BOUNDARY_STREAM,)).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
    mask = torch.zeros(batch, dtype=torch.bool)
    mask[torch.randperm(batch, generator=generator)[: num_boundary(batch, rho)]] = True
    return mask


def chunk_plan(mask: torch.Tensor, chunk: int, size: int) -> BoundaryPlan:
    """The boundary plan of chunk ``chunk`` (samples ``chunk*size .. (chunk+1)*size - 1``) of a global mask."""
    fraction = int(mask.sum()) / mask.numel()
    return BoundaryPlan(mask[chunk * size:(chunk + 1) * size], fraction)


def chunk_slice(chunk: int, size: int) -> slice:
    return slice(chunk * size, (chunk + 1) * size)
