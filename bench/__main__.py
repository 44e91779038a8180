"""`python -m bench [--quick] [--device cpu|cuda] [--only NAME ...] [--out FILE]`: run every benchmark, print one
table of ratios (each against a baseline measured in the same run) and write them, with shapes, dtype, device and
library versions, to `bench/results.json`.

Each benchmark is a module `bench/bench_<name>.py` exposing `run(quick: bool, device: str) -> dict` and is also
runnable alone (`python -m bench.bench_step`). A module that is not there is skipped with a note; one that raises is
recorded as an error and makes the exit status 1, after the others have run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, apply_offline_env, device_info, resolve_device, versions
from cache_tools.format.cli_args import StrictArgumentParser, parse_command_line

BENCHMARKS = ("step", "loss", "build", "loader", "storage", "codec", "chat_loader", "chat", "multi", "distillkit")
DEFAULT_OUT = REPO_ROOT / "bench" / "results.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = StrictArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short CPU smoke run (CI); numbers are not recorded")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, metavar="NAME",
                        help=f"run only these benchmarks (of: {', '.join(BENCHMARKS)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default bench/results.json)")
    return parse_command_line(parser, argv)


def run_one(name: str, quick: bool, device: str) -> dict[str, Any]:
    """Import `bench.bench_<name>` and call its `run`; never raises (errors become a recorded status)."""
    try:
        module = importlib.import_module(f"bench.bench_{name}")
    except ModuleNotFoundError as err:
        if err.name in (f"bench.bench_{name}",):
            return {"status": "skipped", "notes": [f"bench/bench_{name}.py is not there yet"]}
        return {"status": "error", "error": f"import failed: {err}"}
    if not hasattr(module, "run"):
        return {"status": "skipped", "notes": [f"bench/bench_{name}.py has no run(quick, device)"]}
    t0 = time.perf_counter()
    try:
        result = dict(module.run(quick, device))
        result.setdefault("status", "ok")
    except Exception as err:  # noqa: BLE001 - one failing benchmark must not hide the others' numbers
        result = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def ratio_rows(name: str, result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(benchmark, figure, value, goal/met) rows for the table."""
    if result.get("status") != "ok":
        reason = result.get("error") or "; ".join(result.get("notes", []))
        return [(name, result.get("status", "?"), "-", reason.splitlines()[0][:70] if reason else "")]
    rows = []
    for figure, entry in (result.get("ratios") or found_ratios(result)).items():
        if isinstance(entry, dict):
            value, goal, met = entry.get("value"), entry.get("goal", ""), entry.get("met")
        else:
            value, goal, met = entry, "", None
        shown = f"{value:.4g}" if isinstance(value, (int, float)) and math.isfinite(value) else str(value)
        verdict = "" if met is None else ("met" if met else "MISSED")
        rows.append((name, figure, shown, f"{goal} {verdict}".strip()))
    return rows or [(name, "(no ratios reported)", "-", "")]


def found_ratios(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """For a result without a "ratios" entry: every numeric field whose name contains "ratio", found recursively
    (list items are named by their index), so a benchmark that records ratios its own way still shows them."""
    found: dict[str, Any] = {}
    items = result.items() if isinstance(result, dict) else enumerate(result)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list)) and key != "goals":
            found.update(found_ratios(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and "ratio" in str(key):
            found[name] = value
    return found


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("benchmark", "figure", "value", "goal")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write the results JSON via a temp file + rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(record), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def previous_results(path: Path, quick: bool, device: str) -> dict[str, Any]:
    """Benchmarks recorded in `path` by an earlier run with the same --quick on the same kind of device."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    same = previous.get("quick") == quick and previous.get("device", {}).get("device") == device_info(device)["device"]
    return dict(previous.get("benchmarks", {})) if same else {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_offline_env()
    device = resolve_device(args.device)
    names = args.only or list(BENCHMARKS)
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    # --only re-measures some benchmarks and keeps the record of the others (same --quick, same device kind).
    results: dict[str, Any] = previous_results(args.out, args.quick, device) if args.only else {}
    record = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "quick": args.quick,
        "device": device_info(device),
        "versions": versions(),
        "benchmarks": results,
    }
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        results[name] = run_one(name, args.quick, device)
        results[name]["measured_by"] = f"{command} at {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
        print(f"[bench] {name}: {results[name]['status']} ({results[name].get('wall_s', 0)} s)", flush=True)
        write_record(args.out, record)  # after every benchmark: a long or interrupted run keeps what it measured
    rows = [row for name in names for row in ratio_rows(name, results[name])]
    print(format_table(rows))
    print(f"[bench] wrote {args.out}")
    return 1 if any(r["status"] == "error" for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
