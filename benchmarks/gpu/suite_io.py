"""What the GPU suite checks and reads besides running its steps: the requirement check it runs on the box, the
stamp that lets a second part skip reinstalling, and the GPU tests' junit results. Standard library only."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


REQUIREMENT_CHECK = r"""
import sys
from importlib.metadata import PackageNotFoundError, requires, version
from packaging.requirements import Requirement
import torch
# The gpu extra (NVML for the memory columns) only matters where there is a GPU: a CPU dry run goes without it.
extra = "gpu" if torch.cuda.is_available() else ""
missing = []
for text in requires("sdxl-split") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": extra}):
        continue
    try:
        have = version(req.name)
    except PackageNotFoundError:
        missing.append(f"{req.name} (not installed; wanted {req.specifier or 'any'})")
        continue
    ok = req.specifier.contains(have, prereleases=True)
    print(f"{req.name:20} {have:16} {'ok' if ok else 'WANTED ' + str(req.specifier)}")
    if not ok:
        missing.append(f"{req.name} {have} (wanted {req.specifier})")
print(f"torch sees CUDA: {torch.cuda.is_available()}; device: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
if missing:
    print("missing: " + "; ".join(missing))
    sys.exit(1)
"""


def tree_digest(wheels: Path) -> str:
    """What an install is made of: the package sources, pyproject and the wheel names."""
    digest = hashlib.sha256()
    for folder in ("cli", "shared", "encoder_service", "denoiser_service", "bench"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode() + path.read_bytes())
    digest.update((REPO / "pyproject.toml").read_bytes())
    digest.update(" ".join(sorted(w.name for w in wheels.glob("*.whl"))).encode())
    return digest.hexdigest()


def junit_properties(path: Path) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(test, outcome, recorded properties) for each test case of a pytest --junitxml file."""
    if not path.is_file():
        return []
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = f"{tag}: {(element.get('message') or '').splitlines()[0][:160]}" if element.get(
                    "message") else tag
        props = [(p.get("name", ""), p.get("value", "")) for p in case.iter("property")]
        cases.append((case.get("name", ""), outcome, props))
    return cases
