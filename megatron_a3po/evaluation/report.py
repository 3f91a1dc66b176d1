"""Results JSON and the Markdown table printed at the end of `a3po eval`."""

from __future__ import annotations

import json
import os
import tempfile


def markdown_table(per_benchmark: dict[str, dict], average: dict) -> str:
    """One row per benchmark (and the average): avg@n, pass@k columns, mean response length."""
    if not per_benchmark:
        return ""
    first = next(iter(per_benchmark.values()))
    metric_cols = [k for k in first if k.startswith("avg@")] + \
        sorted((k for k in first if k.startswith("pass@")), key=lambda k: int(k.split("@")[1]))
    header = ["benchmark", "kind", "items"] + metric_cols + ["mean length"]
    rows = [[name, m.get("kind", ""), str(m["items"])] + [f"{100 * m[c]:.1f}" for c in metric_cols]
            + [f"{m.get('length_mean', 0):.0f}"] for name, m in per_benchmark.items()]
    if len(per_benchmark) > 1:
        rows.append(["**average**", "", ""] + [f"{100 * average[c]:.1f}" if c in average else "" for c in metric_cols]
                    + [f"{average.get('length_mean', 0):.0f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_json(path: str, results: dict) -> None:
    """Atomic: a crash never leaves half a results file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)
