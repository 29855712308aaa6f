#!/usr/bin/env bash
# Fill .whl/ with the wheels the GPU machine lacks: diffusers (the bench's peer) and those of its
# dependencies that the GPU image does not already have, for CPython 3.12 on manylinux x86-64.
#
#   bench/fetch_wheels.sh            # run on a machine with network access, in the repository
#
# The GPU machine has no network; the device tool carries .whl/ over (run(carry=[".whl"], ...))
# and gpu_check.sh's setup installs them offline into /tmp/gpu_check_site (--no-deps --target,
# first on PYTHONPATH). pip resolves diffusers' whole dependency tree for the target platform;
# the projects the GPU image already has (torch's, numpy's, onnx's, pytest's, scikit-learn's
# dependencies: IMAGE_HAS below) are then deleted, so nothing the image provides is shadowed.
# Fails when .whl/ ends up over MAX_MIB (30; a device-tool carry holds at most ~60 MiB).
#
# Knobs: PYTHON (default python3), DIFFUSERS_VERSION (default 0.42.1, the version CI tests with).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSION=${DIFFUSERS_VERSION:-0.42.1}
MAX_MIB=30
# The GPU image (Python 3.12, torch 2.11.0+cu130, triton 3.6.0, numpy, safetensors, tqdm, onnx,
# onnxruntime, pytest, pytest-benchmark, scikit-learn) and what those depend on, as normalised names.
IMAGE_HAS="torch triton numpy safetensors tqdm onnx onnxruntime pytest pytest_benchmark scikit_learn
scipy joblib threadpoolctl filelock typing_extensions sympy mpmath networkx jinja2 markupsafe fsspec
setuptools protobuf ml_dtypes flatbuffers packaging coloredlogs humanfriendly iniconfig pluggy pygments
py_cpuinfo"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$tmp" "diffusers==$VERSION"

mkdir -p .whl
rm -f .whl/*.whl
for wheel in "$tmp"/*.whl; do
    # a wheel's file name starts with its project name, "-" inside it already turned into "_"
    name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:].' '[:lower:]_')
    case " $(echo $IMAGE_HAS) " in
        *" $name "*) echo "skip $(basename "$wheel") (the GPU image has $name)" ;;
        *) cp "$wheel" .whl/ && echo "keep $(basename "$wheel")" ;;
    esac
done
kib=$(du -sk .whl | cut -f1)
echo ".whl/: $(ls .whl | wc -l) wheels, $((kib / 1024)) MiB ($kib KiB)"
if [ "$kib" -gt $((MAX_MIB * 1024)) ]; then
    echo "fetch_wheels: .whl/ is over ${MAX_MIB} MiB" >&2
    exit 1
fi
