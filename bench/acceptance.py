"""The repair acceptance table: one row per artifact form and seed, from the JSON lines of ``real_weights.py``.

    python bench/real_weights.py --blocks 4 --seed 0 --no-harm --out runs.jsonl
    python bench/real_weights.py --blocks 4 5 6 --groups 2 --seed 0 --out runs.jsonl
    ...                                                    # each form with seeds 0 and 1
    python bench/acceptance.py runs.jsonl

Each row is checked against the thresholds the defaults must reach on held-out photos (the bar is the same for
every form): outliers under 0.5% at the training size and at 1.5x it, in the output and in every block's raw
output (the residual stream); cosine to the artifact-free twin >= 0.95 on all patches and >= 0.9 at the
artifacts at the training size, >= 0.93 on all patches at 1.5x. The no-harm run (the unplanted model
retrofitted and scored against itself) must keep >= 0.98 mean and >= 0.95 at the 5th percentile.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

DEFAULTS, TTR, NO_HARM, BEFORE = ("defaults", "test-time registers, no training", "no harm: unplanted DINOv2, defaults",
                                  "planted, before")
MAX_OUTLIERS, MIN_COS, MIN_COS_ARTIFACTS, MIN_COS_LARGE = 0.005, 0.95, 0.9, 0.93
MIN_NO_HARM, MIN_NO_HARM_P5 = 0.98, 0.95


def read_runs(paths: list[Path]) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    """``{form: {(run, set): row}}``; a later line for the same form, run and set replaces an earlier one."""
    runs: dict[str, dict[tuple[str, str], dict[str, Any]]] = defaultdict(dict)
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                runs[row["form"]][row["run"], row["set"]] = row
    return runs


def sizes(rows: dict[tuple[str, str], dict[str, Any]]) -> tuple[str, str]:
    """The two held-out sets, training size first."""
    held_out = sorted({s for _, s in rows if s.startswith("held-out")}, key=lambda s: int(s.split()[-1][:-2]))
    return held_out[0], held_out[-1]


def form_row(form: str, rows: dict[tuple[str, str], dict[str, Any]]) -> tuple[str, bool]:
    """The table row of one form and whether its defaults pass."""
    small, large = sizes(rows)
    before, ttr, ours = ({s: rows[run, s] for s in (small, large)} for run in (BEFORE, TTR, DEFAULTS))
    passed = (all(ours[s]["outliers"] < MAX_OUTLIERS and ours[s]["stream_outliers"] < MAX_OUTLIERS for s in ours)
              and ours[small]["cos"] >= MIN_COS and ours[small]["cos_artifacts"] >= MIN_COS_ARTIFACTS
              and ours[large]["cos"] >= MIN_COS_LARGE)

    def pair(cells: dict[str, dict[str, Any]], key: str, percent: bool = False) -> str:
        return " / ".join(f"{100 * cells[s][key]:.2f}%" if percent else f"{cells[s][key]:.3f}" for s in (small, large))

    found = rows[DEFAULTS, small]["found"].removeprefix("artifacts build in ")
    cells = [form, found, pair(before, "stream_outliers", True), pair(before, "cos_artifacts"),
             pair(ours, "outliers", True), pair(ours, "stream_outliers", True), pair(ours, "cos"),
             pair(ours, "cos_artifacts"), pair(ttr, "cos"), pair(ttr, "cos_artifacts"),
             f"{rows[DEFAULTS, small]['wall_s']:.0f}", "yes" if passed else "**no**"]
    return "| " + " | ".join(cells) + " |", passed


def no_harm_row(rows: dict[tuple[str, str], dict[str, Any]]) -> tuple[str, bool]:
    """The no-harm line (mean and 5th-percentile cosine of the unplanted model to itself) and whether it passes."""
    small, large = sizes(rows)
    cells = {s: rows[NO_HARM, s] for s in (small, large)}
    passed = all(c["cos"] >= MIN_NO_HARM and c["cos_p5"] >= MIN_NO_HARM_P5 for c in cells.values())
    text = ", ".join(f"{s}: {c['cos']:.3f} mean, {c['cos_p5']:.3f} p5" for s, c in cells.items())
    return f"No harm (unplanted model, defaults, to itself): {text}, {cells[small]['wall_s']:.0f} s", passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("jsonl", type=Path, nargs="+", help="files written by real_weights.py --out")
    paths = parser.parse_args().jsonl
    if missing := [str(p) for p in paths if not p.is_file()]:
        parser.error(f"no such file: {', '.join(missing)}; write it with real_weights.py --out FILE")
    runs = read_runs(paths)
    print("| planted form | found | before: stream outliers | before: cos at artifacts | outliers, output "
          "| outliers, stream | cos all | cos at artifacts | TTR: cos all | TTR: at artifacts | wall s | passes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for form, rows in runs.items():
        if (DEFAULTS, "training crops") in rows:
            line, passed = form_row(form, rows)
            print(line)
            verdicts.append(passed)
    for rows in runs.values():
        if any(run == NO_HARM for run, _ in rows):
            line, passed = no_harm_row(rows)
            print(line)
            verdicts.append(passed)
    print(f"{sum(verdicts)} of {len(verdicts)} pass.")


if __name__ == "__main__":
    main()
