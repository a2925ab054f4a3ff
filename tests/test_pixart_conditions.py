"""PixArt-alpha's extra inputs. The 1024-pixel models take `resolution` (B, 2) and `aspect_ratio` (B, 1)
beside the captions: the sampler feeds them as diffusers' pipeline does (height and width in pixels,
their ratio, both halves of guidance alike), the cache compiles around them, and `--resolution` sets them.
An export called as the pipeline calls it also takes the captions' attention mask: ones, or `--prompt-mask`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

from fcpass.cli import main
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from tests.conftest import RecordingDenoiser
from tests.helpers.diffusers_models import _randomize_

NAMES = ("latent", "timestep", "encoder_hidden_states", "resolution", "aspect_ratio")
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


class _SizedPixArt(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, latent, timestep, encoder_hidden_states, resolution, aspect_ratio):
        cond = {"resolution": resolution, "aspect_ratio": aspect_ratio}
        return self.m(latent, encoder_hidden_states=encoder_hidden_states, timestep=timestep, added_cond_kwargs=cond).sample


def _model() -> torch.nn.Module:
    # The size embeddings take a third of the width each: 2 heads of 12.
    torch.manual_seed(0)  # diffusers draws the initial weights from the global generator
    m = diffusers.PixArtTransformer2DModel(
        num_layers=2, attention_head_dim=12, num_attention_heads=2, sample_size=8, patch_size=2, in_channels=4,
        out_channels=8, cross_attention_dim=24, caption_channels=12, norm_num_groups=1, use_additional_conditions=True,
    )
    model = _SizedPixArt(m).eval()
    _randomize_(model, 1)
    return model


@pytest.fixture(scope="module")
def pixart(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("pixart_sized")
    model = _model()
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 5, 12, generator=g),
            torch.tensor([[64.0, 64.0]] * 2), torch.tensor([[1.0]] * 2))
    path = d / "pixart.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=18, input_names=list(NAMES),
                          output_names=["noise_pred"])
    (d / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    np.save(d / "captions.npy", np.random.default_rng(0).standard_normal((3, 5, 12)).astype(np.float32))
    return {"model": model, "onnx": path, "sched": d / "scheduler_config.json", "captions": d / "captions.npy"}


def run(argv: list[object]) -> int:
    return main([str(a) for a in argv])


def test_size_conditions_are_found_and_fed_as_diffusers_pipeline_feeds_them(pixart: dict[str, object]) -> None:
    den = RecordingDenoiser(pixart["onnx"])
    assert (den.roles.resolution.name, den.roles.aspect_ratio.name, den.roles.others) == ("resolution", "aspect_ratio", ())
    captions = np.load(pixart["captions"])[:1]
    scheduler = scheduler_from_config(pixart["sched"])
    for size, want in ((None, [64.0, 64.0]), ((96, 48), [96.0, 48.0])):
        den.feeds.clear()
        sample(den, scheduler, SampleRequest(prompt_embeds=captions, steps=2, guidance_scale=2.0, resolution=size),
               progress=False)
        feeds = den.feeds[0]
        np.testing.assert_array_equal(feeds["resolution"], [want, want])  # the latent's 8x8 times 8, or as given
        np.testing.assert_array_equal(feeds["aspect_ratio"], [[want[0] / want[1]]] * 2)
        # What the graph computed from those feeds is what diffusers' model computes from the same conditions.
        with torch.no_grad():
            ref = pixart["model"](*(torch.from_numpy(feeds[n]) for n in NAMES)).numpy()
        np.testing.assert_allclose(den.session.run(["noise_pred"], feeds)[0], ref, atol=1e-5)


def test_the_cache_compiles_around_them_and_resolution_reaches_the_model(pixart: dict[str, object], tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--scheduler-config", pixart["sched"], "--prompt-embeds", pixart["captions"], "--steps", "6"]
    a, b, c = (tmp_path / f"{x}.npy" for x in "abc")
    assert run(["sample", pixart["onnx"], *common, "--out-npy", a]) == 0
    assert run(["sample", pixart["onnx"], *common, "--resolution", "64x32", "--out-npy", b]) == 0
    plain = np.load(a)
    assert np.isfinite(plain).all() and np.abs(plain - np.load(b)).max() > 1e-4

    fc = tmp_path / "pixart.fc.onnx"
    assert run(["optimize", pixart["onnx"], "-o", fc, "--calibrate", "2", "--steps", "6", *common[:4]]) == 0
    capsys.readouterr()
    assert run(["inspect", fc]) == 0
    assert "resolution=resolution" in capsys.readouterr().out
    assert run(["sample", fc, "--policy", "none", *common, "--out-npy", c]) == 0
    np.testing.assert_allclose(np.load(c), plain, atol=1e-5)
    assert run(["sample", fc, "--policy", "fastcache", *common, "--resolution", "64x32", "--out-npy", c]) == 0
    assert np.isfinite(np.load(c)).all()


def test_resolution_is_refused_where_no_input_takes_it_or_it_is_no_size(pixart: dict[str, object], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--scheduler-config", pixart["sched"], "--steps", "2"]
    capsys.readouterr()
    assert run(["sample", *common, "--resolution", "64"]) == 2  # the bundled digits model: no size conditions
    assert "--resolution given but the graph takes no size condition" in capsys.readouterr().err
    for bad, why in (("64xabc", "is not HEIGHTxWIDTH in pixels"), ("0x64", "must be at least 1 pixel")):
        with pytest.raises(SystemExit) as exit_:  # argparse's own exit, its usage line cut to one
            run(["sample", pixart["onnx"], *common, "--prompt-embeds", pixart["captions"], "--resolution", bad])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and f"argument --resolution: {bad!r}" in err and why in err
        assert len(err.splitlines()) == 1


class _MaskedPixArt(torch.nn.Module):
    """diffusers' PixArt called as PixArtAlphaPipeline calls it for 512-pixel models: captions with their mask."""

    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, latent, timestep, encoder_hidden_states, encoder_attention_mask):
        return self.m(latent, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                      timestep=timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def test_a_caption_mask_is_fed_ones_or_the_masks_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """All ones (every caption token attends) is what the graph without a mask computes; a mask given reaches the
    model; the cache compiles around it."""
    from tests.helpers.diffusers_models import _pixart

    torch.manual_seed(0)
    plain = _pixart().eval()
    _randomize_(plain, 1)
    masked = _MaskedPixArt(plain.m).eval()
    g = torch.Generator().manual_seed(0)
    latent, t, captions = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 5, 12, generator=g)
    paths = {"plain": tmp_path / "plain.onnx", "masked": tmp_path / "masked.onnx"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (latent, t, captions), str(paths["plain"]), dynamo=False, opset_version=18,
                          input_names=["latent", "timestep", "encoder_hidden_states"], output_names=["noise_pred"])
        torch.onnx.export(masked, (latent, t, captions, torch.ones(2, 5, dtype=torch.int64)), str(paths["masked"]),
                          dynamo=False, opset_version=18, output_names=["noise_pred"],
                          input_names=["latent", "timestep", "encoder_hidden_states", "encoder_attention_mask"])
    sched, embeds, mask = tmp_path / "scheduler_config.json", tmp_path / "captions.npy", tmp_path / "mask.npy"
    sched.write_text(json.dumps(SCHEDULER))
    np.save(embeds, np.random.default_rng(0).standard_normal((3, 5, 12)).astype(np.float32))
    np.save(mask, np.array([[1, 1, 1, 0, 0]] * 3))
    common = ["--scheduler-config", sched, "--prompt-embeds", embeds, "--steps", "4"]
    out = {k: tmp_path / f"{k}.npy" for k in ("plain", "ones", "given", "cached")}
    assert run(["sample", paths["plain"], *common, "--out-npy", out["plain"]]) == 0
    assert run(["sample", paths["masked"], *common, "--out-npy", out["ones"]]) == 0
    assert run(["sample", paths["masked"], *common, "--prompt-mask", mask, "--out-npy", out["given"]]) == 0
    np.testing.assert_allclose(np.load(out["ones"]), np.load(out["plain"]), atol=1e-5)
    assert np.abs(np.load(out["given"]) - np.load(out["ones"])).max() > 1e-3

    fc = tmp_path / "masked.fc.onnx"
    assert run(["optimize", paths["masked"], "-o", fc, "--calibrate", "2", *common[:4], "--prompt-mask", mask]) == 0
    assert run(["sample", fc, "--policy", "none", *common, "--prompt-mask", mask, "--out-npy", out["cached"]]) == 0
    np.testing.assert_allclose(np.load(out["cached"]), np.load(out["given"]), atol=1e-5)

    short = tmp_path / "short.npy"
    np.save(short, np.ones((3, 4)))
    for model, extra, message in (
            (paths["plain"], ["--prompt-mask", mask], "--prompt-mask given but the graph takes no caption mask"),
            (paths["masked"], ["--prompt-mask", short], "--prompt-mask rows are (4,) but the graph takes (5,)"),
            (paths["masked"], ["--negative-mask", mask, "--guidance-scale", "1"],
             "--negative-mask is guidance's unconditional half, and this run has none")):
        capsys.readouterr()
        assert run(["sample", model, *common, *extra]) == 2
        assert message in capsys.readouterr().err
