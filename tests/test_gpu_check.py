"""GPU readiness, checked on a CPU: what `bench/gpu_check.sh` and `pytest -m gpu tests` rely on.

- the GPU tests collect where onnx, onnxruntime and hypothesis are missing (skipped, not errors);
- every test runs with TF32 off and the settings are restored after it (tests/conftest.py);
- gpu_check.sh walks all its steps in a dry run (GPU_CHECK_DRY=1): at most six files in OUTDIR,
  each written as the run goes (a kill or a tiny deadline leaves them), the printed output ending
  with the headline, the smoke tests streamed graph-first, the kernels and suites selections free
  of the compiles they must not make;
- the step profile sorts kernel names into families.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _load(path: Path, name: str):
    """A module by file path (not `import conftest`: pytest rebinds that name to each folder's conftest)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


conftest = _load(REPO / "tests" / "conftest.py", "_tests_conftest")  # its TF32 helpers


def test_gpu_tests_collect_without_onnx_and_hypothesis(tmp_path):
    """`pytest -m gpu tests` where `import onnx`, `import onnxruntime` and `import hypothesis` fail:
    no collection error (the modules that need them skip)."""
    plugin = tmp_path / "block_optional.py"  # loaded with -p before any test module is imported
    plugin.write_text("import sys\nfor name in ('onnx', 'onnxruntime', 'hypothesis'):\n    sys.modules[name] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "block_optional",
                           "-p", "no:hypothesispytest", "-p", "no:cacheprovider", "tests"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "ERROR" not in out and "error" not in out.splitlines()[-1], out[-3000:]
    assert "could not import 'onnx'" in out  # the block worked: the onnx modules were skipped
    assert "could not import 'hypothesis'" in out  # and so was the property-test module
    assert "tests/test_graph.py::" in out  # and the GPU tests were collected


def test_tf32_is_off_inside_every_test():
    # torch's defaults leave cuDNN's TF32 on, so without the autouse fixture this fails
    assert conftest.fp32_settings() == (False, False, "highest")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


def test_tf32_settings_are_restored_after_a_test():
    saved = conftest.fp32_settings()
    try:
        conftest.set_fp32_settings((True, True, "high"))
        with conftest.exact_fp32():
            assert conftest.fp32_settings() == (False, False, "highest")
        assert conftest.fp32_settings() == (True, True, "high")
    finally:
        conftest.set_fp32_settings(saved)


def test_tf32_off_and_restored_where_the_new_fp32_precision_api_was_used():
    """torch 2.9+ refuses legacy TF32 reads once its fp32_precision API was set: the fixture and the
    bench's precision line then use that API. In a subprocess, as that state cannot be undone."""
    code = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("c", {str(REPO / "tests" / "conftest.py")!r})
c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)
from fastddpm.bench import fp32_precision
matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
matmul.fp32_precision = conv.fp32_precision = "tf32"
try:
    c.fp32_settings()
    raise SystemExit("legacy reads did not refuse: this test no longer tests the fallback")
except RuntimeError:
    pass
assert fp32_precision(torch.device("cuda"))["summary"] == "convolutions TF32, matmuls TF32"
with c.exact_fp32():
    assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    assert fp32_precision(torch.device("cuda"))["summary"] == "convolutions fp32, matmuls fp32"
assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


# ------------------------------------------------------------------ gpu_check.sh
GPU_CHECK = REPO / "bench" / "gpu_check.sh"
STEP_NAMES = ["setup", "table", "tests", "kernels", "profile", "table_rest", "unet", "sampling", "onnx", "train"]
MAIN, SUITES = STEP_NAMES[:6], STEP_NAMES[6:]
# What the GPU machine returns: the files of one folder, at most 8; gpu_check writes at most these 6.
FILES = {"env.txt", "summary.txt", "table.json", "tests.log", "kernels.jsonl", "profile.json"}
report = _load(REPO / "bench" / "gpu_check_report.py", "_gpu_check_report")


def _env(env_extra: dict, pythonpath=(), logdir: Path | None = None) -> dict:
    env = dict(os.environ, GPU_CHECK_DRY="1", PYTHON=sys.executable, **env_extra)
    # tests/conftest.py turns Triton's interpreter on for this process; the script's rows would run
    # under it (minutes, not seconds): gpu_check runs as on a machine where it is off
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    if logdir is not None:
        env["GPU_CHECK_LOGDIR"] = str(logdir)
    return env


def _gpu_check(out: Path, env_extra: dict, pythonpath=(), logdir: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_CHECK), str(out)], cwd=REPO, env=_env(env_extra, pythonpath, logdir),
                          capture_output=True, text=True, timeout=300)


_STEP_LINE = re.compile(r"^\s+(\d+) (\S+)\s+budget\s+(\d+) s\s+limit\s+(-|\d+ s)\s+used\s+(-|\d+ s)\s+(.*)$")


def _steps(out: Path) -> dict[str, str]:
    """step name -> state, from summary.txt's steps block."""
    text = (out / "summary.txt").read_text()
    block = text[text.index("\nsteps ("):].split("\n\n")[0]
    return {m.group(2): m.group(6) for m in map(_STEP_LINE.match, block.splitlines()) if m}


def _files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict:
    """Two dry runs side by side (CI has two cores), shared by the tests that read what they left:
    "main", the default steps named by number and by name, and "suites", the four other suites.
    {key: (OUTDIR, LOGDIR, stdout)}."""
    base = tmp_path_factory.mktemp("gpu_check")
    runs = {}
    for key, steps in (("main", "2,tests,kernels,5,table_rest"), ("suites", "unet,8,onnx,train")):
        out, logs, printed = base / key / "out", base / key / "logs", base / f"{key}.out"
        with open(printed, "w") as f:
            proc = subprocess.Popen(["bash", str(GPU_CHECK), str(out)], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                    text=True, env=_env({"GPU_CHECK_STEPS": steps}, logdir=logs))
        runs[key] = (out, logs, printed, proc)
    for key, (out, logs, printed, proc) in runs.items():
        proc.wait(timeout=600)
        assert proc.returncode == 0, printed.read_text()[-5000:]
    return {key: (out, logs, printed.read_text()) for key, (out, logs, printed, _) in runs.items()}


@pytest.fixture
def dry_run(dry_runs):
    return dry_runs["main"]


def test_gpu_check_dry_run_writes_six_files_and_ends_with_the_headline(dry_run):
    out, logs, printed = dry_run
    assert _files(out) == FILES  # all six, nothing else (no per-step logs, no tarball, no temporary names)
    steps = _steps(out)
    assert list(steps) == STEP_NAMES
    assert all(steps[name] == "ok (dry run)" for name in MAIN), steps
    assert all(steps[name] == "not requested" for name in SUITES), steps
    # the step logs (env.txt's first writer's too) stay outside OUTDIR; tests.log is the tests step's own
    assert {p.name for p in logs.glob("*.log")} == {"env.log"} | {f"{n}.log" for n in MAIN if n != "tests"}
    env = (out / "env.txt").read_text()
    assert "stage setup (dry run)" in env and "packages: torch " in env and "triton " in env
    assert all(f"\n  {m} " in env for m in ("fastddpm", "numpy", "safetensors", "tqdm"))  # the imports checked
    assert "nvidia-smi" in env
    tables = json.loads((out / "table.json").read_text())
    headline, rest = tables["table"], tables["table_rest"]
    assert headline["complete"] and [r["name"] for r in headline["rows"]] == ["eager-bf16", "graph-compiled"]
    assert headline["rows"][0]["rel_err_vs_eager_bf16"] == 0.0 and headline["accuracy"]["status"] == "ok"
    assert rest["complete"] and [(r["name"], r["status"]) for r in rest["rows"]] == [("triton", "skipped")]
    profile = json.loads((out / "profile.json").read_text())
    assert profile["us_per_step"] > 0 and profile["families"]["convolutions"]["us_per_step"] > 0
    summary = (out / "summary.txt").read_text()
    blocks = summary.split("\n\n")
    assert blocks[0].startswith("gpu_check: finished,") and "(dry run)" in blocks[0]
    assert blocks[1].startswith("headline (") and blocks[2].startswith("steps (")  # the headline first
    assert "profile (profile.json):" in summary and "fp32 rows:" in summary and "table.json 'table_rest'" in summary
    # printed last: the headline, one line per row of the table
    tail = printed.rstrip().splitlines()[-3:]
    assert tail[0].startswith("headline (") and [line.split()[0] for line in tail[1:]] == ["eager-bf16",
                                                                                          "graph-compiled"]
    assert "images/s" in tail[1] and "err vs eager-bf16 0.0e+00" in tail[1] and "skipped:" in tail[2]


def test_gpu_check_streams_the_smoke_tests_graph_first(dry_run):
    """tests.log is pytest -v of `-m gpu_smoke tests/test_gpu_smoke.py`: a line per test as it ends, in
    file order, the graph-over-compiled check first (on a CPU every case skips)."""
    out, _, _ = dry_run
    lines = [line for line in (out / "tests.log").read_text().splitlines() if "::" in line and " SKIPPED" in line]
    names = [line.split("::")[1].split()[0] for line in lines]
    assert names[:2] == ["test_graph_compiled_fp32_trajectory_matches_reference",
                         "test_graph_compiled_bf16_channels_last_images_match_fp32"]
    assert len(names) == 9 and names[-1] == "test_fused_step_replayed_in_a_cuda_graph"
    assert "tests (tests.log): 9 skipped; pytest: 9 skipped" in (out / "summary.txt").read_text()


def test_gpu_check_kernels_step_compiles_once_per_groupnorm_class(dry_run):
    """The kernels step's GPU selection (listed as skipped in the dry run's log): the copy row and the five
    cifar10 GroupNorm classes forward and backward, 5 Inductor compiles in all (forward only), no step
    cases; kernels.jsonl gets one line per case that ran (here the CPU's eager rows), naming its suite."""
    out, logs, _ = dry_run
    cuda = re.findall(r"^bench/bench_kernels\.py::(\w+)\[cuda-?([^\]]*)\] SKIPPED", (logs / "kernels.log").read_text(),
                      re.M)
    assert len(cuda) == 1 + 5 * 3 + 5 * 2, cuda
    compiles = [(test, case) for test, case in cuda if case.endswith("-compile")]
    assert len(compiles) == 5 and all(test == "test_group_norm_forward" and "bf16-channels-last" in case
                                      for test, case in compiles)
    assert {test for test, _ in cuda} == {"test_copy", "test_group_norm_forward", "test_group_norm_backward"}
    records = [json.loads(line) for line in (out / "kernels.jsonl").read_text().splitlines()]
    assert len(records) == 11 and {r["suite"] for r in records} == {"kernels"}
    assert all("[cpu" in r["name"] and r["median_s"] > 0 for r in records), records


def test_gpu_check_suites_collect_no_compiling_case(dry_runs):
    """The suites' GPU selections (collected in the dry run) hold no torch.compile case and no graph
    case (the graph backend compiles its U-Net by default), so they cost no Inductor compile."""
    out, logs, _ = dry_runs["suites"]
    steps = _steps(out)
    assert {name for name, state in steps.items() if state != "not requested"} == {"setup", *SUITES}
    assert all(steps[name] == "ok (dry run)" for name in SUITES), steps
    assert _files(out) == {"env.txt", "summary.txt"}  # collecting writes no result
    for name in SUITES:
        log = (logs / f"{name}.log").read_text()
        ids = re.findall(rf"^bench/bench_{name}\.py::\S+", log, re.M)
        assert ids and all("compile" not in i and "graph" not in i for i in ids), (name, ids)
        assert "deselected" in log, (name, log[-500:])  # the selection took something away
        assert all("cuda" in i for i in ids), (name, ids)  # and -m gpu the CPU cases


def test_gpu_check_budgets_fit_the_eight_minutes():
    """Steps 1-6's budgets and the summary's reserve add up to at most the default deadline, which
    leaves the 8 minutes (480 s) room for a step's 5 s of grace after its TERM and the final print."""
    text = GPU_CHECK.read_text()
    budgets = [int(b) for b in re.search(r"^BUDGET=\(([\d ]+)\)", text, re.M).group(1).split()]
    deadline = int(re.search(r"^DEADLINE=\$\{GPU_CHECK_DEADLINE:-(\d+)\}", text, re.M).group(1))
    reserve = int(re.search(r"^RESERVE=\$\{GPU_CHECK_RESERVE:-(\d+)\}", text, re.M).group(1))
    assert len(budgets) == len(STEP_NAMES)
    assert sum(budgets[:6]) + reserve <= deadline <= 470


def test_gpu_check_refuses_unknown_steps_and_budgets(tmp_path):
    bad = _gpu_check(tmp_path / "bad", {"GPU_CHECK_STEPS": "tests,warp"})
    assert bad.returncode == 2 and "unknown step 'warp'" in bad.stderr and not (tmp_path / "bad" / "env.txt").exists()
    bad = _gpu_check(tmp_path / "bad", {"GPU_CHECK_BUDGETS": "table=fast"})
    assert bad.returncode == 2 and "bad GPU_CHECK_BUDGETS entry 'table=fast'" in bad.stderr


@pytest.mark.parametrize("module", ["fastddpm", "tqdm"])
def test_gpu_check_setup_fails_loudly_when_a_needed_import_fails(tmp_path, module):
    shadow = tmp_path / "shadow" / module  # first on PYTHONPATH: a package whose import raises
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('blocked by the test')\n")
    out = tmp_path / "gc"
    proc = _gpu_check(out, {}, pythonpath=[shadow.parent], logdir=tmp_path / "logs")
    assert proc.returncode == 1
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("gpu_check:")]
    assert f"cannot import {module}: ImportError: blocked by the test" in line
    steps = _steps(out)
    assert steps["setup"].startswith("FAILED") and {steps[n] for n in MAIN[1:]} == {"pending"}  # nothing else ran
    assert _files(out) == {"env.txt", "summary.txt"}
    assert f"gpu_check setup: cannot import {module}" in (out / "env.txt").read_text()
    assert "blocked by the test" in (out / "summary.txt").read_text()  # the end of the setup log


def test_gpu_check_leaves_its_files_when_killed_after_the_first_step(tmp_path):
    """Killed (SIGKILL, the whole process group) while step 2 runs: env.txt and summary.txt are there
    already, the summary says which step was running, and nothing but the six names is in OUTDIR."""
    out, logs = tmp_path / "gc", tmp_path / "logs"
    proc = subprocess.Popen(["bash", str(GPU_CHECK), str(out)], cwd=REPO, env=_env({}, logdir=logs),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            summary = out / "summary.txt"
            if summary.exists() and "running step 2 (table)" in summary.read_text():
                break
            time.sleep(0.1)
        else:
            pytest.fail("step 2 was never seen running")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert {f for f in _files(out) if not f.startswith(".")} <= FILES
    steps = _steps(out)
    assert steps["setup"] == "ok (dry run)" and steps["table"] == "running"
    assert steps["tests"] == "pending"
    assert "stage setup (dry run)" in (out / "env.txt").read_text()


def test_gpu_check_honours_a_tiny_deadline(tmp_path):
    """GPU_CHECK_DEADLINE=9 with the default steps: the steps that find no time are skipped, the one
    the deadline cuts is stopped by its limit, the run ends near the deadline with at most the six
    files, and the printed output still ends with the headline block."""
    out = tmp_path / "gc"
    start = time.monotonic()
    proc = _gpu_check(out, {"GPU_CHECK_DEADLINE": "9", "GPU_CHECK_RESERVE": "1", "GPU_CHECK_MIN_STEP": "1"},
                      logdir=tmp_path / "logs")
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert took < 9 + 15  # the deadline, a step's 5 s of grace after its TERM, and the summary
    steps = _steps(out)
    assert steps["setup"] == "ok (dry run)"
    assert all(steps[n].startswith(("ok", "TIMEOUT after", "skipped (no time left")) for n in MAIN), steps
    assert steps["table_rest"].startswith("skipped (no time left"), steps
    assert all(steps[n] == "not requested" for n in SUITES)  # the default steps are 2-6
    assert _files(out) <= FILES
    lines = proc.stdout.rstrip().splitlines()
    head = max(i for i, line in enumerate(lines) if line.startswith("headline ("))
    assert all(line.startswith("  ") for line in lines[head + 1:]) and len(lines) > head + 1


def test_the_table_step_rewrites_table_json_and_summary_after_every_row(tmp_path, monkeypatch):
    """gpu_check_report's table command: each report the bench hands over (after every row) replaces
    its key of table.json and refreshes summary.txt, whose headline says what was cut off."""
    import fastddpm.bench as bench

    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    (logs / "steps.tsv").write_text("# deadline 470 elapsed 30 dry 0 finished 0\n1\tsetup\t45\t45\t12\tok\t\n"
                                    "2\ttable\t230\t230\t-\trunning\t\n")
    (out / "table.json").write_text(json.dumps({"schema": report.TABLE_SCHEMA, "table_rest": {"kept": True}}))
    seen = []

    def fake_run_bench(request):
        rows = [dict(name=n, status="ok", reason="", images_per_s=10.0, median_s=25.6, peak_fraction=0.1,
                     rel_err_vs_eager_bf16=0.002) for n in request.backends]
        base = {"request": {"batch": 256, "steps": 1000, "backends": list(request.backends)},
                "ceilings": {"peak": {"tflops": 800.0, "dtype": "bfloat16", "n": 8192}}, "accuracy": {"steps": 3}}
        for k in range(1, len(rows) + 1):
            request.on_report(dict(base, complete=False, rows=rows[:k]))
            tables = json.loads((out / "table.json").read_text())
            seen.append(([r["name"] for r in tables["table"]["rows"]], tables["table_rest"],
                         (out / "summary.txt").read_text()))
        return dict(base, complete=True, rows=rows)

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    monkeypatch.setattr(bench, "format_table", lambda report: "the table")
    assert report.main(["table", str(out), str(logs), "--key", "table", "--device", "cuda", "--model", "cifar10",
                        "--steps", "1000", "--batch", "256", "--backends", "eager-bf16,compile"]) == 0
    assert [names for names, _, _ in seen] == [["eager-bf16"], ["eager-bf16", "compile"]]
    assert all(kept == {"kept": True} for _, kept, _ in seen)  # the other key is left alone
    first = seen[0][2]
    assert first.startswith("gpu_check: running step 2 (table), 30 s of the 470 s deadline used")
    assert "\n  eager-bf16  " in first and "(cut off before: compile)" in first and "err vs eager-bf16 2.0e-03" in first
    assert not list(out.glob(".*"))  # every write went through a rename


def test_print_ends_with_the_headline_block(tmp_path, capsys):
    (tmp_path / "summary.txt").write_text("gpu_check: finished\n\nheadline (x):\n  row 1\n\nsteps (y):\n  1 setup\n\n"
                                          "tests (tests.log): 1 passed\n")
    report.print_summary(tmp_path)
    assert capsys.readouterr().out.split("\n\n")[-1] == "headline (x):\n  row 1\n"


# ------------------------------------------------------------------ fetch_wheels.sh: nothing the image has
FETCH_WHEELS = REPO / "bench" / "fetch_wheels.sh"


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A stand-in wheel: only the METADATA the check reads."""
    import zipfile

    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)


def _check_wheels(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(FETCH_WHEELS), "--check", str(folder)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))


def test_fetch_wheels_ships_only_what_the_gpu_image_lacks(tmp_path):
    """The check run on .whl/ after every download (no network here): diffusers' real requirements
    pass; a wheel of a project the image has (it would shadow it), an unpinned one, or a requirement
    that neither the image nor .whl/ meets is refused, by name."""
    good = tmp_path / "good"
    good.mkdir()
    _wheel(good, "diffusers", "0.42.1", ["importlib_metadata", "filelock", "huggingface-hub<3.0,>=1.32.0", "numpy",
                                         "regex!=2019.12.17", "requests", "safetensors>=0.8.0", "Pillow",
                                         "torch>=1.4; extra == 'torch'"])
    _wheel(good, "importlib-metadata", "10.2.0", ["zipp>=3.20", 'lazy-importer>=0.1; python_version < "3.15"'])
    _wheel(good, "lazy-importer", "0.1.0", [])
    ok = _check_wheels(good)
    assert ok.returncode == 0 and "3 wheels" in ok.stdout and "none in the GPU image" in ok.stdout, ok.stderr

    _wheel(good, "numpy", "2.0.0", [])  # the image has numpy: a wheel would shadow it
    _wheel(good, "rich-extra", "1.0", [])  # pinned nowhere
    bad = _check_wheels(good)
    assert bad.returncode == 1
    assert "numpy-2.0.0-py3-none-any.whl: the GPU image has numpy; a wheel would shadow it" in bad.stderr
    assert "rich_extra-1.0-py3-none-any.whl: rich-extra is not pinned" in bad.stderr

    lacking = tmp_path / "lacking"
    lacking.mkdir()
    _wheel(lacking, "diffusers", "0.42.1", ["importlib_metadata", "huggingface-hub>=9"])
    _wheel(lacking, "importlib-metadata", "10.2.0", ["lazy-importer>=0.1"])
    bad = _check_wheels(lacking)
    assert bad.returncode == 1
    assert "lazy-importer==0.1.0: pinned, but no wheel" in bad.stderr
    assert "requires lazy-importer>=0.1: neither the GPU image nor" in bad.stderr
    assert "requires huggingface-hub>=9: the GPU image has huggingface-hub 1.33.0" in bad.stderr


def test_wheels_are_never_committed():
    proc = subprocess.run(["git", "check-ignore", "-q", ".whl/diffusers-0.42.1-py3-none-any.whl"], cwd=REPO,
                          capture_output=True, timeout=30)
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0  # .gitignore keeps .whl/ out


# ------------------------------------------------------------------ the step profile's kernel families
profile_step = _load(REPO / "bench" / "profile_step.py", "_profile_step")


@pytest.mark.parametrize("name,family", [
    # cuDNN / CUTLASS convolutions (Hopper implicit GEMM, older kernels), and ATen's on a CPU
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_kernel", "convolutions"),
    ("cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_64x64_64x5_nhwc_align8>",
     "convolutions"),
    ("implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1, false, false, true>", "convolutions"),
    ("aten::mkldnn_convolution", "convolutions"),
    # GroupNorm: ours (NCHW and the channels-last whole-row kernels), ATen's two kernels, inductor's fused one
    ("_group_norm_fwd_kernel", "GroupNorm"),
    ("_gn_cl_fwd_kernel", "GroupNorm"),
    ("_gn_cl_bwd_kernel", "GroupNorm"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>(long, float, ...)", "GroupNorm"),
    ("triton_red_fused_native_group_norm_silu_3", "GroupNorm"),
    ("aten::native_group_norm", "GroupNorm"),
    # attention: flash, cuDNN's SDPA (names "cudnn" too), softmax
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, cutlass::bfloat16_t>>",
     "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    # plain GEMMs: the linear layers
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "matmul"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn", "matmul"),
    ("aten::addmm", "matmul"),
    # the fused step
    ("_step_kernel", "fused step"),
    # elementwise: ATen's loops, inductor's pointwise kernels (even named after a fused convolution)
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, ...>",
     "elementwise"),
    ("triton_poi_fused_add_convolution_silu_7", "elementwise"),
    ("aten::silu", "elementwise"),
    # everything else
    ("Memcpy DtoD (Device -> Device)", "other"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, ...>>", "other"),
    ("aten::empty", "other"),
])
def test_profile_classifies_kernels_by_name(name, family):
    assert profile_step.classify(name) == family


def test_profile_summary_is_per_step_and_sums_to_the_total():
    kernels = [("_step_kernel", 30.0), ("sm90_xmma_fprop_implicit_gemm_x", 500.0), ("_group_norm_fwd_kernel", 120.0),
               ("_step_kernel", 30.0), ("sm90_xmma_fprop_implicit_gemm_x", 700.0), ("Memcpy HtoD", 20.0)]
    summary = profile_step.summarize(kernels, steps=2)
    fam = summary["families"]
    assert list(fam) == list(profile_step.FAMILIES)
    assert summary["us_per_step"] == pytest.approx(700.0)
    assert fam["convolutions"] == pytest.approx({"us_per_step": 600.0, "share": 1200 / 1400, "launches_per_step": 1.0})
    assert fam["fused step"]["us_per_step"] == 30.0 and fam["GroupNorm"]["launches_per_step"] == 0.5
    assert fam["attention"] == {"us_per_step": 0.0, "share": 0.0, "launches_per_step": 0.0}
    assert summary["top"][0] == {"name": "sm90_xmma_fprop_implicit_gemm_x", "family": "convolutions",
                                 "us_per_step": 600.0}
    table = profile_step.format_summary(summary, "title")
    assert table.splitlines()[0] == "title" and "85.7%" in table and table.splitlines()[-1].split()[:2] == ["total", "700.0"]
