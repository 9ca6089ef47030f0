#!/usr/bin/env bash
# Fetch the wheels launch/gpu_check.sh installs on the GPU machine into .whl/ (git-ignored).
#
# That machine has Python 3.12, torch, numpy, ninja, nvcc and no network; it lacks deepspeed and
# megatron-core. This downloads exactly what they need there, for CPython 3.12 on x86-64 Linux:
# deepspeed 0.19.8 (only an sdist upstream: built here into a py3-none-any wheel), megatron-core
# 0.16.1 (cp312 manylinux wheel) and the small packages their Requires-Dist names. One version of
# each, or the install there stops. Usage: bash launch/fetch_gpu_wheels.sh [folder, default .whl]
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
mkdir -p "$dest"
# .gitignore has /.whl/; the local exclude keeps it out of `git status` in any checkout too.
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 manylinux_2_5_x86_64 manylinux_2_12_x86_64 manylinux_2_24_x86_64; do
  platforms+=(--platform "$p")
done
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$dest" "$@"
}

# Versions: those installed on the CPU machines where the suite passes (deepspeed's and
# pydantic's pins: pydantic-core must be the exact version pydantic names).
download "megatron-core==0.16.1"
download einops hjson msgpack py-cpuinfo psutil ninja annotated-types typing-inspection "typing-extensions>=4.12"
download "pydantic==$(python3 -c 'import pydantic; print(pydantic.VERSION)')"
core=$(unzip -p "$dest"/pydantic-[0-9]*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
download "pydantic-core==$core"
if ! ls "$dest"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  python3 -m pip wheel -q --no-deps -w "$dest" "deepspeed==0.19.8"
fi

# Every Requires-Dist of the two packages (bar extras, and what the GPU machine has: torch,
# numpy, packaging, tqdm, nvidia-ml-py) must have a wheel here.
missing=0
have=$(ls "$dest" | sed 's/-.*//' | tr 'A-Z.-' 'a-z__')
for whl in "$dest"/deepspeed-*.whl "$dest"/megatron_core-*.whl "$dest"/pydantic-[0-9]*.whl; do
  for req in $(unzip -p "$whl" '*/METADATA' | grep '^Requires-Dist:' | grep -v 'extra ==' \
               | sed 's/^Requires-Dist: *\([A-Za-z0-9_.-]*\).*/\1/' | sort -u); do
    name=$(echo "$req" | tr 'A-Z.-' 'a-z__')
    case "$name" in torch|numpy|packaging|tqdm|nvidia_ml_py) continue ;; esac
    if ! echo "$have" | grep -qx "$name"; then
      echo "fetch_gpu_wheels: $(basename "$whl") needs $req, which has no wheel in $dest" >&2
      missing=1
    fi
  done
done
ls -1 "$dest"
du -sh "$dest"
exit $missing
