"""Run an exported ONNX separator on a mixture of any length, whatever axes its file fixes.

``sepfx.export_onnx`` exports with a dynamic batch and time axis where ONNX Runtime then agrees
with PyTorch at every length it checks; where the model's own code fixes the length, the file
takes one length only (``ExportResult.dynamic_time`` is False and its notes say so). Such a file
still separates a recording of any length here: the mixture is cut into chunks of the file's
length, half overlapping (the last one zero-padded), the chunks are run in batches of the
file's batch size, each chunk's sources are put in the speaker order of what precedes them
(separators do not keep an order across separate runs: the permutation that best correlates
with the overlap is taken), and the chunks are overlap-added with a Hann window, normalised by
the window sum. Every sample is computed from a chunk of the exact length the file was checked
at, but with less context than one run over the whole recording: where the model's statistics
span the length (global layer norm, attention), the result is close to, not the same as, what
the PyTorch model computes at the full length. A file with a dynamic time axis runs once.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

MAX_ALIGNED_SOURCES = 6  # permutations tried per chunk: n_src! (720 at 6); greedy above


def fixed_axes(session: Any) -> tuple[int | None, int | None]:
    """(batch, length) that the file's input fixes, None for a dynamic axis."""
    shape = session.get_inputs()[0].shape
    batch = shape[0] if isinstance(shape[0], int) else None
    length = shape[-1] if isinstance(shape[-1], int) else None
    return batch, length


def as_sources(outputs: list[Any]) -> np.ndarray:
    """[B, n_src, T] from a model's ONNX outputs: one output [B, n_src, T] (or [B, T] for a
    single source), or one output per speaker, each [B, T] or [B, 1, T]."""
    if len(outputs) > 1:
        return np.stack([np.asarray(o).reshape(np.asarray(o).shape[0], -1) for o in outputs], 1)
    first = np.asarray(outputs[0])
    return first[:, None] if first.ndim == 2 else first.reshape(first.shape[0], first.shape[1], -1)


def separate(session: Any, mixture: np.ndarray) -> np.ndarray:
    """The sources [n_src, T] of a mono ``mixture`` [T] (float32) by an ONNX Runtime session
    of a file written by ``sepfx.export_onnx``; chunked when the file fixes the length."""
    batch, length = fixed_axes(session)
    name = session.get_inputs()[0].name
    if length is None:
        rows = np.zeros((batch or 1, mixture.shape[-1]), dtype=mixture.dtype)
        rows[0] = mixture  # a fixed batch: the other rows are silence, their output unused
        return as_sources(session.run(None, {name: rows}))[0]
    return overlap_add(lambda chunks: _run_chunks(session, chunks, batch), mixture, length)


def _run_chunks(session: Any, chunks: np.ndarray, batch: int | None) -> np.ndarray:
    """[n_chunks, n_src, L] from chunks [n_chunks, L], in batches of the file's batch size (all
    at once where the batch is dynamic; the last batch filled with silence)."""
    name = session.get_inputs()[0].name
    size = batch or len(chunks)
    out = []
    for start in range(0, len(chunks), size):
        rows = chunks[start : start + size]
        filled = np.zeros((size, chunks.shape[1]), dtype=chunks.dtype)
        filled[: len(rows)] = rows
        out.append(as_sources(session.run(None, {name: filled}))[: len(rows)])
    return np.concatenate(out)


def overlap_add(run: Any, mixture: np.ndarray, length: int) -> np.ndarray:
    """[n_src, T]: ``run`` (chunks [N, length] -> sources [N, n_src, length]) over chunks of
    ``mixture`` [T] with hop ``length // 2``, aligned in speaker order and overlap-added."""
    total = mixture.shape[-1]
    hop = max(length // 2, 1)
    starts = list(range(0, max(total - length, 0) + hop, hop))  # the last reaches the end
    chunks = np.zeros((len(starts), length), dtype=mixture.dtype)
    for i, start in enumerate(starts):
        piece = mixture[start : start + length]
        chunks[i, : len(piece)] = piece
    sources = np.asarray(run(chunks), dtype=np.float64)
    # a floor keeps the recording's first and last samples, where one chunk alone covers them
    window = np.maximum(np.hanning(length + 2)[1:-1], 1e-3)
    end = starts[-1] + length
    summed = np.zeros((sources.shape[1], end))
    weight = np.zeros(end)
    for i, (start, chunk) in enumerate(zip(starts, sources)):
        if i:  # order this chunk's sources as the estimate over the overlap orders them
            overlap = slice(start, starts[i - 1] + length)
            done = summed[:, overlap] / weight[overlap]
            chunk = chunk[_best_order(done, chunk[:, : done.shape[1]])]
        summed[:, start : start + length] += chunk * window
        weight[start : start + length] += window
    return (summed / weight)[:, :total].astype(mixture.dtype)


def _best_order(reference: np.ndarray, estimate: np.ndarray) -> list[int]:
    """The order of ``estimate``'s sources [n, T] that best correlates with ``reference``'s."""
    n = len(reference)
    scores = reference @ estimate.T  # scores[i, j]: reference i against estimate j
    if n <= MAX_ALIGNED_SOURCES:
        best = max(itertools.permutations(range(n)), key=lambda p: scores[range(n), p].sum())
        return list(best)
    order: list[int] = []
    for i in range(n):  # greedy: each reference source takes its best remaining estimate
        order.append(max((j for j in range(n) if j not in order), key=lambda j: scores[i, j]))
    return order
