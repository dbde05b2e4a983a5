#!/usr/bin/env bash
# The GPU work of issues 12, 13 and 15 as phases. One `run` call takes one or more phases, each with its own
# time limit in seconds (PHASE:SECONDS; default 570), e.g. `bash benchmarks/gpu_session.sh check:120 bench:180
# full:220`. The device machine keeps /tmp while it stays warm, so calls made back to back resume what an
# earlier one cut off. Everything a phase measures goes to $OUT, hardware and versions in $OUT/log.txt.
#
#   carry: .device-data  (holds cifar-10-jpeg.tar.xz and rebuild.py from ../shared/datasets/cifar10-jpeg,
#                         and optionally runs/ : run folders from an earlier session, to resume; they come
#                         back as $OUT/records.tgz and $OUT/ckpt-N.tar - last.pt files, unfinished runs first)
#   bash benchmarks/gpu_session.sh check   # data, the CUDA tests (graphed step, GPU decode)
#   bash benchmarks/gpu_session.sh bench   # issue 12: CIFAR rows, run sets and fused sets at K = 1, 5, 10
#   bash benchmarks/gpu_session.sh full    # issue 12: the full cifar-paper schedule of ResNet-20, then 110
#                                          # (seed 0; they are also Table 6's runs, in its folder layout)
#   bash benchmarks/gpu_session.sh seeds   # issues 12+13: ResNet-20 seeds 1-5 at once, full schedule
#                                          # (a run set or one fused model: FUSED=0/1, else what
#                                          # the bench phase of this warm machine measured faster)
#   bash benchmarks/gpu_session.sh table6  # issue 13: Table 6 at the paper's budget, 3 seeds, 5 at a time
#                                          # (SEEDS=N, K=N; fused like seeds: each depth's seeds;
#                                          # its resnet20-s1, -s2 are the seeds phase's: they resume)
#   bash benchmarks/gpu_session.sh fig67   # issue 13: Fig. 6 (plain-20/32/44/56 beside the ResNets, seed 0) and
#                                          # Fig. 7 (layer responses computed here from those checkpoints)
#   bash benchmarks/gpu_session.sh control # issue 13: the independent control script, ResNet-20, seed 0
#   bash benchmarks/gpu_session.sh r1202   # issue 13: ResNet-1202 at budget B1202 (default 0.03: 1,920 iterations,
#                                          # lr steps at 960/1,440; the paper's 7.93% is at 64k), resumable
#   bash benchmarks/gpu_session.sh r50     # issue 15: the ResNet-50 step under each setting (compile modes)
#   bash benchmarks/gpu_session.sh e2e     # issue 15: JPEG folders end to end, 10-crop/multi-scale evaluation
set -u
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 RESLAB_CACHE=/tmp/reslab-cache
R="python3 -m reslab"
DATA=/tmp/c10/cifar-10-batches-py
T6=/tmp/runs/table6   # reproduce's layout: T6/paper/ARCH-sSEED
# design (a) or (b) for K runs at once: FUSED=1/0 decides; else what the bench phase measured faster for five
# ResNet-20 runs (/tmp/fused-wins, kept while the machine stays warm); else a run set
fuse() { [ "${FUSED:-$(cat /tmp/fused-wins 2>/dev/null || echo 0)}" = 1 ] && echo --fused; }
nographs() { [ -f /tmp/check-failed ] && echo --no-graphs; }   # set by a failed check phase
left() { local s=$(( T0 + BUDGET_S - $(date +%s) )); echo $(( s > 10 ? s : 10 )); }  # timeout 0 = no limit
# SIGTERM at the limit: `reslab train` saves the step it reached and exits (143); KILL only 30 s later
limit() { timeout -k 30 $(left) "$@"; }
log() { tee -a $OUT/log.txt; }
# what comes back: every run folder's record (small) in records.tgz, and last.pt files in ckpt-N.tar (a call
# returns at most 8 files of at most 16 MiB, 64 MiB in all): unfinished runs first, since they are what a cold
# machine would train again, then finished ones, smallest first; rewritten after each training phase so that
# a call cut off at its limit still returns what its earlier phases trained. What does not fit resumes only
# while this machine stays warm, and the log names it.
keep_runs() {
  cd /tmp/runs 2>/dev/null || return 0
  tar czf $OUT/records.tgz $(find . -name metrics.jsonl -o -name config.json -o -name env.json \
    -o -name 'manifest*.json' -o -name layer_responses.json -o -name '*.md' -o -name '*.png') 2>/dev/null
  python3 - $OUT <<'PY' 2>&1 | log
import sys, tarfile
from pathlib import Path
from reslab import checkpoint as c
out, cap = Path(sys.argv[1]), 15 * 2**20
for old in out.glob("ckpt-*.tar"):
    old.unlink()
there = [f for f in out.rglob("*") if f.is_file()]
slots, room = 8 - len(there), 60 * 2**20 - sum(f.stat().st_size for f in there)  # log.txt still grows
def finished(p):
    try:
        return c.read_status(p)["finished"]
    except Exception:  # noqa: BLE001 - unreadable: last in line
        return True
bins = []
for done, size, p in sorted((finished(p), p.stat().st_size, str(p)) for p in Path(".").rglob("last.pt")):
    fit = next((b for b in bins if b[0] + size <= cap), None)
    if size > min(cap, room) or (fit is None and len(bins) >= slots):
        print(f"not returned ({size / 2**20:.1f} MiB; {'finished' if done else 'unfinished'}): {p}")
        continue
    if fit is None:
        bins.append(fit := [0, []])
    fit[0] += size
    fit[1].append(p)
    room -= size
for i, (_, paths) in enumerate(bins, 1):
    with tarfile.open(out / f"ckpt-{i}.tar", "w") as t:
        for p in paths:
            t.add(p)
PY
  cd - > /dev/null
}
# one full-schedule training run, resumed where an earlier call left it (--resume also starts a run that has
# no checkpoint yet); if capturing the graphed step fails (a capture error, never a time limit, a divergence,
# running out of memory or a config error), it is retried eagerly so the run still happens, and the log says so
train_full() {  # out, then train flags
  local out=$1; shift
  limit $R train "$@" $(nographs) --recipe cifar-paper --data-dir $DATA --out $out --resume 2>&1 \
    | grep -v -i warn | tee /tmp/last-train.txt | tail -n 6 | log
  local rc=${PIPESTATUS[0]}
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && [ $(left) -gt 60 ] \
     && grep -q -e captur -e "CUDA graph" -e cudaGraph /tmp/last-train.txt; then
    echo "exit $rc: again with --no-graphs" | log
    limit $R train "$@" --recipe cifar-paper --data-dir $DATA --out $out --no-graphs --resume \
      2>&1 | grep -v -i warn | tail -n 6 | log
  fi
}
mkdir -p /tmp/runs
[ -d .device-data/runs ] && cp -rn .device-data/runs/. /tmp/runs/   # run folders carried from a session before
[ $# -gt 0 ] || { echo "phases: check, bench, full, seeds, table6, fig67, control, r1202, r50, e2e (PHASE[:SECONDS] ...)"; exit 2; }
for SPEC in "$@"; do  # every phase checked before any runs: a typo must not cost the phases before it
  case ${SPEC%%:*} in check|bench|full|seeds|table6|fig67|control|r1202|r50|e2e) ;; *) echo "unknown phase in $SPEC"; exit 2 ;; esac
  case $SPEC in *:*) case ${SPEC#*:} in ''|0*|*[!0-9]*) echo "$SPEC: the limit must be whole seconds (no leading 0)"; exit 2 ;; esac ;; esac
done
for SPEC in "$@"; do
PHASE=${SPEC%%:*}; BUDGET_S=570; [ "$SPEC" = "$PHASE" ] || BUDGET_S=${SPEC#*:}
T0=$(date +%s)
{ echo "== $PHASE (${BUDGET_S} s) $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch,torchvision;print('torch',torch.__version__,'torchvision',torchvision.__version__)"
  nproc; } 2>&1 | log
[ -f $DATA/test_batch ] || python3 .device-data/rebuild.py .device-data/cifar-10-jpeg.tar.xz /tmp/c10 2>&1 | tail -n 2 | log
case $PHASE in
check)
  # every failure's traceback kept in check.txt (comes back under $OUT): a second call to see one costs minutes
  rm -f /tmp/check-failed
  limit python3 -m pytest -v -rfE -p no:cacheprovider tests/test_run.py tests/test_folder.py tests/test_fused.py \
    tests/test_fusedset.py -k "graphed or gpu or cuda or decoding or device_path" 2>&1 | tee $OUT/check.txt \
    | tail -n 15 | log
  # a failed test of the graphed step puts the training of this warm machine on the eager step: a graph that
  # runs but trains wrongly must not produce Table 6 runs (a failed decoding test leaves CIFAR training alone)
  if grep -E -q "^(FAILED|ERROR) .*graphed" $OUT/check.txt; then
    touch /tmp/check-failed; echo "a graphed-step test failed: training runs with --no-graphs" | log
  fi ;;
bench)
  # one bench per net, ResNet-20 first and its run sets before its CIFAR rows: a phase cut off at its limit
  # still has the rows that choose the design; the choice is written only when both rows exist
  for a in resnet20 resnet110; do
    [ $(left) -gt 30 ] || break
    # --no-compile: the compiled rows are in benchmarks/results/nvidia-h100.json already (2026-11-23)
    limit $R bench --device cuda --keep-going --no-compile --only runsets cifar --arch $a \
      --out $OUT/bench-cifar-$a.json 2>&1 | tail -n 25 | log
  done
  python3 - $OUT/bench-cifar-resnet20.json /tmp/fused-wins 2>&1 <<'PY' | log
import json, sys
try:
    rows = {r["setting"]: r["images_per_s"] for r in json.load(open(sys.argv[1]))["rows"] if r["arch"] == "resnet20"}
except (OSError, ValueError) as e:
    sys.exit(f"no design chosen: {e}")
a = next((v for k, v in rows.items() if k.endswith(", 5 runs")), None)
b = next((v for k, v in rows.items() if k.endswith(", fused 5 runs")), None)
if a is None or b is None:
    sys.exit("no design chosen: the bench has not both five-run rows of ResNet-20")
open(sys.argv[2], "w").write(f"{int(b > a)}\n")
print(f"five ResNet-20 runs: run set {a:,.0f} img/s, fused {b:,.0f} img/s; fused wins: {int(b > a)}")
PY
  ;;
full)
  for a in resnet20 resnet110; do
    [ $(left) -gt 60 ] || break
    python3 -c "import sys; from reslab.reproduce import run_status as s; sys.exit(s(sys.argv[1]) not in ('done', 'logged'))" \
      $T6/paper/$a-s0 2>/dev/null && continue   # finished: by its checkpoint, or by its carried record
    t=$(date +%s)
    train_full $T6/paper/$a-s0 --arch $a --seed 0
    echo "$a: this call trained for $(( $(date +%s) - t )) s" | log
  done
  keep_runs ;;
seeds)
  t=$(date +%s)
  limit $R train --arch resnet20 --recipe cifar-paper --seeds 1 2 3 4 5 $(fuse) $(nographs) --data-dir $DATA \
    --out $T6/paper/resnet20 \
    --resume 2>&1 | grep -v -i warn | tail -n 8 | log
  echo "5 x resnet20 $(fuse || echo '(run set)'): this call trained for $(( $(date +%s) - t )) s" | log
  keep_runs ;;
table6)
  limit $R reproduce cifar-table6 --budget paper --seeds ${SEEDS:-3} --concurrent ${K:-5} $(fuse) $(nographs) \
    --data-dir $DATA --out $T6 2>&1 | grep -v -i warn | tail -n 20 | log
  keep_runs ;;
fig67)
  # in Table 6's folders: its seed-0 ResNets are these experiments' runs too, so mostly the plain nets train;
  # the layer responses need no transfer of checkpoints (layer_responses.json comes back in records.tgz)
  limit $R reproduce cifar-degradation --budget paper --concurrent ${K:-5} $(nographs) --data-dir $DATA --out $T6 \
    --no-report 2>&1 | grep -v -i warn | tail -n 20 | log
  [ $(left) -le 30 ] || limit $R reproduce layer-responses --budget paper $(nographs) --data-dir $DATA --out $T6 --no-report \
    2>&1 | grep -v -i warn | tail -n 8 | log
  keep_runs ;;
control)
  limit python3 benchmarks/control_cifar.py --data-dir $DATA --out /tmp/runs/control-resnet20-s0 \
    --resume 2>&1 | tail -n 5 | log
  keep_runs ;;
r1202)
  # a budget fixed up front (its lr steps depend on it), so calls cut off at their limits resume one schedule
  t=$(date +%s)
  train_full /tmp/runs/r1202/x${B1202:-0.03}/resnet1202-s0 --arch resnet1202 --seed 0 --budget ${B1202:-0.03}
  echo "resnet1202 x${B1202:-0.03}: this call trained for $(( $(date +%s) - t )) s" | log
  keep_runs ;;
r50)
  limit $R bench --device cuda --keep-going --only imagenet autotune --imagenet-arch resnet50 --out $OUT/bench-r50.json \
    2>&1 | tail -n 40 | log ;;
e2e)
  limit $R bench --device cuda --keep-going --only e2e eval --imagenet-arch resnet50 --out $OUT/bench-e2e.json \
    2>&1 | tail -n 40 | log ;;
esac
echo "$PHASE wall $(( $(date +%s) - T0 )) s" | log
done
