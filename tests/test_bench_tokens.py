"""tools/bench_tokens.py's token-local branches, cut out of a real export: they compute what the graph computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from fcpass.optimize import OptimizeOptions, optimize
from runtimes.backend import OrtBackend
from tools.bench_tokens import build_feeds, local_branches


def test_cut_branches_equal_the_exported_graph_on_all_tokens_and_on_k(tiny_dit: Path, tmp_path: Path) -> None:
    plan = optimize(tiny_dit, tmp_path / "m.fc.onnx", OptimizeOptions(regions=("stack",), tokens="duca"), None)
    feeds, _ = build_feeds(OrtBackend(tiny_dit), plan, seed=0)
    cut, full, few = local_branches(tiny_dit, plan, feeds)
    outputs = [o.name for o in cut.graph.output]
    assert len(outputs) == len(plan.tokens["blocks"])  # one MLP per block

    probe = onnx.load(str(tiny_dit))
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    want = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(outputs, feeds)
    sess = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(outputs, full)
    for name, w, g in zip(outputs, want, got):
        np.testing.assert_allclose(g, w, atol=1e-5, err_msg=name)

    ks = sorted({few[n].shape[1] for n in few if few[n].shape != full[n].shape})
    assert ks and max(ks) < full[next(iter(full))].shape[1]
    # Token-local: the branch on a token's row alone gives that row of the branch on every token.
    for name, w, g in zip(outputs, want, sess.run(outputs, few)):
        assert g.shape[1] in ks
        np.testing.assert_allclose(g, w[:, :g.shape[1]], atol=1e-5, err_msg=name)
