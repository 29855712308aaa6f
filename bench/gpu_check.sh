#!/usr/bin/env bash
# Everything a lent GPU runs, in ONE call of at most 8 minutes on a cold machine (one H100/H200):
#
#   bench/gpu_check.sh OUTDIR
#
# OUTDIR gets at most six files, each written while the run goes, so a kill or a time-out keeps
# what was measured (bench/gpu_check_report.py writes or reads them all):
#
#   env.txt        written first: python, torch, triton, numpy, onnxruntime, diffusers, ... versions;
#                  the device (name, SMs, L2, memory; clocks, driver, nvidia-smi); rewritten after setup
#                  with the imports every step relies on
#   summary.txt    the headline lines first, then one line per step with its state, then the tests,
#                  the kernel cases, the profile, the full tables and the end of each failed step's
#                  log; rewritten when a step starts and ends and after every table row
#   table.json     {"table": the headline report, "table_rest": the other rows}, fastddpm bench's
#                  JSON, rewritten after every row
#   tests.log      pytest -v of the GPU smoke tests: one line per test as it finishes
#   kernels.jsonl  one JSON line per timed benchmark case as it finishes ("suite" names the suite)
#   profile.json   one steady-state step of backend graph, CUDA time by kernel family
#
# Step logs stay outside OUTDIR (GPU_CHECK_LOGDIR, default a fresh /tmp/gpu_check_logs.*); the
# end of a failed one is copied into summary.txt. The printed output ends with the headline.
#
#   #  step        budget  what
#   -  env           15 s  env.txt (python alone: versions, nvidia-smi), before anything else
#   1  setup         45 s  wheels from .whl/ (bench/fetch_wheels.sh) into /tmp/gpu_check_site, fastddpm
#                          installed (editable, offline; or copied there and run with PYTHONSAFEPATH=1),
#                          env.txt rewritten with torch's view of the device and every import a step
#                          needs; exits 1 with one clear line if torch, numpy, safetensors, tqdm,
#                          fastddpm, fastddpm.kernels or fastddpm.export cannot be imported
#   2  table        230 s  the headline: fastddpm bench --device cuda --model cifar10 --steps 1000
#                          --batch 256, rows eager-bf16, diffusers, graph-eager, diffusers-compile,
#                          graph-compiled, compile (in that order: a time-out keeps the eager rows and
#                          both peers); each row also errs against eager-bf16 on a 3-step run
#   3  tests         75 s  pytest -m gpu_smoke tests/test_gpu_smoke.py: graph over the compiled U-Net
#                          vs the reference first (fp32, bf16), the GroupNorm op, the fused step
#   4  kernels       45 s  bench_kernels.py: the copy row and the five cifar10 GroupNorm shape classes,
#                          bf16 channels-last, forward (eager, compile, fused: 5 Inductor compiles in
#                          all) and backward (eager, fused)
#   5  profile       30 s  bench/profile_step.py, backend graph, cifar10 batch 256 (its compile is
#                          mostly a cache hit after step 2's graph-compiled row)
#   6  table_rest    35 s  the other rows: triton, onnx (skipped without onnxruntime-gpu), reference
#                          (fp32, last: the row a time-out costs)
#   7-10 unet, sampling, onnx, train   the other suites, only when asked for (GPU_CHECK_STEPS=suites),
#                          without a single Inductor compile: -k "not compile and not graph" (the graph
#                          backend compiles its U-Net by default)
#
# Steps 1-6 add up to 460 s, under the 470 s deadline; the other 10 s are the summary's (env.txt's
# 15 s at most, typically 1-2, come out of the steps' time left: the deadline holds). Every step
# runs under `timeout` with limit min(budget, time left before the deadline - 10 s); a step that
# finds under GPU_CHECK_MIN_STEP (20) seconds left is recorded "skipped (no time left)". The
# budgets are estimates written without a GPU (the compile rows dominate the table); rebalance them
# with GPU_CHECK_BUDGETS, not by editing, when the first run's summary shows where the time went.
#
# Knobs (environment):
#   PYTHON              interpreter (default python3)
#   GPU_CHECK_STEPS     which steps: names or numbers, comma-separated; "main" = 2-6 (the default),
#                       "suites" (or "rest") = 7-10, "all" = 2-10. Setup always runs.
#   GPU_CHECK_DEADLINE  seconds for the whole call by its own clock (default 470)
#   GPU_CHECK_BUDGETS   per-step budgets to override, e.g. "table=300,tests=60"
#   GPU_CHECK_MIN_STEP  the fewest seconds a step is started with (default 20)
#   GPU_CHECK_RESERVE   seconds of the deadline kept for the summary and the print (default 10)
#   GPU_CHECK_REPEAT    timed runs per table row (default 1: a row is 1000 steps)
#   GPU_CHECK_LOGDIR    where the step logs go (default: a new folder under /tmp)
#   GPU_CHECK_DRY=1     walk the control flow on a CPU in seconds (CI does, tests/test_gpu_check.py):
#                       no installs, no GPU; the tables and the profile run for real at the tiny preset
#                       (1 step, batch 1), the smoke tests run (and skip), the kernels step runs its
#                       selection's CPU cases (so kernels.jsonl fills) beside the GPU ones (skipped),
#                       the suites only collect their selections (pytest --collect-only).
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUTDIR=$1
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2

PY=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_DEADLINE:-470}
REPEAT=${GPU_CHECK_REPEAT:-1}
DRY=${GPU_CHECK_DRY:-0}
MIN_STEP=${GPU_CHECK_MIN_STEP:-20}
RESERVE=${GPU_CHECK_RESERVE:-10}  # seconds kept back from the steps for the summary and the final print
REPORT_PY=$REPO/bench/gpu_check_report.py
REPORT=("$PY" "$REPORT_PY")
export PYTHONUNBUFFERED=1
START=$SECONDS

NAMES=(setup table tests kernels profile table_rest unet sampling onnx train)
BUDGET=(45 230 75 45 30 35 75 75 60 60)  # steps 1-6 add up to 460 s: DEADLINE - RESERVE
# What the kernels step times, and what keeps the suites free of Inductor compiles (tests/test_gpu_check.py
# collects both selections in the dry run and checks them).
KERNELS_K="test_copy or (group_norm_forward and channels-last) or (group_norm_backward and not compile)"
SUITES_K="not compile and not graph"

BUDGETS=${GPU_CHECK_BUDGETS:-}
for pair in ${BUDGETS//,/ }; do  # name=seconds
    found=0
    for i in "${!NAMES[@]}"; do
        if [ "${pair%%=*}" = "${NAMES[$i]}" ] && [[ ${pair#*=} =~ ^[0-9]+$ ]]; then BUDGET[$i]=${pair#*=}; found=1; fi
    done
    if [ $found = 0 ]; then
        echo "gpu_check: bad GPU_CHECK_BUDGETS entry '$pair' (NAME=SECONDS; steps: ${NAMES[*]})" >&2
        exit 2
    fi
done
case ${GPU_CHECK_STEPS:-main} in
    main|first) STEPS=table,tests,kernels,profile,table_rest ;;
    suites|rest) STEPS=unet,sampling,onnx,train ;;
    all) STEPS=$(IFS=,; echo "${NAMES[*]:1}") ;;
    *) STEPS=${GPU_CHECK_STEPS} ;;
esac
STATE=() LIMIT=() SECS=() LOG=()
for i in "${!NAMES[@]}"; do STATE[$i]="not requested" LIMIT[$i]=- SECS[$i]=- LOG[$i]=; done
STATE[0]=pending
for s in ${STEPS//,/ }; do  # numbers to names; an unknown one is an error before anything runs
    if [[ $s =~ ^[0-9]+$ ]] && [ "$s" -ge 1 ] && [ "$s" -le ${#NAMES[@]} ]; then
        s=${NAMES[$((s - 1))]}
    fi
    found=0
    for i in "${!NAMES[@]}"; do [ "$s" = "${NAMES[$i]}" ] && STATE[$i]=pending && found=1; done
    if [ $found = 0 ]; then
        echo "gpu_check: unknown step '$s' in GPU_CHECK_STEPS; steps: ${NAMES[*]}" \
            "(or 1-${#NAMES[@]}, main, suites, all)" >&2
        exit 2
    fi
done

LOGDIR=${GPU_CHECK_LOGDIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_logs.XXXXXX")}
mkdir -p "$LOGDIR" || exit 2
# a rerun into the same OUTDIR starts clean (only our six names are touched)
for f in env.txt summary.txt table.json tests.log kernels.jsonl profile.json; do
    rm -f "$OUTDIR/$f" "$OUTDIR/.$f.tmp"
done

FINISHED=0
# summarize: steps.tsv for the report script, then summary.txt (a plain copy of the steps if python fails)
summarize() {
    local i
    {
        printf '# deadline %s elapsed %s dry %s finished %s\n' "$DEADLINE" "$((SECONDS - START))" "$DRY" "$FINISHED"
        for i in "${!NAMES[@]}"; do
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$((i + 1))" "${NAMES[$i]}" "${BUDGET[$i]}" "${LIMIT[$i]}" \
                "${SECS[$i]}" "${STATE[$i]}" "${LOG[$i]}"
        done
    } > "$LOGDIR/.steps.tsv" && mv -f "$LOGDIR/.steps.tsv" "$LOGDIR/steps.tsv"
    if ! timeout 30 "${REPORT[@]}" summary "$OUTDIR" "$LOGDIR" 2>> "$LOGDIR/summary.err"; then
        { echo "gpu_check: the summary writer failed ($LOGDIR/summary.err); the steps as recorded:"
          cat "$LOGDIR/steps.tsv"; } > "$OUTDIR/.summary.txt.tmp" &&
            mv -f "$OUTDIR/.summary.txt.tmp" "$OUTDIR/summary.txt"
    fi
}

# step I CMD...: run step I (0-based) under `timeout` with limit min(budget, time left), its output
# into LOG (default LOGDIR/NAME.log); the state goes into summary.txt when it starts and ends.
step() {
    local i=$1
    shift
    local name=${NAMES[$i]}
    [ "${STATE[$i]}" = pending ] || return 0
    local left=$((DEADLINE - (SECONDS - START) - RESERVE))
    if [ "$left" -lt "$MIN_STEP" ]; then
        STATE[$i]="skipped (no time left: ${left} s)"
        echo "== $name: skipped, ${left} s left before the ${DEADLINE} s deadline"
        summarize
        return 0
    fi
    local budget=${BUDGET[$i]}
    local limit=$((budget < left ? budget : left))
    LIMIT[$i]=$limit STATE[$i]=running LOG[$i]=${STEP_LOG:-$LOGDIR/$name.log}
    summarize
    echo "== $((i + 1)) $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "${LOG[$i]}" 2>&1
    local rc=$?
    local status
    case $rc in
        0) status=ok ;;
        5) status="no tests collected" ;;
        124|137) status="TIMEOUT after ${limit} s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [ "$DRY" = 1 ] && status="$status (dry run)"
    SECS[$i]=$((SECONDS - t0)) STATE[$i]=$status
    summarize
    echo "   $status in ${SECS[$i]} s (log: ${LOG[$i]})"
    return $rc
}

setup() {
    set -e
    if [ "$DRY" = 1 ]; then
        echo "dry run: no installs, no GPU needed"
    else
        # Wheels carried in .whl/ (bench/fetch_wheels.sh: diffusers and what it needs that the image
        # lacks) go to /tmp/gpu_check_site, first on the path of every later step.
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
                touch "$LOGDIR/fastddpm_copied"
            fi
        fi
    fi
    # Checked from OUTDIR, not the repository: there `import fastddpm` would find the source folder
    # whether or not the package (with fastddpm.kernels and fastddpm.export) is installed.
    cd "$OUTDIR"
    "$PY" "$REPORT_PY" env "$OUTDIR/env.txt" --stage setup --check
}

export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
export PY DRY OUTDIR LOGDIR REPORT_PY GPU_CHECK_DRY=$DRY
export -f setup
# env.txt first of all (python alone: versions by metadata, nvidia-smi); setup rewrites it with torch's view
timeout 15 "${REPORT[@]}" env "$OUTDIR/env.txt" --stage start > "$LOGDIR/env.log" 2>&1 ||
    echo "gpu_check: env.txt not written before setup ($LOGDIR/env.log); setup tries again" >&2
if ! step 0 bash -c setup; then
    echo "gpu_check: setup failed, nothing else was run: $(grep -m1 'gpu_check setup:' "$LOGDIR/setup.log" ||
        tail -n 1 "$LOGDIR/setup.log") (env.txt and summary.txt in $OUTDIR; log $LOGDIR/setup.log)" >&2
    FINISHED=1
    summarize
    timeout 30 "${REPORT[@]}" print "$OUTDIR" || cat "$OUTDIR/summary.txt"
    exit 1
fi
[ -e "$LOGDIR/fastddpm_copied" ] && export PYTHONSAFEPATH=1

if [ "$DRY" = 1 ]; then  # the same flow on a CPU, in seconds
    DEVICE=cpu MODEL=tiny BSTEPS=1 BATCH=1 PROFILE_BATCH=1 PROFILE_STEPS=1 PROFILE_BACKEND=reference
    HEADLINE=eager-bf16,graph-compiled  # one real row (the accuracy baseline's), one skipped
    REST=triton  # skipped on a CPU: the step's flow without another real row (the dry run's seconds)
    GPU_ONLY=()  # the kernels step also runs its selection's CPU cases (the GPU ones skip)
else
    DEVICE=cuda MODEL=cifar10 BSTEPS=1000 BATCH=256 PROFILE_BATCH=256 PROFILE_STEPS=10 PROFILE_BACKEND=graph
    # cheap rows first, then the compiled peer (the headline's ratios are to it), then fastddpm's
    # compiling rows: a time-out keeps the eager rows and both peers
    HEADLINE=eager-bf16,diffusers,graph-eager,diffusers-compile,graph-compiled,compile
    REST=triton,onnx,reference
    GPU_ONLY=(-m gpu)
fi
table() {  # table STEP KEY BACKENDS
    step "$1" "${REPORT[@]}" table "$OUTDIR" "$LOGDIR" --key "$2" --device "$DEVICE" --model "$MODEL" \
        --steps "$BSTEPS" --batch "$BATCH" --repeat "$REPEAT" --backends "$3"
}
suite() {  # suite STEP: one more pytest-benchmark file, -m gpu, without compiles
    local name=${NAMES[$1]}
    if [ "$DRY" = 1 ]; then
        step "$1" "$PY" -m pytest "bench/bench_$name.py" --collect-only -q -m gpu -k "$SUITES_K" -p no:cacheprovider
    else
        step "$1" "$PY" -m pytest "bench/bench_$name.py" --benchmark-only -m gpu -k "$SUITES_K" -v -p no:cacheprovider \
            --bench-jsonl="$OUTDIR/kernels.jsonl" --benchmark-columns=median,iqr,rounds
    fi
}

table 1 table "$HEADLINE"
STEP_LOG=$OUTDIR/tests.log step 2 "$PY" -m pytest -m gpu_smoke tests/test_gpu_smoke.py -v -rA --tb=short \
    --durations=0 -p no:cacheprovider -p no:randomly
step 3 "$PY" -m pytest bench/bench_kernels.py --benchmark-only ${GPU_ONLY[@]+"${GPU_ONLY[@]}"} -k "$KERNELS_K" -v \
    -p no:cacheprovider --bench-jsonl="$OUTDIR/kernels.jsonl" --benchmark-columns=median,iqr,rounds
step 4 "$PY" bench/profile_step.py --device "$DEVICE" --model "$MODEL" --batch "$PROFILE_BATCH" \
    --backend "$PROFILE_BACKEND" --steps "$PROFILE_STEPS" --json "$OUTDIR/profile.json"
table 5 table_rest "$REST"
for i in 6 7 8 9; do suite $i; done

FINISHED=1
summarize
echo
echo "gpu_check: $((SECONDS - START)) s in all; files in $OUTDIR: $(cd "$OUTDIR" && echo *) (step logs: $LOGDIR)"
echo
timeout 30 "${REPORT[@]}" print "$OUTDIR" || cat "$OUTDIR/summary.txt"
