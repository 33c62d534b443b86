#!/bin/bash
# A sitting of the built-in motion module on a lent GPU (the `device` tool), then its evaluation there:
# what issue 19's "resumable CPU recipe (GPU when available)" leaves for a GPU: every CPU sitting of the shipped
# module together saw about 16,000 clips (2 s a step of 4 clips here). How many the ~7 minutes a device session
# leaves for training see is not measured yet (no GPU was lent since this was written); train.log will say.
#
#   bash bench/gpu_motion_sitting.sh prepare    # here, before the device call: wheels + a tree under 64 MiB
#   device run: command "bash bench/gpu_motion_sitting.sh run 420", carry [".whl"], timeout_s 600
#   bash bench/gpu_motion_sitting.sh restore    # here, after it: the whole checkout back
#
# `run` (on the device) trains from the shipped module for SECONDS (default 420), then runs motion-eval on the
# first 200 held-out clips (Euler a, as every recorded report) and leaves in $OUT: train.log, eval.json (per clip),
# eval.log (the summary), sheet.png (the first 8 clips' frames) and the exported module (config.json,
# diffusion_pytorch_model.safetensors, TRAINING.json). Check its numbers on the CPU here before shipping it:
#   python -m ldm_core.train motion-eval --module <files_at folder> --n 100 --sampler "Euler a" --threads 2
#
# Why `prepare`: the device tool sends the tracked tree and refuses one over 64 MiB; the repo's models are about
# 130 MB. The sitting needs only models/builtin and models/AnimateDiff, so `prepare` leaves the other model
# folders out of the working tree with a sparse checkout (nothing is committed or deleted from git; `restore` puts
# them back) and fetches the wheels the device image lacks (diffusers and pydantic with their needs) into .whl/,
# which .git/info/exclude keeps out of git.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-run}" in
prepare)
    mkdir -p .git/info .whl
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
    for w in diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 \
        typing_inspection==0.4.5 importlib_metadata==10.2.0 lazy-importer==0.1.0; do
        "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$w"
    done
    git sparse-checkout set --no-cone '/*' '!/models/builtin-inpainting/' '!/models/SD-Upscale/' \
        '!/models/ControlNet/' '!/models/ESRGAN/' '!/models/Lora/'
    tree=$( (git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) || true)
    echo "tracked files present: $(git ls-files -t | grep -c '^H') ; their bytes: ${tree}; wheels: $(du -sb .whl | cut -f1)"
    ;;
restore)
    git sparse-checkout disable
    git status --short | head
    ;;
run)
    secs=${2:-420}
    : "${OUT:?run on the device machine, where \$OUT is set}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$OUT/train.log" || true
    python3 -m ldm_core.train motion --device cuda --autocast bf16 --base models/builtin \
        --out /tmp/mm/builtin-motion --work-dir /tmp/mw --init models/AnimateDiff/builtin-motion \
        --clips 64 --max-seconds "$secs" --log-every 25 >>"$OUT/train.log" 2>&1 || { tail -30 "$OUT/train.log"; exit 1; }
    tail -5 "$OUT/train.log"
    python3 -m ldm_core.train motion-eval --module /tmp/mm/builtin-motion --n 200 --sampler "Euler a" --device cuda \
        --json "$OUT/eval.json" --sheet "$OUT/sheet.png" >"$OUT/eval.log" 2>&1 || { tail -30 "$OUT/eval.log"; exit 1; }
    cat "$OUT/eval.log" | tail -40
    cp /tmp/mm/builtin-motion/config.json /tmp/mm/builtin-motion/diffusion_pytorch_model.safetensors \
        /tmp/mm/builtin-motion/TRAINING.json "$OUT/"
    ;;
*)
    echo "usage: $0 prepare | run [SECONDS] | restore" >&2
    exit 2
    ;;
esac
