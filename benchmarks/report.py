"""What every benchmark script ends with: its rows as a markdown table, and a JSON file of them."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch


def print_table(rows: list[dict], cols: list[str]) -> None:
    """The rows' ``cols`` as a markdown table on stdout."""
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def save(path: Path, script: str, argv: list[str] | None, meta: dict, rows: list[dict]) -> dict:
    """Write ``{"meta": {command, torch, machine, **meta}, "rows": rows}`` to ``path``; returns it."""
    args = argv if argv is not None else sys.argv[1:]
    head = {"command": f"python benchmarks/{script} " + " ".join(args), "torch": torch.__version__}
    out = {"meta": head | {"machine": platform.processor() or platform.machine()} | meta, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out
