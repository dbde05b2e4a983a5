#!/usr/bin/env bash
# The GPU work of issues 12, 13 and 15 as phases, one `run` call each (each fits the 600 s limit; the
# device machine keeps /tmp while it stays warm, so call the phases back to back). Everything a phase
# measures goes to $OUT, with the hardware and versions in $OUT/log.txt.
#
#   carry: .device-data  (holds cifar-10-jpeg.tar.xz and rebuild.py from ../shared/datasets/cifar10-jpeg,
#                         and optionally runs/ : run folders from an earlier session, to resume; they come
#                         back as $OUT/records-PHASE.tgz and $OUT/ckpt/ - last.pt files up to 56 MiB per call)
#   bash benchmarks/gpu_session.sh check   # data, the CUDA tests (graphed step, GPU decode), a 2k-step probe
#   bash benchmarks/gpu_session.sh bench   # issue 12: CIFAR rows, run sets and fused sets at K = 1, 5, 10
#   bash benchmarks/gpu_session.sh full    # issue 12: the full cifar-paper schedule of ResNet-20, then 110
#   bash benchmarks/gpu_session.sh table6  # issue 13: Table 6 at the paper's budget, 3 seeds, 5 at a time
#   bash benchmarks/gpu_session.sh control # issue 13: the independent control script, ResNet-20, seed 0
#   bash benchmarks/gpu_session.sh r50     # issue 15: the ResNet-50 step under each setting (compile modes)
#   bash benchmarks/gpu_session.sh e2e     # issue 15: JPEG folders end to end, 10-crop/multi-scale evaluation
set -u
PHASE=${1:?phase: check, bench, full, table6, control, r50 or e2e}
T0=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
BUDGET_S=${BUDGET_S:-570}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 RESLAB_CACHE=/tmp/reslab-cache
R="python3 -m reslab"
DATA=/tmp/c10/cifar-10-batches-py
left() { local s=$(( T0 + BUDGET_S - $(date +%s) )); echo $(( s > 10 ? s : 10 )); }  # timeout 0 = no limit
limit() { timeout -k 10 $(left) "$@"; }
log() { tee -a $OUT/log.txt; }
{ echo "== $PHASE $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch,torchvision;print('torch',torch.__version__,'torchvision',torchvision.__version__)"
  nproc; } 2>&1 | log
[ -f $DATA/test_batch ] || python3 .device-data/rebuild.py .device-data/cifar-10-jpeg.tar.xz /tmp/c10 2>&1 | tail -n 2 | log
# what comes back: every run folder's record (small), and its last.pt where the file fits what a call can
# return (16 MiB a file, 64 MiB in all); larger sets resume only while this machine stays warm
keep_runs() {
  cd /tmp/runs 2>/dev/null || return 0
  tar czf $OUT/records-$PHASE.tgz $(find . -name metrics.jsonl -o -name config.json -o -name env.json \
    -o -name 'manifest*.json' -o -name '*.md' -o -name '*.png') 2>/dev/null
  local total=0 size
  for f in $(find . -name last.pt | sort); do
    size=$(stat -c %s $f)
    [ $(( total + size )) -le $(( 56 * 1024 * 1024 )) ] || { echo "not returned (over 56 MiB in all): $f" | log; continue; }
    total=$(( total + size ))
    mkdir -p $OUT/ckpt/$(dirname $f) && cp $f $OUT/ckpt/$f
  done
  cd - > /dev/null
}
mkdir -p /tmp/runs
[ -d .device-data/runs ] && cp -rn .device-data/runs/. /tmp/runs/   # run folders carried from a session before
case $PHASE in
check)
  python3 -m pytest -q tests/test_run.py tests/test_folder.py -k "graphed or gpu or decoding or device_path" 2>&1 \
    | tail -n 5 | log
  rm -rf /tmp/probe
  limit $R train --arch resnet20 --data-dir $DATA --iters 2000 --eval-every 1000 --out /tmp/probe \
    --no-progress 2>&1 | grep -v -i warn | tail -n 4 | log
  tail -n 3 /tmp/probe/metrics.jsonl >> $OUT/log.txt ;;
bench)
  limit $R bench --device cuda --only cifar runsets --arch resnet20 resnet110 --out $OUT/bench-cifar.json \
    2>&1 | tail -n 40 | log ;;
full)
  for a in resnet20 resnet110; do
    [ $(left) -gt 60 ] || break
    t=$(date +%s)
    limit $R train --arch $a --data-dir $DATA --recipe cifar-paper --out /tmp/runs/full-$a --no-progress \
      $([ -f /tmp/runs/full-$a/last.pt ] && echo --resume) 2>&1 | grep -v -i warn | tail -n 3 | log
    echo "$a: this call trained for $(( $(date +%s) - t )) s" | log
  done
  keep_runs ;;
table6)
  limit $R reproduce cifar-table6 --budget paper --seeds ${SEEDS:-3} --concurrent ${K:-5} \
    --data-dir $DATA --out /tmp/runs/table6 2>&1 | grep -v -i warn | tail -n 20 | log
  keep_runs ;;
control)
  limit python3 benchmarks/control_cifar.py --data-dir $DATA --out /tmp/runs/control-resnet20-s0 \
    --resume 2>&1 | tail -n 5 | log
  keep_runs ;;
r50)
  limit $R bench --device cuda --only imagenet --imagenet-arch resnet50 --out $OUT/bench-r50.json \
    2>&1 | tail -n 40 | log ;;
e2e)
  limit $R bench --device cuda --only e2e eval --imagenet-arch resnet50 --out $OUT/bench-e2e.json \
    2>&1 | tail -n 40 | log ;;
*) echo "unknown phase $PHASE" | log; exit 2 ;;
esac
echo "$PHASE wall $(( $(date +%s) - T0 )) s" | log
