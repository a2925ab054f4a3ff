"""`fcpass export`: PyTorch DiT -> static-shaped ONNX, verified against PyTorch.

Attention stays MatMul/Softmax/MatMul at opset <= 22 (TensorRT cannot build an opset-23
`Attention` inside an `If`). The exported graph records its architecture in the model metadata
(`fcpass.export`) so later commands know what they are looking at. Needs the `torch` extra.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fcpass.contract.errors import FcpassError, first_clause
from fcpass.contract.onnx_io import load_model, save_model

log = logging.getLogger(__name__)

EXPORT_METADATA_KEY = "fcpass.export"
_DIT_NAME = re.compile(r"^dit-(s|b|l|xl)-(2|4|8)$")


@dataclass(frozen=True)
class ExportSpec:
    """What to export: an architecture name and the shapes of the static graph."""

    arch: str
    image_size: int = 256
    batch: int = 2
    exporter: str = "dynamo"
    opset: int = 18


def arch_names() -> list[str]:
    sizes = [f"dit-{s}-{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8)]
    return ["digits", "canvas", *sizes, "pixart-tiny", "pixart-xl-2"]


def build_model(arch: str, image_size: int = 256) -> tuple[Any, dict[str, Any]]:
    """Instantiate an architecture by name; returns the module and its config as a dict."""
    import torch  # noqa: F401  (fail here, with the install hint, rather than deep in models/)

    from models.dit import DiT, DiTConfig, dit_config

    if arch in ("digits", "canvas"):
        from models.canvas import CANVAS_DIT
        from models.digits import DIGITS_DIT

        cfg = DiTConfig(**(DIGITS_DIT if arch == "digits" else CANVAS_DIT))
        return DiT(cfg), {"family": "dit", **asdict(cfg)}
    m = _DIT_NAME.match(arch)
    if m:
        if image_size <= 0 or image_size % 8:
            raise FcpassError(
                f"--image-size {image_size} is not a positive multiple of 8 (the VAE factor); use e.g. 256 or 512"
            )
        patch = int(m.group(2))
        if (image_size // 8) % patch:
            # A latent side the patch does not divide would silently export a graph with the wrong output size.
            raise FcpassError(
                f"--image-size {image_size} gives a {image_size // 8}x{image_size // 8} latent, which patch size "
                f"{patch} does not divide; use a multiple of {8 * patch} (e.g. 256 or 512)"
            )
        cfg = dit_config(m.group(1), patch, image_size)
        return DiT(cfg), {"family": "dit", **asdict(cfg)}
    if arch.startswith("pixart"):
        from models.pixart import PixArt, pixart_config

        pcfg = pixart_config(arch)
        return PixArt(pcfg), {"family": "pixart", **asdict(pcfg)}
    raise FcpassError(f"unknown architecture {arch!r}; choose one of: {', '.join(arch_names())}")


def example_inputs(config: dict[str, Any], batch: int, seed: int = 0) -> dict[str, Any]:
    """Named example inputs (latent, timestep, class or caption) for export and verification."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size = config["input_size"]
    latent = torch.randn(batch, config["in_channels"], size, size, generator=g)
    timestep = torch.linspace(999.0, 1.0, batch)
    if config["family"] == "pixart":
        caption = torch.randn(batch, config["caption_len"], config["caption_channels"], generator=g)
        return {"latent": latent, "timestep": timestep, "encoder_hidden_states": caption}
    labels = torch.arange(batch, dtype=torch.int64) % (config["num_classes"] + 1)
    return {"latent": latent, "timestep": timestep, "class_labels": labels}


def load_weights(model: Any, config: dict[str, Any], weights: str | Path) -> None:
    if config["family"] == "dit":
        from models.convert import load_dit_checkpoint
        from models.dit import DiTConfig

        fields = {k: v for k, v in config.items() if k != "family"}
        loaded = load_dit_checkpoint(weights, DiTConfig(**fields))
        model.load_state_dict(loaded.state_dict())
        return
    import torch

    path = Path(weights)
    if not path.exists():
        raise FcpassError(f"weights file not found: {path}; check the --weights path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torch.load raises UnpicklingError, RuntimeError, EOFError, ...)
        raise FcpassError(
            f"weights {path} could not be read ({type(exc).__name__}: {first_clause(exc)}); pass a torch.save state dict"
        ) from None
    if not isinstance(state, dict):
        raise FcpassError(f"weights {path} hold a {type(state).__name__}, not a state dict; save model.state_dict()")
    expected = model.state_dict()
    # load_state_dict(strict=False) still raises a multi-line RuntimeError on a shape mismatch.
    wrong = next((k for k, v in state.items()
                  if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape), None)
    if wrong is not None:
        raise FcpassError(
            f"weights {path} do not match {config['family']}: key {wrong!r} has shape {tuple(state[wrong].shape)}, "
            f"the model expects {tuple(expected[wrong].shape)}; pick the --arch the checkpoint was trained with"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise FcpassError(
            f"weights {path} do not match {config['family']}: key {first!r} is "
            f"{'missing' if missing else 'unexpected'}; pick the --arch the checkpoint was trained with"
        )


def _unzero_linears(model: Any) -> None:
    """Give the Linear layers the official initialisation zeroes (adaLN, the output layer) small random
    weights, from a fixed seed.

    Zeroed, every block is the identity: a cache then looks lossless, and ONNX Runtime, finding the
    blocks' zero adaLN weights equal, merges their Gemms into one, which a compiled graph (each block
    in its own branch) cannot do, so timings would compare unlike graphs.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)


def export(spec: ExportSpec, output: str | Path, weights: str | Path | None = None, verify: bool = True) -> Path:
    """Export `spec.arch` to `output` (atomically) and check ONNX Runtime against PyTorch."""
    try:
        import torch
    except ImportError:
        raise FcpassError("fcpass export needs PyTorch; install it with: pip install 'fcpass[torch]'") from None
    if not 7 <= spec.opset <= 22:
        raise FcpassError(
            f"--opset {spec.opset} is not supported; use 18..22 (opset 23 fuses attention, which TensorRT cannot build inside an If)"
        )
    if spec.batch < 1:
        raise FcpassError(f"--batch {spec.batch} must be at least 1; use 2 for one sample with guidance")
    if spec.exporter not in ("dynamo", "legacy"):
        raise FcpassError(f"--exporter {spec.exporter!r} is unknown; use dynamo or legacy")
    model, config = build_model(spec.arch, spec.image_size)
    if weights is not None:
        load_weights(model, config, weights)
    else:
        log.warning("no --weights given: exporting %s with its initial (random) weights", spec.arch)
        _unzero_linears(model)
    model.eval()
    inputs = example_inputs(config, spec.batch)
    names = list(inputs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        # The exporters warn about every traced Python int and deprecation; the numerical check
        # below is what tells the user whether the export is right.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if spec.exporter == "dynamo":
                torch.onnx.export(
                    model, tuple(inputs.values()), str(path), dynamo=True, opset_version=spec.opset,
                    input_names=names, output_names=["noise_pred"], external_data=True, verbose=False,
                )
            else:
                torch.onnx.export(
                    model, tuple(inputs.values()), str(path), dynamo=False, opset_version=spec.opset,
                    input_names=names, output_names=["noise_pred"],
                )
            reference = model(*inputs.values()).numpy()
        if verify:
            diff = _max_abs_diff(path, {k: v.numpy() for k, v in inputs.items()}, reference)
            if not diff <= 1e-4:
                raise FcpassError(
                    f"exported graph disagrees with PyTorch (max abs diff {diff:.3g} > 1e-4); try --exporter legacy or another --opset"
                )
        onnx_model = load_model(path)
    meta = {**asdict(spec), "config": config, "weights": str(weights) if weights else None}
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = EXPORT_METADATA_KEY, json.dumps(meta)
    return save_model(onnx_model, output)


def _max_abs_diff(path: Path, feeds: dict[str, np.ndarray], reference: np.ndarray) -> float:
    """ONNX Runtime on the exported file (its weights beside it where the exporter put them there,
    as it does over 2 GB) against PyTorch."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, feeds)
    diff = float(np.abs(out - reference).max())
    log.info("ONNX Runtime vs PyTorch: max abs diff %.3g", diff)
    return diff
