#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine (issue 11), within a time budget (default 480 s).
#
#   bash benchmarks/gpu.sh 2>stderr.log | tee gpu-check.md     # from the checkout's root
#
# Prints markdown for benchmarks/README.md, most telling part first, so that a check cut short by the
# machine's time limit still says the most: device and torch; the bench with host syncs per step
# (augment alone, model step alone, full step, their ratio); the same with the model step and the
# augmentation compiled; seconds per epoch of the real runner; with CIFAR-10 present a short SimCLR
# run's kNN; fp32/bf16 x contiguous/channels_last, compile on/off, and the augmentation compiled or not;
# ResNet-50 at 224 px on ImageNet-sized JPEGs decoded by 14 workers (made on the spot, no download).
# Each part runs under `timeout`, the lesser of its own limit and the time left of the budget; a part
# that fails or is cut says so in one line and the next part runs. Python's stderr (warnings, any
# traceback) is left on stderr: keep it beside the markdown.
#
# Data: CIFAR-10 when extracted under $SSL_LAB_DATA, else the synthetic set at CIFAR-10's shape (50,000
# train and 10,000 test images of 32x32, generated).
#
# Environment: PYTHON (python3), GPU_CHECK_BUDGET_S (480), GPU_CHECK_DEVICE (cuda),
# GPU_CHECK_QUICK=1: a tiny setting of every part (tiny model, 64 images, one step; torch.compile
# included), to rehearse the script on a CPU: `GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash
# benchmarks/gpu.sh` (tests/test_bench.py). Arrays are expanded as ${A[@]+"${A[@]}"}: with set -u,
# bash before 4.4 takes an empty "${A[@]}" for an unset variable.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
START=$SECONDS

if [ -d "${SSL_LAB_DATA:-$HOME/.cache/ssl_lab}/cifar10-jpeg/train" ]; then
    DATA=(data=cifar10); HAVE_CIFAR=1
else
    DATA=(data=synthetic data.num_train=50000 data.num_test=10000); HAVE_CIFAR=0
fi
COMMON=(backbone=resnet18 batch_size=512 "trainer.device=$DEVICE" logger=none trainer.precision=bf16)
BENCH=(--steps 30 --warmup 5 --workers 8)
COMPILE=()
EPOCHS=3 KNN_EPOCHS=20 KNN_EVERY=5
JPEGS=(--train 2048 --val 256)  # ImageNet-sized, for the decoding path
FILES=(data=imagefolder data.root=outputs/gpu-check-jpegs data.image_size=224 augment=simclr_imagenet
       backbone=resnet50 batch_size=256 "trainer.device=$DEVICE" logger=none trainer.precision=bf16)
FILES_BENCH=(--steps 10 --warmup 3 --workers 14)
if [ "$QUICK" = 1 ]; then  # the rehearsal: every part, tiny
    DATA=(data=synthetic data.num_train=64 data.num_test=32)
    COMMON=(backbone=resnet_tiny batch_size=16 "trainer.device=$DEVICE" logger=none trainer.precision=32)
    BENCH=(--steps 1 --warmup 1 --workers 1)
    EPOCHS=1 KNN_EPOCHS=2 KNN_EVERY=1
    JPEGS=(--train 32 --val 8)
    FILES=(data=imagefolder data.root=outputs/gpu-check-jpegs data.image_size=64 augment=simclr_imagenet
           backbone=resnet_tiny batch_size=8 "trainer.device=$DEVICE" logger=none trainer.precision=32)
    FILES_BENCH=(--steps 1 --warmup 1 --workers 1)
fi

# part LIMIT_S TITLE COMMAND...: the command under timeout (its limit or the budget's rest), its stdout
# through (only the lines matching $FILTER, if set), then its wall time; a line when it failed, was cut
# or had no time left.
part() {
    local limit=$1 title=$2; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    [ "$limit" -le "$left" ] || limit=$left
    echo
    echo "\$ $title"
    if [ "$limit" -lt 10 ]; then
        echo "(skipped: ${left} s of the ${BUDGET} s budget left)"
        return
    fi
    local t0=$SECONDS rc
    if [ -n "${FILTER:-}" ]; then
        timeout --kill-after=10 "$limit" "$@" | grep -E "$FILTER"
        rc=${PIPESTATUS[0]}
    else
        timeout --kill-after=10 "$limit" "$@"
        rc=$?
    fi
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "(cut after ${limit} s: the part's limit or the budget)"
    elif [ "$rc" != 0 ]; then
        echo "(failed: exit $rc after $((SECONDS - t0)) s; its error is on stderr)"
    else
        echo "(wall $((SECONDS - t0)) s, start-up and data loading included)"
    fi
}

echo "## GPU check, $(date -u +%F)"
echo
echo '```'
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi here (device: $DEVICE)"
$PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', '| data:', '${DATA[*]}')"
part 150 "python -m ssl_lab.bench ${DATA[*]} ${COMMON[*]} ${BENCH[*]} --syncs" \
    $PY -m ssl_lab.bench "${DATA[@]}" "${COMMON[@]}" "${BENCH[@]}" --syncs
# both compiled, the model step and the augmentation (trainer.compile_augment): the full step and the loop
# against the compiled model step, side by side in one run (issue 34's goal: 0.9x)
FILTER="trainer:|alone|full|loop" part 150 \
    "python -m ssl_lab.bench ${DATA[*]} ${COMMON[*]} ${BENCH[*]} trainer.compile=true trainer.compile_augment=true" \
    $PY -m ssl_lab.bench "${DATA[@]}" "${COMMON[@]}" "${BENCH[@]}" trainer.compile=true trainer.compile_augment=true
# 2 processes on this torch (gloo on the CPU: a GPU each is not needed to catch a version defect):
# check_ddp trains 1 process, then 2 through the runner's launcher (DDP, sync BN, the gathered loss)
DDP=(debug=smoke trainer.device=cpu logger=none method=nnclr)
FILTER="PASS|FAIL|difference" part 120 "python -m ssl_lab.check_ddp --nproc 2 --steps 3 ${DDP[*]}" \
    $PY -m ssl_lab.check_ddp --nproc 2 --steps 3 "${DDP[@]}"
TRAIN=($PY -m ssl_lab.train "${DATA[@]}" "${COMMON[@]}" trainer.progress=false)
FILTER="^epoch|kNN top-1" part 100 "python -m ssl_lab.train ${DATA[*]} ${COMMON[*]} epochs=$EPOCHS monitor.every=0" \
    "${TRAIN[@]}" epochs=$EPOCHS monitor.every=0 hydra.run.dir=outputs/gpu-check
if [ "$HAVE_CIFAR" = 1 ] || [ "$QUICK" = 1 ]; then
    FILTER="^epoch|kNN top-1" part 130 \
        "python -m ssl_lab.train ${DATA[*]} ${COMMON[*]} epochs=$KNN_EPOCHS monitor.every=$KNN_EVERY" \
        "${TRAIN[@]}" epochs=$KNN_EPOCHS monitor.every=$KNN_EVERY hydra.run.dir=outputs/gpu-check-knn
fi
part 150 "python -m ssl_lab.bench ${DATA[*]} ${COMMON[*]} ${BENCH[*]} --variants-only ${COMPILE[*]+${COMPILE[*]}}" \
    $PY -m ssl_lab.bench "${DATA[@]}" "${COMMON[@]}" "${BENCH[@]}" --variants-only ${COMPILE[@]+"${COMPILE[@]}"}
# ImageNet-sized JPEGs made on the spot, then the bench on them: the decoding workers' path
FILES_CMD="rm -rf outputs/gpu-check-jpegs && $(printf '%q ' "$PY" benchmarks/jpeg_folder.py outputs/gpu-check-jpegs "${JPEGS[@]}")"
FILES_CMD+=" && $(printf '%q ' "$PY" -m ssl_lab.bench "${FILES[@]}" "${FILES_BENCH[@]}")"
part 120 "python benchmarks/jpeg_folder.py outputs/gpu-check-jpegs ${JPEGS[*]} && python -m ssl_lab.bench ${FILES[*]} ${FILES_BENCH[*]}" \
    bash -c "$FILES_CMD"
echo
echo "(the check took $((SECONDS - START)) s of its ${BUDGET} s budget)"
echo '```'
