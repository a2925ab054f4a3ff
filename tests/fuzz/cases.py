"""What several fuzz modules and the atheris targets share: the graph edits, the scheduler configs and the
plan carrier they damage, and how a scheduler is run to its end."""

from __future__ import annotations

import json

import numpy as np
import onnx
from hypothesis import strategies as st

from fcpass.contract.plan import PLAN_KEY
from models.digits import SCHEDULER_CONFIG
from runtimes.sampler import check_finite
from runtimes.schedulers import scheduler_from_config

GRAPH_EDITS = ["elem_type", "shape", "cycle", "dangling", "drop_node", "output_type", "drop_initializer"]


def edit_graph(model: onnx.ModelProto, edit: str, draw: st.DrawFn) -> None:
    g = model.graph
    if edit == "elem_type":
        v = draw(st.sampled_from([*g.input, *g.output, *g.value_info]))
        v.type.tensor_type.elem_type = draw(st.sampled_from([0, 2, 6, 7, 9, 10, 11, 16, 30]))
    elif edit in ("shape", "output_type"):
        v = draw(st.sampled_from([*g.input] if edit == "shape" else [*g.output, *g.value_info]))
        dims = v.type.tensor_type.shape.dim
        if dims and draw(st.booleans()):
            dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(st.sampled_from([0, 1, 3, 7, 10**6]))
        else:
            dims.add().dim_value = 5
    elif edit == "cycle":  # a node reads an output of a later node
        i = draw(st.integers(0, len(g.node) - 2))
        j = draw(st.integers(i + 1, len(g.node) - 1))
        if g.node[i].input and g.node[j].output:
            g.node[i].input[0] = g.node[j].output[0]
    elif edit == "dangling":
        n = g.node[draw(st.integers(0, len(g.node) - 1))]
        if n.input:
            n.input[draw(st.integers(0, len(n.input) - 1))] = "no_such_tensor"
    elif edit == "drop_node":
        del g.node[draw(st.integers(0, len(g.node) - 1))]
    elif g.initializer:
        del g.initializer[draw(st.integers(0, len(g.initializer) - 1))]


FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
        "max_shift": 1.15}
CONFIGS_ON_DISK = [SCHEDULER_CONFIG, *sorted((SCHEDULER_CONFIG.parent / "schedulers").glob("*.json"))]
SCHEDULER_DOCS = [json.loads(p.read_text()) for p in CONFIGS_ON_DISK] + [FLOW]
SCHEDULER_KEYS = sorted({k for d in SCHEDULER_DOCS for k in d} | {"trained_betas", "rescale_betas_zero_snr",
                        "thresholding", "solver_order", "algorithm_type", "use_karras_sigmas", "final_sigmas_type"})


def run_scheduler(config: dict, steps: int) -> None:
    """Build the scheduler and take every step of a trajectory: the result must be finite, or an error."""
    scheduler = scheduler_from_config(config)
    scheduler.set_timesteps(steps, image_seq_len=16)
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        out = np.tanh(scheduler.scale_model_input(x, i))
        x = scheduler.step(out, i, x)
        check_finite(x, i, len(scheduler.timesteps), scheduler)  # the sampler's guard
    if not np.all(np.isfinite(x)) or not np.all(np.isfinite(np.asarray(scheduler.timesteps, dtype=float))):
        raise AssertionError(f"a scheduler built from {config} sampled non-finite values without an error")


def with_plan(text: str) -> onnx.ModelProto:
    """A node-less model holding only `text` as its plan: what read_plan reads."""
    model = onnx.ModelProto()
    entry = model.metadata_props.add()
    entry.key, entry.value = PLAN_KEY, text
    return model
