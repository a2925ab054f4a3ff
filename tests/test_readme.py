"""The README's first command (the main job on the bundled model) runs as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fcpass.cli import main
from models.digits import ONNX

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(not ONNX.exists(), reason="bundled model missing (run tools/train_digits.py)")
def test_the_main_job_runs_as_the_readme_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    block = re.search(r"```bash\n(.+?)\n```", README.read_text(), re.DOTALL)
    assert block, "README.md opens with a bash block"
    commands = [shlex.split(c) for c in block.group(1).split("&&")]
    assert commands[0][:2] == ["pip", "install"]
    monkeypatch.chdir(tmp_path)
    for argv in commands[1:]:
        assert argv[0] == "fcpass"
        assert main(argv[1:]) == 0, " ".join(argv)
    out = capsys.readouterr().out
    assert "speedup" in out and Path("digits.png").stat().st_size > 0
