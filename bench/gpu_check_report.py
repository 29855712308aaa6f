"""The files bench/gpu_check.sh leaves in its OUTDIR, written as the run goes (what a kill leaves).

    python bench/gpu_check_report.py env FILE --stage start|setup [--check]
    python bench/gpu_check_report.py table OUTDIR LOGDIR --key table|table_rest --device D --model M
                                     --steps N --batch B --repeat R --backends a,b,...
    python bench/gpu_check_report.py summary OUTDIR LOGDIR
    python bench/gpu_check_report.py print OUTDIR

OUTDIR holds at most these six files (the GPU machine returns at most 8 files from one folder):

    env.txt        versions (python, torch, triton, numpy, onnxruntime, diffusers, ...), the device
                   (name, SMs, L2, memory, clocks, driver: torch and nvidia-smi), the imports every
                   step relies on; written first (`env --stage start`), rewritten after setup
    summary.txt    the headline lines first, then one line per step with its state, then the
                   tests, kernels, profile and tables, and the end of each failed step's log;
                   rewritten when a step starts and ends, and after each table row
    table.json     {"table": the headline bench report, "table_rest": the other rows' report}, each
                   `fastddpm bench`'s JSON, rewritten after every row ("complete": false until the end)
    tests.log      pytest -v of the smoke tests: one line per test as it finishes (gpu_check.sh)
    kernels.jsonl  one JSON line per timed benchmark case, every suite, as each finishes
                   (bench/conftest.py --bench-jsonl; each line names its suite)
    profile.json   bench/profile_step.py's per-family step profile

Every file is replaced by rename (a reader never sees half of one), except tests.log and
kernels.jsonl, which only grow by whole lines. The step logs stay outside OUTDIR, in LOGDIR;
summary.txt carries the end of each failed one.

This script imports only the standard library at the top (fastddpm's bench_table is loaded from
its file), so the summary is written even when fastddpm or torch cannot be imported.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILES = ("env.txt", "summary.txt", "table.json", "tests.log", "kernels.jsonl", "profile.json")
TABLE_SCHEMA = "fastddpm-gpu-check-tables/1"
HEADLINE_KEY, REST_KEY = "table", "table_rest"
TAIL_LINES = 20  # of each failed step's log, in summary.txt
# Distributions whose versions env.txt reports (importlib.metadata: nothing is imported for it).
PACKAGES = ("torch", "triton", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "diffusers", "safetensors",
            "tqdm", "pillow", "huggingface-hub", "pytest", "pytest-benchmark", "hypothesis", "fastddpm")
NEEDED = ("numpy", "safetensors", "tqdm", "fastddpm", "fastddpm.kernels", "fastddpm.export")
OPTIONAL = ("triton", "diffusers", "onnx", "onnxruntime", "pytest", "pytest_benchmark")
NVIDIA_QUERIES = (  # read-only queries: nothing here changes the card's settings
    "name,driver_version,pci.bus_id,memory.total,memory.used,compute_mode,pstate,temperature.gpu",
    "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit",
)


# ------------------------------------------------------------------------------------- writing
def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a hidden name beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _bench_table():
    """fastddpm/bench_table.py, loaded from its file: it needs no torch and no installed fastddpm."""
    spec = importlib.util.spec_from_file_location("_gpu_check_bench_table", REPO / "fastddpm" / "bench_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _one_line(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]


# ------------------------------------------------------------------------------------- env.txt
def _run(cmd: list[str], timeout: float = 5) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return f"{cmd[0]}: no answer in {timeout:g} s"
    return (proc.stdout + proc.stderr).rstrip() or f"(no output, exit {proc.returncode})"


def _commit() -> str:
    head = _run(["git", "-C", str(REPO), "rev-parse", "HEAD"], 10)
    if not re.fullmatch(r"[0-9a-f]{40}", head):
        return "unknown (no git checkout here)"
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], 10)
    return head + (" (uncommitted changes)" if dirty and not dirty.startswith("(no output") else "")


def _versions() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in PACKAGES:
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} -")
    return out


def _host() -> list[str]:
    lines = [f"host: {platform.node()}, {platform.platform()}, {os.cpu_count()} CPUs"
             + (f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "")]
    try:
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        lines.append("memory: " + " ".join(mem.split()[1:]))
    except (OSError, StopIteration):
        pass
    lines.append(f"python: {platform.python_version()} ({sys.executable})")
    return lines


def _nvidia_smi() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return ["nvidia-smi: not found (no NVIDIA driver here)"]
    lines = []
    for fields in NVIDIA_QUERIES:
        lines.append(f"nvidia-smi --query-gpu={fields} --format=csv:")
        lines += ["  " + line for line in _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv"]).splitlines()]
    lines.append("nvidia-smi:")
    lines += ["  " + line for line in _run(["nvidia-smi"]).splitlines()]
    return lines


def _torch_facts() -> list[str]:
    import torch

    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
             f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else '-'}, "
             f"CUDA available {torch.cuda.is_available()}, {torch.get_num_threads()} CPU threads"]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        l2 = getattr(p, "L2_cache_size", None)
        l2_text = "%.1f MiB" % (l2 / 2**20) if l2 else "?"
        lines.append(f"device {i}: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                     f"L2 {l2_text}, memory {p.total_memory / 2**30:.1f} GiB")
    return lines


def _imports(dry: bool) -> tuple[list[str], str | None]:
    """(lines, the first needed import that failed): what every step imports, from where."""
    lines, failed = [], None
    for name in NEEDED:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # ImportError, or anything a broken package raises while importing
            lines.append(f"  {name} FAILED: {_one_line(e)}")
            failed = failed or f"cannot import {name}: {_one_line(e)}"
            continue
        lines.append(f"  {name} {getattr(module, '__version__', '')} {module.__file__}")
    for name in OPTIONAL:  # what only some rows or steps need (a dry run only looks them up: imports take seconds)
        try:
            if dry:
                spec = importlib.util.find_spec(name)
                lines.append(f"  {name} " + (f"found {spec.origin}" if spec else "MISSING (optional)"))
                continue
            module = importlib.import_module(name)
            lines.append(f"  {name} {getattr(module, '__version__', '?')} {module.__file__}")
        except Exception as e:
            lines.append(f"  {name} MISSING (optional): {_one_line(e)}")
    return lines, failed


def write_env(path: Path, stage: str, check: bool, dry: bool) -> int:
    """env.txt: the versions and the device. `--stage start` needs nothing but python (no import of
    torch); `--stage setup --check` adds torch's view of the device and the imports, and exits 1 with
    one line on stderr when a needed import fails (or, outside a dry run, when there is no CUDA)."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [f"gpu_check env.txt, {now}, stage {stage}" + (" (dry run)" if dry else ""),
             f"commit: {_commit()}", *_host(), "packages: " + ", ".join(_versions())]
    failed = None
    if check:
        try:
            lines += _torch_facts()
        except Exception as e:
            failed = f"cannot import torch: {_one_line(e)}"
            lines.append(f"torch FAILED: {_one_line(e)}")
        if failed is None:
            imports, failed = _imports(dry)
            lines += ["imports (from OUTDIR, as every step sees them):", *imports]
            if failed is None and not dry:
                import torch

                if not torch.cuda.is_available():
                    failed = "no CUDA device: nothing on this list can run"
    lines += _nvidia_smi()
    if failed:
        lines.append(f"gpu_check setup: {failed}")
    write_atomic(path, "\n".join(lines) + "\n")
    if failed:
        print(f"gpu_check setup: {failed}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------- table.json
def run_table(args) -> int:
    """One `fastddpm bench` run whose report goes into OUTDIR/table.json under args.key after every
    row, refreshing summary.txt each time; prints the table at the end (into the step's log)."""
    from fastddpm.bench import BenchRequest, format_table, run_bench
    from fastddpm.errors import FastDDPMError

    out, logdir = Path(args.outdir), Path(args.logdir)

    def keep(report: dict) -> None:
        tables = _read_json(out / "table.json") or {"schema": TABLE_SCHEMA}
        tables[args.key] = report
        write_atomic(out / "table.json", json.dumps(tables, indent=2) + "\n")
        try:
            write_summary(out, logdir)
        except Exception as e:  # noqa: BLE001 - the bench goes on; the next step rewrites the summary
            print(f"gpu_check: summary.txt not refreshed: {_one_line(e)}", file=sys.stderr)

    request = BenchRequest(device=args.device, model=args.model, steps=args.steps, batch=args.batch,
                           backends=tuple(args.backends.split(",")), repeat=args.repeat, on_report=keep)
    try:
        report = run_bench(request)
    except FastDDPMError as e:
        print(f"gpu_check table: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    return 0


# ------------------------------------------------------------------------------------- summary.txt
def read_steps(logdir: Path) -> tuple[dict, list[dict]]:
    """LOGDIR/steps.tsv as gpu_check.sh writes it: a '# key value ...' header, then one line per step
    (number, name, budget, limit, seconds, state, log)."""
    header, steps = {}, []
    try:
        text = (logdir / "steps.tsv").read_text()
    except OSError:
        return header, steps
    for line in text.splitlines():
        if line.startswith("#"):
            words = line[1:].split()
            header.update(zip(words[::2], words[1::2]))
        elif line.strip():
            number, name, budget, limit, seconds, state, log = (line.split("\t") + [""] * 7)[:7]
            steps.append(dict(number=number, name=name, budget=budget, limit=limit, seconds=seconds, state=state,
                              log=log))
    return header, steps


_TEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b(.*)$")
_TEST_START = re.compile(r"^(\S+::\S+)\s*$")


def tests_lines(path: Path) -> list[str]:
    """The smoke tests from pytest -v's log: counts, each test that did not pass, the one cut off."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    results, started = [], None
    for line in text.splitlines():
        m = _TEST_LINE.match(line)
        if m:
            results.append((m.group(1), m.group(2), m.group(3).strip()))
            started = None
        elif _TEST_START.match(line):
            started = line.strip()
    counts = {}
    for _, status, _ in results:
        counts[status] = counts.get(status, 0) + 1
    final = next((line.strip("= ") for line in reversed(text.splitlines()) if re.match(r"^=+ .* in [\d.]+s", line)),
                 None)
    lines = [f"tests (tests.log): {', '.join(f'{n} {s.lower()}' for s, n in counts.items()) or 'none finished'}"
             + (f"; pytest: {final}" if final else "; pytest did not finish")]
    lines += [f"  {status} {name} {rest}".rstrip() for name, status, rest in results if status not in ("PASSED",)]
    if started:
        lines.append(f"  cut off while running {started}")
    return lines


def kernels_lines(path: Path) -> list[str]:
    """One line per timed case of kernels.jsonl: median, and the rates its suite recorded."""
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        return [f"kernels.jsonl unreadable: {_one_line(e)}"] if path.exists() else []
    lines = [f"benchmark cases (kernels.jsonl): {len(records)} (median per timed call; rates per launch)"]
    width = max((len(r["name"].split("::")[-1]) for r in records), default=0)
    for r in records:
        x = r.get("extra_info", {})
        name = r["name"].split("::")[-1]
        cells = [f"{1000 * r['median_s']:9.3f} ms"]
        for key, fmt in (("gbps", "{:.4g} GB/s"), ("fraction_of_copy", "{:.2f} of copy"),
                         ("speedup_vs_eager", "x{:.2f} eager"), ("speedup_vs_compile", "x{:.2f} compile"),
                         ("images_per_s", "{:.4g} images/s"), ("tflops", "{:.3g} TFLOP/s")):
            if isinstance(x.get(key), (int, float)):
                cells.append(fmt.format(x[key]))
        if "meets_goal" in x:
            cells.append(f"goal {x['meets_goal']}" + (f" ({x['goal_not_judged']})" if x.get("goal_not_judged") else ""))
        lines.append(f"  {r.get('suite', '?'):<8} {name:<{width}} " + "  ".join(cells))
    return lines


def _headline(bt, report: dict | None, missing: str) -> list[str]:
    if report is None:
        return [f"  {missing}"]
    lines = ["  " + line for line in bt.headline_lines(report)]
    if not report.get("complete"):
        done = {r["name"] for r in report["rows"]}
        todo = [n for n in report["request"]["backends"] if n not in done]
        lines.append(f"  (cut off before: {', '.join(todo)})" if todo else "  (not marked complete)")
    return lines


def _guarded(section, *args) -> list[str]:
    """A section's lines, or one line saying why it could not be written: the summary always is."""
    try:
        return section(*args)
    except Exception as e:  # noqa: BLE001 - a half-written or foreign file must not cost the summary
        return [f"  (could not be read: {_one_line(e)})"]


def summary_text(out: Path, logdir: Path) -> str:
    header, steps = read_steps(logdir)
    bt = _bench_table()
    tables = _read_json(out / "table.json") or {}
    headline, rest = tables.get(HEADLINE_KEY), tables.get(REST_KEY)
    running = next((s for s in steps if s["state"] == "running"), None)
    finished = header.get("finished") == "1"
    status = ("finished" if finished else f"running step {running['number']} ({running['name']})" if running
              else "running")
    lines = [f"gpu_check: {status}, {header.get('elapsed', '?')} s of the {header.get('deadline', '?')} s deadline "
             f"used{' (dry run)' if header.get('dry') == '1' else ''}"]
    # 1. the headline
    table_step = next((s for s in steps if s["name"] == HEADLINE_KEY), None)
    steps_acc = ((headline or {}).get("accuracy") or {}).get("steps", "a few")
    lines += ["", "headline (table.json 'table'; images/s, seconds per 256 x 1000 run, % of the measured peak, "
                  f"ratio to diffusers-compile, error of a {steps_acc}-step run against eager-bf16):"]
    lines += _guarded(_headline, bt, headline,
                      f"no headline table yet (step table: {table_step['state'] if table_step else '-'})")
    # 2. the steps
    lines += ["", "steps (limit = min(budget, time left); seconds used; state):"]
    for s in steps:
        limit = f"{s['limit']} s" if s["limit"] not in ("", "-") else "-"
        used = f"{s['seconds']} s" if s["seconds"] not in ("", "-") else "-"
        lines.append(f"  {s['number']:>2} {s['name']:<11} budget {s['budget']:>4} s  limit {limit:>6}  "
                     f"used {used:>6}  {s['state']}")
    # 3. what the steps left
    if rest is not None:
        lines += ["", "other rows (table.json 'table_rest'):", *_guarded(_headline, bt, rest, "none")]
    for block in (_guarded(tests_lines, out / "tests.log"), _guarded(kernels_lines, out / "kernels.jsonl")):
        if block:
            lines += ["", *block]
    profile = _read_json(out / "profile.json")
    if profile and profile.get("table"):
        lines += ["", "profile (profile.json):", *("  " + line for line in profile["table"].splitlines())]
    for key, report in ((HEADLINE_KEY, headline), (REST_KEY, rest)):
        if report is not None:
            lines += ["", f"table.json '{key}'" + ("" if report.get("complete") else " (INCOMPLETE: cut off)") + ":",
                      *_guarded(lambda r: ["  " + line for line in bt.format_table(r).splitlines()], report)]
    # 4. why a step failed
    for s in steps:
        if s["state"].startswith(("FAILED", "TIMEOUT")) and s["log"]:
            log = Path(s["log"])
            try:
                tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
            except OSError:
                tail = ["(no log)"]
            lines += ["", f"step {s['name']}: {s['state']}; the last {len(tail)} lines of {log.name}:",
                      *("  | " + line for line in tail)]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, logdir: Path) -> None:
    write_atomic(out / "summary.txt", summary_text(out, logdir))


def print_summary(out: Path) -> None:
    """summary.txt with its headline block moved to the end: the printed output ends with the headline."""
    blocks = (out / "summary.txt").read_text().rstrip("\n").split("\n\n")
    head = next((i for i, b in enumerate(blocks) if b.startswith("headline")), None)
    order = blocks if head is None else blocks[:head] + blocks[head + 1:] + [blocks[head]]
    print("\n\n".join(order))


# ------------------------------------------------------------------------------------- the command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("file")
    e.add_argument("--stage", choices=("start", "setup"), required=True)
    e.add_argument("--check", action="store_true", help="import torch and what every step needs (exit 1 if not)")
    t = sub.add_parser("table")
    t.add_argument("outdir")
    t.add_argument("logdir")
    t.add_argument("--key", choices=(HEADLINE_KEY, REST_KEY), required=True)
    t.add_argument("--device", required=True)
    t.add_argument("--model", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--batch", type=int, required=True)
    t.add_argument("--repeat", type=int, default=1)
    t.add_argument("--backends", required=True)
    s = sub.add_parser("summary")
    s.add_argument("outdir")
    s.add_argument("logdir")
    pr = sub.add_parser("print")
    pr.add_argument("outdir")
    args = p.parse_args(argv)
    if args.cmd == "env":
        return write_env(Path(args.file), args.stage, args.check, os.environ.get("GPU_CHECK_DRY") == "1")
    if args.cmd == "table":
        return run_table(args)
    if args.cmd == "summary":
        write_summary(Path(args.outdir), Path(args.logdir))
        return 0
    print_summary(Path(args.outdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
