"""``vlaug generate``: CDGA's generated images (Hemati et al., 2023, "Cross Domain Generative
Augmentation: Domain Generalization with Latent Diffusion Models").

For every image of a training domain i and every other training domain j, a latent diffusion
model makes ``per_image`` new images that move it towards j:

- **CDGA-PG** (``--variant prompt``): Stable Diffusion image-to-image from the source image,
  with a prompt naming the target domain and the class (``"a {domain} of a {class}."``:
  "a sketch of a dog.").
- **CDGA-IG** (``--variant image``), for domains without a text description: an
  image-variation model conditioned on a mix (1 − λ)·e_i + λ·e_j of the CLIP image embeddings
  of the source image and of a guide image of domain j (one of the same class, drawn with the
  item's seed; any image of j when it has none of that class). The paper leaves open how the
  other domain's images condition the model; this mix is vlaug's reading (``--mix`` λ, 0.5).

What it writes, under ``GEN_DIR``: the images (``images/SRC-to-TGT/CLASS/ID_K.png``, each
written whole: a temporary file renamed into place), ``generated.parquet`` (the manifest
``vlaug embed GEN_DIR`` reads: per image ``path``, ``class``, ``domain`` (the generated set's
own, ``photo→sketch``), ``id``, ``source_id`` (the source row's id, as its cache names it),
``source_domain``, ``target_domain``, ``guide_id`` (image-guided), ``prompt``, ``seed`` and
the settings, ``seconds`` per image), ``generate.json`` (the run's settings) and
``progress.jsonl`` (one line per finished image). Every item has its own seed (from
``--seed``, its source id, target and index), so a run that is killed and started again
generates only the missing images, and the same ones it would have made in one go.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vlaug.errors import SourceError, UsageError
from vlaug.sources import GENERATED_MANIFEST  # one name for the writer and the reader

SETTINGS_NAME = "generate.json"
PROGRESS_NAME = "progress.jsonl"
VARIANTS = ("prompt", "image")
INSTALL = 'vlaug generate needs diffusers and transformers: pip install -e ".[generate]"'
# the settings a rerun must share with the run it resumes (the others, e.g. the batch size or the
# device, change how the images are made, not which)
SAME_ON_RESUME = ("model", "variant", "train_domains", "target_domains", "per_image", "strength", "guidance_scale",
                  "steps", "mix", "prompt", "seed", "size")


@dataclass(frozen=True)
class GenerateConfig:
    source: str
    out: str
    model: str  # a diffusers model id, or a local diffusers folder
    variant: str = "prompt"  # prompt (CDGA-PG) | image (CDGA-IG)
    layout: str = "auto"
    classes_file: str | None = None
    train_domains: tuple[str, ...] = ()  # default: every domain of the source
    target_domains: tuple[str, ...] = ()  # default: the training domains (a PG target may also be named by text only)
    per_image: int = 1  # generated images per source image and target domain
    strength: float = 0.75  # img2img: how far from the source image (1: pure noise)
    guidance_scale: float = 7.5  # classifier-free guidance
    steps: int = 50  # denoising steps
    mix: float = 0.5  # image-guided: λ of (1 − λ)·e_source + λ·e_guide
    prompt: str = "a {domain} of a {class}."  # prompt-guided: the template
    seed: int = 0
    batch_size: int = 4
    size: int = 512  # the images' side, in pixels (a multiple of 8)
    device: str = "auto"
    limit: int = 0  # at most this many source images (0: all): to try a model first
    progress: bool = True

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise UsageError(f"--variant {self.variant!r}; use prompt (CDGA-PG) or image (CDGA-IG).")
        if self.per_image < 1 or self.steps < 1 or self.batch_size < 1 or self.limit < 0:
            raise UsageError("--per-image, --steps and --batch-size must be >= 1 and --limit >= 0.")
        if not 0.0 < self.strength <= 1.0 or not 0.0 <= self.mix <= 1.0 or self.guidance_scale < 0:
            raise UsageError(f"--strength {self.strength} must be in (0, 1], --mix {self.mix} in [0, 1] and "
                             f"--guidance-scale {self.guidance_scale} >= 0.")
        if self.size < 8 or self.size % 8:
            raise UsageError(f"--size {self.size}: give a multiple of 8 (the autoencoder halves it three times).")
        if "{class}" not in self.prompt:
            raise UsageError(f"--prompt {self.prompt!r} must name the class with {{class}} (and the domain with {{domain}}).")


@dataclass
class Item:
    """One image to generate."""

    path: str  # relative to GEN_DIR
    class_name: str
    source_id: str
    source_path: str
    source_domain: str
    target_domain: str
    index: int
    seed: int
    guide_id: str = ""
    guide_path: str = ""
    prompt: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def domain(self) -> str:
        return f"{self.source_domain}→{self.target_domain}"


def item_seed(seed: int, source_id: str, target: str, index: int) -> int:
    """The seed of one generated image: from the run's seed, its source row, target and index."""
    digest = hashlib.blake2b(f"{seed}\x00{source_id}\x00{target}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _safe(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return keep.strip("._") or "x"


def plan_items(source, config: GenerateConfig) -> list[Item]:
    """Every image to generate, in a fixed order: source rows of the training domains (the
    source's order), each towards every other target domain, ``per_image`` each."""
    domains = list(source.domains)
    if not domains:
        raise SourceError(f"source {source.root!r} has no domains; CDGA moves images between domains. Embed a "
                          "domain/class folder or a manifest with a 'domain' column.")
    train = [d for d in (config.train_domains or domains)]
    missing = [d for d in train if d not in domains]
    if missing:
        raise UsageError(f"--train-domain {missing[0]!r} is not in the source; its domains are {domains}.")
    targets = list(config.target_domains or train)
    if config.variant == "image":
        text_only = [d for d in targets if d not in domains]
        if text_only:
            raise UsageError(f"--target-domain {text_only[0]!r} has no images in the source, and --variant image "
                             "conditions on images of the target domain; use --variant prompt to name it by text.")
    by_domain: dict[str, list] = {}
    for r in source.records:
        by_domain.setdefault(r.domain, []).append(r)
    items = []
    sources = [r for r in source.records if r.domain in train and r.label is not None]
    if config.limit:
        sources = sources[:config.limit]
    for r in sources:
        for target in targets:
            if target == r.domain:
                continue
            for k in range(config.per_image):
                s = item_seed(config.seed, r.id, target, k)
                rel = f"images/{_safe(r.domain)}-to-{_safe(target)}/{_safe(r.class_name)}/{_safe(r.id)}_{k}.png"
                item = Item(rel, r.class_name, r.id, r.path, r.domain, target, k, s)
                if config.variant == "prompt":
                    item.prompt = config.prompt.replace("{domain}", target).replace("{class}", r.class_name)
                else:
                    pool = by_domain[target]
                    same = [g for g in pool if g.class_name == r.class_name] or pool
                    guide = same[int(np.random.default_rng(s).integers(len(same)))]
                    item.guide_id, item.guide_path = guide.id, guide.path
                items.append(item)
    if not items:
        raise UsageError("nothing to generate: give at least two training or target domains with labelled images.")
    return items


def _settings(config: GenerateConfig) -> dict:
    s = asdict(config)
    for k in ("train_domains", "target_domains"):
        s[k] = list(s[k])
    return s


def _check_resume(out: Path, config: GenerateConfig) -> None:
    """A folder that holds an earlier run is resumed only with the same settings."""
    file = out / SETTINGS_NAME
    if not file.is_file():
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"--out {str(out)!r} exists and is not a vlaug generate folder; give another --out.")
        return
    before = json.loads(file.read_text(encoding="utf-8"))
    now = _settings(config)
    changed = [k for k in SAME_ON_RESUME if before.get(k) != now.get(k)]
    if changed:
        k = changed[0]
        raise UsageError(f"--out {str(out)!r} holds a run with {k} = {before.get(k)!r}, not {now.get(k)!r}; rerun with "
                         "its settings to resume it, or give another --out.")


def load_pipeline(config: GenerateConfig, device):
    """The diffusers pipeline of ``config.variant`` from ``config.model`` (an id or a folder)."""
    try:
        import diffusers
    except ImportError:
        raise UsageError(INSTALL) from None
    looks_local = Path(config.model).exists() or config.model.startswith((".", "/", "~")) or config.model.count("/") > 1
    if looks_local and not Path(config.model).expanduser().is_dir():
        raise UsageError(f"--model {config.model!r} is not a folder; give a local diffusers folder (model_index.json "
                         "inside) or a diffusers model id such as runwayml/stable-diffusion-v1-5.")
    cls = diffusers.StableDiffusionImg2ImgPipeline if config.variant == "prompt" else \
        diffusers.StableDiffusionImageVariationPipeline
    import torch

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        pipe = cls.from_pretrained(str(Path(config.model).expanduser()) if looks_local else config.model, safety_checker=None,
                                   requires_safety_checker=False, dtype=dtype)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--model {config.model!r}: could not load a {cls.__name__} ({first}); give a diffusers model "
                         "id (with network access) or a local diffusers folder.") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _open(path: str, size: int):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").resize((size, size), Image.BICUBIC)


def _mixed_embeddings(pipe, sources, guides, mix: float, device):
    """(1 − λ)·e_source + λ·e_guide, the CLIP image embeddings of the pipeline's image encoder."""
    import torch

    dtype = next(pipe.image_encoder.parameters()).dtype
    with torch.no_grad():
        pixels = pipe.feature_extractor(images=list(sources) + list(guides), return_tensors="pt").pixel_values
        e = pipe.image_encoder(pixels.to(device=device, dtype=dtype)).image_embeds
    n = len(sources)
    return ((1 - mix) * e[:n] + mix * e[n:]).unsqueeze(1)


def _generate_batch(pipe, batch: list[Item], config: GenerateConfig, device) -> list:
    import torch

    generators = [torch.Generator().manual_seed(item.seed) for item in batch]
    images = [_open(item.source_path, config.size) for item in batch]
    if config.variant == "prompt":
        return pipe(prompt=[item.prompt for item in batch], image=images, strength=config.strength,
                    guidance_scale=config.guidance_scale, num_inference_steps=config.steps, generator=generators,
                    output_type="pil").images
    embeds = _mixed_embeddings(pipe, images, [_open(item.guide_path, config.size) for item in batch], config.mix, device)

    def encode(image, device, num_images_per_prompt, do_classifier_free_guidance):  # the mix instead of the image's own
        e = embeds.repeat_interleave(num_images_per_prompt, 0)
        return torch.cat([torch.zeros_like(e), e]) if do_classifier_free_guidance else e

    pipe._encode_image = encode
    try:
        return pipe(image=images, height=config.size, width=config.size, guidance_scale=config.guidance_scale,
                    num_inference_steps=config.steps, generator=generators, output_type="pil").images
    finally:
        del pipe._encode_image


def _save_whole(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _read_progress(out: Path) -> dict[str, float]:
    seconds = {}
    file = out / PROGRESS_NAME
    if file.is_file():
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            seconds[entry["path"]] = entry["seconds"]
    return seconds


def write_manifest(out: Path, items: list[Item], config: GenerateConfig) -> int:
    """``generated.parquet`` of the items whose image exists (written whole: a temporary
    file renamed into place); returns their number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    seconds = _read_progress(out)
    done = [it for it in items if (out / it.path).is_file()]
    columns = {
        "path": [it.path for it in done], "class": [it.class_name for it in done],
        "domain": [it.domain for it in done], "id": [f"generated/{it.path}" for it in done],
        "source_id": [it.source_id for it in done], "source_domain": [it.source_domain for it in done],
        "target_domain": [it.target_domain for it in done], "guide_id": [it.guide_id for it in done],
        "prompt": [it.prompt for it in done], "seed": [it.seed for it in done], "index": [it.index for it in done],
        "variant": [config.variant] * len(done), "model": [config.model] * len(done),
        "strength": [config.strength if config.variant == "prompt" else None] * len(done),
        "guidance_scale": [config.guidance_scale] * len(done), "steps": [config.steps] * len(done),
        "mix": [config.mix if config.variant == "image" else None] * len(done),
        "seconds": [seconds.get(it.path) for it in done],
    }
    tmp = out / f".{GENERATED_MANIFEST}.tmp"
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, out / GENERATED_MANIFEST)
    return len(done)


def generate(config: GenerateConfig, log=None) -> dict:
    """Generate every missing image of the plan, then write the manifest. Returns a summary."""
    from vlaug.devices import resolve_device
    from vlaug.sources import load_source, read_class_file

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(config.out)
    source = load_source(config.source, config.layout, read_class_file(config.classes_file) if config.classes_file else None)
    items = plan_items(source, config)
    _check_resume(out, config)
    todo = [it for it in items if not (out / it.path).is_file()]
    log(f"{source.describe()}\n{len(items)} images planned ({config.variant}-guided, {config.per_image} per source image "
        f"and target domain), {len(items) - len(todo)} already made, {len(todo)} to generate")
    if todo:  # loaded before anything is written: a bad model or a missing extra leaves no folder behind
        device = resolve_device(config.device)
        pipe = load_pipeline(config, device)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_NAME).write_text(json.dumps(_settings(config), indent=2) + "\n", encoding="utf-8")
    if todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="generate", unit="img", disable=not config.progress, file=sys.stderr)
        with open(out / PROGRESS_NAME, "a", encoding="utf-8") as progress:
            for i in range(0, len(todo), config.batch_size):
                batch = todo[i:i + config.batch_size]
                start = time.perf_counter()
                images = _generate_batch(pipe, batch, config, device)
                per_image = (time.perf_counter() - start) / len(batch)
                for item, image in zip(batch, images):
                    _save_whole(image, out / item.path)
                    progress.write(json.dumps({"path": item.path, "seconds": per_image}) + "\n")
                progress.flush()
                bar.update(len(batch))
        bar.close()
    n = write_manifest(out, items, config)
    seconds = [s for s in _read_progress(out).values() if s is not None]
    return {"planned": len(items), "generated": len(todo), "in_manifest": n,
            "seconds_per_image": float(np.mean(seconds)) if seconds else None, "out": str(out)}
