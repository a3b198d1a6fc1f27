"""Zero-shot classification with the class prompt ensemble: no training."""

from __future__ import annotations

import torch

from vlaug.choices import CLASSES_PROMPT_SET
from vlaug.methods.registry import register
from vlaug.methods.base import Fit, Method
from vlaug.zero_shot import zero_shot_weights


@register
class ZeroShot(Method):
    name = "zero-shot"
    summary = 'nothing: argmax of the cosine with the class prompt ensemble'

    def prompt_sets(self):
        return [CLASSES_PROMPT_SET]

    def fit(self, data, splits, seed):
        W, b = zero_shot_weights(data.text), torch.zeros(data.n_classes, device=data.device)
        if splits is None or not len(splits.val):
            return Fit(W, b)
        (accuracy, log_loss), = self.deployed_scores(data, torch.cat([W, b[None]])[None], splits.val)
        return Fit(W, b, {"val_accuracy": accuracy, "val_log_loss": log_loss})  # nothing chosen: for comparison

    def refit(self, data, rows, seed, selection):
        return Fit(zero_shot_weights(data.text), torch.zeros(data.n_classes, device=data.device), dict(selection))
