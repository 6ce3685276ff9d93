"""The one record of a ``bench/gpu_check.sh`` run: ``gpu_check.json`` and a short ``gpu_check.md``.

    python bench/gpu_summary.py RESULTS_DIR [--dry-run]

Reads the steps' statuses (``RESULTS_DIR/steps.tsv``, written by gpu_check.sh) and the results the steps
wrote (``attention_backends.json``, ``attention.json``, ``gpu_train.json``, or their ``_smoke`` variants in a
dry run), and writes both files into RESULTS_DIR. ``gpu_check.json`` keeps the ``attention_choice`` entries
already there (``bench/attention_backends.py`` adds this device's; ``model.attention = "auto"`` reads them).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from provenance import commit


def _load(folder: Path, name: str, dry_run: bool) -> dict | None:
    path = folder / (f"{name}_smoke.json" if dry_run else f"{name}.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(folder: Path) -> list[dict]:
    path = folder / "steps.tsv"
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [{"step": name, "status": status, "seconds": int(seconds)} for name, status, seconds in rows]


def markdown(record: dict) -> str:
    lines = [f"# GPU check: {record['device']}", "",
             f"Commit {record['commit']}, {record['date']}" + (" (DRY RUN: no GPU, code paths only)"
                                                              if record["dry_run"] else ""), "",
             "| step | status | s |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in record["steps"]]
    backends = record.get("attention_backends")
    if backends:
        check = backends["correctness"]
        lines += ["", f"## Attention correctness ({check['dtype']}, {check['error']} vs {check['oracle']}, "
                      f"tolerance {check['tolerance']})", "", "| variant | backend | out | dq | dk | dv | passed |",
                  "|---|---|---|---|---|---|---|"]
        for variant, rows in check["variants"].items():
            for name, r in rows.items():
                errors = r.get("errors")
                cells = " | ".join(f"{errors[n]:.1e}" for n in ("out", "dq", "dk", "dv")) if errors \
                    else f"{r.get('error')} | | |"
                lines.append(f"| {variant} | {name} | {cells} | {'yes' if r['passed'] else 'NO'} |")
        lines += ["", "## Attention forward+backward (ms, TFLOP/s)", "", "| variant | S | " +
                  " | ".join(backends["backends"]) + " |", "|---|---|" + "---|" * len(backends["backends"])]
        cells: dict[tuple, dict] = {}
        for row in backends["results"]:
            cells.setdefault((row["variant"], row["seq_len"]), {})[row["backend"]] = \
                f"{row['fwd_bwd_ms']:.2f} ms, {row['tflops']:.0f}" if "fwd_bwd_ms" in row else row["status"]
        for (variant, seq_len), by_backend in cells.items():
            lines.append(f"| {variant} | {seq_len} | " +
                         " | ".join(by_backend.get(b, "") for b in backends["backends"]) + " |")
        lines += ["", "`auto` on this device: " + "; ".join(
            f"{v}: **{c['backend']}** ({c['why']})" for v, c in backends["choices"].items())]
    train = record.get("gpu_train")
    if train:
        lines += ["", "## Training step (compiled)", "",
                  "| model | S | precision | status | tokens/s | MFU | peak GiB | planned GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in train["results"]:
            def gib(x):
                return f"{x / 2**30:.1f}" if x else ""
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else ""
            lines.append(f"| {r.get('model')} | {r.get('seq_len')} | {r.get('precision')} | {r.get('status')} | "
                         f"{r.get('tokens_per_s') or 0:.0f} | {mfu} | {gib(r.get('peak_memory_bytes'))} | "
                         f"{gib(r.get('predicted_peak_bytes'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--dry-run", action="store_true")
    a = parser.parse_args(argv)
    path = a.results / "gpu_check.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    backends = _load(a.results, "attention_backends", a.dry_run)
    device = (backends or {}).get("machine", {}).get("gpu") or ("none (dry run)" if a.dry_run else "unknown")
    record.update(device=device, commit=commit(), dry_run=a.dry_run,
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"), steps=_steps(a.results),
                  attention_backends=backends, attention_kernels=_load(a.results, "attention", a.dry_run),
                  gpu_train=_load(a.results, "gpu_train", a.dry_run))
    path.write_text(json.dumps(record, indent=1) + "\n")
    (a.results / "gpu_check.md").write_text(markdown(record))
    print(f"wrote {path} and {a.results / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
