#!/usr/bin/env bash
# Everything a lent GPU should run, in one command, well inside 10 minutes on one H100:
#
#   bench/gpu_check.sh DIR
#
#   1. setup          fastddpm installed (editable, offline), diffusers from .whl/ if missing
#   2. tests_gpu      pytest -m gpu tests                      (the GPU-marked tests)
#   3. bench_cifar10  fastddpm bench --model cifar10 --steps 1000 --batch 256 --device cuda
#                     (every backend side by side with diffusers, eager and compiled)
#   4. bench_kernels, bench_unet, bench_sampling, bench_onnx, bench_train
#                     pytest bench/bench_X.py --benchmark-only -m gpu   (each one that exists;
#                     unet and sampling without their compile cases, which step 3 covers)
#
# Every step runs under `timeout` with its own budget, cut further so the whole stays under
# GPU_CHECK_DEADLINE seconds (default 510); a step that finds too little time left is skipped
# and says so (run it in a second call with GPU_CHECK_STEPS). Logs and JSON land in DIR (NAME.log, NAME.json), with summary.txt, and all of it
# packed in DIR/gpu_check.tar.gz (the device tool brings back at most 8 files: copy the tarball,
# summary.txt and bench_cifar10.json to $OUT). The short summary table is printed last.
#
# On a bare machine: a missing Python package is installed, offline, from the wheels in the
# repository's .whl/ folder (see bench/README.md for how to fill it); fastddpm itself with
# `pip install --no-deps --no-build-isolation --no-index -e .`.
#
# Knobs (environment): PYTHON (default python3), GPU_CHECK_DEADLINE (s, default 510),
# GPU_CHECK_REPEAT (timed runs per row of the cifar10 table, default 1: a row is 1000 steps),
# GPU_CHECK_STEPS (comma-separated subset of tests,table,kernels,unet,sampling,onnx,train;
# default all; setup always runs).
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: bench/gpu_check.sh DIR" >&2
    exit 2
fi
OUTDIR=$1
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_DEADLINE:-510}
STEPS=${GPU_CHECK_STEPS:-tests,table,kernels,unet,sampling,onnx,train}
REPEAT=${GPU_CHECK_REPEAT:-1}
export PYTHONUNBUFFERED=1
START=$SECONDS
SUMMARY="$OUTDIR/summary.tsv"
printf 'step\tstatus\tseconds\tlog\n' > "$SUMMARY"

wanted() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# step NAME BUDGET_SECONDS CMD...: run CMD with stdout+stderr in DIR/NAME.log under a timeout of
# min(BUDGET, time left before the deadline); record the outcome in summary.tsv.
step() {
    local name=$1 budget=$2
    shift 2
    local left=$((DEADLINE - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        printf '%s\tskipped (no time left)\t0\t-\n' "$name" >> "$SUMMARY"
        echo "== $name: skipped, ${left}s left before the ${DEADLINE}s deadline"
        return 0
    fi
    local limit=$((budget < left ? budget : left))
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    local rc=$?
    local status
    case $rc in
        0) status=ok ;;
        5) status="no tests collected" ;;
        124|137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$name.log" >> "$SUMMARY"
    echo "   $status in $((SECONDS - t0))s; tail of $name.log:"
    tail -n 3 "$OUTDIR/$name.log" | sed 's/^/   | /'
}

setup() {
    set -e
    nvidia-smi || true
    # Wheels carried in .whl/ for what the machine lacks (diffusers: the bench's peer).
    if ! "$PY" -c "import diffusers" 2>/dev/null; then
        if ls .whl/*.whl >/dev/null 2>&1; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/gpu_check_site .whl/*.whl
        else
            echo "diffusers is missing and .whl/ holds no wheels: the diffusers rows will be skipped"
        fi
    fi
    if ! "$PY" -c "import fastddpm.kernels" 2>/dev/null; then
        "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
    fi
    "$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
for name in ("fastddpm", "triton", "diffusers", "onnxruntime", "pytest_benchmark"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), mod.__file__)
    except ImportError as e:
        print(name, "MISSING:", e)
assert torch.cuda.is_available(), "no CUDA device: nothing on this list can run"
EOF
}

# Wheels from .whl/ go to /tmp/gpu_check_site, first on the path of every step after setup.
export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
export PY
export -f setup
step setup 120 bash -c setup
if ! grep -q "^setup	ok" "$SUMMARY"; then
    echo "setup failed; see $OUTDIR/setup.log" >&2
    cat "$OUTDIR/setup.log" >&2
    exit 1
fi

wanted tests && step tests_gpu 90 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider --junitxml="$OUTDIR/tests_gpu.xml"

# The table: cheap rows first and the compiling ones last, so a time-out still leaves the
# reference, the eager rows and the diffusers peer in the JSON (it is rewritten after each row).
wanted table && step bench_cifar10 270 "$PY" -m fastddpm bench --device cuda --model cifar10 --steps 1000 --batch 256 \
    --repeat "$REPEAT" --backends reference,eager-bf16,diffusers,triton,graph,onnx,compile,diffusers-compile \
    --json "$OUTDIR/bench_cifar10.json"

for suite in kernels unet sampling onnx train; do
    wanted "$suite" || continue
    file=bench/bench_$suite.py
    if [ ! -f "$file" ]; then
        printf 'bench_%s\tabsent (%s)\t0\t-\n' "$suite" "$file" >> "$SUMMARY"
        continue
    fi
    # The compile backend's cases are left to the table above (a compile per case would not fit);
    # run them apart with: pytest bench/bench_unet.py bench/bench_sampling.py --benchmark-only -m gpu -k compile
    select=()
    case $suite in
        kernels) budget=120 ;;
        unet|sampling) budget=75; select=(-k "not compile") ;;
        train) budget=60; select=(-k "not compile") ;;  # compiled training: bench_train.py as a script
        *) budget=60 ;;
    esac
    step "bench_$suite" "$budget" "$PY" -m pytest "$file" --benchmark-only -m gpu ${select[@]+"${select[@]}"} -q \
        -p no:cacheprovider --benchmark-json="$OUTDIR/bench_$suite.json" --benchmark-columns=median,iqr,rounds
done

# The summary: the steps, the side-by-side table, and the medians of the pytest-benchmark suites.
"$PY" - "$OUTDIR" > "$OUTDIR/summary.txt" 2>&1 <<'EOF'
import csv, json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = list(csv.reader(open(out / "summary.tsv"), delimiter="\t"))
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
print("gpu_check steps")
for r in rows:
    print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
table = out / "bench_cifar10.json"
if table.exists():
    from fastddpm.bench import format_table
    report = json.loads(table.read_text())
    print()
    print(format_table(report) + ("" if report["complete"] else "\n(INCOMPLETE: the run was cut off)"))
for path in sorted(out.glob("bench_*.json")):
    if path.name == "bench_cifar10.json":
        continue
    data = json.loads(path.read_text())
    print(f"\n{path.name}: {len(data['benchmarks'])} timed cases (median; extra_info images/s, TFLOP/s, GB/s)")
    for b in data["benchmarks"]:
        x = b.get("extra_info", {})
        rates = ", ".join(f"{k} {x[k]:.4g}" for k in ("images_per_s", "tflops", "gbps")
                          if isinstance(x.get(k), (int, float)))
        print(f"  {b['name']:<60} {1000 * b['stats']['median']:10.3f} ms  {rates}")
EOF
(cd "$OUTDIR" && tar czf gpu_check.tar.gz --exclude gpu_check.tar.gz -- *)
echo
echo "all logs and JSON: $OUTDIR (packed: $OUTDIR/gpu_check.tar.gz); $((SECONDS - START))s in all"
echo
cat "$OUTDIR/summary.txt"
