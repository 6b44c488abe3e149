"""Mean ± std over seeds of the metrics.json files of one experiment: table.md and table.json beside them.

    python workflows/results/table.py workflows/results/mt-ssn-regimes

Reads ``<experiment>/<row>-seed<k>/metrics.json`` (one folder per run, as ``reproduce.sh`` keeps them) and writes
one row per ``<row>`` (regimes first, or in the order of ``rows.txt`` when there is one) with the mean and the
sample standard deviation over its seeds, plus every per-seed value in table.json, so the README's tables are built
from committed raw output and can be re-made from it.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

# keys of a report's metrics.json (evaluated split)
METRICS = ("image_auroc", "image_ap", "seg_image_auroc", "pixel_auroc", "pixel_ap", "aupro", "pixel_f1",
           "pixel_f1_max", "iou", "mae", "seg_recall", "pixel_threshold")
HEADERS = ("image AUROC", "image AP", "seg-image AUROC", "pixel AUROC", "pixel AP", "AUPRO", "pixel F1",
           "pixel F1-max", "IoU", "MAE", "Seg_Recall", "pixel threshold")


def collect(exp: Path) -> dict[str, dict[str, list[float]]]:
    rows: dict[str, dict[str, list[float]]] = {}
    for run in sorted(exp.iterdir()):
        m = re.fullmatch(r"(.+)-seed(\d+)", run.name)
        if not (m and (run / "metrics.json").is_file()):
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        row = rows.setdefault(m.group(1), {"seeds": []})
        row["seeds"].append(int(m.group(2)))
        for k in METRICS:
            if metrics.get(k) is not None:
                row.setdefault(k, []).append(float(metrics[k]))
    return rows


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(exp_dir: str) -> int:
    exp = Path(exp_dir)
    rows = collect(exp)
    if not rows:
        print(f"no <row>-seed<k>/metrics.json under {exp}", file=sys.stderr)
        return 2
    listed = exp / "rows.txt"  # an ablation's rows in the order they were run (reproduce.sh writes it)
    known = tuple(listed.read_text().split()) if listed.is_file() else ("unsupervised", "weak", "mixed", "full")
    order = [r for r in known if r in rows] + sorted(set(rows) - set(known))
    cols = [(k, h) for k, h in zip(METRICS, HEADERS, strict=True) if any(rows[r].get(k) for r in order)]
    lines = ["| run | seeds | " + " | ".join(h for _, h in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in order:
        lines.append(f"| {r} | {len(rows[r]['seeds'])} | " + " | ".join(cell(rows[r].get(k, [])) for k, _ in cols)
                     + " |")
    (exp / "table.md").write_text("\n".join(lines) + "\n")
    summary = {r: {k: ({"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                        "values": v} if k != "seeds" else v) for k, v in rows[r].items()} for r in order}
    (exp / "table.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "workflows/results/mt-ssn-regimes"))
