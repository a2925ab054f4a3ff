"""Export a diffusers transformer with random weights to ONNX, the way a deployment export reaches fcpass.

    python tools/export_diffusers.py flux --size small -o flux.onnx
    fcpass optimize flux.onnx -o flux.fc.onnx --calibrate 2 --steps 8 --scheduler-config scheduler_config.json \\
        --prompt-embeds captions.npy --pooled-embeds pooled.npy --guidance-scale 3.5

Families: `flux` (FLUX.1-dev's layout: double- then single-stream blocks, the packed latent, position ids,
a guidance input), `wan` (Wan 2.1's video transformer), `hunyuanvideo` (HunyuanVideo's: double- and
single-stream blocks on a video latent, the captions' mask, pooled embeddings, a guidance input), `sd3.5` (SD3.5's: dual attention in the first
block, RMS-normalised queries and keys), `sana` (linear attention) and `cogvideox` (a video latent
(B, frames, C, H, W)). Sizes:
`tiny` (what the tests run) and `small` (a few hundred tokens at width 256, for timing the cache's
mechanics). The exporter is torch's dynamo exporter at opset 18 (the legacy one cannot export their
`rms_norm`), but for Sana: the dynamo exporter's graph optimizer drops the 1e-15 its linear attention
adds to a denominator that can be 0, so the graph divides 0 by 0 where PyTorch does not; the legacy
exporter keeps it. Static shapes, each input named as the family's pipeline passes it. Beside MODEL.onnx it
writes the family's `scheduler_config.json` and random caption embeddings (`captions.npy`, and
`pooled.npy` where the model takes them), so that `fcpass sample` draws from it at once.

The weights are random (`models.pixart.randomize_`, seeded): the samples mean nothing, and quality
figures on these graphs measure a cache against the same random model uncached, nothing more.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.pixart import randomize_

FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
                  "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True}  # FLUX.1-dev's scheduler_config.json
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}  # SD3.5's
# Wan 2.1's and Sana's scheduler_config.json, the keys their solvers read
WAN_SCHEDULER = {"_class_name": "UniPCMultistepScheduler", "beta_schedule": "linear", "disable_corrector": [],
                 "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True, "predict_x0": True,
                 "prediction_type": "flow_prediction", "solver_order": 2, "solver_type": "bh2", "use_flow_sigmas": True}
SANA_SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++",
                  "beta_schedule": "linear", "final_sigmas_type": "zero", "flow_shift": 3.0,
                  "prediction_type": "flow_prediction", "solver_order": 2, "solver_type": "midpoint",
                  "use_flow_sigmas": True}
COGVIDEOX_SCHEDULER = {"_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                       "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "set_alpha_to_one": True,
                       "snr_shift_scale": 3.0, "steps_offset": 0, "timestep_spacing": "trailing"}  # CogVideoX-2b's
HUNYUAN_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0}  # HunyuanVideo's


class Keywords(torch.nn.Module):
    """A diffusers transformer called with keyword inputs in `names`' order, returning its sample."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, args)), return_dict=False)[0]


def pipeline_image_ids(rows: int, cols: int) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids: (0, row, column) of each 2x2 latent patch."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


@dataclass(frozen=True)
class Family:
    build: Callable[[dict[str, int]], torch.nn.Module]
    inputs: Callable[[dict[str, int], torch.Generator], dict[str, torch.Tensor]]
    sizes: dict[str, dict[str, int]]
    scheduler: dict[str, Any]
    pooled: bool = False
    exporter: str = "dynamo"


def _flux(s: dict[str, int]) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=4 * s["channels"], num_layers=s["double"],
                                  num_single_layers=s["single"], attention_head_dim=s["head_dim"],
                                  num_attention_heads=s["heads"], joint_attention_dim=s["text"],
                                  pooled_projection_dim=s["pooled"], guidance_embeds=True, axes_dims_rope=s["rope"])


def _flux_inputs(s: dict[str, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    side = s["grid"]
    return {"hidden_states": torch.randn(s["batch"], side * side, 4 * s["channels"], generator=g),
            "encoder_hidden_states": torch.randn(s["batch"], s["caption"], s["text"], generator=g),
            "pooled_projections": torch.randn(s["batch"], s["pooled"], generator=g),
            "timestep": torch.full((s["batch"],), 0.5), "img_ids": pipeline_image_ids(side, side),
            "txt_ids": torch.zeros(s["caption"], 3), "guidance": torch.full((s["batch"],), 3.5)}


def _wan(s: dict[str, int]) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=s["heads"], attention_head_dim=s["head_dim"],
                                 in_channels=s["channels"], out_channels=s["channels"], text_dim=s["text"],
                                 freq_dim=s["freq"], ffn_dim=s["ffn"], num_layers=s["layers"], rope_max_seq_len=32)


def _wan_inputs(s: dict[str, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"hidden_states": torch.randn(s["batch"], s["channels"], s["frames"], s["side"], s["side"], generator=g),
            "timestep": torch.linspace(500.0, 200.0, s["batch"]),
            "encoder_hidden_states": torch.randn(s["batch"], s["caption"], s["text"], generator=g)}


def _hunyuan(s: dict[str, int]) -> torch.nn.Module:
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=s["channels"], out_channels=s["channels"], num_attention_heads=s["heads"], attention_head_dim=s["head_dim"],
        num_layers=s["double"], num_single_layers=s["single"], num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
        patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=s["text"],
        pooled_projection_dim=s["pooled"], rope_axes_dim=s["rope"])


def _hunyuan_inputs(s: dict[str, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"hidden_states": torch.randn(s["batch"], s["channels"], s["frames"], s["side"], s["side"], generator=g),
            "timestep": torch.full((s["batch"],), 500.0),
            "encoder_hidden_states": torch.randn(s["batch"], s["caption"], s["text"], generator=g),
            "encoder_attention_mask": torch.ones(s["batch"], s["caption"], dtype=torch.int64),
            "pooled_projections": torch.randn(s["batch"], s["pooled"], generator=g),
            "guidance": torch.full((s["batch"],), 6000.0)}


def _sd35(s: dict[str, int]) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(num_layers=s["layers"], attention_head_dim=s["head_dim"], num_attention_heads=s["heads"],
                                 sample_size=s["side"], patch_size=2, in_channels=s["channels"], out_channels=s["channels"],
                                 joint_attention_dim=s["text"], caption_projection_dim=s["heads"] * s["head_dim"],
                                 pooled_projection_dim=s["pooled"], pos_embed_max_size=2 * s["side"], qk_norm="rms_norm",
                                 dual_attention_layers=(0,))


def _sd35_inputs(s: dict[str, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"hidden_states": torch.randn(s["batch"], s["channels"], s["side"], s["side"], generator=g),
            "timestep": torch.linspace(500.0, 200.0, s["batch"]),
            "encoder_hidden_states": torch.randn(s["batch"], s["caption"], s["text"], generator=g),
            "pooled_projections": torch.randn(s["batch"], s["pooled"], generator=g)}


def _sana(s: dict[str, int]) -> torch.nn.Module:
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=s["channels"], out_channels=s["channels"], num_attention_heads=s["heads"],
                                  attention_head_dim=s["head_dim"], num_layers=s["layers"], num_cross_attention_heads=s["heads"],
                                  cross_attention_head_dim=s["head_dim"], cross_attention_dim=s["heads"] * s["head_dim"],
                                  caption_channels=s["text"], mlp_ratio=2.5, sample_size=s["side"], patch_size=1)


def _sana_inputs(s: dict[str, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"hidden_states": torch.randn(s["batch"], s["channels"], s["side"], s["side"], generator=g),
            "encoder_hidden_states": torch.randn(s["batch"], s["caption"], s["text"], generator=g),
            "timestep": torch.linspace(500.0, 200.0, s["batch"])}


def _cogvideox(s: dict[str, int]) -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(num_attention_heads=s["heads"], attention_head_dim=s["head_dim"],
                                       in_channels=s["channels"], out_channels=s["channels"], time_embed_dim=8,
                                       text_embed_dim=s["text"], num_layers=s["layers"], sample_width=s["side"],
                                       sample_height=s["side"], sample_frames=4 * s["frames"] - 3, patch_size=2,
                                       temporal_compression_ratio=4, max_text_seq_length=s["caption"])


def _cogvideox_inputs(s: dict[str, int], g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"hidden_states": torch.randn(s["batch"], s["frames"], s["channels"], s["side"], s["side"], generator=g),
            "encoder_hidden_states": torch.randn(s["batch"], s["caption"], s["text"], generator=g),
            "timestep": torch.linspace(500, 200, s["batch"]).long()}


FAMILIES: dict[str, Family] = {
    "flux": Family(_flux, _flux_inputs, {
        "tiny": {"batch": 1, "channels": 4, "grid": 4, "double": 2, "single": 3, "heads": 2, "head_dim": 8, "text": 12,
                 "caption": 5, "pooled": 6, "rope": [2, 2, 4]},
        "small": {"batch": 1, "channels": 16, "grid": 16, "double": 2, "single": 4, "heads": 4, "head_dim": 64,
                  "text": 64, "caption": 32, "pooled": 32, "rope": [16, 24, 24]},
    }, FLUX_SCHEDULER, pooled=True),
    "wan": Family(_wan, _wan_inputs, {
        "tiny": {"batch": 2, "channels": 4, "frames": 3, "side": 8, "layers": 2, "heads": 2, "head_dim": 8, "text": 12,
                 "freq": 16, "ffn": 32, "caption": 5},
        "small": {"batch": 2, "channels": 16, "frames": 4, "side": 16, "layers": 4, "heads": 4, "head_dim": 64,
                  "text": 64, "freq": 64, "ffn": 1024, "caption": 32},
    }, WAN_SCHEDULER),
    "hunyuanvideo": Family(_hunyuan, _hunyuan_inputs, {
        "tiny": {"batch": 1, "channels": 4, "frames": 3, "side": 8, "double": 1, "single": 1, "heads": 2, "head_dim": 8,
                 "text": 12, "caption": 5, "pooled": 6, "rope": (2, 4, 2)},
        "small": {"batch": 1, "channels": 16, "frames": 4, "side": 16, "double": 2, "single": 4, "heads": 4,
                  "head_dim": 64, "text": 64, "caption": 32, "pooled": 32, "rope": (16, 24, 24)},
    }, HUNYUAN_SCHEDULER, pooled=True),
    "sd3.5": Family(_sd35, _sd35_inputs, {
        "tiny": {"batch": 2, "channels": 4, "side": 8, "layers": 2, "heads": 2, "head_dim": 8, "text": 12, "caption": 5,
                 "pooled": 6},
        "small": {"batch": 2, "channels": 16, "side": 32, "layers": 4, "heads": 4, "head_dim": 64, "text": 64,
                  "caption": 32, "pooled": 32},
    }, FLOW_SCHEDULER, pooled=True),
    "sana": Family(_sana, _sana_inputs, {
        "tiny": {"batch": 2, "channels": 4, "side": 8, "layers": 2, "heads": 2, "head_dim": 8, "text": 12, "caption": 5},
        "small": {"batch": 2, "channels": 32, "side": 16, "layers": 4, "heads": 4, "head_dim": 64, "text": 64,
                  "caption": 32},
    }, SANA_SCHEDULER, exporter="legacy"),
    "cogvideox": Family(_cogvideox, _cogvideox_inputs, {
        "tiny": {"batch": 2, "channels": 4, "frames": 3, "side": 8, "layers": 2, "heads": 2, "head_dim": 8, "text": 12,
                 "caption": 5},
        "small": {"batch": 2, "channels": 16, "frames": 4, "side": 16, "layers": 4, "heads": 4, "head_dim": 64,
                  "text": 64, "caption": 32},
    }, COGVIDEOX_SCHEDULER),
}


@dataclass
class Exported:
    model: torch.nn.Module  # the PyTorch module exported (keyword wrapper around the diffusers model)
    path: Path
    feeds: dict[str, np.ndarray]  # the example inputs of the export
    scheduler: Path
    captions: Path
    pooled: Path | None


def export_family(name: str, size: str, path: Path, seed: int = 0, samples: int = 3) -> Exported:
    """Build `name` at `size` with random weights from `seed`, export it to `path`, and write its scheduler
    config and `samples` random caption embeddings beside it."""
    family = FAMILIES[name]
    spec = family.sizes[size]
    inputs = family.inputs(spec, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model = Keywords(randomize_(family.build(spec).eval(), seed), list(inputs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(inputs.values()), str(path), opset_version=18, input_names=list(inputs),
                              output_names=["noise_pred"], verbose=False,
                              **({"dynamo": True, "external_data": False} if family.exporter == "dynamo" else {"dynamo": False}))
    folder = path.parent
    scheduler = folder / "scheduler_config.json"
    scheduler.write_text(json.dumps(family.scheduler))
    rng = np.random.default_rng(seed)
    captions = folder / "captions.npy"
    np.save(captions, rng.standard_normal((samples, *inputs["encoder_hidden_states"].shape[1:])).astype(np.float32))
    pooled = None
    if family.pooled:
        pooled = folder / "pooled.npy"
        np.save(pooled, rng.standard_normal((samples, *inputs["pooled_projections"].shape[1:])).astype(np.float32))
    return Exported(model, path, {k: v.numpy() for k, v in inputs.items()}, scheduler, captions, pooled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("family", choices=list(FAMILIES))
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--seed", type=int, default=0, help="of the random weights and embeddings")
    ap.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file; its folder gets the rest")
    args = ap.parse_args()
    if not args.output.parent.is_dir():  # torch.onnx.export's own error here is a traceback
        ap.exit(2, f"{ap.prog}: error: the folder {args.output.parent} of -o does not exist; create it or pick another\n")
    out = export_family(args.family, args.size, args.output, args.seed)
    print(f"wrote {out.path}, {out.scheduler.name}, {out.captions.name}" + (f", {out.pooled.name}" if out.pooled else ""))


if __name__ == "__main__":
    main()
