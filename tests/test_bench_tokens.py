"""tools/bench_tokens.py's token-local branches, cut out of a real export: they compute what the graph computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from tests.conftest import tiny_feeds
from tests.helpers.compiled import Tok
from tools.bench_tokens import local_branches


def test_cut_branches_equal_the_exported_graph_on_all_tokens_and_on_k(tiny_dit: Path) -> None:
    tok = Tok(tiny_dit)
    feeds = tiny_feeds(0)
    cut, full, few = local_branches(tiny_dit, tok.plan, feeds)
    outputs = [o.name for o in cut.graph.output]
    assert len(outputs) == tok.blocks  # one MLP per block

    want = tok.truth(feeds, outputs)
    sess = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    for name, got in zip(outputs, sess.run(outputs, full)):
        np.testing.assert_allclose(got, want[name], atol=1e-5, err_msg=name)

    ks = sorted({few[n].shape[1] for n in few if few[n].shape != full[n].shape})
    assert ks and max(ks) < full[next(iter(full))].shape[1]
    # Token-local: the branch on a token's row alone gives that row of the branch on every token.
    for name, got in zip(outputs, sess.run(outputs, few)):
        assert got.shape[1] in ks
        np.testing.assert_allclose(got, want[name][:, :got.shape[1]], atol=1e-5, err_msg=name)
