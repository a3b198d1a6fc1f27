"""``vlaug prompts``: add or replace prompt sets and class templates of an existing cache.

Texts are not part of a cache's identity: its images stay as they are and only
``texts.parquet`` (written atomically) and the manifest's ``templates`` / ``prompt_sets``
change. The text encoder is the one the cache's images came from: the model and weights
the manifest records (a local checkpoint file is found again, at its recorded path or at
the ``--pretrained`` path given, and checked by its recorded sha256). Only the text tower
is moved to the device.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlaug import cache
from vlaug.choices import CLASSES_PROMPT_SET
from vlaug.encoders import RANDOM_WEIGHTS, EncoderSpec, check_encoder_spec, load_encoder, parse_prompt_sets, resolve_templates
from vlaug.errors import CacheMismatchError, UsageError


@dataclass(frozen=True)
class PromptsConfig:
    """Everything ``vlaug prompts`` needs; the defaults are the CLI's."""

    features: str = ""  # the cache whose texts change
    prompt_sets: tuple[str, ...] = ()  # "NAME=TEMPLATE" / "NAME=@FILE": added, or replacing a set of that name
    templates: str | None = None  # new templates of the class prompts (preset or file); None: keep them
    model: str | None = None  # None: the model the manifest records (another one is refused)
    pretrained: str | None = None  # None: the manifest's; a path: where the recorded checkpoint file is now
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self):
        if not self.prompt_sets and not self.templates:
            raise UsageError("nothing to change: give --prompt-set NAME=TEMPLATE (repeatable) and/or --templates.")


@dataclass
class PromptsResult:
    features: str
    added: list[str]  # prompt sets that are new
    replaced: list[str]  # prompt sets (or "classes") whose templates changed
    unchanged: list[str]  # given with the templates they already had

    def summary(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("added", self.added), ("replaced", self.replaced), ("unchanged", self.unchanged)) if names]
        return f"prompt sets {'; '.join(parts)} -> {self.features}/texts.parquet (images untouched)"


def _encoder_spec(manifest: cache.CacheManifest, config: PromptsConfig, where: str) -> EncoderSpec:
    """The spec of the encoder the cache's images came from; refuse another model or weights."""
    if config.model and config.model.replace("/", "-") != manifest.model.replace("/", "-"):
        raise CacheMismatchError(
            f"--model {config.model!r}: the cache {where!r} was embedded with {manifest.model!r}, and its texts must "
            "come from the same model. Leave out --model."
        )
    recorded = manifest.pretrained
    if not manifest.pretrained_sha256:  # a tag, random weights, or weights that come with the model
        if config.pretrained and config.pretrained != recorded and not (config.pretrained.lower() == RANDOM_WEIGHTS == recorded):
            raise CacheMismatchError(
                f"--pretrained {config.pretrained!r}: the cache {where!r} was embedded with {recorded!r}. Leave out --pretrained."
            )
        if manifest.model.startswith(("hf-hub:", "local-dir:")):
            return EncoderSpec(manifest.model, recorded)
        return check_encoder_spec(manifest.model, recorded or RANDOM_WEIGHTS)
    # a local checkpoint file: found again at the path given, else at the recorded one, and checked by its hash
    path = config.pretrained or recorded
    if not Path(path).is_file():
        raise UsageError(
            f"the cache {where!r} was embedded with the checkpoint file {recorded!r}, which is not there any more. "
            "Pass --pretrained PATH where the same file is now (it is checked by its sha256)."
        )
    spec = check_encoder_spec(manifest.model, path)
    if spec.checkpoint_sha256 != manifest.pretrained_sha256:
        raise CacheMismatchError(
            f"--pretrained {path!r} is not the checkpoint the cache {where!r} was embedded with (sha256 "
            f"{spec.checkpoint_sha256[:12]}..., the cache records {manifest.pretrained_sha256[:12]}...). Pass that file."
        )
    return spec


def update_prompts(config: PromptsConfig, log: Callable[[str], None] | None = None) -> PromptsResult:
    """Encode the given prompt sets (and templates) with the cache's own text encoder and
    write them into its ``texts.parquet``; ``images/`` is never touched.

    Raises:
        UsageError: not a cache, an unlabeled cache, bad templates, the checkpoint file
            missing; CacheMismatchError: another model or weights than the cache's;
            CacheLockedError: vlaug embed is writing the cache.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(config.features)
    if not cache.is_cache(out):
        raise UsageError(f"{str(out)!r} is not a vlaug feature cache (no manifest.json). Run vlaug embed first.")
    manifest = cache.read_manifest(out)
    if not manifest.classes:
        raise UsageError(f"cache {str(out)!r} is unlabeled (no classes): prompts name classes, so it has none to change.")
    templates = resolve_templates(config.templates) if config.templates else None
    sets = parse_prompt_sets(config.prompt_sets)
    spec = _encoder_spec(manifest, config, str(out))
    cache.check_unlocked(out)
    lock, _ = cache.acquire_lock(out)
    try:
        manifest = cache.read_manifest(out)  # again, under the lock
        wanted = {CLASSES_PROMPT_SET: templates, **sets} if templates else dict(sets)
        current = cache.read_text_templates(out, manifest)  # what texts.parquet was encoded from
        texts = cache.read_texts(out, manifest)
        result = PromptsResult(str(out), [], [], [])
        todo = {}
        for name, t in wanted.items():
            if name in current and current[name] == t and name in texts:
                result.unchanged.append(name)
            else:
                (result.replaced if name in current else result.added).append(name)
                todo[name] = t
        if todo:
            if spec.random_weights:
                log(f"note: {manifest.model} has RANDOM weights (seed {manifest.seed}), as the cache's images do")
            encoder = load_encoder(spec.model, spec, config.device, config.precision, manifest.seed or 0, text_only=True)
            if encoder.embed_dim != manifest.embed_dim:
                raise CacheMismatchError(f"{spec.model} encodes texts as {encoder.embed_dim}-d, the cache holds "
                                         f"{manifest.embed_dim}-d embeddings; it was not embedded with this model.")
            for name, t in todo.items():
                texts[name] = encoder.encode_prompts(manifest.classes, t).numpy()
            if templates:
                manifest.templates = templates
            manifest.prompt_sets = {**manifest.prompt_sets, **sets}
            made_from = {**current, **todo}
            order = [name for name in (CLASSES_PROMPT_SET, *manifest.prompt_sets) if name in texts]
            # texts.parquet records in its own metadata what it was encoded from, so a crash
            # between these two writes cannot make heads take new texts for old ones
            cache.write_texts(out, {name: texts[name] for name in order}, manifest.classes, made_from)
            cache.write_manifest(out, manifest)
        return result
    finally:
        cache.release_lock(lock)
