"""Coverage-guided fuzz targets (atheris, libFuzzer's engine) for every reader, with the hypothesis cases' property.

    python tests/fuzz/atheris_targets.py READER --seeds DIR [--tally FILE] [LIBFUZZER FLAGS ...] [CORPUS ...]

READER is one of TARGETS, or `all` (the first byte of an input picks the reader: one process fuzzes them
all). Each target's `TestOneInput` feeds the bytes libFuzzer mutates to one reader and checks what
`tests.fuzz.harness.check` checks: it works, or raises FcpassError with one line naming the problem and
its fix; never another exception, never past the time bound, never a file left behind, never the input
changed. A case that breaks it raises, so libFuzzer stops and writes the input (`crash-*`, under
-artifact_prefix); `python tests/fuzz/atheris_targets.py READER --seeds DIR crash-FILE` replays it.

The seeds (`--seeds DIR`, built there on first use) are the inputs the readers take when nothing is
damaged: the tiny DiT's ONNX file and its plan, the bundled model's segments folder, its manifest and
engine index, the scheduler configs, policy specs, option values and `.npy` embeddings. fcpass and the
runtimes are instrumented as they are imported, with everything a reader imports lazily: the seeds run
through every target before fuzzing starts. `tools/fuzz.py --engine atheris` runs each reader for its
share of the time and prints the tally; `--tally FILE` is where it reads it (rewritten after every case).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import atheris
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

if __name__ == "__main__":  # instrumented as they are imported, where the targets run (tools/fuzz.py reads READERS)
    with atheris.instrument_imports(include=["fcpass", "runtimes"]):
        import fcpass.cli  # noqa: F401  (every command's module, so that what they import is instrumented too)
        from fcpass.cli.common import embeddings
        from fcpass.compiler.static_shapes import parse_dims
        from fcpass.contract.engines import ENGINES_FORMAT, ENGINES_INDEX, manifest_digest, read_engines_index
        from fcpass.contract.manifest import MANIFEST, interface_model, read_manifest, segment_files
        from fcpass.contract.onnx_io import load_model
        from fcpass.contract.plan import PLAN_KEY, read_plan
        from fcpass.contract.roles import parse_role_overrides
        from runtimes.policies import make_policy
        from runtimes.schedulers import load_config
        from tests.fuzz.cases import CONFIGS_ON_DISK, FLOW, run_scheduler, with_plan
        from tests.fuzz.harness import FAILURES, TALLY, case_dir, check


SEEDS: Path = Path()  # set by main: the folder of seeds
TALLY_FILE: Path | None = None

POLICY_SEEDS = ["none", "fora:regions=stack,interval=3,warmup=2", "fastcache:alpha=0.05,max_skips=3,regions=stack",
                "teacache:threshold=0.3", "taylorseer:interval=5,regions=blocks", "fbcache:threshold=0.05", "magcache",
                "delta-dit:interval=2,boundary=0.5", "duca:ratio=0.05,grid=2", "toca:interval=3"]
VALUE_SEEDS = ["height=64,width=64", "frames=9,batch=2", "latent=x,timestep=t,class=y", "prompt_embeds=ctx"]


def build_seeds(folder: Path) -> None:
    """The undamaged inputs every target starts from, written to `folder` (once: kept for later runs)."""
    from fcpass.cli import main
    from tests.conftest import export_tiny_dit

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tiny.fc.onnx").exists():
        export_tiny_dit(folder / "tiny.onnx", "legacy")
        assert main(["optimize", str(folder / "tiny.onnx"), "-o", str(folder / "tiny.fc.onnx")]) == 0
    if not (folder / "digits.seg" / MANIFEST).exists():
        assert main(["optimize", "-o", str(folder / "digits.seg"), "--lowering", "segments", "--regions", "stack,tail",
                     "--calibrate", "1", "--calib-steps", "4"]) == 0


def seeds(reader: str) -> list[bytes]:
    """The undamaged inputs of `reader`, as the bytes its target takes."""
    import onnx

    seg = SEEDS / "digits.seg"
    if reader == "onnx.load":
        return [(SEEDS / "tiny.onnx").read_bytes()]
    if reader == "plan.text":
        model = onnx.load(str(SEEDS / "tiny.fc.onnx"), load_external_data=False)
        plan = next(p.value for p in model.metadata_props if p.key == PLAN_KEY)
        return [plan.encode(), json.dumps(json.loads((seg / MANIFEST).read_text())["plan"]).encode()]
    if reader == "scheduler.file":  # the first byte picks the number of steps
        return [bytes([3]) + p.read_bytes() for p in CONFIGS_ON_DISK] + [bytes([9]) + json.dumps(FLOW).encode()]
    if reader == "policy.spec":
        return [s.encode() for s in POLICY_SEEDS]
    if reader == "cli.values":
        return [s.encode() for s in VALUE_SEEDS]
    if reader == "npy.embeddings":
        out = []
        for a in (np.ones((1, 4, 8), np.float32), np.zeros((2, 3, 8), np.float16), np.ones((4, 8), np.float32),
                  np.arange(6, dtype=np.int64)):
            buf = io.BytesIO()
            np.save(buf, a)
            out.append(buf.getvalue())
        return out
    if reader == "segments.manifest":
        return [(seg / MANIFEST).read_bytes()]
    if reader == "engines.index":
        index = {"format": ENGINES_FORMAT, "format_version": 1, "manifest_sha256": manifest_digest(seg),
                 "engines": {"000_main.0.onnx": "000_main.0.plan"}}
        return [json.dumps(index).encode()]
    raise KeyError(reader)


def text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def load_onnx(data: bytes) -> None:
    with case_dir() as d:
        (d / "m.onnx").write_bytes(data)
        check("onnx.load", lambda: load_model(d / "m.onnx"), inputs=[d / "m.onnx"], folder=d)


def plan_text(data: bytes) -> None:
    check("plan.text", lambda: read_plan(with_plan(text(data)), "model.fc.onnx"))


def scheduler_file(data: bytes) -> None:
    steps = 1 + (data[0] % 30 if data else 0)
    with case_dir() as d:
        (d / "scheduler_config.json").write_bytes(data[1:])
        check("scheduler.file", lambda: run_scheduler(load_config(d / "scheduler_config.json"), steps),
              inputs=[d / "scheduler_config.json"], folder=d)


def policy_spec(data: bytes) -> None:
    check("policy.spec", lambda: make_policy(text(data)).describe())


def cli_values(data: bytes) -> None:
    check("cli.dims", lambda: parse_dims(text(data)))
    check("cli.inputs", lambda: parse_role_overrides(text(data)))


def npy_embeddings(data: bytes) -> None:
    with case_dir() as d:
        (d / "e.npy").write_bytes(data)
        for rank in (2, 3):
            check("npy.embeddings", lambda rank=rank: embeddings(d / "e.npy", "prompt embeddings", rank=rank),
                  inputs=[d / "e.npy"], folder=d)


def segments_manifest(data: bytes) -> None:
    def read(seg: Path) -> None:
        m = read_manifest(seg)
        segment_files(m)
        interface_model(m)

    with case_dir() as d:
        (d / MANIFEST).write_bytes(data)
        check("segments.manifest", lambda: read(d), inputs=[d / MANIFEST], folder=d)


def engines_index(data: bytes) -> None:
    with case_dir() as d:
        (d / ENGINES_INDEX).write_bytes(data)
        check("engines.index", lambda: read_engines_index(d, SEEDS / "digits.seg"), inputs=[d / ENGINES_INDEX], folder=d)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "onnx.load": load_onnx, "plan.text": plan_text, "scheduler.file": scheduler_file, "policy.spec": policy_spec,
    "cli.values": cli_values, "npy.embeddings": npy_embeddings, "segments.manifest": segments_manifest,
    "engines.index": engines_index,
}
READERS = list(TARGETS)


def write_tally() -> None:
    if TALLY_FILE is not None:
        doc = {"tally": [[r, o, n] for (r, o), n in TALLY.items()], "failures": FAILURES}
        TALLY_FILE.write_text(json.dumps(doc))


def one_input(target: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """`target` as libFuzzer's TestOneInput: the tally written after every case, a broken property raised."""
    def test_one_input(data: bytes) -> None:
        try:
            target(data)
        finally:
            write_tally()

    return test_one_input


def test_all(data: bytes) -> None:
    """Every reader in one process: the first byte picks it, the rest is its input."""
    if data:
        TARGETS[READERS[data[0] % len(READERS)]](data[1:])


def main(argv: list[str]) -> None:
    global SEEDS, TALLY_FILE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reader", choices=[*READERS, "all"])
    ap.add_argument("--seeds", type=Path, required=True, help="the folder of seeds (built there if empty)")
    ap.add_argument("--tally", type=Path, help="where to write the tally (JSON) after every case")
    args, fuzzer_args = ap.parse_known_args(argv[1:])
    SEEDS, TALLY_FILE = args.seeds, args.tally
    with atheris.instrument_imports(include=["fcpass", "runtimes"]):
        build_seeds(SEEDS)
        corpus = SEEDS / "corpus" / args.reader
        corpus.mkdir(parents=True, exist_ok=True)
        for i, reader in enumerate(READERS):
            if args.reader not in (reader, "all"):
                continue
            for j, seed in enumerate(seeds(reader)):
                if args.reader == "all":
                    seed = bytes([i]) + seed
                (corpus / f"seed-{reader}-{j}").write_bytes(seed)
                (test_all if args.reader == "all" else TARGETS[reader])(seed)  # each seed works (and warms up)
    TALLY.clear()
    target = test_all if args.reader == "all" else TARGETS[args.reader]
    paths = [a for a in fuzzer_args if not a.startswith("-")]
    atheris.Setup([argv[0], *fuzzer_args, *([] if paths else [str(corpus)])], one_input(target))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
