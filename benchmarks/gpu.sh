#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine (issue 11); under 8 minutes on one H100.
#
#   bash benchmarks/gpu.sh                  # from the checkout's root; PYTHON=python3 by default
#
# Prints markdown for benchmarks/README.md: device and torch, the bench (augment alone, model step alone,
# full step, their ratio, host syncs per step, fp32/bf16 x contiguous/channels_last, compile on/off),
# seconds per epoch of the real runner, and with CIFAR-10 present a short SimCLR run's kNN.
# Data: CIFAR-10 when extracted under $SSL_LAB_DATA, else the synthetic set at CIFAR-10's shape (50,000
# train and 10,000 test images of 32x32, generated).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
COMMON=(backbone=resnet18 batch_size=512 trainer.device=cuda logger=none trainer.precision=bf16)
if [ -d "${SSL_LAB_DATA:-$HOME/.cache/ssl_lab}/cifar10-jpeg/train" ]; then
    DATA=(data=cifar10); HAVE_CIFAR=1
else
    DATA=(data=synthetic data.num_train=50000 data.num_test=10000); HAVE_CIFAR=0
fi
echo "## GPU check, $(date -u +%F)"
echo
echo '```'
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(), '| data:', '${DATA[*]}')"
echo
echo "\$ python -m ssl_lab.bench ${DATA[*]} ${COMMON[*]} --steps 30 --warmup 5 --syncs --variants"
timeout 300 $PY -m ssl_lab.bench "${DATA[@]}" "${COMMON[@]}" --steps 30 --warmup 5 --workers 8 --syncs --variants
echo
EPOCHS=3
echo "\$ python -m ssl_lab.train ${DATA[*]} ${COMMON[*]} epochs=$EPOCHS monitor.every=0"
start=$(date +%s.%N)
timeout 300 $PY -m ssl_lab.train "${DATA[@]}" "${COMMON[@]}" epochs=$EPOCHS monitor.every=0 \
    trainer.progress=false hydra.run.dir=outputs/gpu-check | grep -E "^epoch|kNN top-1:"
end=$(date +%s.%N)
$PY -c "print(f'wall {($end - $start):.1f} s for $EPOCHS epochs, kNN monitor and start-up included')"
if [ "$HAVE_CIFAR" = 1 ]; then
    echo
    echo "\$ python -m ssl_lab.train data=cifar10 ${COMMON[*]} epochs=20 monitor.every=5"
    timeout 240 $PY -m ssl_lab.train data=cifar10 "${COMMON[@]}" epochs=20 monitor.every=5 \
        trainer.progress=false hydra.run.dir=outputs/gpu-check-knn | grep -E "^epoch|kNN top-1"
fi
echo '```'
