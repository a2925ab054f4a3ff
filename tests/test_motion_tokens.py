"""FastCache's motion tokens: the stack on its k most salient tokens, checked against the PyTorch DiT."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from fcpass.compiler.discover import discover_blocks
from fcpass.compiler.passes.cache_regions import insert_cache_regions
from fcpass.compiler.trt_check import check_graph
from fcpass.contract.errors import FcpassError
from fcpass.contract.plan import APPROX_MIX, MIX_WIDTH, MOTION_INPUT, CachePlan
from fcpass.contract.tokens import TokenOptions
from fcpass.optimize import OptimizeOptions, optimize
from fcpass.sampling import SamplingSetup, load_denoiser
from runtimes.policies import FastCache, FastCacheConfig
from runtimes.sampler import SampleRequest, sample
from runtimes.schedulers import scheduler_from_config
from runtimes.state import Commit
from tests.conftest import SCHEDULER_CONFIG, export_tiny_dit, load, tiny_dit_model, tiny_feeds

torch = pytest.importorskip("torch")

ROLES = {"latent": "latent", "timestep": "timestep", "class": "class_labels", "prompt_embeds": None}
N, D, B = 16, 32, 2  # the tiny DiT: 16 tokens of width 32, batch 2 (one CFG pair)
SEED = 5


class Motion:
    """The tiny DiT (PyTorch and ONNX) compiled with motion tokens; runs one step under chosen controls."""

    def __init__(self, path: Path, ratio: float, regions: tuple[str, ...] = ("blocks", "stack")) -> None:
        self.original = load(path)
        bmap = discover_blocks(self.original, "latent")
        done = insert_cache_regions(self.original, bmap, ROLES, regions, taylor=True, motion_ratio=ratio)
        self.model, self.plan = done.model, done.plan
        self.sess = ort.InferenceSession(self.model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.orig = ort.InferenceSession(self.original.SerializeToString(), providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.stack = self.plan.region("stack")
        self.k = self.plan.motion["k"]

    def state(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {s.name: rng.standard_normal([int(d) for d in s.shape]).astype(s.dtype) for s in self.plan.states}

    def run(self, feeds: dict[str, np.ndarray], state: dict[str, np.ndarray], motion: int, ctl: int = 0,
            approx: str = "residual") -> dict[str, np.ndarray]:
        r = len(self.plan.regions)
        mix = np.zeros((r, MIX_WIDTH), np.float32)
        mix[self.stack.index] = APPROX_MIX[approx]
        ctls = np.zeros(r, np.int64)
        ctls[self.stack.index] = ctl
        out = self.sess.run(None, {**feeds, **state, "fc_ctl": ctls, "fc_thr": np.zeros(r, np.float32), "fc_mix": mix,
                                   MOTION_INPUT: np.array(motion, np.int64)})
        return dict(zip(self.outputs, out))

    def state_of(self, kind: str) -> str:
        return next(s.name for s in self.plan.states if s.region == "stack" and s.kind == kind)


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_dit(tmp_path_factory.mktemp(request.param) / "tiny.onnx", request.param, seed=SEED)


def _torch_motion_step(feeds: dict[str, np.ndarray], x_ref: np.ndarray, o_ref: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The motion step in PyTorch: the blocks run on the k selected tokens alone (`residual` for the rest)."""
    model = tiny_dit_model(SEED)
    with torch.no_grad():
        latent, t, y = (torch.from_numpy(feeds[n]) for n in ("latent", "timestep", "class_labels"))
        x = model.x_embedder(latent) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        saliency = ((x - torch.from_numpy(x_ref)) ** 2).sum(-1)
        idx = torch.topk(saliency.mean(0), k).indices  # both CFG halves select alike
        xk = x[:, idx]
        for block in model.blocks:
            xk = block(xk, c)
        out = torch.from_numpy(o_ref) + (x - torch.from_numpy(x_ref))
        out[:, idx] = xk
        final = model.final_layer(out, c)
        from models.dit import unpatchify

        pred = unpatchify(final, model.out_channels, model.patch_size)
    return {"idx": idx.numpy(), "x": x.numpy(), "xk": xk.numpy(), "stack_out": out.numpy(), "pred": pred.numpy()}


def test_motion_step_equals_the_pytorch_blocks_on_the_selected_tokens(exported: Path) -> None:
    m = Motion(exported, 0.5)
    assert m.k == 8
    feeds = tiny_feeds(seed=1)
    state = m.state(0)
    x_ref, o_ref, o_prev = (state[m.state_of(kind)] for kind in ("in", "out", "prev"))
    want = _torch_motion_step(feeds, x_ref, o_ref, m.k)
    got = m.run(feeds, state, motion=1)
    np.testing.assert_allclose(got["noise_pred"], want["pred"], rtol=1e-5, atol=2e-5)  # fp32 rounding
    idx = want["idx"]
    rest = np.setdiff1d(np.arange(N), idx)
    # Each reference is refreshed at the computed tokens only.
    x_next, o_next, prev_next = (got[m.state_of(kind) + ".next"] for kind in ("in", "out", "prev"))
    np.testing.assert_allclose(x_next[:, idx], want["x"][:, idx], atol=1e-5)
    np.testing.assert_allclose(o_next[:, idx], want["xk"], atol=1e-5)
    np.testing.assert_array_equal(x_next[:, rest], x_ref[:, rest])
    np.testing.assert_array_equal(o_next[:, rest], o_ref[:, rest])
    np.testing.assert_array_equal(prev_next[:, idx], o_ref[:, idx])
    np.testing.assert_array_equal(prev_next[:, rest], o_prev[:, rest])
    # Regions nested in the stack are not reached: NaN statistics, -1 decisions, states kept.
    blocks = [r.index for r in m.plan.block_regions()]
    assert np.isnan(got["fc_stat"][blocks]).all() and (got["fc_skip"][blocks] == -1).all()
    assert got["fc_skip"][m.stack.index] == 0
    kept = Commit(m.plan)(state, got, got["fc_skip"])
    for s in m.plan.states:
        if s.region.startswith("block"):
            np.testing.assert_array_equal(kept[s.name], state[s.name])


def test_motion_off_is_the_original_graph_and_k_n_equals_it_too(exported: Path) -> None:
    feeds = tiny_feeds(seed=2)
    want = Motion(exported, 0.5).orig.run(None, feeds)[0]
    for ratio, motion in ((0.5, 0), (1.0, 1)):
        m = Motion(exported, ratio)
        got = m.run(feeds, m.state(3), motion=motion)
        np.testing.assert_allclose(got["noise_pred"], want, atol=1e-5)
        if motion:  # every token computed: the states are the true stack input and output
            assert m.k == N
            full = m.run(feeds, m.state(3), motion=0)
            for kind in ("in", "out"):
                np.testing.assert_allclose(got[m.state_of(kind) + ".next"], full[m.state_of(kind) + ".next"], atol=1e-5)


def test_a_skipped_stack_ignores_the_motion_flag(exported: Path) -> None:
    m = Motion(exported, 0.5)
    feeds, state = tiny_feeds(seed=4), m.state(1)
    a, b = m.run(feeds, state, motion=0, ctl=1), m.run(feeds, state, motion=1, ctl=1)
    for name in m.outputs:
        np.testing.assert_array_equal(a[name], b[name])


def test_ops_static_k_and_tensorrt_rules(exported: Path) -> None:
    m = Motion(exported, 0.3)
    assert m.k == math.ceil(0.3 * N)
    stack_if = next(n for n in m.model.graph.node if n.op_type == "If" and n.name == "fc/stack/If")
    compute = next(a.g for a in stack_if.attribute if a.name == "else_branch")
    motion_if = next(n for n in compute.node if n.op_type == "If")
    motion = next(a.g for a in motion_if.attribute if a.name == "then_branch")
    ops = Counter(n.op_type for n in motion.node)
    assert ops["TopK"] == 1 and ops["GatherND"] >= 2 and ops["ScatterND"] == 4  # out, in, out, prev
    assert ops["GatherElements"] == ops["ScatterElements"] == 0  # whole token rows only
    # The nested block regions are not reached on a motion step; the static tokens' approximation
    # reads their input only where the mix row asks for it.
    assert [n.name for n in motion.node if n.op_type == "If"] == ["fc/stack/a0/gate"]
    topk = next(n for n in motion.node if n.op_type == "TopK")
    k_init = next(t for t in m.model.graph.initializer if t.name == topk.input[1])
    assert onnx.numpy_helper.to_array(k_init).tolist() == [m.k]
    assert m.plan.motion["macs"] < m.stack.macs
    assert not [v for v in check_graph(m.model) if v.severity == "error"]
    # The plan round-trips through the metadata.
    assert CachePlan.from_json(m.plan.to_json()).motion == m.plan.motion


def test_declines(exported: Path) -> None:
    original = load(exported)
    bmap = discover_blocks(original, "latent")
    with pytest.raises(FcpassError, match="stack"):
        insert_cache_regions(original, bmap, ROLES, ("blocks",), motion_ratio=0.5)
    with pytest.raises(FcpassError, match=r"must be in \(0, 1\]"):
        insert_cache_regions(original, bmap, ROLES, ("stack",), motion_ratio=0.0)
    with pytest.raises(FcpassError, match="cannot share a graph"):
        insert_cache_regions(original, bmap, ROLES, ("stack",), motion_ratio=0.5, tokens=TokenOptions(k=2))


def test_fastcache_motion_policy_sets_the_flag_after_warmup(exported: Path) -> None:
    m = Motion(exported, 0.5, regions=("stack",))
    policy = FastCache(FastCacheConfig(regions="stack", motion=True, warmup=2))
    policy.reset(m.plan, 6)
    assert [policy.controls(i).motion for i in range(6)] == [False, False, True, True, True, False]
    # Every second computing step runs all tokens; a skipped step does not count.
    policy = FastCache(FastCacheConfig(regions="stack", motion=True, warmup=2, motion_full_every=2))
    policy.reset(m.plan, 9)
    seen = []
    for i in range(9):
        seen.append(policy.controls(i).motion)
        policy.observe(i, np.zeros((1, B), np.float32), np.array([1.0 if i == 4 else 0.0], np.float32))
    assert seen == [False, False, True, False, True, True, False, True, False]
    plain = Motion(exported, 0.5, regions=("stack",))
    plain.plan.motion = {}
    with pytest.raises(FcpassError, match="--motion-ratio"):
        FastCache(FastCacheConfig(regions="stack", motion=True)).reset(plain.plan, 6)


@pytest.mark.parametrize("lowering", ["if", "segments"])
def test_sampling_with_motion_tokens_end_to_end(tmp_path: Path, lowering: str) -> None:
    src = export_tiny_dit(tmp_path / "tiny.onnx", "legacy", seed=SEED)
    out = tmp_path / ("tiny.fc.onnx" if lowering == "if" else "tiny.fc")
    request = SampleRequest(classes=[1], steps=6, guidance_scale=1.5, uncond_class=10)
    setup = SamplingSetup(SCHEDULER_CONFIG, request)
    plan = optimize(src, out, OptimizeOptions(regions=("stack",), motion_ratio=0.5, lowering=lowering), setup)
    assert plan.motion["k"] == 8
    den = load_denoiser(out, "fastcache:regions=stack,motion=1,warmup=2", {})
    runs = [sample(den, scheduler_from_config(SCHEDULER_CONFIG), request, progress=False) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].images, runs[1].images)  # the state is reset between runs
    assert [r["motion"] for r in runs[0].records] == [False, False, True, True, True, False]
    assert runs[0].macs_executed == runs[0].macs_uncached - 3 * (plan.region("stack").macs - plan.motion["macs"])
    base = sample(load_denoiser(out, "none", {}), scheduler_from_config(SCHEDULER_CONFIG), request, progress=False)
    assert not np.array_equal(base.images, runs[0].images)
    assert np.isfinite(runs[0].images).all()


def _torch_merge_step(feeds: dict[str, np.ndarray], x_ref: np.ndarray, k: int, nb: int = 5, lam: float = 1.0) -> np.ndarray:
    """ALGORITHMS 2c in numpy (float64, per sample), the blocks in PyTorch on the k merged tokens."""
    from models.dit import unpatchify

    model = tiny_dit_model(SEED)
    with torch.no_grad():
        latent, t, y = (torch.from_numpy(feeds[n]) for n in ("latent", "timestep", "class_labels"))
        x = (model.x_embedder(latent) + model.pos_embed).numpy().astype(np.float64)
        c = model.t_embedder(t) + model.y_embedder(y)
        merged, kept_all, d2_all = [], [], []
        for b in range(B):
            d2 = ((x[b, :, None] - x[b, None]) ** 2).sum(-1)
            hood = np.argsort(d2, axis=1, kind="stable")[:, : nb + 1]  # the token itself first
            density = np.take_along_axis(d2, hood[:, 1:], 1).mean(1)
            motion = np.linalg.norm(x[b] - x_ref[b], axis=1)
            log_s = -density + np.log1p(lam * motion / motion.max())
            kept = np.argsort(-log_s, kind="stable")[:k]
            w = np.exp(log_s - log_s.max())
            merged.append(np.stack([(w[hood[i], None] * x[b, hood[i]]).sum(0) / w[hood[i]].sum() for i in kept]))
            kept_all.append(kept)
            d2_all.append(d2)
        xm = torch.from_numpy(np.stack(merged)).float()
        ok = xm
        for block in model.blocks:
            ok = block(ok, c)
        delta = (ok - xm).numpy()
        out = np.stack([x[b] + delta[b][np.argmin(d2_all[b][:, kept_all[b]], axis=1)] for b in range(B)])
        final = model.final_layer(torch.from_numpy(out).float(), c)
        return unpatchify(final, model.out_channels, model.patch_size).numpy()


def test_merge_step_equals_the_pytorch_blocks_on_the_merged_tokens(exported: Path) -> None:
    from fcpass.compiler.passes.motion_tokens import MergeOptions

    original = load(exported)
    with pytest.raises(FcpassError, match="--no-probes"):  # TeaCache's probe reads the tokens too
        insert_cache_regions(original, discover_blocks(original, "latent"), ROLES, ("stack",), motion_ratio=0.5,
                             merge=MergeOptions())
    done = insert_cache_regions(original, discover_blocks(original, "latent"), ROLES, ("stack",),
                                motion_ratio=0.5, merge=MergeOptions(), probes=False)
    model, plan = done.model, done.plan
    assert plan.motion["merge"] == {"neighbours": 5, "weight": 1.0}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feeds = tiny_feeds(seed=1)
    rng = np.random.default_rng(0)
    state = {s.name: rng.standard_normal([int(d) for d in s.shape]).astype(s.dtype) for s in plan.states}
    got = dict(zip(names, sess.run(None, {**feeds, **state, "fc_ctl": np.zeros(1, np.int64), "fc_thr": np.zeros(1, np.float32),
                                         "fc_mix": np.zeros((1, MIX_WIDTH), np.float32), MOTION_INPUT: np.array(1, np.int64)})))
    x_ref = state[next(s.name for s in plan.states if s.kind == "in")]
    np.testing.assert_allclose(got["noise_pred"], _torch_merge_step(feeds, x_ref, plan.motion["k"]), rtol=1e-4, atol=1e-4)
    for s in plan.states:  # a merged step refreshes no reference
        np.testing.assert_array_equal(got[s.next], state[s.name])
    assert plan.motion["macs"] < plan.region("stack").macs
    assert not [v for v in check_graph(model) if v.severity == "error"]
    with pytest.raises(FcpassError, match="--merge-neighbours"):
        insert_cache_regions(original, discover_blocks(original, "latent"), ROLES, ("stack",), motion_ratio=0.5,
                             merge=MergeOptions(neighbours=N), probes=False)


def _torch_context_step(feeds: dict[str, np.ndarray], state: dict[str, np.ndarray], plan: CachePlan, k: int) -> np.ndarray:
    """A motion step whose k tokens attend to every token: their own fresh keys and values scattered
    into the cached ones of all N (`--motion-context`), in PyTorch; `reuse` for the other tokens."""
    from models.dit import modulate, unpatchify

    model = tiny_dit_model(SEED)
    keys = [state[s.name] for s in plan.states if s.kind == "key"]
    values = [state[s.name] for s in plan.states if s.kind == "value"]
    x_ref = state[next(s.name for s in plan.states if s.kind == "in")]
    o_ref = state[next(s.name for s in plan.states if s.kind == "out")]
    assert len(keys) == len(values) == len(model.blocks)
    with torch.no_grad():
        latent, t, y = (torch.from_numpy(feeds[n]) for n in ("latent", "timestep", "class_labels"))
        x = model.x_embedder(latent) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        idx = torch.topk(((x - torch.from_numpy(x_ref)) ** 2).sum(-1).mean(0), k).indices
        h = x[:, idx]
        for block, key, value in zip(model.blocks, keys, values):
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = block.adaLN_modulation(c).chunk(6, dim=1)
            a = block.attn
            qkv = a.qkv(modulate(block.norm1(h), shift_a, scale_a)).reshape(B, k, 3, a.num_heads, a.head_dim)
            q, kk, v = qkv.permute(2, 0, 3, 1, 4)
            key_all, value_all = torch.from_numpy(key).clone(), torch.from_numpy(value).clone()
            key_all[..., idx] = kk.transpose(-2, -1)
            value_all[:, :, idx] = v
            att = ((q * a.scale) @ key_all).softmax(-1) @ value_all
            h = h + gate_a.unsqueeze(1) * a.proj(att.transpose(1, 2).reshape(B, k, D))
            h = h + gate_m.unsqueeze(1) * block.mlp(modulate(block.norm2(h), shift_m, scale_m))
        out = torch.from_numpy(o_ref).clone()
        out[:, idx] = h
        return unpatchify(model.final_layer(out, c), model.out_channels, model.patch_size).numpy()


def test_motion_tokens_attending_to_cached_keys_and_values(exported: Path) -> None:
    original = load(exported)
    bmap = discover_blocks(original, "latent")
    done = insert_cache_regions(original, bmap, ROLES, ("stack",), motion_ratio=0.5, motion_context=True)
    model, plan = done.model, done.plan
    assert plan.motion["context"]
    kv = [s for s in plan.states if s.kind in ("key", "value")]
    assert [s.shape for s in kv[:2]] == [[B, 2, D // 2, N], [B, 2, N, D // 2]]  # (B, H, d, N) and (B, H, N, d)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    controls = {"fc_ctl": np.zeros(1, np.int64), "fc_thr": np.zeros(1, np.float32), "fc_mix": np.zeros((1, MIX_WIDTH), np.float32)}

    def run(feeds: dict[str, np.ndarray], state: dict[str, np.ndarray], motion: int) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(None, {**feeds, **state, **controls, MOTION_INPUT: np.array(motion, np.int64)})))

    feeds = tiny_feeds(seed=1)
    rng = np.random.default_rng(0)
    state = {s.name: rng.standard_normal([int(d) for d in s.shape]).astype(s.dtype) for s in plan.states}
    got = run(feeds, state, 1)
    np.testing.assert_allclose(got["noise_pred"], _torch_context_step(feeds, state, plan, plan.motion["k"]),
                               rtol=1e-5, atol=2e-5)
    # A full step stores the true keys and values; a motion step at the same input then equals it.
    full = run(feeds, state, 0)
    cached = {s.name: full[s.next] for s in plan.states}
    again = run(feeds, cached, 1)
    np.testing.assert_allclose(again["noise_pred"], full["noise_pred"], atol=1e-5)
    for s in kv:
        np.testing.assert_allclose(again[s.next], full[s.next], atol=1e-6)
    with pytest.raises(FcpassError, match="--regions stack"):
        insert_cache_regions(original, bmap, ROLES, ("blocks", "stack"), motion_ratio=0.5, motion_context=True)
