#!/usr/bin/env bash
# tools/gpu_wheels.sh: the wheels a bare GPU image (torch, timm, transformers, tensorboard
# already there) needs to run tools/gpu_check.py, downloaded here into .whl/ (ignored by git)
# for Python 3.12 on x86-64 Linux.  Prints the line that installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform any)
# what the image lacks (its package list: deepspeed needs pydantic and hjson; webdataset braceexpand);
# versions as in this repository's venv
for pkg in deepspeed==0.19.8 webdataset==1.0.2 submitit==1.5.4 hjson braceexpand pydantic==2.14.4 pydantic_core==2.50.5 \
           annotated-types==0.8.0 typing-inspection==0.4.5; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLAT[@]}" -d .whl "$pkg" 2>/dev/null ||
        python3 -m pip wheel -q --no-deps -w .whl "$pkg"   # sdist only (deepspeed): a pure-Python wheel, ops JIT-built
done
ls .whl
echo 'on the device: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade' \
     '--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;' \
     'python3 tools/gpu_check.py --out $OUT'
