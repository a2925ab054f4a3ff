"""Guidance's null class, read from the label table of a class-conditional export that carries no metadata."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from fcpass.cli import main
from fcpass.compiler.graphinfo import label_rows
from tests.conftest import SCHEDULER_CONFIG

torch = pytest.importorskip("torch")
SAMPLE = ["--scheduler-config", str(SCHEDULER_CONFIG), "--steps", "2", "--class", "3"]


def _export(module: torch.nn.Module, path: Path, exporter: str) -> Path:
    args = (torch.randn(2, 4, 8, 8), torch.tensor([10.0, 10.0]), torch.tensor([1, 10]))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        extra = {"external_data": False} if exporter == "dynamo" else {}
        torch.onnx.export(module.eval(), args, str(path), dynamo=exporter == "dynamo", opset_version=18,
                          input_names=["latent", "timestep", "class_labels"], output_names=["sample"], **extra)
    return path


class _DiffusersDiT(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        diffusers = pytest.importorskip("diffusers")
        self.m = diffusers.DiTTransformer2DModel(
            num_layers=1, attention_head_dim=8, num_attention_heads=2, sample_size=8, patch_size=2, in_channels=4,
            out_channels=8, num_embeds_ada_norm=10, norm_num_groups=1)

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.m(latent, timestep=timestep, class_labels=class_labels).sample[:, :4]


class _ClampedLabels(torch.nn.Module):
    """A label table the class input reaches only through a clamp: which row is the null class is not told."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(11, 4)

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        emb = self.table(class_labels.clamp(0, 9))
        return latent * (1 + emb[:, :, None, None] * 1e-3) + timestep[:, None, None, None] * 1e-4


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def diffusers_dit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _export(_DiffusersDiT(), tmp_path_factory.mktemp(request.param) / "dit.onnx", request.param)


def test_the_null_class_is_the_label_table_s_last_row(tiny_dit: Path, diffusers_dit: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """DiT's convention (facebookresearch's and diffusers' alike): num_classes + 1 rows, the last the null class.
    Sampling with the inferred label equals sampling with it given."""
    caplog.set_level("INFO")
    for model in (tiny_dit, diffusers_dit):
        assert label_rows(onnx.load(str(model)), "class_labels" if model == diffusers_dit else _class_input(model)) == 11
        inferred, given = tmp_path / f"{model.stem}-a.npy", tmp_path / f"{model.stem}-b.npy"
        assert main(["sample", str(model), *SAMPLE, "--out-npy", str(inferred)]) == 0
        assert "guidance's null label: 10, the last row of" in caplog.text and "--uncond-class overrides" in caplog.text
        assert main(["sample", str(model), *SAMPLE, "--uncond-class", "10", "--out-npy", str(given)]) == 0
        assert np.array_equal(np.load(inferred), np.load(given))
        caplog.clear()


def test_a_graph_whose_table_does_not_tell_asks_for_the_null_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _export(_ClampedLabels(), tmp_path / "clamped.onnx", "legacy")
    assert label_rows(onnx.load(str(model)), "class_labels") is None
    assert main(["sample", str(model), *SAMPLE]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fcpass:")]
    assert len(err) == 1 and "pass --uncond-class U, or --guidance-scale 1" in err[0]
    assert main(["sample", str(model), *SAMPLE, "--guidance-scale", "1"]) == 0


def _class_input(model: Path) -> str:
    from fcpass.contract.roles import infer_roles

    labels = infer_roles(onnx.load(str(model)), {}).class_labels
    assert labels is not None
    return labels.name
