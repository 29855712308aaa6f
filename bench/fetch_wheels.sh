#!/usr/bin/env bash
# Fill .whl/ with exactly the wheels the GPU machine lacks for gpu_check: diffusers (the bench's
# peer) and those of its requirements the GPU image does not have, pinned, for CPython 3.12 on
# manylinux x86-64. Nothing the image already has is ever shipped: a wheel would shadow it.
#
#   bench/fetch_wheels.sh            # download (needs a package index), then check; in the repository
#   bench/fetch_wheels.sh --check    # only check .whl/ (or DIR: --check DIR); no network
#
# The GPU machine has no network; the device tool carries .whl/ over (run(carry=[".whl"], ...)) and
# gpu_check.sh's setup installs it offline into /tmp/gpu_check_site (--no-deps --target, first on
# PYTHONPATH). Every wheel is fetched with `pip download --no-deps` at its pinned version, so pip
# resolves nothing behind our back. The check (also run after every download) fails, naming the
# wheel, when
#   - a wheel's project is in the image (bench/gpu_image_packages.txt): it would shadow the image's;
#   - a wheel is not pinned below, or a pin has no wheel, or a project comes twice;
#   - a requirement of a kept wheel (markers evaluated for CPython 3.12 on Linux x86-64, extras
#     left out) is neither in the image nor kept, or the image's version (where known) misses its
#     specifier: then pin it below.
# and when .whl/ is over MAX_MIB (30; a device-tool carry holds at most ~60 MiB).
#
# diffusers 0.42.1 requires importlib_metadata (imported by diffusers only on Python < 3.8, but a
# requirement all the same), which requires lazy-importer; everything else it requires (filelock,
# huggingface-hub, numpy, pillow, regex, requests, safetensors, zipp) is in the image.
#
# Knobs: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PINS=(diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0)
IMAGE=bench/gpu_image_packages.txt
MAX_MIB=30

check() {  # check DIR: the rules above, on the wheels in DIR
    "$PY" - "$1" "$IMAGE" "$MAX_MIB" "${PINS[@]}" <<'PYEOF'
import re, sys, zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet

folder, image_file, max_mib, pins = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
image = {}
for line in image_file.read_text().splitlines():
    if line.strip() and not line.startswith("#"):
        name, _, version = line.strip().partition("==")
        image[norm(name)] = version or None
pinned = {norm(p.split("==")[0]): p.split("==")[1] for p in pins}
target = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
errors, kept = [], {}
wheels = sorted(folder.glob("*.whl"))
for wheel in wheels:
    name, version = wheel.name.split("-")[:2]
    name = norm(name)
    if name in image:
        errors.append(f"{wheel.name}: the GPU image has {name}; a wheel would shadow it")
    elif name not in pinned:
        errors.append(f"{wheel.name}: {name} is not pinned in bench/fetch_wheels.sh")
    elif version != pinned[name]:
        errors.append(f"{wheel.name}: {name} is pinned at {pinned[name]}, not {version}")
    if name in kept:
        errors.append(f"{wheel.name}: a second wheel of {name} (pip --no-index stops on two)")
    kept[name] = wheel
for name in pinned:
    if name not in kept:
        errors.append(f"{name}=={pinned[name]}: pinned, but no wheel of it in {folder}")
for name, wheel in kept.items():
    with zipfile.ZipFile(wheel) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = z.read(meta).decode() if meta else ""
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(target):
            continue  # an extra, or another Python or platform
        dep = norm(req.name)
        if dep in kept:
            continue
        if dep not in image:
            errors.append(f"{wheel.name} requires {req}: neither the GPU image nor {folder} has {dep}; pin it")
        elif image[dep] and not SpecifierSet(str(req.specifier)).contains(image[dep], prereleases=True):
            errors.append(f"{wheel.name} requires {req}: the GPU image has {dep} {image[dep]}")
mib = sum(w.stat().st_size for w in wheels) / 2**20
if mib > max_mib:
    errors.append(f"{folder}: {mib:.1f} MiB of wheels, over {max_mib} MiB")
for e in errors:
    print(f"fetch_wheels: {e}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{folder}: {len(wheels)} wheels, {mib:.1f} MiB, none in the GPU image, every requirement met: "
      + ", ".join(w.name for w in wheels))
PYEOF
}

if [ "${1:-}" = "--check" ]; then
    check "${2:-.whl}"
    exit
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for pin in "${PINS[@]}"; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$tmp" "$pin"
done
check "$tmp"
mkdir -p .whl
rm -f .whl/*.whl
mv "$tmp"/*.whl .whl/
ignored=$(git check-ignore -q .whl/x.whl && echo yes || echo NO)
echo ".whl/: $(ls .whl | wc -l) wheels ($(du -sk .whl | cut -f1) KiB), git-ignored: $ignored"
