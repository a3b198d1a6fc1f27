"""The generic minibatch training loop: AdamW over epochs, the epoch with the lowest
validation loss kept. It knows no head and no file: callers pass a module, a loss and
their rows (tensors in memory, or callables that stream chunks of rows).

Used by stage 2 (``vlaug train-box``) for every head and by stage 3's joint methods.
Each epoch draws a seeded permutation and slices batches from it (no DataLoader, no
per-sample Python).
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Callable, Iterator

import torch

# (module, x, y) -> (loss, parts): parts are detached scalars logged per epoch
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
# () -> one pass over some rows as (x, y) tensors on the module's device
Chunks = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def fit(
    module: torch.nn.Module,
    loss_fn: LossFn,
    *,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    generator: torch.Generator | None = None,
    progress: bool = False,
    val_seed: int = 0,
    select_on: str | None = None,
    patience: int | None = None,
) -> tuple[list[dict], int]:
    """Train ``module`` with AdamW and keep the epoch with the lowest validation loss.

    Args:
        loss_fn: ``(module, x, y) -> (loss, parts)``.
        x_train, y_train, x_val, y_val: tensors on the module's device.
        generator: CPU generator for the batch order.
        val_seed: the validation pass runs under this fixed seed, so its random parts
            (LatentDR's pool subsets) are the same every epoch and losses compare.
        select_on: select on this part of the loss (e.g. the clean classification term)
            instead of the whole loss.
        patience: stop once this many epochs in a row have not lowered the validation
            loss (None: train every epoch).

    Returns:
        per-epoch history and the selected epoch (1-based); ``module`` holds its weights.
    """

    def train_batches():
        order = torch.randperm(len(x_train), generator=generator).to(x_train.device)
        for start in range(0, len(x_train), batch_size):
            idx = order[start : start + batch_size]
            yield x_train[idx], y_train[idx]

    def val_loss():
        return mean_loss(module, loss_fn, x_val, y_val, batch_size, val_seed, select_on) if len(x_val) else None

    return fit_batches(module, loss_fn, train_batches=train_batches, val_loss=val_loss, epochs=epochs, lr=lr,
                       weight_decay=weight_decay, progress=progress, patience=patience)


def fit_streamed(
    module: torch.nn.Module,
    loss_fn: LossFn,
    *,
    train_chunks: Chunks,
    val_chunks: Chunks | None,
    epochs: int,
    batch_size: int,
    buffer_rows: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    generator: torch.Generator | None = None,
    progress: bool = False,
    val_seed: int = 0,
) -> tuple[list[dict], int]:
    """:func:`fit` for rows that do not fit in memory: each epoch reads ``train_chunks()``
    (e.g. a cache streamed from disk), keeps the rows in a shuffle buffer of about
    ``buffer_rows`` and draws minibatches from a seeded permutation of it. With a buffer
    that holds every training row the batch order is exactly :func:`fit`'s. The buffer is
    one tensor of ``max(buffer_rows, batch_size)`` rows, allocated once per fit.
    ``val_chunks`` (None: no validation rows) gives the validation rows each epoch."""
    buffer = _ShuffleBuffer(max(buffer_rows, batch_size), batch_size, generator)

    def train_batches():
        for xb, yb in train_chunks():
            if buffer.held + len(xb) > buffer_rows:  # the buffer and this chunk are shuffled together
                yield from buffer.drain(xb, yb)
            else:
                buffer.add(xb, yb)
        if buffer.held:
            yield from buffer.drain()

    def val_loss():
        if val_chunks is None:
            return None
        total, n = 0.0, 0
        for xb, yb in val_chunks():
            total += mean_loss(module, loss_fn, xb, yb, batch_size, val_seed) * len(xb)
            n += len(xb)
        return total / n if n else None

    return fit_batches(module, loss_fn, train_batches=train_batches, val_loss=val_loss, epochs=epochs, lr=lr,
                       weight_decay=weight_decay, progress=progress)


class _ShuffleBuffer:
    """:func:`fit_streamed`'s shuffle buffer: the rows held, in one tensor allocated at the
    first chunk and refilled in place. A draw permutes the rows held followed by those of
    the chunk that overflows the buffer, and gathers each minibatch from both, so that
    the rows are never concatenated (a transient copy of the whole buffer)."""

    def __init__(self, capacity: int, batch_size: int, generator: torch.Generator | None):
        self.capacity, self.batch_size, self.generator = capacity, batch_size, generator
        self.x = self.y = None  # (capacity, ...) once the first chunk has come
        self.held = 0  # rows in x[:held], y[:held]

    def add(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Hold a chunk's rows (they must fit)."""
        self._allocate(xb, yb)
        self.x[self.held : self.held + len(xb)] = xb
        self.y[self.held : self.held + len(yb)] = yb
        self.held += len(xb)

    def drain(self, xb: torch.Tensor | None = None, yb: torch.Tensor | None = None):
        """Yield minibatches of a seeded permutation of the rows held followed by ``xb``'s:
        whole batches, keeping the rest for the next draw, or (without a chunk: the end of
        the epoch) every row, the last batch possibly smaller."""
        if xb is not None:
            self._allocate(xb, yb)
        n = self.held + (len(xb) if xb is not None else 0)
        order = torch.randperm(n, generator=self.generator).to(self.x.device)
        stop = n - n % self.batch_size if xb is not None else n
        for start in range(0, stop, self.batch_size):
            yield self._gather(order[start : start + self.batch_size], xb, yb)
        rest = order[stop:]
        self.x[: len(rest)], self.y[: len(rest)] = self._gather(rest, xb, yb)  # gathered copies: no overlap
        self.held = len(rest)

    def _allocate(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        """Allocate the buffer like the first chunk (dtype, device, row shape)."""
        if self.x is None:
            self.x = xb.new_empty((self.capacity, *xb.shape[1:]))
            self.y = yb.new_empty((self.capacity, *yb.shape[1:]))

    def _gather(self, idx: torch.Tensor, xb: torch.Tensor | None, yb: torch.Tensor | None):
        """Rows ``idx`` of the rows held followed by ``xb``'s, as new tensors."""
        if xb is None:
            return self.x[idx], self.y[idx]
        x, y = xb.new_empty((len(idx), *xb.shape[1:])), yb.new_empty((len(idx), *yb.shape[1:]))
        held = idx < self.held
        x[held], y[held] = self.x[idx[held]], self.y[idx[held]]
        x[~held], y[~held] = xb[idx[~held] - self.held], yb[idx[~held] - self.held]
        return x, y


def fit_batches(
    module: torch.nn.Module,
    loss_fn: LossFn,
    *,
    train_batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    val_loss: Callable[[], float | None],
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    progress: bool = False,
    patience: int | None = None,
) -> tuple[list[dict], int]:
    """The epoch loop behind :func:`fit` and :func:`fit_streamed`: ``train_batches()``
    yields one epoch of (x, y) minibatches; ``val_loss()`` gives the epoch's validation loss;
    ``patience`` stops the loop once that many epochs in a row have not lowered it."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    history, best_loss, best_state, best_epoch = [], math.inf, None, epochs
    bar = tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for epoch in bar:
        module.train()
        n, total, sums = 0, 0.0, {}
        for xb, yb in train_batches():
            loss, parts = loss_fn(module, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(xb)
            total += loss.detach() * len(xb)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(xb)
        row = {"epoch": epoch, "train_loss": float(total) / n, **{k: float(v) / n for k, v in sums.items()}}
        row["val_loss"] = val_loss()
        history.append(row)
        if row["val_loss"] is not None and row["val_loss"] < best_loss:
            best_loss, best_epoch = row["val_loss"], epoch
            best_state = copy.deepcopy(module.state_dict())
        bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{row['val_loss']:.4f}" if row["val_loss"] is not None else "-")
        if patience is not None and best_state is not None and epoch - best_epoch >= patience:
            break
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return history, best_epoch


@torch.no_grad()
def mean_loss(module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0,
              part: str | None = None) -> float:
    """Mean loss (or its ``part``) over ``x`` in eval mode, under a fixed seed."""
    module.eval()
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        total = 0.0
        for start in range(0, len(x), batch_size):
            loss, parts = loss_fn(module, x[start : start + batch_size], y[start : start + batch_size])
            total += float(parts[part] if part else loss) * len(x[start : start + batch_size])
    return total / len(x)
