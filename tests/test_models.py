"""Checkpoint loading, official <-> diffusers DiT conversion, and the PixArt model, on tiny configs.

Every model here has random non-zero weights everywhere (`randomize_`): the reference
initialisation zeroes the adaLN and output layers, under which any two implementations agree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fcpass.contract.errors import FcpassError
from models.convert import (
    diffusers_dit_config,
    diffusers_to_dit,
    dit_to_diffusers,
    infer_dit_shape,
    is_diffusers_layout,
    load_dit_checkpoint,
    match_official_timestep_embedding_,
    save_diffusers,
)
from models.dit import DiT, DiTConfig
from models.pixart import PixArt, PixArtConfig, pixart_config, randomize_

TINY = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def _dit(config: DiTConfig = TINY, seed: int = 0) -> DiT:
    return randomize_(DiT(config), seed).eval()


def _inputs(config: DiTConfig = TINY) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, config.in_channels, config.input_size, config.input_size, generator=g)
    # Non-integer and large timesteps, where the two sin-cos conventions differ most.
    t = torch.tensor([0.0, 37.5, 999.0])
    y = torch.tensor([0, 7, config.num_classes - 1])
    return x, t, y


@torch.no_grad()
def _run(model: DiT, config: DiTConfig = TINY) -> torch.Tensor:
    return model(*_inputs(config))


@pytest.fixture(scope="module")
def model() -> DiT:
    return _dit()


@pytest.fixture(scope="module")
def reference(model: DiT) -> torch.Tensor:
    out = _run(model)
    assert out.shape == (3, TINY.out_channels, 8, 8)
    assert out.abs().max() > 1e-2, "randomize_ left the output trivial; parity tests would prove nothing"
    return out


def _diffusers_dit(config: DiTConfig) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**diffusers_dit_config(config)).eval()


@torch.no_grad()
def _run_diffusers(dmodel: torch.nn.Module, config: DiTConfig = TINY) -> torch.Tensor:
    x, t, y = _inputs(config)
    return dmodel(x, timestep=t, class_labels=y).sample


# ---------------------------------------------------------------------------- official checkpoints


@pytest.mark.parametrize("form", ["plain", "ema", "ddp", "safetensors"])
def test_official_checkpoint_loads_identically(tmp_path: Path, model: DiT, reference: torch.Tensor, form: str) -> None:
    sd = model.state_dict()
    other = _dit(seed=99).state_dict()  # decoy: the wrong wrapper key would load these
    if form == "plain":
        path = tmp_path / "dit.pt"
        torch.save(sd, path)
    elif form == "ema":
        # What the official train.py writes, argparse.Namespace included.
        path = tmp_path / "0050000.pt"
        torch.save({"model": other, "ema": sd, "opt": {}, "args": argparse.Namespace(model="DiT-S/2")}, path)
    elif form == "ddp":
        path = tmp_path / "dit.pth"
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        path = tmp_path / "dit.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))

    loaded = load_dit_checkpoint(path, TINY)
    assert not loaded.training
    assert torch.equal(_run(loaded), reference)


def test_missing_or_unreadable_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(FcpassError, match="not found"):
        load_dit_checkpoint(tmp_path / "nope.pt", TINY)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FcpassError, match="could not be read"):
        load_dit_checkpoint(junk, TINY)
    not_weights = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_weights)
    with pytest.raises(FcpassError, match="no state dict"):
        load_dit_checkpoint(not_weights, TINY)


def test_wrong_depth_names_key_and_fix(tmp_path: Path, model: DiT) -> None:
    path = tmp_path / "dit.pt"
    torch.save(model.state_dict(), path)
    deeper = DiTConfig(**{**TINY.__dict__, "depth": 3})
    with pytest.raises(FcpassError) as info:
        load_dit_checkpoint(path, deeper)
    msg = str(info.value)
    assert "'blocks.2.attn.qkv.weight'" in msg and "absent" in msg
    assert "depth 2, width 64" in msg and "depth=2" in msg

    shallower = DiTConfig(**{**TINY.__dict__, "depth": 1})
    with pytest.raises(FcpassError, match=r"'blocks\.1\..*no place in the model.*depth 2, width 64"):
        load_dit_checkpoint(path, shallower)


def test_wrong_width_names_key_shapes_and_fix(tmp_path: Path, model: DiT) -> None:
    path = tmp_path / "dit.pt"
    torch.save(model.state_dict(), path)
    wider = DiTConfig(**{**TINY.__dict__, "hidden_size": 96})
    with pytest.raises(FcpassError) as info:
        load_dit_checkpoint(path, wider)
    msg = str(info.value)
    assert "'x_embedder.proj.weight'" in msg
    assert "(96, 4, 2, 2)" in msg and "(64, 4, 2, 2)" in msg
    assert "hidden_size=64" in msg


def test_published_size_is_suggested_by_name(tmp_path: Path) -> None:
    # Only the tensors the loader reads first and the size guess needs; shapes as in DiT-S/2.
    sd = {"x_embedder.proj.weight": torch.zeros(384, 4, 2, 2), "pos_embed": torch.zeros(1, 16, 384)}
    sd.update({f"blocks.{i}.attn.qkv.bias": torch.zeros(3 * 384) for i in range(12)})
    assert infer_dit_shape(sd) == {"depth": 12, "hidden_size": 384, "in_channels": 4, "patch_size": 2, "input_size": 8}
    path = tmp_path / "dit_s.pt"
    torch.save(sd, path)
    with pytest.raises(FcpassError) as info:
        load_dit_checkpoint(path, TINY)
    msg = str(info.value)
    assert "these weights look like depth 12, width 384: DiT-S/2" in msg
    assert "--arch dit-s-2" in msg


def test_other_mismatches_get_specific_advice(tmp_path: Path) -> None:
    no_sigma = DiTConfig(**{**TINY.__dict__, "learn_sigma": False, "num_classes": 5})
    path = tmp_path / "dit.pt"
    torch.save(_dit(no_sigma).state_dict(), path)
    with pytest.raises(FcpassError) as info:
        load_dit_checkpoint(path, TINY)
    msg = str(info.value)
    assert "'y_embedder.embedding_table.weight'" in msg
    assert "num_classes=5" in msg and "learn_sigma=False" in msg


# ---------------------------------------------------------------------------- diffusers layout


def test_converted_keys_and_shapes_are_diffusers_own(model: DiT) -> None:
    converted = dit_to_diffusers(model.state_dict(), TINY)
    expected = _diffusers_dit(TINY).state_dict()
    assert list(converted) != [] and set(converted) == set(expected)
    for key, tensor in expected.items():
        assert converted[key].shape == tensor.shape, key
    # One embedder copy per block, each its own storage (safetensors refuses shared tensors).
    a = converted["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"]
    b = converted["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"]
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert is_diffusers_layout(converted) and not is_diffusers_layout(model.state_dict())


def test_diffusers_model_matches_official(tmp_path: Path, model: DiT, reference: torch.Tensor) -> None:
    from diffusers import DiTTransformer2DModel

    folder = save_diffusers(model, tmp_path / "dit-diffusers")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    dmodel, info = DiTTransformer2DModel.from_pretrained(folder, output_loading_info=True)
    assert all(not v for v in info.values()), info
    # A 1e-5 vs 1e-6 LayerNorm eps moves outputs by only ~5e-6 here, below the tolerance; check it directly.
    eps = {m.eps for m in dmodel.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    dmodel = match_official_timestep_embedding_(dmodel.eval())
    out = _run_diffusers(dmodel)
    assert out.shape == reference.shape
    assert (out - reference).abs().max().item() <= 1e-5


def test_diffusers_timestep_frequencies_differ_unless_patched(model: DiT, reference: torch.Tensor) -> None:
    """diffusers' DiT uses downscale_freq_shift=1; only t=0 (all cos 1, sin 0) is unaffected."""
    dmodel = _diffusers_dit(TINY)
    dmodel.load_state_dict(dit_to_diffusers(model.state_dict(), TINY), strict=True)
    diff = (_run_diffusers(dmodel) - reference).abs().amax(dim=(1, 2, 3))
    assert diff[0] <= 1e-5
    assert diff[1:].min() > 1e-4
    match_official_timestep_embedding_(dmodel)
    assert (_run_diffusers(dmodel) - reference).abs().max() <= 1e-5


def test_no_dropout_class_table_round_trips(tmp_path: Path) -> None:
    config = DiTConfig(**{**TINY.__dict__, "class_dropout_prob": 0.0})
    model = _dit(config)
    sd = model.state_dict()
    assert sd["y_embedder.embedding_table.weight"].shape[0] == 10
    converted = dit_to_diffusers(sd, config)
    # diffusers always has the null-class row.
    assert converted["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].shape[0] == 11
    back = diffusers_to_dit(converted, config)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    dmodel = _diffusers_dit(config)
    dmodel.load_state_dict(converted, strict=True)
    match_official_timestep_embedding_(dmodel)
    assert (_run_diffusers(dmodel, config) - _run(model, config)).abs().max() <= 1e-5


def test_round_trips_are_exact(model: DiT) -> None:
    sd = model.state_dict()
    back = diffusers_to_dit(dit_to_diffusers(sd, TINY), TINY)
    assert list(back) and back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back[key], sd[key]), key

    # From diffusers' side: a random diffusers model whose embedder copies agree, as converted weights do.
    dsd = randomize_(_diffusers_dit(TINY), seed=5).state_dict()
    for key in list(dsd):
        if ".norm1.emb." in key and key.startswith("transformer_blocks.1."):
            dsd[key] = dsd[key.replace("transformer_blocks.1.", "transformer_blocks.0.")].clone()
    again = dit_to_diffusers(diffusers_to_dit(dsd, TINY), TINY)
    assert again.keys() == dsd.keys()
    for key in dsd:
        assert torch.equal(again[key], dsd[key]), key


def test_pos_embed_is_kept_when_asked(model: DiT) -> None:
    sd = dict(model.state_dict())
    sd["pos_embed"] = sd["pos_embed"] + 0.5  # a learned table diffusers would not reproduce
    assert "pos_embed.pos_embed" not in dit_to_diffusers(sd, TINY)
    kept = dit_to_diffusers(sd, TINY, include_pos_embed=True)
    assert torch.equal(diffusers_to_dit(kept, TINY)["pos_embed"], sd["pos_embed"])


def test_divergent_diffusers_embedders_are_refused(model: DiT) -> None:
    dsd = dit_to_diffusers(model.state_dict(), TINY)
    dsd["transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"] += 1.0
    with pytest.raises(FcpassError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder\.linear_2\.bias"):
        diffusers_to_dit(dsd, TINY)


def test_diffusers_layout_loads_through_loader(tmp_path: Path, model: DiT, reference: torch.Tensor) -> None:
    path = tmp_path / "diffusers_layout.safetensors"
    save_file(dit_to_diffusers(model.state_dict(), TINY), str(path))
    assert torch.equal(_run(load_dit_checkpoint(path, TINY)), reference)
    folder = save_diffusers(model, tmp_path / "folder")
    assert torch.equal(_run(load_dit_checkpoint(folder, TINY)), reference)
    # A depth mismatch in diffusers layout is reported in official names.
    with pytest.raises(FcpassError, match=r"'blocks\.2\.attn\.qkv\.weight'.*depth 2, width 64"):
        load_dit_checkpoint(path, DiTConfig(**{**TINY.__dict__, "depth": 3}))


def test_config_outside_diffusers_is_refused() -> None:
    with pytest.raises(FcpassError, match="mlp_ratio"):
        diffusers_dit_config(DiTConfig(**{**TINY.__dict__, "mlp_ratio": 2.0}))


# ---------------------------------------------------------------------------- PixArt

PIXART = pixart_config("pixart-tiny")


def _pixart_inputs(config: PixArtConfig = PIXART, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, config.input_size, config.input_size, generator=g)
    t = torch.tensor([12.0, 640.0])
    ehs = torch.randn(2, config.caption_len, config.caption_channels, generator=g)
    return x, t, ehs


@torch.no_grad()
def test_pixart_shape_and_determinism() -> None:
    model = randomize_(PixArt(PIXART), seed=3).eval()
    x, t, ehs = _pixart_inputs()
    out = model(x, t, ehs)
    assert out.shape == (2, 2 * PIXART.in_channels, PIXART.input_size, PIXART.input_size)
    assert torch.isfinite(out).all() and out.abs().max() > 1e-2
    assert torch.equal(model(x, t, ehs), out)
    twin = randomize_(PixArt(PIXART), seed=3).eval()
    assert torch.equal(twin(x, t, ehs), out)
    # The reference zero-init makes an untrained model's output exactly zero.
    assert torch.count_nonzero(PixArt(PIXART).eval()(x, t, ehs)) == 0


def test_pixart_module_tree() -> None:
    model = PixArt(PIXART)
    assert len(model.blocks) == PIXART.depth
    names = set(model.state_dict())
    for i in range(PIXART.depth):
        for suffix in ("scale_shift_table", "attn.qkv.weight", "cross_attn.q_linear.weight",
                       "cross_attn.kv_linear.weight", "cross_attn.proj.weight", "mlp.fc1.weight"):
            assert f"blocks.{i}.{suffix}" in names
    assert {"t_block.1.weight", "y_embedder.y_proj.fc1.weight", "final_layer.scale_shift_table", "pos_embed"} <= names
    assert model.blocks[0].scale_shift_table.shape == (6, PIXART.hidden_size)


@torch.no_grad()
def test_pixart_depends_on_text_and_time() -> None:
    model = randomize_(PixArt(PIXART), seed=4).eval()
    x, t, ehs = _pixart_inputs()
    out = model(x, t, ehs)
    assert (model(x, t, _pixart_inputs(seed=9)[2]) - out).abs().max() > 1e-3
    assert (model(x, t + 100.0, ehs) - out).abs().max() > 1e-3
    # Per sample: changing one caption leaves the other sample's output alone.
    ehs2 = ehs.clone()
    ehs2[1] += 1.0
    out2 = model(x, t, ehs2)
    assert (out2[0] - out[0]).abs().max() <= 1e-6
    assert (out2[1] - out[1]).abs().max() > 1e-3


def _pixart_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our PixArt names -> diffusers PixArtTransformer2DModel names (test-only mapping)."""
    top = {
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
        "t_block.1": "adaln_single.linear",
        "y_embedder.y_proj.fc1": "caption_projection.linear_1",
        "y_embedder.y_proj.fc2": "caption_projection.linear_2",
        "final_layer.linear": "proj_out",
    }
    block = {"attn.proj": "attn1.to_out.0", "cross_attn.q_linear": "attn2.to_q", "cross_attn.proj": "attn2.to_out.0",
             "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
    out: dict[str, torch.Tensor] = {"scale_shift_table": sd["final_layer.scale_shift_table"]}
    for key, value in sd.items():
        stem, _, leaf = key.rpartition(".")
        if stem in top:
            out[f"{top[stem]}.{leaf}"] = value
        elif key.startswith("blocks."):
            _, i, rest = key.split(".", 2)
            d = f"transformer_blocks.{i}."
            stem = rest.rpartition(".")[0]
            if rest == "scale_shift_table":
                out[d + rest] = value
            elif stem == "attn.qkv":
                for name, part in zip("qkv", value.chunk(3), strict=True):
                    out[f"{d}attn1.to_{name}.{leaf}"] = part
            elif stem == "cross_attn.kv_linear":
                for name, part in zip("kv", value.chunk(2), strict=True):
                    out[f"{d}attn2.to_{name}.{leaf}"] = part
            else:
                out[f"{d}{block[stem]}.{leaf}"] = value
    return out


@torch.no_grad()
def test_pixart_matches_diffusers_pixart() -> None:
    """Same weights in diffusers' PixArtTransformer2DModel give the same output: the design is PixArt's."""
    from diffusers import PixArtTransformer2DModel

    cfg = PIXART
    model = randomize_(PixArt(cfg), seed=6).eval()
    dmodel = PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        cross_attention_dim=cfg.hidden_size, sample_size=cfg.input_size, patch_size=cfg.patch_size,
        caption_channels=cfg.caption_channels, use_additional_conditions=False,
    ).eval()
    dmodel.load_state_dict(_pixart_to_diffusers(model.state_dict()), strict=True)
    x, t, ehs = _pixart_inputs()
    ours = model(x, t, ehs)
    theirs = dmodel(x, encoder_hidden_states=ehs, timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_pixart_xl_config_is_the_published_size() -> None:
    cfg = pixart_config("pixart-xl-2")
    assert (cfg.input_size, cfg.hidden_size, cfg.depth, cfg.num_heads) == (64, 1152, 28, 16)
    assert (cfg.caption_channels, cfg.caption_len, cfg.out_channels) == (4096, 120, 8)
    with torch.device("meta"):
        n = sum(p.numel() for p in PixArt(cfg).parameters())
    # The "0.6B" PixArt-alpha XL/2: exactly diffusers' PixArtTransformer2DModel at sample_size 64.
    assert n == 610_856_096
    with pytest.raises(FcpassError, match="pixart-tiny"):
        pixart_config("pixart-huge")
