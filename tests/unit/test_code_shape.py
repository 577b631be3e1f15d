"""The shape the code keeps (Renovation 2): no function outside cli/ over 60 lines or 8 parameters, and no two
classes of the product share a name, so a name in a traceback or a review points at one thing."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("cli", "shared", "encoder_service", "denoiser_service", "bench", "ray_engine", "http_service", "benchmarks")
MAX_LINES = 60
MAX_PARAMETERS = 8


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"))) for folder in PRODUCT
            for path in sorted((ROOT / folder).rglob("*.py"))]


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
    return count - int(bool(args.args) and args.args[0].arg in ("self", "cls"))


def test_no_function_outside_cli_is_over_60_lines_or_8_parameters() -> None:
    too_big = []
    for path, tree in _modules():
        if path.relative_to(ROOT).parts[0] == "cli":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES or _parameters(node) > MAX_PARAMETERS:
                    too_big.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines, "
                                   f"{_parameters(node)} parameters")
    assert not too_big, "\n".join(too_big)


def test_no_two_classes_share_a_name() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(f"{path.relative_to(ROOT)}:{node.lineno}")
    shared = {name: places for name, places in where.items() if len(places) > 1}
    assert not shared, shared
