"""Render every record in bench/results/*.json to one markdown file and one plot per benchmark.

    python bench/render.py [--results bench/results] [--out bench/results/RESULTS.md]

Each record names its device, versions and git commit (see fastadapters.bench.harness.environment); the
table shows them beside the numbers so no figure travels without its device. Records whose rows
carry ``step_s`` (training step) or ``time_s`` / ``floor_ratio`` (kernels, serving) are tabulated
with every scalar column they have, in the order the first row gives.
"""
from __future__ import annotations

import argparse
import glob
import json
import os


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "-" if v is None else str(v)


def render_record(rec: dict) -> str:
    # the harness's records keep their setting in "env" and their table in "rows"; vllm_compare's
    # (written by a script of its own) keep them at the top level and in "results"
    env = rec.get("env") or {"device": rec.get("device"), "git_commit": rec.get("git_commit"), "time": rec.get("time"),
                             "torch": (rec.get("versions") or {}).get("torch")}
    head = (f"### {rec.get('benchmark') or rec.get('bench', '?')} — {env.get('device') or '?'}"
            + (f" ({env['device_type']})" if env.get("device_type") else "")
            + f", torch {env.get('torch')}" + (f", triton {env['triton']}" if env.get("triton") else "")
            + f", commit {env.get('git_commit')}, {env.get('time')}")
    shown = ("rows", "results", "env", "benchmark", "bench", "device", "git_commit", "time")
    meta = {k: v for k, v in rec.items() if k not in shown}
    lines = [head, "", "Setting: " + ", ".join(f"{k}={_fmt(v)}" for k, v in meta.items()), ""]
    rows = [_flat(r) for r in rec.get("rows") or rec.get("results") or []]
    if rows:
        cols = [c for c in rows[0] if not isinstance(rows[0][c], (list, dict))]
        for r in rows[1:]:
            cols += [c for c in r if c not in cols and not isinstance(r[c], (list, dict))]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _flat(row: dict) -> dict:
    """A kernel row's per-implementation timings ({"impls": {name: {"full_ms": ...}}}) as columns."""
    out = {k: v for k, v in row.items() if k != "impls"}
    for name, rec in (row.get("impls") or {}).items():
        for key in ("fwd_ms", "full_ms"):
            if key in rec:
                out[f"{name}_{key}"] = rec[key]
    return out


RATIO_KEYS = ("vs_frozen_base", "floor_ratio", "speedup", "vs_peft", "fused_over_base_full",
              "fa_graph_over_floor", "fa_over_floor", "cuda_over_floor")


def plot_record(rec: dict, path: str) -> bool:
    """A bar chart of the first ratio column (vs_frozen_base / floor_ratio / speedup); False if none."""
    rows = rec.get("rows", [])
    key = next((k for k in RATIO_KEYS if rows and k in rows[0]), None)
    if key is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r.get("variant") or r.get("name") or " ".join(str(r[k]) for k in ("kind", "mode", "B", "A", "M", "r", "b")
                                                                   if k in r) or i) for i, r in enumerate(rows)]
    values = [r.get(key) or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows)), 4))
    ax.bar(range(len(rows)), values)
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(key)
    ax.set_title(f"{rec.get('benchmark')} on {rec.get('env', {}).get('device')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    ap.add_argument("--results", default=here)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    out = args.out or os.path.join(args.results, "RESULTS.md")
    parts = ["# Benchmark results", "", "Rendered by bench/render.py from the JSON files beside this one.", ""]
    n = 0
    for path in sorted(glob.glob(os.path.join(args.results, "*.json"))):
        with open(path) as f:
            records = json.load(f)
        if isinstance(records, dict):  # a file holding one record rather than a list of them
            records = [records]
        parts.append(f"## {os.path.basename(path)}\n")
        for i, rec in enumerate(records):
            parts.append(render_record(rec))
            if not args.no_plots:
                png = os.path.join(args.results, f"{os.path.splitext(os.path.basename(path))[0]}_{i}.png")
                if plot_record(rec, png):
                    parts.append(f"\n![{rec.get('benchmark')}]({os.path.basename(png)})")
            parts.append("")
            n += 1
    with open(out, "w") as f:
        f.write("\n".join(parts))
    print(f"rendered {n} record(s) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
