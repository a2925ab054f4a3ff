"""Shared fixtures: tiny DiTs with random weights, exported by both torch exporters."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from fcpass.contract.onnx_io import initializer_tensors
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.sampling import SamplingSetup
from models.digits import DIGITS_DIR
from runtimes.sampler import SampleRequest

# The tiny random-weight models' samples diverge without DDIM's clipping of x0 (values in the tens, where a
# float32 trajectory's rounding passes the tests' 1e-5); the trained bundled model samples unclipped.
SCHEDULER_CONFIG = DIGITS_DIR / "schedulers" / "ddim_clipped.json"

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TINY = {"input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 3, "num_heads": 2, "num_classes": 10}


def tiny_dit_model(seed: int = 0, **overrides: object) -> Any:
    """The PyTorch DiT that `export_tiny_dit` exports (random weights from `seed`)."""
    torch = pytest.importorskip("torch")
    from models.dit import DiT, DiTConfig
    from models.pixart import randomize_

    model = DiT(DiTConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        randomize_(model, seed)
    return model


def export_tiny_dit(path: Path, exporter: str, seed: int = 0, batch: int = 2, dynamic_batch: bool = False,
                    **overrides: object) -> Path:
    """The tiny DiT as ONNX: static shapes, or with `dynamic_batch` a dynamic batch axis named `batch`."""
    torch = pytest.importorskip("torch")
    model = tiny_dit_model(seed, **overrides)
    cfg = model.config
    args = (
        torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(1)),
        torch.tensor([10.0, 500.0][:batch]),
        torch.tensor([1, cfg.num_classes][:batch]),
    )
    with torch.no_grad():
        torch.onnx.export(
            model, args, str(path), dynamo=exporter == "dynamo", opset_version=18,
            input_names=["latent", "timestep", "class_labels"], output_names=["noise_pred"], verbose=False,
            dynamic_axes={name: {0: "batch"} for name in ("latent", "timestep", "class_labels", "noise_pred")}
            if dynamic_batch else None,
        )
    return path


def to_fp16(src: Path, dst: Path) -> Path:
    """`src` in fp16, inputs and outputs too, as onnxconverter-common converts a graph for an fp16 engine."""
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    # The converter types a Cast's output fp16 but leaves its `to` at float, which ONNX Runtime refuses
    # to load; a blocked Cast stays fp32, with Casts around it.
    casts = [n.name for n in model.graph.node if n.op_type == "Cast"]
    onnx.save(float16.convert_float_to_float16(model, keep_io_types=False, node_block_list=casts), str(dst))
    return dst


@pytest.fixture(scope="session")
def tiny_dit_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The legacy export of the tiny DiT, converted to fp16."""
    d = tmp_path_factory.mktemp("fp16")
    return to_fp16(export_tiny_dit(d / "tiny.onnx", "legacy"), d / "tiny16.onnx")


@pytest.fixture(scope="session", params=["legacy", "dynamo"])
def tiny_dit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block DiT (8x8x4 latent, width 32) exported with each exporter."""
    return export_tiny_dit(tmp_path_factory.mktemp(request.param) / "tiny.onnx", request.param)


def tiny_feeds(seed: int = 0, batch: int = 2, dtype: type = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "latent": rng.standard_normal((batch, 4, 8, 8)).astype(dtype),
        "timestep": np.full((batch,), 400.0 + seed, dtype=dtype),
        "class_labels": np.array([3, 10][:batch], dtype=np.int64),
    }


def forced_compute_error(compiled: Path, original: Path, feeds: dict[str, np.ndarray]) -> float:
    """Max abs difference between `compiled`'s output, every region forced to compute from a zero state,
    and `original`'s on the same `feeds`: the invariant of every rewrite."""
    import onnxruntime as ort

    from fcpass.contract.plan import CTL_INPUT, MIX_INPUT, MIX_WIDTH, THR_INPUT, read_plan

    plan = read_plan(onnx.load(str(compiled), load_external_data=False))
    r = len(plan.regions)
    forced = {**feeds, CTL_INPUT: np.zeros(r, np.int64), THR_INPUT: np.zeros(r, np.float32),
              MIX_INPUT: np.zeros((r, MIX_WIDTH), np.float32), **{s.name: np.zeros(s.shape, s.dtype) for s in plan.states}}
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 3  # ORT warns about harmless initializer dedup inside If branches
    (got,) = ort.InferenceSession(str(compiled), quiet, providers=["CPUExecutionProvider"]).run(["noise_pred"], forced)
    (ref,) = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(["noise_pred"], feeds)
    return float(np.abs(got - ref).max())


class RecordingDenoiser:
    """The plain graph at `path` on ONNX Runtime as the sampler's denoiser, keeping the feeds of every call."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        from fcpass.contract.roles import infer_roles

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.roles = infer_roles(onnx.load(str(path)))
        self.uncached_macs = 0
        self.feeds: list[dict[str, np.ndarray]] = []

    def reset(self, num_steps: int) -> None:
        pass

    def __call__(self, feeds: dict[str, np.ndarray], step: int) -> np.ndarray:
        self.feeds.append(feeds)
        return self.session.run(["noise_pred"], feeds)[0]

    def last_record(self) -> dict[str, Any]:
        return {}


def calibration_setup(classes: list[int]) -> SamplingSetup:
    return SamplingSetup(SCHEDULER_CONFIG, SampleRequest(classes=classes, steps=6, guidance_scale=1.5, uncond_class=10))


@pytest.fixture(scope="session")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("calib")
    src = export_tiny_dit(d / "tiny.onnx", "legacy", seed=3)
    out = d / "tiny.fc.onnx"
    optimize(src, out, OptimizeOptions(calibrate=2, calib_steps=6, calib_eps=0.5), calibration_setup([1, 2]))
    return src, out


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def all_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers of the main graph and of every branch (compiled graphs keep weights in their branches)."""
    return list(initializer_tensors(model))


def unread_nodes(graph: onnx.GraphProto, where: str = "main") -> list[str]:
    """Nodes, in `graph` and every branch of it, whose outputs neither a graph output nor any node reads.

    ONNX Runtime drops such nodes from the main graph but runs them inside an If branch, at every
    step that takes it."""
    from fcpass.compiler.graphinfo import node_inputs
    from fcpass.contract.onnx_io import subgraphs

    read = {x for n in graph.node for x in node_inputs(n)} | {o.name for o in graph.output}
    out = [f"{where}: {n.op_type} {n.name or n.output[0]}" for n in graph.node if not any(o in read for o in n.output if o)]
    for n in graph.node:
        for g in subgraphs(n):
            out += unread_nodes(g, f"{where} > {n.name}")
    return out


def as_its_pipeline(e: Any, scheduler_class: Any, steps: int, guidance: float) -> np.ndarray:
    """What diffusers' `scheduler_class`, configured as the export's pipeline is, draws from the PyTorch transformer,
    from the noise `fcpass sample` draws: one sample per call of the batch-2 graph, guidance against zero
    unconditional embeddings, the timestep as the graph takes it."""
    import torch

    captions = torch.from_numpy(np.load(e.captions))
    timestep_dtype = torch.from_numpy(e.feeds["timestep"]).dtype
    noise = np.random.default_rng(0).standard_normal((len(captions), *e.feeds["hidden_states"].shape[1:]))
    want = []
    for row, x0 in enumerate(noise.astype(np.float32)):
        scheduler = scheduler_class.from_config(json.loads(e.scheduler.read_text()))
        scheduler.set_timesteps(steps)
        x = torch.from_numpy(x0[None])
        embeds = torch.cat([captions[row : row + 1], torch.zeros_like(captions[row : row + 1])])
        for t in scheduler.timesteps:
            feeds = {"hidden_states": torch.cat([x, x]), "encoder_hidden_states": embeds,
                     "timestep": t.expand(2).to(timestep_dtype)}
            with torch.no_grad():
                out = e.model(*(feeds[name] for name in e.feeds))  # in the export's input order
            cond, uncond = out.chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        want.append(x.numpy())
    return np.concatenate(want)
