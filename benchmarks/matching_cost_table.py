#!/usr/bin/env python
"""Per-run step ratios (arm / global-only) and matching milliseconds of `glsd bench --sections
step` JSONs: one row per file, as the README's performance section quotes them.

    python benchmarks/matching_cost_table.py benchmarks/results/matching-cost
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(folder: Path) -> list[str]:
    out = ["| run | none step (ms) | arm: step / none, match ms |", "|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        modes = json.loads(path.read_text())["step"]["modes"]
        none = modes["none"]["step_ms"]
        arms = ", ".join(f"{arm} {m['step_ms'] / none:.2f} ({m['match_ms']:.1f})"
                         for arm, m in modes.items() if arm != "none")
        out.append(f"| {path.stem} | {none:.1f} | {arms} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows(Path(sys.argv[1]))))
