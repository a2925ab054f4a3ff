"""The `Backend` interface (load, run one step) and its ONNX Runtime implementation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from fcpass.contract.errors import FcpassError
from fcpass.contract.onnx_io import load_model
from fcpass.contract.roles import TensorSpec, graph_inputs, graph_outputs

log = logging.getLogger(__name__)


class Backend(Protocol):
    """Runs one denoiser call. Implementations keep whatever they need on their device."""

    name: str
    model: onnx.ModelProto
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """`outputs` (default all) of one call on host `feeds`."""
        ...

    @property
    def provider(self) -> str: ...


PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def session_setup(providers: list[str] | None, threads: int | None) -> tuple[Any, Any, list[str]]:
    """The onnxruntime module, SessionOptions with `threads`, and the full provider names; one-line
    errors when ONNX Runtime or a provider is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FcpassError(
            "ONNX Runtime is not installed; pip install 'fcpass[cpu]' (or 'fcpass[gpu]' for CUDA, never both)"
        ) from None
    wanted = [PROVIDER_ALIASES.get(p, p) for p in (providers or ["cpu"])]
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        raise FcpassError(
            f"ONNX Runtime provider {missing[0]} is not available here (available: {', '.join(available)}); "
            "install onnxruntime-gpu for CUDA (pip install 'fcpass[gpu]') or use --provider cpu"
        )
    if threads is not None and threads < 1:
        raise FcpassError(f"--threads {threads} must be at least 1 (leave it out for ONNX Runtime's default)")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort, opts, wanted


def device_of(provider: str) -> str:
    """The device ("cuda" or "cpu") that state buffers live on for an execution provider."""
    return "cuda" if provider == "CUDAExecutionProvider" else "cpu"


def ort_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises from a load or a run: RuntimeError and its own classes (which derive from Exception)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = (v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return (RuntimeError, *own)


def open_session(ort: Any, path: Path, opts: Any, providers: list[str], fix: str) -> Any:
    """An InferenceSession of `path`; ORT's load errors become one line ending in `fix`."""
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # noqa: BLE001  (ORT reports graph problems as generic RuntimeErrors)
        first_line = str(exc).strip().splitlines()[0][:300]
        raise FcpassError(f"ONNX Runtime cannot load {path}: {first_line}; {fix}") from None


class OrtBackend:
    """ONNX Runtime session with explicit providers; `provider` reports the one that actually runs."""

    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        iobinding: bool = True,
    ) -> None:
        self.path = Path(path)
        self.model = load_model(self.path, load_weights=False)
        self.threads = threads  # intra-op threads; None: ONNX Runtime's default, one per core
        ort, opts, wanted = session_setup(providers, threads)
        opts.log_severity_level = 3  # ORT warns about harmless initializer dedup inside If branches
        self.session = open_session(ort, self.path, opts, wanted, "re-export the model")
        self.inputs = graph_inputs(self.model)
        self.outputs = graph_outputs(self.model)
        self._output_names = [o.name for o in self.outputs]
        # I/O binding keeps the cache state where the session runs and spares ONNX Runtime converting
        # every state tensor in and out at each step, on the CPU too.
        self.iobinding = iobinding
        log.info("ONNX Runtime session on %s", self.provider)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self._output_names
        return dict(zip(names, self.session.run(names, feeds)))

    @property
    def device(self) -> str:
        return device_of(self.provider)

    def bound_call(self) -> Any:
        """`runtimes.state.BoundCall` on this session: calls as the cache state's binding makes them (or None)."""
        from runtimes.state import BoundCall

        return BoundCall(self.session, self.device) if self.iobinding else None

    def state_binding(self, plan: Any) -> Any:
        """Cache state on the session's device with I/O binding, or as host arrays."""
        from runtimes.state import BoundState, HostState

        if not self.iobinding:
            return HostState(self, plan)
        return BoundState(self.session, plan, self.device)
