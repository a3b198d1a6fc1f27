"""Joint methods: a classifier trained together with batch-level heads in the AdamW loop of
:mod:`vlaug.loop` (LatentDR's own setting, and BatchFormer), and ``linear-adamw``, a plain
linear classifier trained in the same loop: the baseline that tells what the heads add
over the optimiser itself.

Each method searches a small grid of learning rate × weight decay (``lr`` and
``weight_decay``, comma-separated), as the logistic probes search their weight decay.
Every configuration trains from the same initial weights on the same minibatches
(stacked into one vectorised forward where the module allows it), counting optimiser
steps: a cache of few rows makes one-step epochs, never a short training. A configuration
stops once the validation loss of its clean classification term (cross-entropy of the
classifier on the original rows; not the method's whole loss, whose extra terms score
other targets) has not dropped by more than ``min_improvement`` × itself + ``min_delta``
for ``patience`` steps, at most ``max_steps``, and keeps the step with its lowest such
loss. The configuration whose kept classifier, as the method deploys it (with its
zero-shot ensemble, if any), has the highest validation accuracy is chosen, ties to the
lower validation log-loss. The refit trains that configuration for its kept number of
steps on train + validation rows, without validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch

from vlaug import loop
from vlaug.heads.batchformer import BatchFormer, BatchFormerConfig, batchformer_loss
from vlaug.heads.latentdr import LatentDR, LatentDRConfig, latentdr_loss
from vlaug.methods.registry import register
from vlaug.methods.base import EnsembleOptions, Fit, Method, RunData, check_positive
from vlaug.probe import is_better

SELECTED_ON = ("per configuration, the step with the lowest clean validation CE; across configurations, the "
               "validation accuracy of the deployed probe, ties to the lower validation log-loss")
VAL_BLOCK_ROWS = 8192  # validation rows scored at a time (bounds the (configs, rows, classes) logits)
# Seeds (or folds) trained as one stack hold at most about this many values: per copy, 6 x its parameters
# (weights, gradients, AdamW's moments, the kept step) and 8 x its batch's activations per input width.
# 2**28 float32 values = 1 GiB: 4 configurations of linear-adamw at d = 512 for about 60 seeds at once,
# of batchformer for about 3
STACK_VALUES = 2**28
# Devices on which the seeds (or folds) are stacked. On 2 CPU cores stacking gave the same results
# (linear-adamw: bit for bit) in the same time, as the work is arithmetic (linear-adamw, 12 DomainBed
# tasks at d = 512: 8.2 s stacked, 0.7 s a task alone), or 10 % more (batchformer, latentdr-sa: the
# batch is copied per configuration); on an accelerator, where a step's time is its launches, one
# step for every seed is what pays.
STACK_DEVICES = ("cuda", "mps")


def _values(options, name: str, minimum: float, strict: bool) -> tuple[float, ...]:
    """The comma-separated numbers of option ``name``, checked against ``minimum``."""
    text, out = getattr(options, name), []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{name} == {text!r}: {part.strip()!r} is not a number; give comma-separated numbers, "
                             f"e.g. {name}=1e-3,1e-2.") from None
        if not math.isfinite(value) or not (value > minimum if strict else value >= minimum):
            raise ValueError(f"{name} == {value} must be {'>' if strict else '>='} {minimum:g} (in {name}={text!r}).")
        out.append(value)
    if len(set(out)) < len(out):
        raise ValueError(f"{name} == {text!r} repeats a value; give each once.")
    return tuple(out)


@dataclass(frozen=True)
class JointOptions(EnsembleOptions):
    # The defaults were chosen on tuning caches (vlaug.simulate's five settings drawn with
    # seeds 1001-1003, never the reported seed 0) by replaying stopping rules on the clean
    # validation CE recorded every 10 steps of 6-16 configurations of linear-adamw (and 4-6
    # of batchformer on small and default); the table is in docs/probes.md "Joint methods".
    # 10,000: the most steps a configuration of this grid ran under the rules below was 7,450
    # (linear-adamw, small: 240 rows, one step an epoch; 1,000 epochs had capped every seed there)
    max_steps: int = 10_000  # the most AdamW steps per configuration
    # 300: the old 30 epochs were 210 steps on 1,500 rows; 200 stopped batchformer's bumpy curves sooner
    patience: int = 300  # steps without a clear drop of the clean validation CE before a configuration stops
    val_every: int = 10  # steps between validation checks (the patience is counted in steps)
    # a drop restarts the patience when larger than min_improvement × CE + min_delta: with either
    # alone, some configuration still crept down (separable rows: CE -> 0) to 8,000 steps
    min_improvement: float = 0.01  # relative part of the drop that counts as an improvement
    min_delta: float = 0.001  # absolute part (nats)
    batch_size: int = 256  # rows per minibatch: the batch the heads mix across
    # lr: adding 1e-3 (the old default) moved linear-adamw by at most 0.6 point in domain for
    # 1.3-1.5x the steps; batchformer at 1e-3 was still improving at 4,000 steps on small
    lr: str = "3e-3,1e-2"  # AdamW learning rates searched (comma-separated; one value: no search)
    # weight decay: 0.01 (about none at these lrs) and 1 (lr × wd = 1 % shrinkage a step at 1e-2)
    weight_decay: str = "0.01,1"  # AdamW (decoupled) weight decays searched (comma-separated)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "max_steps", "patience", "val_every", "batch_size")
        if not 0.0 <= self.min_improvement < 1.0 or not self.min_delta >= 0.0:
            raise ValueError(f"min_improvement == {self.min_improvement} must be in [0, 1) and min_delta == "
                             f"{self.min_delta} >= 0.")
        self.configs()  # parses lr and weight_decay: a bad value is refused here

    @property
    def lrs(self) -> tuple[float, ...]:
        return _values(self, "lr", 0.0, strict=True)

    @property
    def weight_decays(self) -> tuple[float, ...]:
        return _values(self, "weight_decay", 0.0, strict=False)

    def configs(self) -> list[tuple[float, float]]:
        """The grid: every (lr, weight_decay) pair, lr outermost."""
        return list(product(self.lrs, self.weight_decays))


class JointMethod(Method):
    """A module whose ``classifier`` (on inputs scaled by ``input_scale``) is the probe."""

    Options = JointOptions
    streams = False  # minibatch training over rows held in memory
    # the grid's configurations share one vectorised forward (torch.func.vmap); False: a
    # module vmap cannot run, whose configurations' forwards run one after another
    vectorizes = True

    def build(self, embed_dim: int, n_classes: int) -> tuple[torch.nn.Module, loop.LossFn]:
        """The module (classes: at least 2) and its loss over ``(module, x, y)``."""
        raise NotImplementedError

    def _train(self, data: RunData, train: np.ndarray, val: np.ndarray, seed: int, configs: list[tuple[float, float]],
               max_steps: int, batch_size: int) -> tuple[list[loop.StepRun], float]:
        """Every configuration trained on ``train``, early-stopped on ``val`` (none: ``max_steps``
        steps each); the runs and the module's input scale."""
        o, dev = self.options, data.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            module, loss = self.build(data.embed_dim, max(2, data.n_classes))
            module = module.to(dev)
            tr, va = data.rows(train), data.rows(val)
            x_val, y_val = data.x[va].float(), data.y[va]
            runs = loop.fit_steps(module, loss, x_train=data.x[tr].float(), y_train=data.y[tr], batch_size=batch_size,
                                  max_steps=max_steps, configs=configs, generator=torch.Generator().manual_seed(seed),
                                  val_loss=_clean_ce(x_val, y_val, module.input_scale) if len(val) else None,
                                  val_every=o.val_every, patience=o.patience, min_improvement=o.min_improvement,
                                  min_delta=o.min_delta, vectorize=self.vectorizes)
        return runs, module.input_scale

    def _theta(self, run: loop.StepRun, scale: float, n_classes: int) -> torch.Tensor:
        """(d + 1, C): a run's kept classifier as the probe's W (on unscaled inputs) over b."""
        W = run.state["classifier.weight"].T * scale
        return torch.cat([W, run.state["classifier.bias"][None]])[:, :n_classes]

    def fit_seeds(self, data, splits, solver, searched=None):
        """Every seed's (or task's) fit; their configurations trained together, as copies of
        one stack (:func:`vlaug.loop.fit_steps` with ``tasks``), in groups that keep the
        stack within STACK_VALUES: each copy gets the batches, start and validation it would
        get alone, and every step is one vectorised forward for all of them (issue 28's
        speed rule)."""
        if len(splits) < 2 or data.x is None or data.device.type not in STACK_DEVICES:
            return super().fit_seeds(data, splits, solver, searched)
        module, _ = self.build(data.embed_dim, max(2, data.n_classes))
        per_copy = 6 * sum(p.numel() for p in module.parameters()) + 8 * self.options.batch_size * (data.embed_dim + data.n_classes)
        group = max(1, STACK_VALUES // (per_copy * len(self.options.configs())))
        fits = []
        for start in range(0, len(splits), group):
            part = list(range(start, min(len(splits), start + group)))
            runs, scale = self._train_tasks(data, [splits[i] for i in part], part)
            fits += [self._chosen(data, r, scale, np.asarray(splits[i].val)) for i, r in zip(part, runs)]
        return fits

    def _train_tasks(self, data: RunData, splits: list, seeds: list[int]) -> tuple[list[list[loop.StepRun]], float]:
        """Every configuration of every split trained at once (copy = split × configuration),
        each split's copies from the module its seed builds, on its batches, early-stopped on
        its validation rows."""
        o, dev, configs = self.options, data.device, self.options.configs()
        union = np.unique(np.concatenate([np.asarray(s.train) for s in splits]))
        x_train, y_train = data.x[data.rows(union)].float(), data.y[data.rows(union)]
        tasks = []
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            for s, seed in zip(splits, seeds):
                torch.manual_seed(seed)
                module, loss = self.build(data.embed_dim, max(2, data.n_classes))
                module = module.to(dev)
                va = data.rows(np.asarray(s.val))
                tasks.append(loop.StepTask(rows=data.rows(np.searchsorted(union, np.asarray(s.train))),
                                           generator=torch.Generator().manual_seed(seed),
                                           val_loss=_clean_ce(data.x[va].float(), data.y[va], module.input_scale)
                                           if len(va) else None,
                                           init={n: p.detach().clone() for n, p in module.named_parameters()}))
            torch.manual_seed(seeds[0])
            runs = loop.fit_steps(module, loss, x_train=x_train, y_train=y_train, batch_size=o.batch_size,
                                  max_steps=o.max_steps, configs=configs * len(splits), val_every=o.val_every,
                                  patience=o.patience, min_improvement=o.min_improvement, min_delta=o.min_delta,
                                  vectorize=self.vectorizes, tasks=tasks,
                                  task_of=[t for t in range(len(splits)) for _ in configs])
        k = len(configs)
        return [runs[t * k:(t + 1) * k] for t in range(len(splits))], module.input_scale

    def fit(self, data, splits, seed):
        o = self.options
        train, val = np.asarray(splits.train), np.asarray(splits.val)
        runs, scale = self._train(data, train, val, seed, o.configs(), o.max_steps, o.batch_size)
        return self._chosen(data, runs, scale, val)

    def _chosen(self, data: RunData, runs: list[loop.StepRun], scale: float, val: np.ndarray) -> Fit:
        """The configuration whose kept classifier, as deployed, scores best on ``val``."""
        o, c = self.options, data.n_classes
        thetas = torch.stack([self._theta(run, scale, c) for run in runs])
        scores = self.deployed_scores(data, thetas, val)
        search, chosen = [], 0
        for k, (run, (accuracy, log_loss)) in enumerate(zip(runs, scores)):
            search.append({"lr": run.lr, "weight_decay": run.weight_decay, "steps": run.steps, "stopped": run.stopped,
                           "selected_step": run.selected_step, "val_accuracy": accuracy, "val_log_loss": log_loss})
            if k and is_better((accuracy, log_loss), (search[chosen]["val_accuracy"], search[chosen]["val_log_loss"])):
                chosen = k
        selection = {"optimizer": "AdamW", **search[chosen], "batch_size": o.batch_size, "max_steps": o.max_steps,
                     "selected_on": SELECTED_ON}
        return Fit(thetas[chosen, :-1], thetas[chosen, -1], selection, search)

    def refit(self, data, rows, seed, selection):
        rows = np.asarray(rows)
        runs, scale = self._train(data, rows, rows[:0], seed, [(selection["lr"], selection["weight_decay"])],
                                  selection["selected_step"], selection["batch_size"])
        theta = self._theta(runs[0], scale, data.n_classes)
        return Fit(theta[:-1], theta[-1], dict(selection))


def _clean_ce(x: torch.Tensor, y: torch.Tensor, scale: float) -> loop.StackedLoss:
    """The copies' clean validation CE, from their classifiers alone (the ``ce`` part of
    every joint loss: CE of ``classifier(x · scale)`` on the original rows)."""

    def losses(params: dict[str, torch.Tensor]) -> torch.Tensor:
        W, b = params["classifier.weight"] * scale, params["classifier.bias"]  # (A, C, d), (A, C)
        total = torch.zeros(len(W), device=W.device)
        for start in range(0, len(x), VAL_BLOCK_ROWS):
            xb, yb = x[start : start + VAL_BLOCK_ROWS], y[start : start + VAL_BLOCK_ROWS]
            logits = torch.einsum("nd,acd->anc", xb, W) + b[:, None]  # (A, n, C)
            target = logits.gather(2, yb.view(1, -1, 1).expand(len(W), -1, 1))[..., 0]
            total += (logits.logsumexp(2) - target).sum(1)
        return total / len(x)

    return losses


class PlainLinear(torch.nn.Module):
    """A linear classifier on embeddings scaled by √d, as the joint methods' classifiers are."""

    def __init__(self, embed_dim: int, n_classes: int):
        super().__init__()
        self.classifier = torch.nn.Linear(embed_dim, n_classes)
        self.input_scale = float(embed_dim) ** 0.5

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z * self.input_scale)


def _cross_entropy(m, x, y):
    ce = torch.nn.functional.cross_entropy(m(x), y)
    return ce, {"ce": ce.detach()}


@register
class LinearAdamW(JointMethod):
    name = "linear-adamw"
    summary = "joint: a plain linear layer in the joint methods' AdamW loop and grid search, their fair baseline"

    def build(self, embed_dim, n_classes):
        return PlainLinear(embed_dim, n_classes), _cross_entropy


@register
class BatchFormerMethod(JointMethod):
    name = "batchformer"
    summary = 'joint: a transformer layer across the batch, classifier shared by original and mixed features'

    def build(self, embed_dim, n_classes):
        module = BatchFormer(BatchFormerConfig(embed_dim=embed_dim, n_classes=n_classes))
        return module, lambda m, x, y: batchformer_loss(m(x), y)


class LatentDRJoint(JointMethod):
    kind = "sa"

    def build(self, embed_dim, n_classes):
        module = LatentDR(LatentDRConfig(embed_dim=embed_dim, n_classes=n_classes, kind=self.kind))
        return module, lambda m, x, y: latentdr_loss(m(x, y), y)


@register
class LatentDRSA(LatentDRJoint):
    name = "latentdr-sa"
    summary = (
        'joint: a fresh LatentDR head (self-attention degradation) trained with the classifier (the '
        "paper's setting)"
    )
    kind = "sa"


@register
class LatentDRPool(LatentDRJoint):
    name = "latentdr-pool"
    summary = (
        "joint: a fresh LatentDR head (pooling degradation) trained with the classifier (the paper's "
        'setting)'
    )
    kind = "pool"
