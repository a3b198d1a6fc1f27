"""Few-shot CLIP adaptation on cached features (issue 29): the baselines a user with 1-16
labelled images per class compares latent augmentation against.

Every method classifies the image embedding f (unit norm, as the cache stores it) against
the class prompt ensemble t̂_c (unit norm) at CLIP's logit scale s = 1 / TEMPERATURE = 100,
and returns the same :class:`~vlaug.probe.LinearProbe` as every other method (Tip-Adapter's
cache and CLIP-Adapter's bottleneck ride in it: ``vlaug predict`` runs them as they were
selected).

- ``tip-adapter`` (Zhang et al., 2022, Eq. 6), training-free:
  logits = s·f·T̂ᵀ + α·exp(−β(1 − f·Kᵀ))·L, keys K the training embeddings, L their one-hot
  labels; α and β from the paper's grid, chosen on the validation rows only.
- ``tip-adapter-f`` (ibid., §3.3): the keys fine-tuned with AdamW (lr 1e-3, eps 1e-4, cosine
  schedule, batch 256, 20 epochs: the paper's) at the initial α = β = 1, the epoch kept by
  validation accuracy (the paper kept the best *test* epoch), then α and β searched again.
- ``clip-adapter`` (Gao et al., 2021, Eq. 2-3): a bias-free bottleneck MLP A (d → d/4 → d,
  ReLU after each layer) mixed residually, f' = r·A(f) + (1 − r)·f with r = 0.2, classified
  as s·f̂'·T̂ᵀ; trained with cross-entropy.
- ``taskres`` (Yu et al., 2023, Eq. 3): class weights t̂_c + α·x_c with a learned residual x_c
  (zero at the start), α = 0.5; logits s·f·(T̂ + α·X)ᵀ.
- ``cross-modal`` (Lin et al., 2023): a linear probe whose training rows are the images and
  the class prompt embeddings as samples of their class (weight decay chosen like ``linear``).
- ``lp++`` (Huang et al., 2024, Eq. 4): logits f·W + b + α_c·f·t̂_c, W started at the class
  means, α at 250 × the mean text score of the class means (its code), block updates with its
  data-driven step sizes (W: 4N / λmax(FᵀF), heavy ball 0.9; α: N / (4·max_c Σ_i (f_i·t̂_c)²)
  every 10 iterations), 300 iterations, the last kept: no validation search.
- ``clap`` (Silva-Rodríguez et al., 2024, Eq. 5-7): prototypes P started at T̂, logits
  s·f·P̂ᵀ, minimising CE + mean_c λ_c·‖p_c − t̂_c‖², λ_c the zero-shot probability of class c
  on its own training rows (the class-adaptive constraint), by full-batch L-BFGS; no
  validation search. ``constraint=inf`` keeps the zero-shot weights.

The trained adapters (``tip-adapter-f``, ``clip-adapter``, ``taskres``) train with AdamW on
a cosine schedule for ``epochs`` epochs, at most ``max_steps`` optimiser steps (a cache of
thousands of rows is not a few-shot set: the budget keeps it affordable), scoring the
validation rows after every epoch; the epoch with the best validation accuracy (ties: lower
log-loss) is kept, and the refit on train + val trains the same schedule to that epoch.
The papers trained with SGD (CLIP-Adapter, TaskRes) and chose their epochs on test rows;
vlaug's AdamW and validation-kept epoch are its choices, options all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from vlaug.choices import CLASSES_PROMPT_SET
from vlaug.errors import UsageError
from vlaug.methods.base import Fit, Method, Options, RunData, check_positive
from vlaug.methods.linear import ProbeMethod
from vlaug.methods.registry import register
from vlaug.probe import Rows, adapted_features, cache_logits, is_better
from vlaug.zero_shot import TEMPERATURE, zero_shot_weights

# Tip-Adapter keeps every training row as a key, and every prediction is scored against all of them:
# a cache model of more keys is no longer a few-shot method (use --shots, or another method)
MAX_KEYS = 65_536
# Tip-Adapter's search grid (its code's search_scale [7, 3], search_step [200, 20]): β in 0.1 … 7, α in 0.1 … 3
TIP_BETAS = tuple(float(v) for v in 0.1 + (7.0 - 0.1) * np.arange(200) / 200)
TIP_ALPHAS = tuple(float(v) for v in 0.1 + (3.0 - 0.1) * np.arange(20) / 20)
SEARCH_VALUES = 2**24  # (α, rows, classes) logits scored at a time in the α × β search


def _text(data: RunData) -> torch.Tensor:
    """T̂: the class prompt ensemble, unit norm, (C, d)."""
    return F.normalize(data.text.float(), dim=-1)


def _zero_shot(data: RunData) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero-shot classifier as the probe's (W, b): s·T̂ᵀ and zeros."""
    return zero_shot_weights(data.text), torch.zeros(data.n_classes, device=data.device)


def _labelled(data: RunData, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (float32, in memory: read once when streamed) and labels of ``rows``."""
    rows = np.asarray(rows)
    return data.gather(rows), data.y[data.rows(rows)]


def _one_hot(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    return F.one_hot(y, n_classes).float()


def _best(scores: list[tuple[float, float]]) -> int:
    """The index of the best (accuracy, log-loss): :func:`~vlaug.probe.is_better`, the first on a tie."""
    best = 0
    for k, s in enumerate(scores):
        if k and is_better(s, scores[best]):
            best = k
    return best


# ----------------------------------------------------------------------------- Tip-Adapter


@dataclass(frozen=True)
class TipOptions(Options):
    # a fixed α and β (both >= 0) skip the search; -1 (the default): searched on the validation rows
    # over Tip-Adapter's grid (TIP_ALPHAS × TIP_BETAS)
    alpha: float = -1.0  # weight of the cache model (0: zero-shot exactly)
    beta: float = -1.0  # sharpness of the affinities exp(−β(1 − cos))

    def __post_init__(self):
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if value != -1.0 and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} == {value}, must be >= 0 (or -1: searched on the validation rows).")
        if (self.alpha == -1.0) != (self.beta == -1.0):
            raise ValueError(f"alpha == {self.alpha} and beta == {self.beta}: give both, or neither (searched).")


def _cache_parts(keys: torch.Tensor, values: torch.Tensor, alpha: float, beta: float) -> dict:
    return {"cache": {"keys": keys.detach(), "values": values, "alpha": float(alpha), "beta": float(beta)}}


def _check_keys(method: str, n: int) -> None:
    if n > MAX_KEYS:
        raise UsageError(f"{method} keeps every training row as a key: {n} rows is more than {MAX_KEYS}, beyond a "
                         "few-shot set; give --shots K (e.g. --shots 16), or use linear.")


def _search_cache(data: RunData, keys: torch.Tensor, values: torch.Tensor, val: np.ndarray,
                  alphas: tuple[float, ...], betas: tuple[float, ...]) -> tuple[dict, list[dict]]:
    """Every (α, β) of the grid scored on the validation rows: the best (accuracy, then log-loss,
    then the first: smallest β, then smallest α) and the search."""
    x, _ = _labelled(data, val)
    W, b = _zero_shot(data)
    zs = torch.addmm(b, x, W)  # (n, C), as the probe's linear layer computes it
    per = max(1, SEARCH_VALUES // max(1, zs.numel()))
    a = torch.tensor(alphas, device=data.device)
    search = []
    # the cosines x̂·Kᵀ once (in row pieces of at most SEARCH_VALUES): each β is then an exp and a product with L
    f, step = F.normalize(x, dim=-1), max(1, SEARCH_VALUES // max(1, len(keys)))
    cosines = [f[i:i + step] @ keys.T for i in range(0, len(f), step)]
    for beta in betas:
        cache = torch.cat([torch.exp(-beta * (1 - c)) @ values for c in cosines])
        for i in range(0, len(alphas), per):
            scores = data.logit_scores(zs[None] + a[i:i + per, None, None] * cache[None], val)
            search += [{"alpha": alphas[i + j], "beta": beta, "val_accuracy": s[0], "val_log_loss": s[1]}
                       for j, s in enumerate(scores)]
    return search[_best([(s["val_accuracy"], s["val_log_loss"]) for s in search])], search


class _CacheMethod(Method):
    """Tip-Adapter's classifier: zero-shot plus the cache model of the training rows."""

    Options = TipOptions

    def prompt_sets(self):
        return [CLASSES_PROMPT_SET]

    def check_splits(self, splits):
        # the refit keeps the training and the validation rows as keys
        _check_keys(self.name, max(len(s.train) + len(s.val) for s in splits))

    def _grid(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        o = self.options
        return (TIP_ALPHAS, TIP_BETAS) if o.alpha == -1.0 else ((o.alpha,), (o.beta,))

    def _keys(self, data: RunData, rows: np.ndarray, seed: int, selection: dict | None,
              val: np.ndarray | None = None) -> tuple[torch.Tensor, dict]:
        """The cache's keys for training rows ``rows`` (and what their training recorded): a
        fit's (``selection`` None, validation rows ``val``) or a refit's at ``selection``."""
        x, _ = _labelled(data, rows)
        return F.normalize(x, dim=-1), {}

    def search_space(self):
        alphas, betas = self._grid()
        if len(alphas) * len(betas) == 1:
            return ""
        return (f"α × β searched on validation: {len(alphas)} α {alphas[0]:g} … {alphas[-1]:.4g} × "
                f"{len(betas)} β {betas[0]:g} … {betas[-1]:.4g}")

    def fit(self, data, splits, seed):
        train, val = np.asarray(splits.train), np.asarray(splits.val)
        _check_keys(self.name, len(train))
        keys, info = self._keys(data, train, seed, None, val)
        values = _one_hot(data.y[data.rows(train)], data.n_classes)
        alphas, betas = self._grid()
        if len(val):
            best, search = _search_cache(data, keys, values, val, alphas, betas)
        else:  # nothing to select on: the grid's first values
            best, search = {"alpha": alphas[0], "beta": betas[0], "val_accuracy": float("nan"),
                            "val_log_loss": float("nan")}, []
        selection = {**info, **best, "n_train_rows": len(train), "n_val_rows": len(val), "n_candidates": max(1, len(search)),
                     "selected_on": "validation accuracy of the deployed classifier, ties to the lower log-loss"}
        W, b = _zero_shot(data)
        # the search keeps each candidate's scores; the fit keeps only the chosen one's (4,000 candidates), but for a
        # leave-one-domain-out fold, whose every candidate is scored for the mean over its folds
        return Fit(W, b, selection, [] if len(search) > 50 and seed not in self.folds else search,
                   parts=_cache_parts(keys, values, best["alpha"], best["beta"]))

    def refit(self, data, rows, seed, selection):
        rows = np.asarray(rows)
        _check_keys(self.name, len(rows))
        keys, _ = self._keys(data, rows, seed, selection)
        values = _one_hot(data.y[data.rows(rows)], data.n_classes)
        W, b = _zero_shot(data)
        return Fit(W, b, {**selection, "n_train_rows": len(rows)},
                   parts=_cache_parts(keys, values, selection["alpha"], selection["beta"]))


@register
class TipAdapter(_CacheMethod):
    name = "tip-adapter"
    summary = ("few-shot, training-free (Tip-Adapter): zero-shot + α·exp(−β(1 − f·Kᵀ))·L over the training rows' "
               "keys K and one-hot labels L; α, β on validation")


# ----------------------------------------------------------------------------- trained adapters


@dataclass(frozen=True)
class TrainedOptions(Options):
    epochs: int = 200  # epochs of the cosine schedule (at most max_steps steps in all)
    lr: float = 1e-3  # AdamW's learning rate
    weight_decay: float = 0.0  # AdamW's (decoupled) weight decay
    batch_size: int = 32  # rows per step
    max_steps: int = 2000  # the schedule's cap in optimiser steps (a large cache: fewer epochs)

    def __post_init__(self):
        check_positive(self, "epochs", "batch_size", "max_steps")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"lr == {self.lr} must be > 0 and weight_decay == {self.weight_decay} >= 0.")


def _schedule(o: TrainedOptions, n: int) -> tuple[int, int]:
    """(epochs, steps per epoch) of the schedule on ``n`` training rows."""
    per_epoch = max(1, math.ceil(n / o.batch_size))
    return max(1, min(o.epochs, o.max_steps // per_epoch)), per_epoch


def train_epochs(params: dict[str, torch.Tensor], logits_of: Callable[[dict, torch.Tensor], torch.Tensor],
                 x: torch.Tensor, y: torch.Tensor, o: TrainedOptions, seed: int, *, data: RunData | None = None,
                 val: np.ndarray | None = None, x_val: torch.Tensor | None = None, stop_at: int | None = None,
                 eps: float = 1e-8) -> tuple[dict[str, torch.Tensor], dict]:
    """``params`` trained on ``(x, y)`` with cross-entropy of ``logits_of(params, x)``: AdamW on a
    cosine schedule of :func:`_schedule`'s length, minibatches from a permutation drawn with
    ``seed`` each epoch. With validation rows ``val`` (embeddings ``x_val``), they are scored
    after every epoch and the best epoch's parameters are returned; else those after
    ``stop_at`` epochs (default: all). Returns the parameters and ``{"epochs", "steps",
    "selected_epoch", "val_accuracy", "val_log_loss"}``."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    epochs, per_epoch = _schedule(o, len(x))
    opt = torch.optim.AdamW(list(params.values()), lr=o.lr, weight_decay=o.weight_decay, eps=eps)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch)
    generator = torch.Generator().manual_seed(seed)
    last = epochs if stop_at is None else min(epochs, stop_at)
    best, scored = None, val is not None and len(val) > 0
    for epoch in range(1, last + 1):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for i in range(0, len(x), o.batch_size):
            index = order[i:i + o.batch_size]
            loss = F.cross_entropy(logits_of(params, x[index]), y[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        if scored:
            with torch.no_grad():
                (score,) = data.logit_scores(logits_of(params, x_val), val)
            if best is None or is_better(score, best[0]):
                best = (score, epoch, {k: v.detach().clone() for k, v in params.items()})
    if best is None:
        best = ((float("nan"), float("nan")), last, {k: v.detach() for k, v in params.items()})
    (accuracy, log_loss), epoch, state = best
    return state, {"epochs": epochs, "steps": last * per_epoch, "selected_epoch": epoch, "val_accuracy": accuracy,
                   "val_log_loss": log_loss}


class _TrainedMethod(Method):
    """A few-shot adapter trained by :func:`train_epochs`: subclasses give the start, the
    logits and the probe parts of a trained state."""

    Options: ClassVar = TrainedOptions

    def prompt_sets(self):
        return [CLASSES_PROMPT_SET]

    def start(self, data: RunData, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def logits_fn(self, data: RunData, x: torch.Tensor, y: torch.Tensor) -> Callable[[dict, torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def deployed_fit(self, data: RunData, state: dict, x: torch.Tensor, y: torch.Tensor) -> Fit:
        raise NotImplementedError

    def _trained(self, data, rows, seed, val=None, stop_at=None):
        x, y = _labelled(data, rows)
        x_val = data.gather(np.asarray(val)) if val is not None and len(val) else None
        with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
            torch.manual_seed(seed)
            start = self.start(data, x, y, seed)
        state, info = train_epochs(start, self.logits_fn(data, x, y), x, y, self.options, seed, data=data, val=val,
                                   x_val=x_val, stop_at=stop_at)
        return self.deployed_fit(data, state, x, y), info

    def fit(self, data, splits, seed):
        train, val = np.asarray(splits.train), np.asarray(splits.val)
        fit, info = self._trained(data, train, seed, val)
        fit.selection.update({"optimizer": "AdamW", "lr": self.options.lr, "weight_decay": self.options.weight_decay,
                              "batch_size": self.options.batch_size, **info, "n_train_rows": len(train),
                              "n_val_rows": len(val), "selected_on": "the epoch with the best validation accuracy"})
        return fit

    def refit(self, data, rows, seed, selection):
        fit, _ = self._trained(data, np.asarray(rows), seed, stop_at=selection["selected_epoch"])
        fit.selection.update({**selection, "n_train_rows": len(rows)})
        return fit


@dataclass(frozen=True)
class TipFOptions(TipOptions, TrainedOptions):
    epochs: int = 20  # Tip-Adapter-F's
    batch_size: int = 256  # Tip-Adapter-F's
    init_alpha: float = 1.0  # α while the keys train (the paper's starting values; α, β are searched after)
    init_beta: float = 1.0  # β while the keys train

    def __post_init__(self):
        TipOptions.__post_init__(self)
        TrainedOptions.__post_init__(self)
        if not (self.init_alpha >= 0 and self.init_beta >= 0):
            raise ValueError(f"init_alpha == {self.init_alpha} and init_beta == {self.init_beta} must be >= 0.")


@register
class TipAdapterF(_CacheMethod):
    name = "tip-adapter-f"
    summary = ("few-shot (Tip-Adapter-F): tip-adapter with its keys fine-tuned by AdamW, the epoch, then α and β, "
               "chosen on validation")
    Options = TipFOptions

    def _keys(self, data, rows, seed, selection, val=None):
        o = self.options
        x, y = _labelled(data, rows)
        W, b = _zero_shot(data)
        values = _one_hot(y, data.n_classes)

        def logits_of(p, xb):
            return torch.addmm(b, xb, W) + o.init_alpha * cache_logits(xb, p["keys"], values, o.init_beta)

        scored = selection is None and val is not None and len(val) > 0  # a fit: the epoch kept by validation
        state, info = train_epochs({"keys": F.normalize(x, dim=-1)}, logits_of, x, y, o, seed, data=data,
                                   val=val if scored else None, x_val=data.gather(val) if scored else None,
                                   stop_at=None if selection is None else selection["selected_epoch"], eps=1e-4)
        info = {"optimizer": "AdamW", "lr": o.lr, "batch_size": o.batch_size, "init_alpha": o.init_alpha,
                "init_beta": o.init_beta, **{k: info[k] for k in ("epochs", "steps", "selected_epoch")}}
        return state["keys"], info


@register
class ClipAdapter(_TrainedMethod):
    name = "clip-adapter"
    summary = "few-shot (CLIP-Adapter): a residual bottleneck MLP on the image feature, classified by the class prompts"

    @dataclass(frozen=True)
    class Options(TrainedOptions):
        ratio: float = 0.2  # residual ratio r: f' = r·A(f) + (1 − r)·f (the paper's 0.2)
        reduction: int = 4  # the bottleneck's width d / reduction

        def __post_init__(self):
            super().__post_init__()
            check_positive(self, "reduction")
            if not 0.0 <= self.ratio <= 1.0:
                raise ValueError(f"ratio == {self.ratio}, must be in [0, 1].")

    def start(self, data, x, y, seed):
        d = data.embed_dim
        h = max(1, d // self.options.reduction)
        first, second = torch.nn.Linear(d, h, bias=False), torch.nn.Linear(h, d, bias=False)  # torch's init, seeded
        return {"down": first.weight.detach().to(data.device), "up": second.weight.detach().to(data.device)}

    def logits_fn(self, data, x, y):
        r, (W, b) = self.options.ratio, _zero_shot(data)

        def logits_of(p, xb):
            return torch.addmm(b, adapted_features(xb, p["down"], p["up"], r), W)

        return logits_of

    def deployed_fit(self, data, state, x, y):
        W, b = _zero_shot(data)
        return Fit(W, b, {"ratio": self.options.ratio, "hidden": int(state["down"].shape[0])},
                   parts={"adapter": {"down": state["down"].detach(), "up": state["up"].detach(),
                                      "ratio": self.options.ratio}})


@register
class TaskRes(_TrainedMethod):
    name = "taskres"
    summary = "few-shot (TaskRes): class weights t̂_c + α·x_c, the residual x_c learned from zero"

    @dataclass(frozen=True)
    class Options(TrainedOptions):
        alpha: float = 0.5  # the residual's scale (the paper's 0.5)
        batch_size: int = 256
        lr: float = 1e-4  # AdamW on weights that the logit scale s = 100 multiplies

        def __post_init__(self):
            super().__post_init__()
            if not self.alpha >= 0:
                raise ValueError(f"alpha == {self.alpha}, must be >= 0.")

    def start(self, data, x, y, seed):
        return {"residual": torch.zeros(data.n_classes, data.embed_dim, device=data.device)}

    def _weights(self, data, residual):
        return (_text(data) + self.options.alpha * residual).T / TEMPERATURE

    def logits_fn(self, data, x, y):
        return lambda p, xb: xb @ self._weights(data, p["residual"])

    def deployed_fit(self, data, state, x, y):
        return Fit(self._weights(data, state["residual"]).detach(), torch.zeros(data.n_classes, device=data.device),
                   {"alpha": self.options.alpha})


# ----------------------------------------------------------------------------- linear ones


@register
class CrossModal(ProbeMethod):
    name = "cross-modal"
    summary = ("few-shot (cross-modal adaptation): linear probe on the images plus each class's prompt embedding as "
               "a row of its class")

    def prompt_sets(self):
        return [CLASSES_PROMPT_SET]

    def batch_values(self, data, splits):
        return None  # its rows are built (the text rows): searched alone

    def text_rows(self, data: RunData) -> tuple[torch.Tensor, torch.Tensor]:
        """The class prompt ensemble as C rows (unit norm, like the images) labelled 0 … C − 1."""
        return _text(data), torch.arange(data.n_classes, device=data.device)

    def training_rows(self, data, rows, seed):
        rows = np.asarray(rows, dtype=np.int64)
        xt, yt = self.text_rows(data)
        c = data.n_classes
        counts = torch.bincount(data.y[data.rows(rows)], minlength=c).float() + 1
        per_class = data.class_weights(counts)
        index = data.rows(rows)

        def blocks():
            if len(rows) and data.x is not None:  # the resident cache itself, indexed: no copy
                yield data.x, data.y[index], per_class[data.y[index]], index
            elif len(rows):
                for pos, x in data.stream(rows):
                    y = data.y[data.rows(rows[pos])]
                    yield x, y, per_class[y]
            yield xt, yt, per_class[yt]

        return Rows(blocks, data.embed_dim, c, len(rows) + c, data.device)


class _NoSearch(Method):
    """A method that fits the training rows alone, with no validation search (its paper's
    claim): :meth:`_train` gives the classifier; the fit reports its validation scores."""

    def prompt_sets(self):
        return [CLASSES_PROMPT_SET]

    def _train(self, data: RunData, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, dict]:
        raise NotImplementedError

    def fit(self, data, splits, seed):
        train, val = np.asarray(splits.train), np.asarray(splits.val)
        W, b, info = self._train(data, train)
        (accuracy, log_loss), = self.deployed_scores(data, torch.cat([W, b[None]])[None], val) if len(val) else \
            [(float("nan"), float("nan"))]
        return Fit(W, b, {**info, "val_accuracy": accuracy, "val_log_loss": log_loss, "n_train_rows": len(train),
                          "selected_on": "nothing: no validation search (the validation scores are reported)"})

    def refit(self, data, rows, seed, selection):
        W, b, info = self._train(data, np.asarray(rows))
        return Fit(W, b, {**selection, **info, "n_train_rows": len(rows)})


@dataclass(frozen=True)
class LPPPOptions(Options):
    iterations: int = 300  # full-batch iterations (LP++'s epochs)
    alpha_every: int = 10  # iterations between two updates of the blending α (LP++'s)

    def __post_init__(self):
        check_positive(self, "iterations", "alpha_every")


@register
class LPPlusPlus(_NoSearch):
    name = "lp++"
    summary = ("few-shot (LP++): f·W + b + α_c·f·t̂_c, W from the class means, α and the step sizes from the data; "
               "no validation search")
    Options = LPPPOptions

    def _train(self, data: RunData, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, dict]:
        o, c = self.options, data.n_classes
        x, y = _labelled(data, rows)
        f, T = F.normalize(x, dim=-1).double(), _text(data).double()
        n = len(f)
        onehot = _one_hot(y, c).double()
        counts = onehot.sum(0).clamp(min=1)
        W = (onehot.T @ f / counts[:, None]).clone()  # (C, d) class means
        b = torch.zeros(c, dtype=torch.float64, device=f.device)
        text_scores = f @ T.T  # (n, C)
        alpha = torch.full((c,), 250.0 * float((onehot.T @ text_scores / counts[:, None]).mean()), dtype=torch.float64,
                           device=f.device)
        lr_w = 4 * n / float(torch.linalg.eigvalsh(f.T @ f).max())
        lr_alpha = n / (4 * float((text_scores ** 2).sum(0).max()))
        W.requires_grad_(True), b.requires_grad_(True), alpha.requires_grad_(True)
        opt = torch.optim.SGD([W, b], lr=lr_w, momentum=0.9)
        alpha_grad = torch.zeros_like(alpha)
        for it in range(1, o.iterations + 1):
            loss = F.cross_entropy(f @ W.T + b + alpha * text_scores, y)
            opt.zero_grad(set_to_none=True)
            alpha.grad = None
            loss.backward()
            opt.step()
            alpha_grad += alpha.grad
            if it % o.alpha_every == 0:  # its code: a gradient step on α with the gradient summed since the last
                with torch.no_grad():
                    alpha -= lr_alpha * alpha_grad
                alpha_grad.zero_()
        with torch.no_grad():
            weights = (W + alpha[:, None] * T).T.float()  # (d, C): the blend is linear in f
        info = {"iterations": o.iterations, "lr_w": lr_w, "lr_alpha": lr_alpha,
                "alpha_mean": float(alpha.detach().mean()), "train_loss": float(loss.detach())}
        return weights.contiguous(), b.detach().float(), info



@dataclass(frozen=True)
class CLAPOptions(Options):
    constraint: float = 1.0  # multiplier of the class-adaptive penalty (inf: the zero-shot weights, kept)
    max_iter: int = 300  # L-BFGS iterations

    def __post_init__(self):
        check_positive(self, "max_iter")
        if not self.constraint >= 0:
            raise ValueError(f"constraint == {self.constraint}, must be >= 0 (inf: keep the zero-shot weights).")


@register
class CLAP(_NoSearch):
    name = "clap"
    summary = ("few-shot (CLAP): zero-shot-initialised linear probe, each class held near its prompt by the zero-shot "
               "accuracy on its rows; no validation search")
    Options = CLAPOptions

    def _train(self, data: RunData, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, dict]:
        T = _text(data)
        zero = torch.zeros(data.n_classes, device=data.device)
        if math.isinf(self.options.constraint):
            return zero_shot_weights(data.text), zero, {"constraint": "inf", "iterations": 0}
        x, y = _labelled(data, rows)
        f = F.normalize(x, dim=-1)
        with torch.no_grad():  # λ_c: the zero-shot probability of class c on its own rows
            p = (f @ T.T / TEMPERATURE).softmax(-1)
            onehot = _one_hot(y, data.n_classes)
            lam = (p * onehot).sum(0) / onehot.sum(0).clamp(min=1)
        lam = self.options.constraint * lam
        P = T.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([P], lr=1, max_iter=self.options.max_iter, tolerance_grad=1e-7, tolerance_change=1e-12,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(f @ F.normalize(P, dim=-1).T / TEMPERATURE, y) + (lam * (P - T).pow(2).sum(1)).mean()
            loss.backward()
            return loss

        opt.step(closure)
        state = opt.state[P]
        W = (F.normalize(P.detach(), dim=-1).T / TEMPERATURE).contiguous()
        return W, zero, {"constraint": self.options.constraint, "iterations": int(state.get("n_iter", 0)),
                         "lambda_mean": float(lam.mean()), "train_loss": float(closure().detach())}

