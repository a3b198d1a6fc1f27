"""``cdga:GEN_FEATURES``: the linear probe on the original rows plus CDGA's generated images
(Hemati et al., 2023), embedded by ``vlaug embed GEN_DIR`` with the main cache's model.

Split hygiene is the method's heart: for the rows a fit trains on (a seed's training rows,
or a DomainBed task's), a generated row is used only when the row it was made from
(``source_id``) is one of them, its source and target domains are training domains of that
fit, and (image-guided) its guide (``guide_id``) is one of them too. A generated row from a
validation or test row, or moved towards a test domain, is never used. A prompt-guided row
whose target is a domain named only by text (no image of it in the cache) is allowed only
with ``text_targets=true``, as LADS and LARE use a domain's name: off by default, and the
report's selection says how many rows each rule left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlaug import cache as cache_io
from vlaug.errors import UsageError
from vlaug.methods.base import EnsembleOptions
from vlaug.methods.linear import ProbeMethod
from vlaug.methods.registry import register
from vlaug.probe import Rows

REASONS = ("source not a training row", "source domain not a training domain", "target domain not a training domain",
           "guide not a training row")


@dataclass(frozen=True)
class CDGAOptions(EnsembleOptions):
    # allow prompt-guided rows moved towards a domain with no image in the cache (named by text only, as LADS does)
    text_targets: bool = False


@register
class CDGA(ProbeMethod):
    name = "cdga"
    summary = ("originals + CDGA's generated images (vlaug generate, then vlaug embed GEN_DIR), only those made from "
               "this fit's training rows, between its training domains")
    Options = CDGAOptions
    path_argument = "GEN_FEATURES"

    def bind(self, feats, train_domains):
        gen = cache_io.read_manifest(self.path) if cache_io.is_cache(self.path) else None
        if gen is None:
            raise UsageError(f"--method {self.text!r}: {self.path!r} is not a feature cache; embed the generated folder "
                             "first: vlaug embed GEN_DIR --out GEN_FEATURES (same --model as the main cache).")
        m = feats.manifest
        if (gen.model, gen.pretrained, gen.embed_dim) != (m.model, m.pretrained, m.embed_dim):
            raise UsageError(f"--method {self.text!r}: {self.path!r} was embedded with {gen.model} / {gen.pretrained} "
                             f"(d = {gen.embed_dim}), the cache with {m.model} / {m.pretrained} (d = {m.embed_dim}); "
                             "embed the generated folder with the cache's --model and --pretrained.")
        unknown = sorted(set(gen.classes) - set(m.classes))
        if unknown:
            raise UsageError(f"--method {self.text!r}: the generated set's classes {unknown[:5]} are not the cache's.")
        return None

    def batch_values(self, data, splits):
        return None  # its rows are built per fit (the generated rows that fit's training rows allow): searched alone

    def _generated(self, data):
        """The generated cache, read once: embeddings, labels in the main cache's class order,
        provenance columns, and the main cache's row ids and domains with images."""
        if getattr(self, "_gen", None) is None:
            gen = cache_io.read_cache(self.path)
            columns = cache_io.read_columns(self.path, ["source_id", "source_domain", "target_domain", "guide_id"])
            index = {c: i for i, c in enumerate(data.feats.classes)}
            labels = np.asarray([index[gen.manifest.classes[c]] for c in gen.labels], dtype=np.int64)
            ids = np.asarray([i for chunk in cache_io.iter_ids(data.features) for i in chunk], dtype=object)
            self._gen = {"x": torch.as_tensor(gen.embeddings, device=data.device), "y": torch.as_tensor(labels, device=data.device),
                         **columns, "main_ids": ids, "image_domains": set(np.unique(data.feats.domains).tolist()) - {""}}
        return self._gen

    def allowed(self, data, rows: np.ndarray) -> tuple[np.ndarray, dict]:
        """The generated rows a fit on cache rows ``rows`` may use, and how many each rule left out."""
        g = self._generated(data)
        rows = data.cache_rows(rows)  # a sampled search's subset: its rows are the cache's elsewhere
        ids = set(g["main_ids"][rows].tolist())
        domains = set(data.feats.domains[rows].tolist()) - {""}
        target_ok = np.isin(g["target_domain"], list(domains))
        if self.options.text_targets:  # a domain with no image in the cache: named by text only
            target_ok |= ~np.isin(g["target_domain"], list(g["image_domains"]))
        checks = [np.fromiter((s in ids for s in g["source_id"]), bool, len(g["source_id"])),
                  np.isin(g["source_domain"], list(domains)), target_ok,
                  np.fromiter((not s or s in ids for s in g["guide_id"]), bool, len(g["guide_id"]))]
        keep, left_out = np.ones(len(g["source_id"]), bool), {}
        for reason, ok in zip(REASONS, checks):  # each row counted under the first rule it breaks
            left_out[reason] = int((keep & ~ok).sum())
            keep &= ok
        return np.flatnonzero(keep), left_out

    def training_rows(self, data, rows, seed):
        rows = np.asarray(rows, dtype=np.int64)
        g = self._generated(data)
        use, _ = self.allowed(data, rows)
        xg, yg = g["x"][torch.as_tensor(use, device=data.device)].float(), g["y"][torch.as_tensor(use, device=data.device)]
        c = data.n_classes
        counts = torch.bincount(data.y[data.rows(rows)], minlength=c).float() + torch.bincount(yg, minlength=c).float()
        per_class = data.class_weights(counts)
        index = data.rows(rows)

        def blocks():
            if data.x is not None:
                yield data.x, data.y[index], per_class[data.y[index]], index
            else:
                for pos, x in data.stream(rows):
                    y = data.y[data.rows(rows[pos])]
                    yield x, y, per_class[y]
            if len(use):
                yield xg, yg, per_class[yg]

        return Rows(blocks, data.embed_dim, c, len(rows) + len(use), data.device)

    def _counts(self, data, rows) -> dict:
        use, left_out = self.allowed(data, rows)
        return {"n_generated": int(len(use)), "generated_left_out": left_out, "text_targets": self.options.text_targets}

    def fit(self, data, splits, seed, found=None):
        fit = super().fit(data, splits, seed, found)
        fit.selection.update(self._counts(data, splits.train))
        return fit

    def refit(self, data, rows, seed, selection):
        fit = super().refit(data, rows, seed, selection)
        fit.selection.update(self._counts(data, rows))
        return fit
