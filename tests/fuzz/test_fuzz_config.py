"""Scheduler configs, policy specs and the small values the CLI parses: each field a wrong type or out of range."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcpass.contract.errors import FcpassError
from runtimes.policies import CONFIGS, POLICIES, make_policy
from runtimes.schedulers import load_config
from tests.fuzz.cases import FLOW, SCHEDULER_DOCS, SCHEDULER_KEYS, run_scheduler
from tests.fuzz.harness import case_dir, check, examples
from tests.fuzz.mutate import ODD_VALUES, damaged_text


@settings(max_examples=examples(2500))
@given(base=st.sampled_from(SCHEDULER_DOCS), key=st.sampled_from(SCHEDULER_KEYS), value=ODD_VALUES,
       steps=st.sampled_from([1, 2, 3, 10, 25]))
def test_scheduler_field(base: dict, key: str, value: object, steps: int) -> None:
    check("scheduler.config", lambda: run_scheduler({**base, key: value}, steps))


@settings(max_examples=examples(400))
@given(base=st.sampled_from(SCHEDULER_DOCS), data=st.data())
def test_scheduler_file(base: dict, data: st.DataObject) -> None:
    text = data.draw(damaged_text(json.dumps(base, indent=1)))
    with case_dir() as d:
        path = d / "scheduler_config.json"
        path.write_text(text)
        check("scheduler.file", lambda: run_scheduler(load_config(path), 4), inputs=[path], folder=d)


POLICY_FIELDS = {name: list(cls.__dataclass_fields__) for name, cls in CONFIGS.items()}
SPEC_VALUES = st.one_of(st.sampled_from(["0", "1", "-1", "0.5", "1e309", "nan", "NaN", "Infinity", "-0", "[]", "[1,2]",
                                         "{}", "null", "true", "x", "", "stack", "blocks", "stack,blocks", "tail",
                                         "reuse", "taylor1", "1e-300", "99999999999999999999", '"q"', "\u00e9"]),
                        st.text(max_size=6))


@st.composite
def policy_specs(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from([*POLICIES, "unknown", "", "FORA"]))
    keys = POLICY_FIELDS.get(name, []) + ["bogus"]
    options = draw(st.lists(st.tuples(st.sampled_from(keys), SPEC_VALUES), max_size=3))
    return name + (":" + ",".join(f"{k}={v}" for k, v in options) if options else "")


@settings(max_examples=examples(3000))
@given(spec=policy_specs(), alpha=st.one_of(st.none(), st.floats(allow_nan=True)),
       max_skips=st.one_of(st.none(), st.integers(-3, 10**6)))
def test_policy_spec(spec: str, alpha: float | None, max_skips: int | None) -> None:
    def build() -> None:
        options = {"alpha": alpha, "max_skips": max_skips} if spec.startswith("fastcache") else {}
        policy = make_policy(spec, **options)
        policy.describe()

    check("policy.spec", build)


@settings(max_examples=examples(1200))
@given(text=st.one_of(st.text(max_size=24), st.lists(st.tuples(st.sampled_from(["height", "width", "frames", "batch",
                                                                                  "h", "", "x=1"]),
                                                                 st.sampled_from(["0", "-1", "64", "1e3", "", "x", "2"])),
                                                       max_size=3).map(lambda kv: ",".join(f"{k}={v}" for k, v in kv))))
def test_dims_and_roles(text: str) -> None:
    from fcpass.compiler.static_shapes import parse_dims
    from fcpass.contract.roles import parse_role_overrides

    check("cli.dims", lambda: parse_dims(text))
    check("cli.inputs", lambda: parse_role_overrides(text.replace("height", "latent").replace("width", "timestep")))


DDIM, UNIPC = SCHEDULER_DOCS[0], next(d for d in SCHEDULER_DOCS if d["_class_name"] == "UniPCMultistepScheduler")
# The minimal configs the fuzzer found crashing (a traceback, a MemoryError, or NaN sampled without a word).
SCHEDULER_REGRESSIONS = [
    ({**DDIM, "_class_name": []}, 1),  # TypeError: unhashable type
    ({**DDIM, "beta_start": 0.5}, 1),  # betas past beta_end: NaN samples
    ({**DDIM, "beta_end": 1e308}, 1),  # betas >= 1: NaN samples
    ({**DDIM, "num_train_timesteps": 10**12}, 1),  # MemoryError allocating the schedule
    ({**DDIM, "steps_offset": 10**12}, 1),  # IndexError past the schedule
    ({**DDIM, "steps_offset": 2**63}, 1),  # OverflowError
    ({**DDIM, "trained_betas": [""] * 1000}, 1),  # ValueError converting to float
    ({**UNIPC, "beta_end": 0.5}, 10),  # alphas_cumprod underflows to 0: NaN samples
    ({**UNIPC, "num_train_timesteps": 2}, 10),  # repeated timesteps: ZeroDivisionError
    ({**UNIPC, "predict_x0": False}, 10),  # noise prediction stepping to sigma 0: NaN (as diffusers), now stopped
    ({**FLOW, "max_shift": 1e308}, 1),  # OverflowError in exp
]


@pytest.mark.parametrize("config,steps", SCHEDULER_REGRESSIONS)
def test_scheduler_regressions(config: dict, steps: int) -> None:
    with pytest.raises(FcpassError):
        run_scheduler(config, steps)


def test_regression_policy_option_without_a_value() -> None:
    """Found by the coverage-guided target: the line said what was wrong but named no fix."""
    from tests.fuzz.harness import one_clear_line

    with pytest.raises(FcpassError) as info:
        make_policy("teacache:threshold")
    assert one_clear_line(str(info.value)) is None, str(info.value)


def test_regression_scheduler_config_not_utf8() -> None:
    """Found by the coverage-guided target: a byte that is not UTF-8 raised UnicodeDecodeError."""
    with case_dir() as d:
        (d / "scheduler_config.json").write_bytes(b'{"_class_name": "DDIMScheduler\xe1"}')
        with pytest.raises(FcpassError, match="is not UTF-8 text"):
            load_config(d / "scheduler_config.json")


def test_regression_policy_option_with_a_newline() -> None:
    """Found by the coverage-guided target: an unknown option's name was shown as it was, newline and all."""
    from tests.fuzz.harness import one_clear_line

    with pytest.raises(FcpassError) as info:
        make_policy("fora:le\nvel=stack")
    assert one_clear_line(str(info.value)) is None, str(info.value)
