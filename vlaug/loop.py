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
    that holds every training row the batch order is exactly :func:`fit`'s.
    ``val_chunks`` (None: no validation rows) gives the validation rows each epoch."""

    def train_batches():
        buf_x, buf_y, held = [], [], 0

        def drain(final: bool):
            x, y = torch.cat(buf_x), torch.cat(buf_y)
            order = torch.randperm(len(x), generator=generator).to(x.device)
            stop = len(x) if final else len(x) - len(x) % batch_size
            for start in range(0, stop, batch_size):
                idx = order[start : start + batch_size]
                yield x[idx], y[idx]
            rest = order[stop:]
            return [x[rest]], [y[rest]]

        for xb, yb in train_chunks():
            buf_x.append(xb)
            buf_y.append(yb)
            held += len(xb)
            if held > buffer_rows:
                buf_x, buf_y = yield from drain(final=False)
                held = len(buf_x[0])
        if held:
            yield from drain(final=True)

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
