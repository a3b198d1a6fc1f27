import open_clip
import pytest
import torch
from safetensors.torch import save_file

from vlaug.encoders import (
    TEMPLATE_PRESETS,
    TINY_MODEL,
    check_encoder_spec,
    load_encoder,
    parse_prompt_sets,
    resolve_templates,
    split_preprocess,
)
from vlaug.errors import EncoderError, UsageError


def _images(seed=0, n=3, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_template_presets_and_files(tmp_path):
    assert resolve_templates("photo") == ["a photo of a {}."]
    assert len(resolve_templates("openai")) == 80
    assert resolve_templates("simple")[0] == "itap of a {}."
    f = tmp_path / "t.txt"
    f.write_text("# mine\na drawing of a {}.\n\na {} in the wild.\n")
    assert resolve_templates(str(f)) == ["a drawing of a {}.", "a {} in the wild."]
    f.write_text("a drawing of a cat\n")
    with pytest.raises(UsageError, match="no '\\{\\}'"):
        resolve_templates(str(f))
    with pytest.raises(UsageError, match="preset"):
        resolve_templates("no-such-preset")


def test_prompt_sets(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a sketch of a {}.\na drawing of a {}.\n")
    sets = parse_prompt_sets(["painting=a painting of a {}.", "painting=an oil painting of a {}.", f"sketch=@{f}"])
    assert sets == {
        "painting": ["a painting of a {}.", "an oil painting of a {}."],
        "sketch": ["a sketch of a {}.", "a drawing of a {}."],
    }
    for bad in ["painting", "=a {}", "classes=a {}", "x=no braces", "x=a {0} {}"]:
        with pytest.raises(UsageError):
            parse_prompt_sets([bad])


def test_encoder_spec_errors(tmp_path):
    with pytest.raises(EncoderError, match="unknown model 'ViT-B-33'.*ViT-B-32"):
        check_encoder_spec("ViT-B-33", "none")
    with pytest.raises(EncoderError, match="unknown pretrained tag 'laion9b'.*laion2b_s34b_b79k"):
        check_encoder_spec("ViT-B-32", "laion9b")
    with pytest.raises(EncoderError, match="not found"):
        check_encoder_spec("ViT-B-32", str(tmp_path / "missing.pt"))
    assert check_encoder_spec("ViT-B-32", "laion2b_s34b_b79k").pretrained == "laion2b_s34b_b79k"
    assert check_encoder_spec("ViT-B/32", "None").random_weights
    assert check_encoder_spec("hf-hub:org/repo", "anything").pretrained == ""


def test_random_weights_follow_the_seed():
    x = _images()
    a = load_encoder("vlaug-tiny", "none", "cpu", seed=1).encode_images(x)
    b = load_encoder("vlaug-tiny", "none", "cpu", seed=1).encode_images(x)
    c = load_encoder("vlaug-tiny", "none", "cpu", seed=2).encode_images(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))


def test_loading_does_not_touch_the_global_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_encoder("vlaug-tiny", "none", "cpu", seed=9)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_checkpoint_gives_identical_embeddings(tmp_path, fmt):
    torch.manual_seed(123)
    reference = open_clip.create_model("vlaug-tiny").eval()
    state = reference.state_dict()
    path = tmp_path / f"tiny.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    enc = load_encoder("vlaug-tiny", str(path), "cpu", seed=0)
    assert enc.spec.checkpoint_sha256 and len(enc.spec.checkpoint_sha256) == 64
    x = _images(3)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_image(x), dim=-1)
    torch.testing.assert_close(enc.encode_images(x), expected, rtol=0, atol=0)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "coca.pt"
    torch.save(open_clip.create_model("vlaug-tiny-coca").state_dict(), path)
    with pytest.raises(EncoderError, match="does not fit model vlaug-tiny"):
        load_encoder("vlaug-tiny", str(path), "cpu")


@pytest.mark.parametrize("model", ["vlaug-tiny", "vlaug-tiny-coca"])
@pytest.mark.parametrize("templates", ["photo", "simple"])
def test_prompt_embeddings_equal_open_clip_zero_shot_classifier(model, templates):
    enc = load_encoder(model, "none", "cpu", seed=0)
    classes = ["dog", "paint_can", "the eiffel tower"]
    ours = enc.encode_prompts(classes, TEMPLATE_PRESETS[templates])
    reference = open_clip.build_zero_shot_classifier(
        enc.model, open_clip.get_tokenizer(model), ["dog", "paint can", "the eiffel tower"],
        TEMPLATE_PRESETS[templates], num_classes_per_batch=None,
    ).T
    assert ours.shape == (3, 64)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(3))


def test_coca_image_embeddings_are_normalised():
    enc = load_encoder("vlaug-tiny-coca", "none", "cpu")
    out = enc.encode_images(_images())
    assert out.shape == (3, 64)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_unavailable_device_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="CUDA is not available"):
        load_encoder("vlaug-tiny", "none", "cuda")


def _photos(tmp_path):
    from PIL import Image

    from tests.conftest import write_image

    return [Image.open(write_image(tmp_path / f"{i}.jpg", i, size=50 + 90 * i)).convert("RGB") for i in range(3)]


def test_uint8_worker_path_gives_identical_embeddings(tmp_path):
    enc = load_encoder("vlaug-tiny", "none", "cpu")
    assert enc.preprocess_uint8 is not None and enc.worker_preprocess is enc.preprocess_uint8
    images = _photos(tmp_path)
    as_uint8 = torch.stack([enc.preprocess_uint8(im) for im in images])
    as_float = torch.stack([enc.preprocess(im) for im in images])
    assert as_uint8.dtype == torch.uint8
    torch.testing.assert_close(enc.encode_images(as_uint8), enc.encode_images(as_float), rtol=0, atol=0)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_split_of_open_clip_224_transforms_is_exact(tmp_path, resize_mode):
    preprocess = open_clip.image_transform(224, is_train=False, resize_mode=resize_mode)
    pil_part, mean, std = split_preprocess(preprocess)
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    for im in _photos(tmp_path):
        torch.testing.assert_close(pil_part(im).float().div(255).sub_(m).div_(s), preprocess(im), rtol=0, atol=0)


def test_unknown_transform_is_not_split():
    import torchvision.transforms as T

    assert split_preprocess(T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3), T.RandomErasing()])) is None


def test_default_tag_fails_fast_and_whole_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    import socket

    from typer.testing import CliRunner

    from tests.conftest import make_class_folder
    from vlaug.cli import app

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache: the weights are not there
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(v, raising=False)
    attempts = []

    def unreachable(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    src = make_class_folder(tmp_path / "src", n=1)
    r = CliRunner().invoke(app, ["embed", str(src), "--out", str(tmp_path / "feat"), "--workers", "0", "--no-progress"])
    assert r.exit_code == 2, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot download ViT-B-32 weights 'laion2b_s34b_b79k': huggingface.co cannot be reached")
    assert line.endswith("(--pretrained none gives random weights, for tests only).")  # the whole message, with the fix
    assert "--pretrained PATH" in line
    assert attempts == [(("huggingface.co", 443), 3.0)]  # one short attempt
    assert not (tmp_path / "feat").exists()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts.clear()
    r = CliRunner().invoke(app, ["embed", str(src), "--out", str(tmp_path / "feat"), "--workers", "0", "--no-progress"])
    assert r.exit_code == 2 and "HF_HUB_OFFLINE is set" in r.stderr and attempts == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_text_only_encoder_reads_no_image_weights_and_equals_the_full_model(tmp_path, monkeypatch, suffix):
    import safetensors

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in open_clip.create_model(TINY_MODEL).state_dict().items()}
    path = tmp_path / f"tiny{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    full = load_encoder(TINY_MODEL, str(path), "cpu")
    read = []
    original = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = original(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    text = load_encoder(TINY_MODEL, str(path), "cpu", text_only=True)
    assert text.model.visual is None and text.embed_dim == full.embed_dim
    torch.testing.assert_close(text.encode_prompts(["cat", "dog"], ["a {}.", "a photo of a {}."]),
                               full.encode_prompts(["cat", "dog"], ["a {}.", "a photo of a {}."]))
    if suffix == ".safetensors":
        assert read and not any(k.startswith("visual.") for k in read)  # the image tower is never read
