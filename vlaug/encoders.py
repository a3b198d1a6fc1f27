"""open_clip encoders: model names, pretrained weights (tag, local file or random init),
preprocessing, tokenizers and prompt templates.

Importing this module registers vlaug's tiny model configs (``vlaug-tiny`` and
``vlaug-tiny-coca``: 2 layers, width 64, 32-px input) with open_clip, so the demo and
the tests run without downloading weights.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
import torchvision.transforms as T
import torch.nn.functional as F

from vlaug.choices import CLASSES_PROMPT_SET
from vlaug.devices import autocast, resolve_device, resolve_precision
from vlaug.errors import EncoderError, UsageError

TINY_MODEL = "vlaug-tiny"
RANDOM_WEIGHTS = "none"
open_clip.add_model_config(Path(__file__).parent / "model_configs")

# Prompt templates. `simple` is the 7-template subset of CLIP's ImageNet ensemble that
# OpenAI's prompt-engineering notebook recommends (open_clip's SIMPLE_IMAGENET_TEMPLATES);
# `openai` is the full 80-template ensemble; `photo` is LARE's single prompt.
TEMPLATE_PRESETS: dict[str, list[str]] = {
    "simple": [t("{}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES],
    "openai": [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES],
    "photo": ["a photo of a {}."],
}
_PROMPT_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- templates


def check_template(template: str, where: str) -> str:
    """Return ``template`` if it formats a class name through exactly one ``{}``."""
    if "{}" not in template:
        raise UsageError(f"template {template!r} ({where}) has no '{{}}' where the class name goes. Add '{{}}'.")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        raise UsageError(
            f"template {template!r} ({where}) must contain '{{}}' and no other braces; write a literal brace as '{{{{'."
        ) from None
    return template


def read_templates_file(path: str | os.PathLike) -> list[str]:
    """One template per line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(
            f"templates {str(path)!r} is neither a preset ({', '.join(TEMPLATE_PRESETS)}) nor a file. "
            "Pass a preset name or a text file with one template per line."
        )
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    templates = [check_template(ln, str(p)) for ln in lines if ln and not ln.startswith("#")]
    if not templates:
        raise UsageError(f"templates file {str(p)!r} holds no template. Write one per line, e.g. 'a photo of a {{}}.'")
    return templates


def resolve_templates(spec: str) -> list[str]:
    """A preset name (``simple``, ``openai``, ``photo``) or a templates file."""
    if spec in TEMPLATE_PRESETS:
        return list(TEMPLATE_PRESETS[spec])
    return read_templates_file(spec)


def parse_prompt_sets(specs: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """Parse ``NAME=TEMPLATE`` or ``NAME=@FILE`` specs; a name given twice collects several templates."""
    sets: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise UsageError(f"--prompt-set {spec!r} must look like NAME=TEMPLATE, e.g. \"painting=a painting of a {{}}.\"")
        if not _PROMPT_SET_NAME.match(name) or name == CLASSES_PROMPT_SET:
            raise UsageError(
                f"--prompt-set name {name!r} must be letters, digits, '_', '-' or '.', and not {CLASSES_PROMPT_SET!r}."
            )
        templates = read_templates_file(value[1:]) if value.startswith("@") else [check_template(value, f"--prompt-set {name}")]
        sets.setdefault(name, []).extend(templates)
    return sets


# ----------------------------------------------------------------------------- model spec


@dataclass(frozen=True)
class EncoderSpec:
    model: str  # as given: a built-in name, or hf-hub:ORG/REPO, or local-dir:PATH
    pretrained: str  # "none", a tag, an absolute checkpoint path, or "" when the schema carries weights
    checkpoint_sha256: str | None = None  # of a local checkpoint file

    @property
    def random_weights(self) -> bool:
        return self.pretrained == RANDOM_WEIGHTS


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_encoder_spec(model: str, pretrained: str | None) -> EncoderSpec:
    """Validate a model name and pretrained value without loading or downloading anything.

    Raises:
        EncoderError: unknown model, unknown pretrained tag, missing checkpoint file.
    """
    pretrained = (pretrained or "").strip()
    if pretrained.lower() == RANDOM_WEIGHTS:
        pretrained = RANDOM_WEIGHTS
    if model.startswith(("hf-hub:", "local-dir:")):
        if model.startswith("local-dir:") and not Path(model[len("local-dir:"):]).is_dir():
            raise EncoderError(f"--model {model!r}: folder not found. Pass a folder with open_clip_config.json and weights.")
        # the weights come with the hub repo or the folder; --pretrained none still gives random weights
        return EncoderSpec(model, RANDOM_WEIGHTS if pretrained == RANDOM_WEIGHTS else "")

    name = model.replace("/", "-")
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise EncoderError(
            f"unknown model {model!r}.{hint} Pass an open_clip name (e.g. ViT-B-32, ViT-L-14, coca_ViT-B-32; "
            "`python -c \"import open_clip; print(open_clip.list_models())\"` lists them), hf-hub:ORG/REPO or local-dir:PATH."
        )
    if pretrained == RANDOM_WEIGHTS:
        return EncoderSpec(name, RANDOM_WEIGHTS)
    if not pretrained:
        raise EncoderError(
            f"--pretrained is empty. Pass a tag ({', '.join(open_clip.list_pretrained_tags_by_model(name)[:4]) or 'none known'}),"
            " a checkpoint file, or 'none' for random weights."
        )
    if Path(pretrained).is_file():
        path = Path(pretrained).resolve()
        return EncoderSpec(name, str(path), _sha256(path))
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags or open_clip.get_pretrained_cfg(name, pretrained):
        return EncoderSpec(name, pretrained)
    looks_like_path = os.sep in pretrained or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors", ".npz")
    if looks_like_path:
        raise EncoderError(f"--pretrained {pretrained!r}: checkpoint file not found. Check the path.")
    raise EncoderError(
        f"unknown pretrained tag {pretrained!r} for {name}; known tags: {tags or 'none'}. "
        "Pass one of them, a local checkpoint file, or 'none' for random weights."
    )


# ----------------------------------------------------------------------------- encoder


class _ToUInt8Tensor:
    """PIL image -> (3, H, W) uint8 tensor: ToTensor without the float conversion."""

    def __call__(self, pic):
        return torch.from_numpy(np.array(pic.convert("RGB"), dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def split_preprocess(preprocess: Callable) -> tuple[Callable, tuple, tuple] | None:
    """Split open_clip's eval transform into a PIL part that ends in uint8 and (mean, std).

    open_clip's eval transform is ``Compose([Resize, CenterCrop, convert RGB, ToTensor,
    Normalize])``. Decoding workers then send uint8 tensors (4x less to copy and pin) and
    the float conversion and normalisation run batched on the model's device, with the
    same operations in the same order as ToTensor and Normalize (identical results).
    Returns None for a transform of another shape, which then runs whole in the workers.
    """
    steps = getattr(preprocess, "transforms", None)
    if not steps or len(steps) < 2:
        return None
    # everything before ToTensor already works on PIL images
    *pil_steps, to_tensor, normalize = steps
    if not isinstance(to_tensor, T.ToTensor) or not isinstance(normalize, T.Normalize):
        return None
    return T.Compose([*pil_steps, _ToUInt8Tensor()]), tuple(normalize.mean), tuple(normalize.std)


@dataclass
class Encoder:
    """A frozen open_clip model with its preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable  # PIL image -> (3, H, W) float tensor: open_clip's eval transform
    tokenizer: Callable
    spec: EncoderSpec
    embed_dim: int
    device: torch.device
    precision: str
    # PIL image -> (3, H, W) uint8 tensor, and the normalisation encode_images applies to
    # uint8 input; None when the transform could not be split (workers then run `preprocess`)
    preprocess_uint8: Callable | None = None
    mean: tuple | None = None
    std: tuple | None = None

    @property
    def worker_preprocess(self) -> Callable:
        """What decoding workers run: the uint8 part when there is one."""
        return self.preprocess_uint8 or self.preprocess

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) images -> (n, d) L2-normalised float32 embeddings.

        ``images`` are either preprocessed floats or uint8 from ``preprocess_uint8``,
        which are scaled and normalised here exactly as ToTensor + Normalize would.
        """
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            if self.mean is None:
                raise ValueError("uint8 images need an encoder whose preprocessing was split (preprocess_uint8)")
            mean = torch.as_tensor(self.mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=torch.float32, device=self.device).view(-1, 1, 1)
            images = images.to(torch.float32).div(255).sub_(mean).div_(std)
        with autocast(self.device, self.precision):
            features = self.model.encode_image(images, normalize=False)
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_prompts(self, class_names: list[str], templates: list[str]) -> torch.Tensor:
        """The CLIP template ensemble: (n_classes, d) float32, one normalised row per class.

        Each template is encoded and normalised, the templates of a class are averaged and
        the mean is re-normalised: exactly open_clip's ``build_zero_shot_classifier``.
        Underscores in class names become spaces in the prompts (``paint_can`` -> ``paint can``).
        """
        names = [c.replace("_", " ") for c in class_names]
        with autocast(self.device, self.precision):
            weights = open_clip.build_zero_shot_classifier(
                self.model, self.tokenizer, names, templates, num_classes_per_batch=10, device=self.device
            )
        return F.normalize(weights.T.float(), dim=-1).cpu()


def load_encoder(
    model: str = TINY_MODEL,
    pretrained: str | EncoderSpec = RANDOM_WEIGHTS,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    text_only: bool = False,
) -> Encoder:
    """Build an open_clip model in eval mode.

    Args:
        model: open_clip model name, ``hf-hub:ORG/REPO`` or ``local-dir:PATH``.
        pretrained: a tag (downloaded by open_clip), a local checkpoint file, or
            ``none`` for random weights seeded by ``seed`` (same seed -> same weights).
        device: ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
        precision: ``auto`` (bf16/fp16 autocast on GPU, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
        text_only: drop the image tower before moving the model to ``device`` (for
            encoding prompts only: ``encode_images`` then cannot be used).

    Raises:
        EncoderError: unknown model or tag, a checkpoint that does not fit the model, a
            failed download.
    """
    spec = pretrained if isinstance(pretrained, EncoderSpec) else check_encoder_spec(model, pretrained)
    check_weights_reachable(spec)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    kwargs = dict(device="cpu", precision="fp32")
    if spec.model.startswith(("hf-hub:", "local-dir:")):
        kwargs["load_weights"] = not spec.random_weights
    elif not spec.random_weights:
        kwargs["pretrained"] = spec.pretrained
    try:
        # Random weights come from a private generator state: same seed, same model, and
        # the caller's global RNG is left as it was.
        with torch.random.fork_rng(devices=[]), _quiet_open_clip(spec.random_weights):
            torch.manual_seed(seed)
            built = _create_text_only(spec) if text_only and "pretrained" in kwargs else None
            net, preprocess = built or open_clip.create_model_and_transforms(spec.model, **kwargs)[::2]
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
        if "Error(s) in loading state_dict" in str(e) or "size mismatch" in str(e):
            raise EncoderError(
                f"checkpoint {spec.pretrained!r} does not fit model {spec.model}: {reason}. "
                "Pass the --model the checkpoint was trained with."
            ) from None
        raise EncoderError(
            f"could not load {spec.model} weights {spec.pretrained!r}: {reason}. Without internet access, download the "
            "checkpoint elsewhere and pass its file with --pretrained PATH."
        ) from None
    except (OSError, ValueError) as e:
        raise EncoderError(f"could not load {spec.model} weights {spec.pretrained!r}: {' '.join(str(e).split())}. "
                           f"{_OFFLINE_FIX}") from None
    if text_only:
        net.visual = None  # prompts need only the text tower: the image tower never reaches the device
    net = net.to(dev).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(spec.model)
    embed_dim = _text_dim(net, tokenizer) if text_only else _embed_dim(net)
    split = split_preprocess(preprocess)
    pil_part, mean, std = split if split else (None, None, None)
    return Encoder(net, preprocess, tokenizer, spec, embed_dim, dev, prec, pil_part, mean, std)


_OFFLINE_FIX = ("Without internet access: download the weights once on a machine with access (open_clip caches them "
                "in ~/.cache/huggingface), or pass a local checkpoint file with --pretrained PATH (--pretrained none "
                "gives random weights, for tests only).")


def _weights_source(spec: EncoderSpec) -> tuple[str, list[tuple[str, str]]] | None:
    """Where open_clip would download ``spec``'s weights from: (host, [(hub repo, file), ...]
    that may already be in the local hub cache); None when nothing is downloaded."""
    from urllib.parse import urlparse

    if spec.random_weights or spec.checkpoint_sha256:
        return None
    hub_host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    if spec.model.startswith("hf-hub:"):
        repo = spec.model[len("hf-hub:"):]
        return hub_host, [(repo, f) for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")]
    if spec.model.startswith("local-dir:") or not spec.pretrained:
        return None
    cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained) or {}
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # "org/name/" (default file names) or "org/name/file"
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            names.insert(0, filename[: -len(".bin")] + ".safetensors")
        return hub_host, [(repo, n) for n in names]
    if cfg.get("url"):
        return urlparse(cfg["url"]).hostname or "", []
    return None


def _is_cached(files: list[tuple[str, str]]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo, name), str) for repo, name in files)


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """One short TCP connection to ``host``:443 (a proxy, when one is set, is trusted instead)."""
    import socket

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_weights_reachable(spec: EncoderSpec) -> None:
    """Fail fast, before open_clip spends a minute in download retries, when the weights of
    ``spec`` are not in the local cache and cannot be downloaded: offline mode
    (``HF_HUB_OFFLINE``) or the host unreachable after one short attempt.

    Raises:
        EncoderError: naming the weights, why, and the fix.
    """
    where = _weights_source(spec)
    if where is None:
        return
    host, files = where
    if files and _is_cached(files):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline and files:
        why = "HF_HUB_OFFLINE is set and they are not in the local cache"
    elif not _reachable(host):
        why = f"{host} cannot be reached (no internet access?)"
    else:
        return
    name = spec.model if spec.model.startswith("hf-hub:") else f"{spec.model} weights {spec.pretrained!r}"
    raise EncoderError(f"cannot download {name}: {why}. {_OFFLINE_FIX}")


@contextlib.contextmanager
def _quiet_open_clip(quiet: bool):
    """Silence open_clip's own "initialized randomly" log line; vlaug prints a louder one."""
    root = logging.getLogger()
    level = root.level
    if quiet:
        root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _state_without_visual(path: str) -> dict:
    """A checkpoint's state dict without the image tower: from a safetensors file only the
    other tensors are read; other formats are read whole, then filtered."""
    visual = ("visual.", "module.visual.")
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(visual)}
    else:
        state = open_clip.factory.load_state_dict(path)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("visual.")}


def _create_text_only(spec: EncoderSpec) -> tuple[torch.nn.Module, Callable] | None:
    """The model with its text tower loaded from the checkpoint and its image tower never
    read (for ``vlaug prompts``); None when the checkpoint's layout is not the plain one,
    and the caller then loads the whole model."""
    from open_clip.factory import convert_state_dict, convert_to_custom_text_state_dict, resize_text_pos_embed

    if spec.checkpoint_sha256:
        path = spec.pretrained
    else:
        path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(spec.model, spec.pretrained))
    if not path or Path(path).suffix in (".npz", ".npy"):
        return None
    with _quiet_open_clip(True):  # built without weights on purpose: the text tower's come next
        net, _, preprocess = open_clip.create_model_and_transforms(spec.model, device="cpu", precision="fp32")
    state = convert_state_dict(net, _state_without_visual(path))
    if "positional_embedding" in state and not hasattr(net, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    resize_text_pos_embed(state, net)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("visual.") for k in missing):
        return None  # not the layout we know: the caller loads the whole checkpoint the usual way
    return net, preprocess


def _text_dim(net: torch.nn.Module, tokenizer: Callable) -> int:
    """Output dimension of encode_text, read from one encoded prompt."""
    device = next(net.parameters()).device
    with torch.no_grad():
        return int(net.encode_text(tokenizer(["a"]).to(device)).shape[-1])


def _embed_dim(net: torch.nn.Module) -> int:
    """Output dimension of encode_image, read from a 1-image forward on the model's own input size."""
    size = net.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    device = next(net.parameters()).device
    with torch.no_grad():
        return int(net.encode_image(torch.zeros(1, 3, *size, device=device)).shape[-1])
