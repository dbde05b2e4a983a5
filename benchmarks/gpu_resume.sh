#!/usr/bin/env bash
# Resume one carried run folder (.device-data/runs/NAME) on the GPU to the end of its schedule.
#   bash benchmarks/gpu_resume.sh NAME
set -u
T0=$(date +%s); OUT=${OUT:-/tmp/out}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 RESLAB_CACHE=/tmp/reslab-cache
python3 benchmarks/pack_cifar.py unpack .device-data /tmp/cifar 2>&1 | tee $OUT/log.txt
mkdir -p /tmp/runs && cp -r .device-data/runs/$1 /tmp/runs/
timeout ${BUDGET_S:-540} python3 -m reslab train --out /tmp/runs/$1 --resume --data-dir /tmp/cifar/cifar-10-batches-py \
  $(python3 -c "import json;c=json.load(open('/tmp/runs/$1/config.json'));print('--arch',c['arch'],'--seed',c['seed'],'--precision',c['precision'],'--compile')") \
  > /tmp/resume.log 2>&1
grep -v warning /tmp/resume.log | tail -n 3 | tee -a $OUT/log.txt
cd /tmp/runs && tar czf $OUT/$1.tgz $1/metrics.jsonl $1/config.json $1/env.json && cp $1/last.pt $OUT/$1-last.pt
echo "wall $(( $(date +%s) - T0 )) s" | tee -a $OUT/log.txt
