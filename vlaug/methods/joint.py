"""Joint methods: a classifier trained together with batch-level heads in the AdamW loop of
:mod:`vlaug.loop` (LatentDR's own setting, and BatchFormer), and ``linear-adamw``, a plain
linear classifier trained in the same loop: the baseline that tells what the heads add
over the optimiser itself.

Training runs until the validation loss of the clean classification term (cross-entropy
of the classifier on the original rows; not the methods' whole loss, whose extra terms
score other targets) has not improved for ``patience`` epochs, at most ``epochs``; the
best epoch is kept. The refit trains for that many epochs on train + validation rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlaug import loop
from vlaug.heads.batchformer import BatchFormer, BatchFormerConfig, batchformer_loss
from vlaug.heads.latentdr import LatentDR, LatentDRConfig, latentdr_loss
from vlaug.methods.registry import register
from vlaug.methods.base import EnsembleOptions, Fit, Method, RunData, check_positive


@dataclass(frozen=True)
class JointOptions(EnsembleOptions):
    epochs: int = 1000  # the most AdamW epochs (the one with the lowest clean validation loss is kept)
    patience: int = 30  # stop once the clean validation loss has not improved for this many epochs
    batch_size: int = 256  # rows per minibatch: the batch the heads mix across
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "epochs", "patience", "batch_size")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr == {self.lr} must be > 0 and weight_decay == {self.weight_decay} >= 0.")


class JointMethod(Method):
    """A module whose ``classifier`` (on inputs scaled by ``input_scale``) is the probe."""

    Options = JointOptions
    streams = False  # minibatch training over rows held in memory

    def build(self, embed_dim: int, n_classes: int) -> tuple[torch.nn.Module, loop.LossFn]:
        """The module (classes: at least 2) and its loss over ``(module, x, y)``."""
        raise NotImplementedError

    def _train(self, data: RunData, train: np.ndarray, val: np.ndarray, seed: int, epochs: int) -> Fit:
        o, c, dev = self.options, data.n_classes, data.device
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            module, loss = self.build(data.embed_dim, max(2, c))
            module = module.to(dev)
            tr, va = data.rows(train), data.rows(val)
            history, selected = loop.fit(module, loss, x_train=data.x[tr].float(), y_train=data.y[tr], x_val=data.x[va].float(),
                                         y_val=data.y[va], epochs=epochs, batch_size=o.batch_size, lr=o.lr,
                                         weight_decay=o.weight_decay, generator=torch.Generator().manual_seed(seed),
                                         val_seed=seed, select_on="ce", patience=o.patience if len(val) else None)
        W = module.classifier.weight.detach().T * module.input_scale
        b = module.classifier.bias.detach()
        selection = {"selected_epoch": selected, "epochs": len(history), "optimizer": "AdamW", "lr": o.lr,
                     "weight_decay": o.weight_decay, "batch_size": o.batch_size, "selected_on": "clean validation CE"}
        return Fit(W[:, :c], b[:c], selection)

    def fit(self, data, splits, seed):
        return self._train(data, np.asarray(splits.train), np.asarray(splits.val), seed, self.options.epochs)

    def refit(self, data, rows, seed, selection):
        return self._train(data, rows, rows[:0], seed, selection["selected_epoch"])


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
    summary = "joint: a plain linear layer in the joint methods' AdamW loop, their fair baseline"

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
