#!/usr/bin/env bash
# Everything a lent GPU should run, in two calls of at most 8.5 minutes each (one H100/H200):
#
#   bench/gpu_check.sh DIR                          # call 1: steps 1-5
#   GPU_CHECK_STEPS=rest bench/gpu_check.sh DIR     # call 2: steps 6-10
#
#   1. setup       wheels from .whl/ for what the machine lacks, fastddpm importable (offline);
#                  FAILS the whole run (exit 1, one clear line) if fastddpm, numpy, safetensors
#                  or tqdm cannot be imported. Always runs, at most 60 s.
#   2. table       the headline: fastddpm bench --model cifar10 --steps 1000 --batch 256 --device cuda
#                  rows eager-bf16 (the reference code, bf16 channels-last), diffusers (bf16 eager),
#                  graph-eager, diffusers-compile, graph-compiled, compile (in that order); warm-up
#                  (compile, capture) reported apart from the timed run
#   3. tests       pytest -m gpu tests
#   4. kernels     pytest bench/bench_kernels.py --benchmark-only -m gpu (each case appended to
#                  bench_kernels.jsonl as it finishes)
#   5. profile     bench/profile_step.py: one steady-state step of backend graph, CUDA time by
#                  kernel family
#   6. table_rest  the table's other rows: reference (fp32 NCHW), triton, onnx
#   7-10. unet, sampling, onnx, train: the other pytest-benchmark suites with -m gpu (unet and
#                  sampling without their compile cases, train without compiled training)
#
# Every step runs under `timeout` with its own budget, cut further so the whole call stays under
# GPU_CHECK_DEADLINE seconds (default 510); a step that finds under 20 s left is skipped and
# recorded so. Each step writes as it goes (the table's JSON after every row, the suites' JSON
# lines after every case), so a time-out keeps what was measured before it. Logs and results land
# in DIR (NAME.log, NAME.json, NAME.jsonl), with summary.tsv (one line per step, written as each
# ends), summary.txt and DIR/gpu_check.tar.gz (all of it). The run ends by printing summary.txt,
# whose last lines are the headline: one line per row of the table with images/s, seconds per
# 256 x 1000 run, % of the measured bf16 peak and the ratio to diffusers compiled.
#
# Knobs (environment):
#   PYTHON              interpreter (default python3)
#   GPU_CHECK_STEPS     which steps: names or numbers, comma-separated (e.g. "tests,5" or "6,7");
#                       "first" = 2-5 (the default), "rest" = 6-10, "all" = 2-10. Setup always runs.
#   GPU_CHECK_DEADLINE  seconds for the whole call (default 510)
#   GPU_CHECK_REPEAT    timed runs per table row (default 1: a row is 1000 steps)
#   GPU_CHECK_DRY=1     walk the control flow on a CPU in seconds (CI does, tests/test_gpu_check.py):
#                       setup checks imports but installs nothing and needs no GPU; the table and the
#                       profile run for real on the CPU at the tiny preset (1 step, batch 1; the
#                       rows reference, graph-eager, graph-compiled); the other steps echo their command.
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
REPEAT=${GPU_CHECK_REPEAT:-1}
DRY=${GPU_CHECK_DRY:-0}
export PYTHONUNBUFFERED=1
START=$SECONDS
SUMMARY="$OUTDIR/summary.tsv"
printf 'step\tstatus\tseconds\tlog\n' > "$SUMMARY"
rm -f "$OUTDIR/.fastddpm_copied"

NAMES=(setup table tests kernels profile table_rest unet sampling onnx train)
case ${GPU_CHECK_STEPS:-first} in
    first) STEPS=table,tests,kernels,profile ;;
    rest) STEPS=table_rest,unet,sampling,onnx,train ;;
    all) STEPS=$(IFS=,; echo "${NAMES[*]:1}") ;;
    *) STEPS=${GPU_CHECK_STEPS} ;;
esac
# numbers to names; an unknown one is an error before anything runs
wanted_list=","
for s in ${STEPS//,/ }; do
    if [[ $s =~ ^[0-9]+$ ]] && [ "$s" -ge 1 ] && [ "$s" -le ${#NAMES[@]} ]; then
        s=${NAMES[$((s - 1))]}
    fi
    case " ${NAMES[*]} " in
        *" $s "*) wanted_list="$wanted_list$s," ;;
        *) echo "gpu_check: unknown step '$s' in GPU_CHECK_STEPS; steps: ${NAMES[*]} (or 1-${#NAMES[@]}, first, rest, all)" >&2
           exit 2 ;;
    esac
done
wanted() { case $wanted_list in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# record NAME STATUS SECONDS LOG: one line of summary.tsv
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"; }

# step NAME BUDGET_SECONDS CMD...: run CMD with stdout+stderr in DIR/NAME.log under a timeout of
# min(BUDGET, time left before the deadline); record the outcome in summary.tsv. A step that was
# not asked for is recorded as such, so summary.tsv always lists every step.
step() {
    local name=$1 budget=$2
    shift 2
    if [ "$name" != setup ] && ! wanted "$name"; then
        record "$name" "not requested" 0 -
        return 0
    fi
    local left=$((DEADLINE - (SECONDS - START)))
    if [ "$left" -lt 20 ]; then
        record "$name" "skipped (no time left)" 0 -
        echo "== $name: skipped, ${left}s left before the ${DEADLINE}s deadline"
        return 0
    fi
    local limit=$((budget < left ? budget : left))
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    if [ "$DRY" = 1 ] && [ "$name" != setup ] && [ -z "${DRY_REAL:-}" ]; then
        echo "dry run: would run: $*" > "$OUTDIR/$name.log"
    else
        timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    fi
    local rc=$?
    local status
    case $rc in
        0) status=ok ;;
        5) status="no tests collected" ;;
        124|137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [ "$DRY" = 1 ] && status="$status (dry run)"
    record "$name" "$status" "$((SECONDS - t0))" "$name.log"
    echo "   $status in $((SECONDS - t0))s; tail of $name.log:"
    tail -n 3 "$OUTDIR/$name.log" | sed 's/^/   | /'
    return $rc
}

setup() {
    set -e
    if [ "$DRY" = 1 ]; then
        echo "dry run: no nvidia-smi, no installs, no GPU needed"
    else
        nvidia-smi || true
        # Wheels carried in .whl/ (bench/fetch_wheels.sh: diffusers and what it needs that the
        # image lacks) go to /tmp/gpu_check_site, first on the path of every later step.
        if ! "$PY" -c "import diffusers" 2>/dev/null; then
            if ls .whl/*.whl >/dev/null 2>&1; then
                "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                    --target /tmp/gpu_check_site .whl/*.whl
            else
                echo "diffusers is missing and .whl/ holds no wheels: the diffusers rows will be skipped"
            fi
        fi
        # fastddpm itself: editable and offline (setuptools comes with torch on Python 3.12); where
        # site-packages is not writable, a plain copy into /tmp/gpu_check_site instead.
        if ! (cd "$OUTDIR" && "$PY" -c "import fastddpm.kernels, fastddpm.export") 2>/dev/null; then
            if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
                "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/gpu_check_site .
                # a copy, not an editable install: the repository's fastddpm/ folder must not shadow
                # it (it lacks fastddpm.kernels and fastddpm.export), so later steps run with
                # PYTHONSAFEPATH=1 (the working directory left off sys.path)
                touch "$OUTDIR/.fastddpm_copied"
            fi
        fi
    fi
    # Checked from DIR, not the repository: there `import fastddpm` would find the source folder
    # whether or not the package (with fastddpm.kernels and fastddpm.export) is installed.
    (cd "$OUTDIR" && "$PY" - <<'PYEOF'
import importlib, importlib.util, os, sys
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
# What every step needs: a failure here ends the run with one clear line.
for name in ("numpy", "safetensors", "tqdm", "fastddpm", "fastddpm.kernels", "fastddpm.export"):
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # ImportError, or anything a broken package raises while importing
        sys.exit(f"gpu_check setup: cannot import {name}: {type(e).__name__}: {e}")
    print(name, getattr(mod, "__version__", ""), mod.__file__)
# What only some rows or steps need: reported, and the steps say what they skip. (A dry run only
# looks them up: importing diffusers and onnxruntime takes seconds and proves nothing on a CPU.)
dry = os.environ.get("GPU_CHECK_DRY") == "1"
for name in ("triton", "diffusers", "onnx", "onnxruntime", "pytest", "pytest_benchmark"):
    try:
        if dry:
            spec = importlib.util.find_spec(name)
            print(name, "found" if spec else "MISSING (optional)", spec.origin if spec else "")
            continue
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as e:
        print(name, "MISSING (optional):", type(e).__name__, e)
if not dry and not torch.cuda.is_available():
    sys.exit("gpu_check setup: no CUDA device: nothing on this list can run")
PYEOF
    )
}

export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
export PY DRY OUTDIR GPU_CHECK_DRY=$DRY
export -f setup
if ! step setup 60 bash -c setup; then
    echo "gpu_check: setup failed, nothing else was run: $(grep -m1 'gpu_check setup:' "$OUTDIR/setup.log" ||
        tail -n 1 "$OUTDIR/setup.log") (full log: $OUTDIR/setup.log)" >&2
    exit 1
fi
[ -e "$OUTDIR/.fastddpm_copied" ] && export PYTHONSAFEPATH=1

if [ "$DRY" = 1 ]; then  # the same flow on a CPU, in seconds
    DEVICE=cpu MODEL=tiny BSTEPS=1 BATCH=1 PROFILE_BATCH=1 PROFILE_STEPS=1 PROFILE_BACKEND=reference
    HEADLINE=reference,graph-eager,graph-compiled  # fp32: bf16 convolutions are slow on a CPU
    REST=reference
else
    DEVICE=cuda MODEL=cifar10 BSTEPS=1000 BATCH=256 PROFILE_BATCH=256 PROFILE_STEPS=10 PROFILE_BACKEND=graph
    # cheap rows first, then the compiled peer (the headline's ratios are to it), then fastddpm's
    # compiling rows: a time-out keeps the eager rows and both peers
    HEADLINE=eager-bf16,diffusers,graph-eager,diffusers-compile,graph-compiled,compile
    REST=reference,triton,onnx
fi
bench_table() {  # bench_table NAME BACKENDS
    DRY_REAL=1 step "$1" 270 "$PY" -m fastddpm bench --device "$DEVICE" --model "$MODEL" --steps "$BSTEPS" \
        --batch "$BATCH" --repeat "$REPEAT" --backends "$2" --json "$OUTDIR/$1.json"
}
suite() {  # suite NAME BUDGET [pytest selection...]: one pytest-benchmark file, -m gpu
    local name=$1 budget=$2
    shift 2
    local file=bench/bench_$name.py
    if wanted "$name" && [ ! -f "$file" ]; then
        record "$name" "absent ($file)" 0 -
        return 0
    fi
    step "$name" "$budget" "$PY" -m pytest "$file" --benchmark-only -m gpu "$@" -q -p no:cacheprovider \
        --bench-jsonl="$OUTDIR/$name.jsonl" --benchmark-json="$OUTDIR/$name.json" \
        --benchmark-columns=median,iqr,rounds
}

bench_table table "$HEADLINE"
step tests 90 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider --junitxml="$OUTDIR/tests.xml"
suite kernels 90
DRY_REAL=1 step profile 90 "$PY" bench/profile_step.py --device "$DEVICE" --model "$MODEL" --batch "$PROFILE_BATCH" \
    --backend "$PROFILE_BACKEND" --steps "$PROFILE_STEPS" --json "$OUTDIR/profile.json"
bench_table table_rest "$REST"
# the compile backend's cases are left to the table (a compile per case would not fit); run them
# apart with: pytest bench/bench_unet.py bench/bench_sampling.py --benchmark-only -m gpu -k compile
suite unet 75 -k "not compile"
suite sampling 75 -k "not compile"
suite onnx 60
suite train 60 -k "not compile"  # compiled training: bench_train.py as a script

# The summary: the steps, the tables, the profile, the suites' medians, and last the headline.
"$PY" - "$OUTDIR" > "$OUTDIR/summary.txt" 2>&1 <<'PYEOF'
import csv, json, sys
from pathlib import Path

from fastddpm.bench_table import format_table, headline_lines

out = Path(sys.argv[1])
rows = list(csv.reader(open(out / "summary.tsv"), delimiter="\t"))
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
print("gpu_check steps")
for r in rows:
    print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))


def report(name):
    path = out / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    print(f"\n{name}:\n" + format_table(data) + ("" if data["complete"] else "\n(INCOMPLETE: the run was cut off)"))
    return data


headline = report("table")
report("table_rest")
profile = out / "profile.json"
if profile.exists():
    print("\nprofile:\n" + json.loads(profile.read_text())["table"])
for name in ("kernels", "unet", "sampling", "onnx", "train"):
    full, lines = out / f"{name}.json", out / f"{name}.jsonl"
    if full.exists():  # pytest-benchmark's own file, written at the end of the suite
        cases = [(b["name"], b["stats"]["median"], b.get("extra_info", {})) for b in json.loads(full.read_text())["benchmarks"]]
    elif lines.exists():  # the suite was cut off: the cases it finished
        cases = [(c["name"].split("::")[-1], c["median_s"], c["extra_info"])
                 for c in map(json.loads, lines.read_text().splitlines())]
    else:
        continue
    print(f"\n{name}: {len(cases)} timed cases{'' if full.exists() else ' (cut off)'} (median; images/s, TFLOP/s, GB/s)")
    for case, median, x in cases:
        rates = ", ".join(f"{k} {x[k]:.4g}" for k in ("images_per_s", "tflops", "gbps") if isinstance(x.get(k), (int, float)))
        print(f"  {case:<60} {1000 * median:10.3f} ms  {rates}")
print("\nheadline (images/s, seconds per 256 x 1000 run, % of the measured peak, ratio to diffusers-compile):")
print("\n".join(headline_lines(headline)) if headline else "  no table (step 2 did not run)")
PYEOF
[ $? -eq 0 ] || echo "gpu_check: writing summary.txt failed; its end says why" >&2
(cd "$OUTDIR" && tar czf gpu_check.tar.gz --exclude gpu_check.tar.gz -- *)
echo
echo "all logs and JSON: $OUTDIR (packed: $OUTDIR/gpu_check.tar.gz); $((SECONDS - START))s in all"
echo
cat "$OUTDIR/summary.txt"
