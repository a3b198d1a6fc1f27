"""The generic minibatch training loops. It knows no head and no file: callers pass a
module, a loss and their rows (tensors in memory, or callables that stream chunks of rows).

- :func:`fit` / :func:`fit_streamed` / :func:`fit_batches`: AdamW over epochs, the epoch
  with the lowest validation loss kept. Stage 2 (``vlaug train-box``) trains every head so.
- :func:`fit_steps`: a budget counted in optimiser steps, validation every few steps, one
  copy of the module per configuration (learning rate, weight decay), all trained on the
  same minibatches in one vectorised forward (``torch.func.vmap``); each keeps the step with
  its lowest validation loss and stops on its own patience. Stage 3's joint methods search
  their grid so.

Each epoch draws a seeded permutation and slices batches from it (no DataLoader, no
per-sample Python).
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.func import functional_call, vmap

# (module, x, y) -> (loss, parts): parts are detached scalars logged per epoch
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
# () -> one pass over some rows as (x, y) tensors on the module's device
Chunks = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]
# stacked parameters of the configurations still training ({name: (A, ...)}) -> (A,) validation losses
StackedLoss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


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


@dataclass
class StepRun:
    """One configuration of :func:`fit_steps`: how it stopped and the parameters it kept."""

    lr: float
    weight_decay: float
    steps: int = 0  # optimiser steps it ran
    stopped: str = "cap"  # "patience": its validation loss stopped improving; "cap": it ran max_steps
    selected_step: int = 0  # the step kept (lowest validation loss; the last step without validation)
    val_loss: float | None = None  # validation loss at the kept step (None: no validation)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # the kept parameters, by name


@dataclass
class StepTask:
    """One training problem of :func:`fit_steps` when it trains several at once (seeds,
    folds): its rows, batch order, validation loss and starting parameters."""

    rows: torch.Tensor | None = None  # indices of its training rows in x_train (None: every row)
    generator: torch.Generator | None = None  # CPU generator of its batch order
    val_loss: StackedLoss | None = None  # its copies' validation losses (None: no validation)
    init: dict[str, torch.Tensor] | None = None  # its starting parameters by name (None: the module's)


def fit_steps(
    module: torch.nn.Module,
    loss_fn: LossFn,
    *,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    batch_size: int,
    max_steps: int,
    configs: list[tuple[float, float]],
    val_loss: StackedLoss | None = None,
    val_every: int = 1,
    patience: int | None = None,
    min_improvement: float = 0.0,
    min_delta: float = 0.0,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
    tasks: list[StepTask] | None = None,
    task_of: list[int] | None = None,
) -> list[StepRun]:
    """Train one copy of ``module`` (all from its current weights) per configuration
    ``(lr, weight_decay)`` of ``configs`` with AdamW, counting optimiser steps.

    Every step draws one minibatch (slices of a seeded permutation of the training rows,
    a new one each pass) and feeds it to every configuration still training: the copies'
    parameters are stacked and ``loss_fn`` runs once for all of them under
    ``torch.func.vmap`` (``randomness="different"``: each copy draws its own dropout).
    Every ``val_every`` steps (and at the last) ``val_loss`` scores the copies; each keeps
    the step with its lowest validation loss and stops once ``patience`` steps have passed
    without one lower by more than ``min_improvement`` × the loss that last restarted its
    patience + ``min_delta`` (a loss that creeps down forever, as cross-entropy does on
    separable rows, does not keep a copy training). A few rows make a small epoch, never a
    short training.

    Args:
        loss_fn: ``(module, x, y) -> (loss, parts)``; the module it is given calls
            ``module`` with a copy's parameters.
        x_train, y_train: tensors on the module's device.
        configs: ``(lr, weight_decay)`` per copy (decoupled weight decay, as torch's AdamW).
        val_loss: the copies' validation losses from their stacked parameters; None: no
            validation, every copy runs ``max_steps`` steps and keeps the last.
        patience: steps without a lower validation loss before a copy stops (None: never).
        min_improvement, min_delta: the relative and absolute drop of the validation loss
            that restarts the patience (both 0: any drop).
        generator: CPU generator for the batch order.
        vectorize: False for a module that ``vmap`` cannot run: the copies' forwards then
            run one after another in each step (same batches, same updates).
        tasks, task_of: several training problems at once (the seeds or folds of a joint
            method, issue 28): copy k trains task ``task_of[k]``, on that task's rows, batches
            (its own generator: the batches it would get alone), starting parameters and
            validation loss (``val_loss`` and ``generator`` are then unused). Every copy still
            training takes one step per step, all in one vectorised forward (copies whose
            batches differ in size, at the end of a pass, in one forward per size).

    Returns:
        one :class:`StepRun` per configuration, in order; ``module`` itself is unchanged.
    """
    if max_steps < 1 or val_every < 1 or not configs:
        raise ValueError(f"max_steps == {max_steps} and val_every == {val_every} must be >= 1, with at least one config.")
    runs = [StepRun(lr, wd) for lr, wd in configs]
    if tasks is None:
        tasks, task_of = [StepTask(None, generator, val_loss)], [0] * len(configs)
    if task_of is None or len(task_of) != len(configs):
        raise ValueError("task_of must name the task of every configuration.")
    initial = None
    if any(t.init is not None for t in tasks):
        own = dict(module.named_parameters())
        initial = {name: torch.stack([(tasks[t].init or own)[name].detach() for t in task_of]) for name in own}
    optimizer = _StackedAdamW(module, configs, initial)
    buffers = {name: b for name, b in module.named_buffers()}  # shared by the copies (vlaug's modules update none)
    batches = [_batches(len(x_train) if t.rows is None else len(t.rows), batch_size, t.generator, x_train.device)
               for t in tasks]
    reference = [(math.inf, 0)] * len(runs)  # (loss, step) that last restarted each copy's patience (step 0: none yet)
    module.train()
    for step in range(1, max_steps + 1):
        alive = sorted({task_of[k] for k in optimizer.ids})
        picked = {}
        for t in alive:  # each task's next batch, as it would draw it alone
            idx = next(batches[t])
            rows = idx if tasks[t].rows is None else tasks[t].rows[idx]
            picked[t] = (x_train[rows], y_train[rows])
        if len(tasks) == 1:
            losses = _stacked_losses(module, loss_fn, optimizer.params, buffers, *picked[0], vectorize)
        else:
            losses = _task_losses(module, loss_fn, optimizer.params, buffers, picked,
                                  [task_of[k] for k in optimizer.ids], vectorize)
        losses.sum().backward()  # the copies are independent: each gets its own gradient
        optimizer.step()
        if step % val_every and step < max_steps:
            continue
        scores = _validation(tasks, optimizer.params, [task_of[k] for k in optimizer.ids])
        done = []
        for slot, (k, score) in enumerate(zip(optimizer.ids, scores)):
            if score is None:  # a task without validation: it runs max_steps and keeps the last
                continue
            run, score = runs[k], score if math.isfinite(score) else math.inf
            if not run.state or score < run.val_loss:
                run.selected_step, run.val_loss = step, score
                run.state = optimizer.copy(slot)
            if not reference[k][1] or score < reference[k][0] * (1 - min_improvement) - min_delta:
                reference[k] = (score, step)
            if patience is not None and step - reference[k][1] >= patience:
                run.steps, run.stopped = step, "patience"
                done.append(slot)
        optimizer.drop(done)
        if not optimizer.ids:
            break
    for slot, k in enumerate(optimizer.ids):  # still training at the cap
        runs[k].steps, runs[k].stopped = max_steps, "cap"
        if tasks[task_of[k]].val_loss is None:
            runs[k].selected_step, runs[k].state = max_steps, optimizer.copy(slot)
    module.eval()
    return runs


def _validation(tasks: list[StepTask], params: dict[str, torch.Tensor], slot_tasks: list[int]) -> list[float | None]:
    """Each copy's validation loss (None for a task without validation), task by task."""
    scores: list[float | None] = [None] * len(slot_tasks)
    with torch.no_grad():
        for t in sorted(set(slot_tasks)):
            if tasks[t].val_loss is None:
                continue
            slots = [i for i, u in enumerate(slot_tasks) if u == t]
            mine = params if len(slots) == len(slot_tasks) else {n: p[slots] for n, p in params.items()}
            for i, v in zip(slots, tasks[t].val_loss(mine).tolist()):
                scores[i] = v
    return scores


def _task_losses(module, loss_fn: LossFn, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 picked: dict[int, tuple[torch.Tensor, torch.Tensor]], slot_tasks: list[int], vectorize: bool) -> torch.Tensor:
    """(A,) training losses of copies that train different tasks, each on its task's batch:
    one vectorised forward per batch size (all copies but at the end of a pass)."""
    by_size: dict[int, list[int]] = {}
    for slot, t in enumerate(slot_tasks):
        by_size.setdefault(len(picked[t][1]), []).append(slot)
    out = torch.zeros(len(slot_tasks), device=next(iter(params.values())).device)

    def one(p, x, y):
        return loss_fn(_Bound(module, {**p, **buffers}), x, y)[0]

    for slots in by_size.values():
        index = torch.as_tensor(slots, device=out.device)
        mine = {n: p[index] for n, p in params.items()}
        x = torch.stack([picked[slot_tasks[s]][0] for s in slots])
        y = torch.stack([picked[slot_tasks[s]][1] for s in slots])
        if vectorize:
            losses = vmap(one, randomness="different")(mine, x, y)
        else:
            losses = torch.stack([one({n: p[i] for n, p in mine.items()}, x[i], y[i]) for i in range(len(slots))])
        out = out.index_put((index,), losses)
    return out


def _batches(n: int, batch_size: int, generator: torch.Generator | None, device: torch.device) -> Iterator[torch.Tensor]:
    """Row indices of minibatches, endlessly: each pass a seeded permutation, sliced (the last slice may be smaller)."""
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


class _Bound:
    """``module`` called with one copy's parameters (``torch.func.functional_call``): what a
    :data:`LossFn` calls; its other attributes are the module's."""

    def __init__(self, module: torch.nn.Module, state: dict[str, torch.Tensor]):
        self._module, self._state = module, state

    def __call__(self, *args):
        return functional_call(self._module, self._state, args)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _stacked_losses(module, loss_fn: LossFn, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                    x: torch.Tensor, y: torch.Tensor, vectorize: bool) -> torch.Tensor:
    """(A,) training losses of the copies on one minibatch."""

    def one(p):
        return loss_fn(_Bound(module, {**p, **buffers}), x, y)[0]

    if vectorize:
        return vmap(one, randomness="different")(params)
    n = len(next(iter(params.values())))
    return torch.stack([one({name: p[i] for name, p in params.items()}) for i in range(n)])


# torch's fused AdamW kernel (CPU and CUDA in the torch versions vlaug supports; else the
# update below, operation by operation)
FUSED_ADAMW = hasattr(torch, "_fused_adamw_")
FUSED_DEVICES = ("cpu", "cuda")


class _StackedAdamW:
    """AdamW (torch's update: decoupled weight decay, bias-corrected moments) over stacked
    copies of a module's parameters, each copy with its own lr and weight decay; copies
    that stop are dropped from the stack."""

    BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults

    def __init__(self, module: torch.nn.Module, configs: list[tuple[float, float]],
                 initial: dict[str, torch.Tensor] | None = None):
        n = len(configs)
        if initial is not None:  # each copy's own start, stacked {name: (A, ...)}
            self.params = {name: p.clone().requires_grad_() for name, p in initial.items()}
        else:
            self.params = {name: p.detach().unsqueeze(0).repeat(n, *[1] * p.dim()).requires_grad_()
                           for name, p in module.named_parameters()}  # {name: (A, ...)}
        self.exp_avg = {name: torch.zeros_like(p) for name, p in self.params.items()}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in self.params.items()}
        device = next(iter(self.params.values())).device
        self.lr = torch.tensor([lr for lr, _ in configs], device=device)  # (A,)
        self.weight_decay = torch.tensor([wd for _, wd in configs], device=device)
        self.ids = list(range(n))  # the configuration of each slot still in the stack
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        """One update of every copy from its gradient (cleared afterwards)."""
        self.t += 1
        if FUSED_ADAMW and self.lr.device.type in FUSED_DEVICES:
            self._fused_step()
            return
        (b1, b2), t = self.BETAS, self.t
        correction1, correction2 = 1 - b1**t, math.sqrt(1 - b2**t)
        for name, p in self.params.items():
            shape = (-1,) + (1,) * (p.dim() - 1)
            lr, wd = self.lr.view(shape), self.weight_decay.view(shape)
            grad, m, v = p.grad, self.exp_avg[name], self.exp_avg_sq[name]
            if grad is None:  # unused by the loss: left alone, as torch's AdamW does
                continue
            p.mul_(1 - lr * wd)
            m.lerp_(grad, 1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            p.sub_(lr / correction1 * m / (v.sqrt() / correction2 + self.EPS))
            p.grad = None

    def _fused_step(self) -> None:
        """:meth:`step` by torch's fused AdamW kernel, one call per copy (its own lr and
        weight decay) over that copy's slices of every parameter: one pass over the
        parameters and moments instead of one per elementwise operation (the update's
        arithmetic is the same; on 2 CPU cores the optimiser took about a tenth of a
        batchformer or latentdr-sa step, fused about a third of that:
        benchmarks/joint_step.py)."""
        names = [name for name, p in self.params.items() if p.grad is not None]  # unused by the loss: left alone
        step = torch.tensor(float(self.t), device=self.lr.device)
        (b1, b2) = self.BETAS
        for slot, (lr, wd) in enumerate(zip(self.lr.tolist(), self.weight_decay.tolist())):
            params = [self.params[n][slot] for n in names]
            torch._fused_adamw_(params, [self.params[n].grad[slot] for n in names], [self.exp_avg[n][slot] for n in names],
                                [self.exp_avg_sq[n][slot] for n in names], [], [step] * len(names), amsgrad=False,
                                lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=self.EPS, maximize=False)
        for n in names:
            self.params[n].grad = None

    def copy(self, slot: int) -> dict[str, torch.Tensor]:
        """The parameters of the copy in ``slot``, detached."""
        return {name: p[slot].detach().clone() for name, p in self.params.items()}

    def drop(self, slots: list[int]) -> None:
        """Remove the copies in ``slots`` from the stack."""
        if not slots:
            return
        keep = [i for i in range(len(self.ids)) if i not in slots]
        index = torch.as_tensor(keep, device=self.lr.device, dtype=torch.long)
        self.params = {name: p.detach()[index].requires_grad_() for name, p in self.params.items()}
        self.exp_avg = {name: m[index] for name, m in self.exp_avg.items()}
        self.exp_avg_sq = {name: v[index] for name, v in self.exp_avg_sq.items()}
        self.lr, self.weight_decay = self.lr[index], self.weight_decay[index]
        self.ids = [self.ids[i] for i in keep]
