"""A tiny DiT compiled in process, run one step at a time under chosen controls: region caching (`Compiled`)
and token caching (`Tok`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from fcpass.compiler.branches import find_branches
from fcpass.compiler.discover import discover_blocks
from fcpass.compiler.graphinfo import GraphIndex
from fcpass.compiler.passes.cache_regions import insert_cache_regions
from fcpass.contract.plan import APPROX_MIX, MIX_WIDTH, write_plan
from fcpass.contract.tokens import TokenOptions
from runtimes.state import Commit
from tests.conftest import load

ROLES = {"latent": "latent", "timestep": "timestep", "class": "class_labels", "prompt_embeds": None}


class Compiled:
    """A compiled tiny model with helpers to run one step under chosen controls."""

    def __init__(self, path: Path, regions: tuple[str, ...] = ("blocks", "tail", "stack"), taylor: bool = True) -> None:
        self.original = load(path)
        bmap = discover_blocks(self.original, "latent")
        done = insert_cache_regions(self.original, bmap, ROLES, regions, taylor=taylor)
        self.model, self.plan = done.model, done.plan
        write_plan(self.model, self.plan)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(self.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.ref_sess = ort.InferenceSession(self.original.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]
        r = len(self.plan.regions)
        self.state = {s.name: np.zeros(s.shape, s.dtype) for s in self.plan.states}
        self.dtype = np.dtype(self.plan.states[0].dtype)  # the model's float type
        self.commit = Commit(self.plan)
        self.ctl = np.zeros(r, np.int64)
        self.thr = np.zeros(r, np.float32)
        self.mix = np.zeros((r, MIX_WIDTH), np.float32)

    def idx(self, name: str) -> int:
        return self.plan.region(name).index

    def run(self, feeds: dict[str, np.ndarray], update: bool = True) -> dict[str, np.ndarray]:
        out = dict(zip(self.names, self.sess.run(None, {**feeds, **self.state, "fc_ctl": self.ctl,
                                                          "fc_thr": self.thr, "fc_mix": self.mix})))
        if update:
            self.state = self.commit(self.state, out, out["fc_skip"])
        return out

    def true_values(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """Values of original-graph tensors, by exposing them as extra outputs of the original model."""
        m = onnx.ModelProto()
        m.CopyFrom(self.original)
        for n in names:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


class Tok:
    """A tiny DiT compiled with token caching; run steps under chosen region and token controls."""

    def __init__(self, path: Path, k: int | None = 5, regions: tuple[str, ...] = ("blocks",), score: str = "vnorm",
                 **options: float) -> None:
        self.original = load(path)
        bmap = discover_blocks(self.original, "latent")
        index = GraphIndex(self.original)
        self.split = [find_branches(index, b) for b in bmap.blocks]
        done = insert_cache_regions(self.original, bmap, ROLES, regions,
                                    tokens=TokenOptions(k=k, score=score, **options))
        self.model, self.plan = done.model, done.plan
        write_plan(self.model, self.plan)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(self.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.ref = ort.InferenceSession(self.original.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.sess.get_outputs()]
        self.state = {s.name: np.zeros(s.shape, s.dtype) for s in self.plan.states}
        self.r = len(self.plan.regions)
        self.blocks = len(self.plan.tokens["blocks"])

    def run(self, feeds: dict[str, np.ndarray], tok: list[int] | int = 0, ctl: dict[str, int] | None = None,
            rand: np.ndarray | None = None) -> dict[str, np.ndarray]:
        c = np.zeros(self.r, np.int64)
        mix = np.zeros((self.r, len(APPROX_MIX["reuse"])), np.float32)
        for name, v in (ctl or {}).items():
            c[self.plan.region(name).index] = v
            mix[self.plan.region(name).index] = APPROX_MIX["reuse"]
        extra = {"fc_tok_rand": rand} if rand is not None else {}
        modes = np.broadcast_to(np.asarray(tok, np.int64), (self.blocks,)).copy()
        out = dict(zip(self.names, self.sess.run(None, {
            **feeds, **self.state, **extra, "fc_ctl": c, "fc_thr": np.zeros(self.r, np.float32), "fc_mix": mix,
            "fc_tok": modes})))
        self.state = Commit(self.plan)(self.state, out, out["fc_skip"], modes)
        return out

    def truth(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        m = onnx.ModelProto()
        m.CopyFrom(self.original)
        m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
