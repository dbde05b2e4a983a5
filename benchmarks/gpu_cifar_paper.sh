#!/usr/bin/env bash
# One GPU call: the paper's full CIFAR-10 schedule (cifar-paper: 64k iterations at batch 128, evaluation
# every 2k) for ResNet-20/32/44/56/110, seed 0, as parallel processes on one GPU (small nets leave most of
# an H100 idle), bf16 + channels_last + torch.compile. Metrics, configs and final checkpoints go to $OUT.
# Data: the pack made by benchmarks/pack_cifar.py (carried as .device-data).
#   bash benchmarks/gpu_cifar_paper.sh  [ARCHS...]
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 RESLAB_CACHE=/tmp/reslab-cache
R="python3 -m reslab"
ARCHS=${*:-resnet20 resnet32 resnet44 resnet56 resnet110}
MODE=${MODE:-default}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch,torchvision;print('torch',torch.__version__,'torchvision',torchvision.__version__)"
  python3 benchmarks/pack_cifar.py unpack .device-data /tmp/cifar; } 2>&1 | tee $OUT/log.txt
DATA=/tmp/cifar/cifar-10-batches-py
launch() {  # $1 = extra flags
  for a in $ARCHS; do
    $R train --arch $a --data-dir $DATA --recipe cifar-paper --out /tmp/runs/$a-s0 --seed 0 --precision bf16 \
      $1 ${EXTRA:-} >/tmp/runs-$a.log 2>&1 &
  done
}
launch "--compile --compile-mode $MODE"
sleep 100
if grep -q "Error\|error" /tmp/runs-resnet20.log && ! grep -q "step 100/" /tmp/runs-resnet20.log; then
  echo "compiled runs failed; falling back to eager:" | tee -a $OUT/log.txt; tail -5 /tmp/runs-resnet20.log | tee -a $OUT/log.txt
  kill $(jobs -p) 2>/dev/null; sleep 2; rm -rf /tmp/runs; launch "--no-compile"
fi
deadline=$(( T0 + ${BUDGET_S:-540} ))
while [ $(date +%s) -lt $deadline ] && [ -n "$(jobs -r)" ]; do sleep 5; done
for a in $ARCHS; do echo "$a: $(grep -v warning /tmp/runs-$a.log | tail -n 1)"; done | tee -a $OUT/log.txt
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >> $OUT/log.txt
cd /tmp/runs && tar czf $OUT/runs.tgz */metrics.jsonl */config.json */env.json
for a in resnet20 resnet56 resnet110; do [ -f $a-s0/last.pt ] && cp $a-s0/last.pt $OUT/$a-s0-last.pt; done
echo "wall $(( $(date +%s) - T0 )) s" | tee -a $OUT/log.txt
