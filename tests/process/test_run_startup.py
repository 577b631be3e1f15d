"""`run`'s own process only plans: torch (1.7 s to import) is for its children, which start at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, hang_bound

pytestmark = pytest.mark.slow

# The CLI with torch refused in this process alone: the children are fresh interpreters (spawn), which import
# this file as __mp_main__ and so never reach the block below.
TORCH_REFUSED = """
import runpy, sys

class RefuseTorch:
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("run's own process imported torch")

if __name__ == "__main__":
    sys.meta_path.insert(0, RefuseTorch())
    sys.argv = ["sdxl-split", *sys.argv[1:]]
    runpy.run_module("sdxl_split.cli", run_name="__main__")
"""


def test_runs_own_process_never_imports_torch(cache_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "torch_refused.py"
    script.write_text(TORCH_REFUSED)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red bicycle\na lighthouse at dusk\n")
    out = tmp_path / "out"
    args = ["--model", "tiny", "run", str(prompts), "--out", str(out), "--size", "64x64", "--steps", "1"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=hang_bound(600),
                          env=cli_env(cache_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(out.glob("*.png"))) == 2
    # A re-run finds every image, loads no model and still imports no torch here.
    again = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                           timeout=hang_bound(600), env=cli_env(cache_dir))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 rendered, 2 already done" in again.stdout
