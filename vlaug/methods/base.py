"""What a stage-3 method is, and the data every method of a run shares.

A method is one subclass of :class:`Method`, registered with
:func:`vlaug.methods.register`: its name, the head kinds it needs, its typed
:class:`Options` (defaults and checks), whether it can train on a cache streamed from
disk, how many extra rows it adds per training row, and how it trains (:meth:`Method.fit`)
and refits at the chosen hyperparameters (:meth:`Method.refit`). Every method returns a
linear classifier ``x W + b`` (a :class:`~vlaug.probe.LinearProbe`), so that all of them
are scored, ensembled and saved the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator
from urllib.parse import parse_qsl

import numpy as np
import torch

from vlaug.cache import FeatureCache, take_rows
from vlaug.choices import CLASSES_PROMPT_SET
from vlaug.errors import UsageError
from vlaug.probe import LinearProbe, ProbeConfig, Rows, calibrate_temperature, validation_scores
from vlaug.runs import MethodSettings
from vlaug.zero_shot import TEMPERATURE, zero_shot_logits

if TYPE_CHECKING:  # imported for annotations only
    from vlaug.checkpoint import Checkpoint
    from vlaug.protocols import Splits

STREAM_ROWS = 16384  # rows per float32 block read off a resident cache (64 MB at d = 1024)
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class Options:
    """A method's options. Subclasses add fields, each with a default and a comment, and
    check their values in ``__post_init__`` (raising ValueError with the observed value)."""

    @classmethod
    def parse(cls, query: str, where: str, method: str = "") -> "Options":
        """Options from a query string such as ``n_aug=40&ensemble=0.7`` (``where`` names
        the method spec in errors); unknown keys and bad values are UsageErrors."""
        defaults = {f.name: f.default for f in fields(cls)}
        values = {}
        for key, text in parse_qsl(query, keep_blank_values=True):
            if key not in defaults:
                raise UsageError(f"--method {where!r}: unknown option {key!r} for {method or 'this method'}; "
                                 f"it takes {sorted(defaults) or 'none'}.")
            kind = type(defaults[key])
            try:
                if kind is bool and text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                values[key] = (text.lower() in ("true", "1")) if kind is bool else kind(text)
            except ValueError:
                raise UsageError(f"--method {where!r}: option {key}={text!r} must be {_TYPE_NAMES.get(kind, kind.__name__)}.") from None
        try:
            return cls(**values)
        except ValueError as e:
            raise UsageError(f"--method {where!r}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EnsembleOptions(Options):
    """Options of every method that trains a probe: the zero-shot ensemble weight."""

    ensemble: float = 0.0  # weight of the zero-shot probabilities mixed into the probe's (0: the probe alone)

    def __post_init__(self):
        if not 0.0 <= self.ensemble <= 1.0:
            raise ValueError(f"ensemble == {self.ensemble}, must be in [0, 1].")


def check_positive(options: Options, *names: str, minimum: float = 1) -> None:
    """Raise ValueError unless every option in ``names`` is >= ``minimum``."""
    for name in names:
        value = getattr(options, name)
        if value < minimum:
            raise ValueError(f"{name} == {value}, must be >= {minimum}.")


@dataclass
class Fit:
    """One trained method: the linear classifier and what its selection chose."""

    W: torch.Tensor  # (d, C)
    b: torch.Tensor  # (C,)
    selection: dict = field(default_factory=dict)  # the chosen hyperparameters (JSON-ready); refit() takes them back
    search: list[dict] = field(default_factory=list)  # every candidate the selection tried
    # an input-adaptive ensemble's gate: {"means": (C, d), "precision": (d, d), "center", "width", "max"}
    gate: dict | None = None
    # what the probe holds beside x W + b (vlaug.methods.fewshot): {"cache": {"keys", "values", "alpha", "beta"}}
    # (Tip-Adapter) and/or {"adapter": {"down", "up", "ratio"}} (CLIP-Adapter)
    parts: dict | None = None


@dataclass
class Search:
    """A seed's logistic search (see :class:`~vlaug.methods.linear.ProbeMethod`): the chosen candidate and the
    search, the probe on the training rows, those rows (when built), and after a search on a
    sample the sample and the refit on every training row."""

    best: dict
    search: list[dict]
    W: torch.Tensor
    b: torch.Tensor
    rows: Rows | None  # None: built again when needed
    sample: tuple[np.ndarray, np.ndarray] | None = None
    refit: dict | None = None
    train: np.ndarray | None = None  # the training rows it was fitted for
    extension: dict | None = None  # {"grid_extended", "grid"} once continued past an end of the grid (None: not yet)


@dataclass
class BatchPlan:
    """A method's part of a batched search (:meth:`Method.batch_plan`)."""

    trains: list[np.ndarray]
    vals: list[np.ndarray]
    per_seed: list[Rows] | None  # the seeds' built rows; None: rows of the cache
    init: tuple[torch.Tensor, torch.Tensor] | None
    anchor: torch.Tensor | None


@dataclass
class RunData:
    """What every method of a run shares: the cache's rows (in memory, or streamed from
    disk chunk by chunk), labels, domains, class prompts and the trained heads."""

    feats: FeatureCache  # without embeddings when streamed
    x: torch.Tensor | None  # (n, d) on the device, in the cache's stored precision; None: streamed from disk
    y: torch.Tensor  # (n,)
    dom: torch.Tensor  # (n,) domain index
    text: torch.Tensor  # (C, d) class prompt ensemble
    heads: dict[str, "Checkpoint"]  # head path -> checkpoint
    settings: MethodSettings  # the run's settings that methods read (grid, iterations, reweighting, ...)
    device: torch.device
    chunks: Callable[[], Iterator[tuple[int, np.ndarray]]] | None = None  # the cache read from disk (streamed)
    passes: int = 0  # reads of the cache from disk so far (streamed)
    # validation scores weigh each domain's rows equally (the mean of the domains' accuracies, DomainBed's
    # training-domain validation) instead of pooling them
    balance_domains: bool = False
    features: str = ""  # the cache's folder (a method that reads more of it, e.g. its row ids)
    origin: np.ndarray | None = None  # after subset(): this run's row i is the cache's row origin[i]

    @property
    def n_classes(self) -> int:
        return len(self.feats.classes)

    @property
    def embed_dim(self) -> int:
        return self.feats.manifest.embed_dim

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """Row indices as a tensor on the device."""
        return torch.as_tensor(rows, device=self.device)

    def cache_rows(self, rows: np.ndarray) -> np.ndarray:
        """The cache's indices of this run's rows ``rows``: where ``feats`` (domains, ids of
        the whole cache) describes them, also in a :meth:`subset`."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows if self.origin is None else self.origin[rows]

    def stream(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """The embeddings of ``rows`` as ``(positions in rows, (m, d) tensor)`` blocks: one
        block in memory, one per chunk read from disk when streamed (in cache order)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.x is not None:  # resident (maybe float16): float32 blocks of at most STREAM_ROWS rows
            for i in range(0, len(rows), STREAM_ROWS):
                yield np.arange(i, min(len(rows), i + STREAM_ROWS)), self.x[self.rows(rows[i:i + STREAM_ROWS])].float()
            return
        self.passes += 1
        for pos, emb in take_rows(self.chunks(), rows):
            yield pos, torch.as_tensor(emb, device=self.device)

    def subset(self, rows: np.ndarray) -> "RunData":
        """The rows ``rows`` as a run held in memory (its row i is row ``rows[i]`` here), read
        once: a sample to fit on without reading a streamed cache again."""
        r = self.rows(rows)
        x = self.x[r] if self.x is not None else self.gather(rows)  # resident: kept in its precision
        return replace(self, x=x, y=self.y[r], dom=self.dom[r], chunks=None, passes=0, origin=self.cache_rows(rows))

    def val_groups(self, rows: np.ndarray) -> tuple[torch.Tensor, int] | None:
        """Per validation row of ``rows``, its group in the scores, and the number of groups:
        None (every row alike), or with ``balance_domains`` and several domains among
        ``rows``, the row's domain, so that the accuracy is the mean over the domains of each
        domain's accuracy (counted per domain: equal hits give equal scores)."""
        if not self.balance_domains or not len(rows):
            return None
        _, groups = torch.unique(self.dom[self.rows(rows)], return_inverse=True)
        n = int(groups.max()) + 1
        return (groups, n) if n > 1 else None

    def labelled_rows(self, rows: np.ndarray) -> Rows:
        """Rows with their labels (validation rows: the probe's accuracy is read off them,
        per group of :meth:`val_groups` when that is not None: the group ids ride in the
        blocks' weight slot, ``Rows.groups`` says how many); the resident cache itself,
        indexed (no copy), or read again on every pass when streamed."""
        grouped = self.val_groups(np.asarray(rows))
        ids, n_groups = grouped if grouped is not None else (None, 0)
        if self.x is not None:
            index = self.rows(rows)
            built = [(self.x, self.y[index], ids, index)]
            return Rows(lambda: built, self.embed_dim, self.n_classes, len(rows), self.device, groups=n_groups)

        def blocks():
            for pos, x in self.stream(rows):
                yield x, self.y[self.rows(rows[pos])], None if ids is None else ids[self.rows(pos)]

        return Rows(blocks, self.embed_dim, self.n_classes, len(rows), self.device, groups=n_groups)

    def class_weights(self, counts: torch.Tensor) -> torch.Tensor:
        """Per class, the weight of a training row with that (hard) label, from the training
        rows' class ``counts``: 1/N, or with --class-weight inversely to its class's count
        (the weights sum to 1 over the rows either way)."""
        if self.settings.class_weight:
            return 1.0 / (counts.clamp(min=1) * int((counts > 0).sum()))
        return torch.full((self.n_classes,), 1.0 / max(1, int(counts.sum())), device=self.device)

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """The embeddings of ``rows`` in their order, in memory (for samples of rows)."""
        out = torch.empty((len(rows), self.embed_dim), device=self.device)
        for pos, x in self.stream(rows):
            out[torch.as_tensor(pos, device=self.device)] = x
        return out

    def calibration(self, W: torch.Tensor, b: torch.Tensor, rows: np.ndarray) -> dict:
        """Temperature scaling of both sides of an ensemble on labelled ``rows`` (validation
        rows of the training domains): the probe's logit scale and the zero-shot temperature
        that make each side's probabilities calibrated, so that an ensemble weight λ means
        the same mix whatever the probe's weight decay."""
        logits, zs, y = [], [], []
        with torch.no_grad():
            for pos, x in self.stream(rows):
                logits.append(torch.addmm(b, x, W))
                zs.append(zero_shot_logits(x, self.text, 1.0))
                y.append(self.y[self.rows(rows[pos])])
        logits, zs, y = torch.cat(logits), torch.cat(zs), torch.cat(y)
        return {"logit_scale": 1.0 / calibrate_temperature(logits, y), "zero_shot_temperature": calibrate_temperature(zs, y)}

    def probe_scores(self, probe: LinearProbe, rows: np.ndarray) -> tuple[float, float]:
        """(accuracy, mean log-loss) of ``probe``'s predictions on labelled ``rows``."""
        grouped = self.val_groups(np.asarray(rows))
        ids, g = grouped if grouped is not None else (torch.zeros(len(rows), dtype=torch.long, device=self.device), 1)
        correct, loss, n = (torch.zeros(g, dtype=torch.float64, device=self.device) for _ in range(3))
        with torch.no_grad():
            for pos, x in self.stream(np.asarray(rows)):
                p, y = probe.predict_proba(x), self.y[self.rows(np.asarray(rows)[pos])]
                at = ids[self.rows(pos)]
                correct.index_add_(0, at, (p.argmax(1) == y).double())
                loss.index_add_(0, at, -p.gather(1, y[:, None])[:, 0].clamp(min=1e-30).log().double())
                n.index_add_(0, at, torch.ones(len(y), dtype=torch.float64, device=self.device))
        if not len(rows):
            return float("nan"), float("nan")
        # per group, then the mean over groups (rounded: equal means of other hit counts compare equal)
        return round(float((correct / n).mean()), 12), round(float((loss / n).mean()), 12)

    def logit_scores(self, logits: torch.Tensor, rows: np.ndarray) -> list[tuple[float, float]]:
        """(accuracy, mean log-loss) of each candidate's logits ``(P, n, C)`` (or one's, ``(n, C)``) on labelled ``rows``
        (in memory, in ``rows``' order), per group of :meth:`val_groups` then averaged, as
        :meth:`probe_scores` scores a probe."""
        rows = np.asarray(rows)
        logits = logits if logits.dim() == 3 else logits[None]  # one candidate: (n, C)
        if not len(rows):
            return [(float("nan"), float("nan"))] * len(logits)
        grouped = self.val_groups(rows)
        ids, g = grouped if grouped is not None else (torch.zeros(len(rows), dtype=torch.long, device=self.device), 1)
        y = self.y[self.rows(rows)]
        logp = logits.double().log_softmax(-1)
        hits = (logits.argmax(-1) == y).double()  # (P, n)
        losses = -logp.gather(2, y.view(1, -1, 1).expand(len(logits), -1, 1))[..., 0]
        n = torch.bincount(ids, minlength=g).double()
        acc = torch.zeros(len(logits), g, dtype=torch.float64, device=self.device).index_add_(1, ids, hits) / n
        loss = torch.zeros(len(logits), g, dtype=torch.float64, device=self.device).index_add_(1, ids, losses) / n
        return [(round(float(a), 12), round(float(l), 12)) for a, l in zip(acc.mean(1), loss.mean(1))]

    def make_probe(self, W: torch.Tensor, b: torch.Tensor, ensemble: float = 0.0,
                   calibration: dict | None = None, gate: dict | None = None, parts: dict | None = None) -> LinearProbe:
        """A probe with weights ``W`` (d, C), bias ``b``, the class prompts for its ensemble
        and, for an ensemble, its :meth:`calibration` and (input-adaptive) its ``gate``;
        ``parts``: a few-shot method's cache model or adapter (:attr:`Fit.parts`)."""
        c, g = calibration or {}, gate or {}
        cache, adapter = (parts or {}).get("cache"), (parts or {}).get("adapter")
        probe = LinearProbe(ProbeConfig(self.embed_dim, self.n_classes, ensemble,
                                        c.get("zero_shot_temperature", TEMPERATURE), c.get("logit_scale", 1.0),
                                        gate_max=g.get("max", 0.0), gate_center=g.get("center", 0.0),
                                        gate_width=g.get("width", 1.0),
                                        n_keys=len(cache["keys"]) if cache else 0,
                                        cache_alpha=cache["alpha"] if cache else 0.0,
                                        cache_beta=cache["beta"] if cache else 1.0,
                                        adapter_hidden=len(adapter["down"]) if adapter else 0,
                                        adapter_ratio=adapter["ratio"] if adapter else 0.2))
        with torch.no_grad():
            probe.linear.weight.copy_(W.T.cpu())
            probe.linear.bias.copy_(b.cpu())
            probe.text.copy_(self.text.cpu())
            if gate:
                probe.gate_means.copy_(gate["means"].cpu())
                probe.gate_precision.copy_(gate["precision"].cpu())
            if cache:
                probe.cache_keys.copy_(cache["keys"].cpu())
                probe.cache_values.copy_(cache["values"].cpu())
            if adapter:
                probe.adapter[0].weight.copy_(adapter["down"].cpu())
                probe.adapter[2].weight.copy_(adapter["up"].cpu())
        return probe.to(self.device).eval()


class Method:
    """A stage-3 method: subclass it, set the class attributes, implement :meth:`fit` and
    :meth:`refit`, and register it with :func:`vlaug.methods.register`.

    An instance is one ``--method`` spec: ``NAME[:HEAD_DIR][?key=value&...]``.
    """

    name: ClassVar[str]  # what users write in --method
    summary: ClassVar[str] = ""  # one line for the method list
    Options: ClassVar[type[Options]] = Options  # its options (a frozen dataclass)
    head_kinds: ClassVar[tuple[str, ...]] = ()  # kinds of trained head it needs (vlaug train-box); () for none
    streams: ClassVar[bool] = True  # whether it can train on a cache streamed from disk
    plots_box_volumes: ClassVar[bool] = False  # its head's box volumes are plotted (LARE's Tables 4 and 5)
    path_argument: ClassVar[str] = ""  # a method written NAME:PATH whose PATH is no head (e.g. cdga:GEN_FEATURES)
    # the splits (by index) that are leave-one-domain-out folds (vlaug.evaluate sets them on the instance): each is
    # scored for the mean over its folds, which chooses (vlaug.domainbed.extended_choice), not by a choice of its own
    folds: frozenset[int] = frozenset()

    def __init__(self, text: str, head: str = "", options: Options | None = None):
        self.text = text  # as the user wrote it: the method's name in reports
        self.head = head  # head directory (methods that need a head)
        self.options = options if options is not None else self.Options()
        self.group = text  # the --method spec it came from: one of several configurations when that spec lists values
        self.config = {}  # the listed options' values this configuration takes ({} when the spec lists none)
        self.path = ""  # NAME:PATH of a method with a path_argument

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text!r})"

    @property
    def ensemble(self) -> float:
        return getattr(self.options, "ensemble", 0.0)

    def bind(self, feats: FeatureCache, train_domains: list[str]) -> str | None:
        """Check the method against the cache before any training (e.g. the prompt sets it
        needs); raise UsageError with the fix. Called once per run, before :meth:`extra_rows`.
        Returns a warning for the report (what this cache makes of the method), or None."""
        return None

    def bind_tasks(self, feats: FeatureCache, domain_sets: list[list[str]]) -> str | None:
        """:meth:`bind` under ``--protocol leave-one-domain-out``, where the training domains
        differ between fits: ``domain_sets`` holds each fit's (its test domain, and a fold's
        validation domain, left out). By default the method is bound to every domain, for a
        method whose checks do not depend on which domains train."""
        return self.bind(feats, sorted({d for s in domain_sets for d in s}))

    def check_splits(self, splits: list["Splits"]) -> None:
        """Refuse (UsageError, with the fix) splits this method cannot train on, before any
        training (e.g. a cache model of more keys than it holds); under ``--method all`` the
        method is left out instead, with the reason."""

    def reweighting_conflict(self) -> str:
        """Why --reweight cannot apply to this method ('' when it can, or has no rows of its
        own to reweight: then the report says it was not applied)."""
        return ""

    def prompt_sets(self) -> list[str]:
        """The cache's prompt sets the method uses (reported with their templates): the
        class prompts when it mixes in zero-shot."""
        return [CLASSES_PROMPT_SET] if self.ensemble > 0 else []

    def extra_rows(self) -> int:
        """How many rows the method adds per training row (sizes the streamed chunks); 0 for
        methods that add none."""
        return 0

    def augment(self, data: RunData, x: torch.Tensor, y: torch.Tensor, dom: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The extra training rows ``(x, soft targets)`` the method adds to rows ``x`` with
        labels ``y`` and domain indices ``dom``; None when it adds none."""
        return None

    def augmenter(self, data: RunData, rows: np.ndarray):
        """The :meth:`augment` of a fit on the training rows ``rows`` (same signature): a
        method whose extras depend on the fit's training domains (prompt-shift's target
        prompt sets) binds them here."""
        return self.augment

    def fit(self, data: RunData, splits: "Splits", seed: int) -> Fit:
        """Train on ``splits.train``, selecting hyperparameters on ``splits.val``."""
        raise NotImplementedError

    def refit(self, data: RunData, rows: np.ndarray, seed: int, selection: dict) -> Fit:
        """Train on ``rows`` (train + val) at the hyperparameters ``selection`` chose."""
        raise NotImplementedError

    def search_space(self) -> str:
        """What this method's own search chooses among, for the report, where its options do
        not say it (e.g. Tip-Adapter's α × β grid); "" otherwise."""
        return ""

    def extends_grid(self) -> bool:
        """Whether a search of this method goes on past an end of the weight-decay grid that
        it chose (:func:`vlaug.methods.linear.extend_grid`); then :meth:`fold_candidate` fits
        a value past the grid for the mean over leave-one-domain-out folds."""
        return False

    def fold_candidate(self, data: RunData, splits: "Splits", seed: int, weight_decay: float) -> dict:
        """The search entry of split ``seed`` (a leave-one-domain-out fold) at ``weight_decay``,
        a value past the grid: for a method that :meth:`extends_grid`."""
        raise NotImplementedError

    def batch_values(self, data: RunData, splits: list["Splits"]) -> float | None:
        """How many values the rows this method builds for every seed's search would hold
        (0: it fits on rows of the cache), or None where its searches cannot join a batch
        (:class:`~vlaug.methods.batching.ProbeSolver`)."""
        return None

    def batch_plan(self, data: RunData, splits: list["Splits"]) -> BatchPlan:
        """Its part of a batched search: the seeds' training and validation rows, its
        built rows, start and anchor (asked only where :meth:`batch_values` is not None)."""
        raise NotImplementedError

    def deployed(self, data: RunData, W: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear part of what the method deploys from fitted weights ``W``, ``b`` (e.g. a
        WiSE mix with the zero-shot classifier); the fitted weights themselves by default."""
        return W, b

    def deploys_fit_as_is(self, gate: dict | None = None) -> bool:
        """Whether the deployed classifier is the fitted ``x W + b`` itself: no :meth:`deployed`
        mix, no zero-shot ensemble, no gate (then its validation scores are the fit's)."""
        return type(self).deployed is Method.deployed and self.ensemble == 0 and gate is None

    def deployed_scores(self, data: RunData, thetas: torch.Tensor, val: np.ndarray,
                        gate: dict | None = None) -> list[tuple[float, float]]:
        """Validation ``(accuracy, log-loss)`` of exactly what this method deploys, for each
        candidate of ``thetas`` (P, d + 1, C: the fitted W over b): its :meth:`deployed` mix,
        and for an ensemble (or a ``gate``) both sides calibrated on the same ``val`` rows,
        as the run calibrates the kept candidate. Every selection is made on these scores and
        ``val_accuracy`` records them (issue 27: never the fit's scores when another model is
        deployed)."""
        val = np.asarray(val)
        if self.deploys_fit_as_is(gate):
            return validation_scores(data.labelled_rows(val), thetas)
        if not len(val):
            return [(float("nan"), float("nan"))] * len(thetas)
        return [self.final_scores(data, *self.deployed(data, theta[:-1], theta[-1]), val, gate) for theta in thetas]

    def final_scores(self, data: RunData, W: torch.Tensor, b: torch.Tensor, val: np.ndarray,
                     gate: dict | None = None) -> tuple[float, float]:
        """Validation ``(accuracy, log-loss)`` of the probe deployed with the final weights
        ``W``, ``b`` (after :meth:`deployed`): with the method's zero-shot ensemble (or
        ``gate``), both sides calibrated on ``val`` as the run calibrates them."""
        calibration = data.calibration(W, b, val) if (self.ensemble or gate) else None
        return data.probe_scores(data.make_probe(W, b, self.ensemble, calibration, gate), val)

    def fit_seeds(self, data: RunData, splits: list["Splits"], solver, searched: dict[int, Search] | None = None) -> list[Fit]:
        """:meth:`fit` on every seed's splits (seed i: ``splits[i]``). ``solver``: the run's
        :class:`~vlaug.methods.batching.ProbeSolver`, for methods that share work between
        seeds; ``searched``: the searches it already ran for this method, by seed."""
        return [self.fit(data, s, seed) for seed, s in enumerate(splits)]
