#!/usr/bin/env bash
# The real-footage tokenizer recipe on the lent GPU machine (one H200): each preset of $PRESETS trained for $MINUTES
# minutes on bikes.mp4 and evaluated at 128x128 on carphone_pristine.mp4, held out, exactly as the CPU
# runs of docs/results/tokenizer.md (bench/tokenizer_recipes.py: the fitted start, the trained model, the equal-floats baseline, seams).
#
# That machine has no PyAV or webdataset and cannot reach a registry, and ../shared does not travel with the
# checkout, so prepare both here once, from the repository's root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       av==18.1.0 webdataset==1.0.2 braceexpand==0.1.7
#   mkdir -p runs/clips && cp ../shared/data/clips/*.mp4 runs/clips/
#
# then, through the device tool, one preset a call (a command may run 10 minutes; a session has 15 of device
# time, start included, so 10 minutes a preset does not fit: 3 each does, about 5 minutes a call):
#
#   run(command="PRESETS=small bash bench/gpu_tokenizer.sh", carry=[".whl", "runs/clips"], timeout_s=420)
#   run(command="PRESETS=base bash bench/gpu_tokenizer.sh", carry=[".whl", "runs/clips"], timeout_s=420)
#
# Each writes tokenizer_recipes_gpu_<preset>.json and its log under $OUT (bench/results when $OUT is unset, so
# the script also runs on a CPU: MINUTES=0.5 PRESETS=tiny bash bench/gpu_tokenizer.sh checks it end to end).
set -euo pipefail
cd "$(dirname "$0")/.."

PRESETS=${PRESETS:-small base}
MINUTES=${MINUTES:-3}
BATCH=${BATCH:-8}          # the CPU recipe's batch of 64x64 crops; an H200 has room for far more
WORKERS=${WORKERS:-8}      # decoding processes per run: one cannot keep up with a GPU's steps
CLIPS=${CLIPS:-runs/clips}
RESULTS=${OUT:-bench/results}
WORK=${WORK:-/tmp/gpu_tokenizer}
PY=${PYTHON:-python3}

if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
for clip in bikes.mp4 carphone_pristine.mp4; do
    [ -f "$CLIPS/$clip" ] || { echo "error: $CLIPS/$clip is missing: copy ../shared/data/clips/*.mp4 to $CLIPS and carry it" >&2; exit 2; }
done
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

mkdir -p "$RESULTS"
for preset in $PRESETS; do
    PYTHONUNBUFFERED=1 "$PY" bench/tokenizer_recipes.py --train "$CLIPS/bikes.mp4" \
        --held-out "$CLIPS/carphone_pristine.mp4" --preset "$preset" --size 128 --minutes "$MINUTES" \
        --batch-size "$BATCH" --workers "$WORKERS" --work "$WORK/$preset" \
        --out "$RESULTS/tokenizer_recipes_gpu_$preset.json" --recipe "after=@footage" \
        2>&1 | tee "$RESULTS/tokenizer_recipes_gpu_$preset.log"
done
