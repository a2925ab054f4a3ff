"""More transformers nobody here wrote, compiled as they come from the dynamo exporter: SD3.5's (dual attention
in some blocks, RMS-normalised queries and keys) and CogVideoX's (a video latent (B, frames, C, H, W), the
caption tokens carried through every block beside the video's). Each compiles, passes TensorRT's static
rules, and with every region computing equals the original graph."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxscript")

from fcpass.cli import main
from fcpass.discover import discover_blocks
from fcpass.roles import infer_roles
from fcpass.trt_check import check_graph
from tests.conftest import forced_compute_error
from tests.test_diffusers_graphs import _randomize_

B = 2


class _Keywords(torch.nn.Module):
    """The transformer called with keyword inputs, as its pipeline calls it."""

    def __init__(self, m: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.m, self.names = m, names

    def forward(self, *args):
        return self.m(**dict(zip(self.names, args)), return_dict=False)[0]


def _sd35() -> torch.nn.Module:
    return diffusers.SD3Transformer2DModel(
        num_layers=2, attention_head_dim=8, num_attention_heads=2, sample_size=8, patch_size=2, in_channels=4,
        out_channels=4, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6, pos_embed_max_size=16,
        qk_norm="rms_norm", dual_attention_layers=(0,))


def _cogvideox() -> torch.nn.Module:
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8, text_embed_dim=12,
        num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=5)


CASES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[torch.Generator], dict[str, torch.Tensor]], list[str]]] = {
    "sd3.5": (_sd35, lambda g: {"hidden_states": torch.randn(B, 4, 8, 8, generator=g), "timestep": torch.tensor([500.0, 200.0]),
                                "encoder_hidden_states": torch.randn(B, 5, 12, generator=g),
                                "pooled_projections": torch.randn(B, 6, generator=g)},
              ["transformer_blocks.0", "transformer_blocks.1"]),
    "cogvideox": (_cogvideox, lambda g: {"hidden_states": torch.randn(B, 3, 4, 8, 8, generator=g),
                                         "encoder_hidden_states": torch.randn(B, 5, 12, generator=g),
                                         "timestep": torch.tensor([500, 200])},
                  ["transformer_blocks.0", "transformer_blocks.1"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiles_and_computes_what_the_original_does(name: str, tmp_path: Path) -> None:
    build, inputs, scopes = CASES[name]
    torch.manual_seed(0)  # diffusers draws the initial weights from the global generator
    module = build().eval()
    _randomize_(module, 1)
    feeds = inputs(torch.Generator().manual_seed(0))
    model = _Keywords(module, list(feeds))
    src, fc = tmp_path / "model.onnx", tmp_path / "model.fc.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(feeds.values()), str(src), dynamo=True, external_data=False, opset_version=18,
                          input_names=list(feeds), output_names=["noise_pred"], verbose=False)
        assert np.abs(model(*feeds.values()).numpy()).max() > 1e-2  # the randomized model's output is not trivial
    original = onnx.load(str(src))
    assert infer_roles(original).latent.name == "hidden_states"
    assert [".".join(b.scope.rsplit(".", 2)[-2:]) for b in discover_blocks(original, "hidden_states").blocks] == scopes
    assert main(["optimize", str(src), "-o", str(fc), "--taylor"]) == 0
    assert check_graph(onnx.load(str(fc))) == []
    assert forced_compute_error(fc, src, {k: v.numpy() for k, v in feeds.items()}) <= 1e-5
