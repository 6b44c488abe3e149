#!/usr/bin/env bash
# Re-run the experiments behind every figure of the README and copy their raw outputs next to it.
#
#   workflows/results/reproduce.sh all                 # every experiment below (about 2.5 hours on 2 CPU cores)
#   workflows/results/reproduce.sh sd900 bench-gmbinet # some of them
#   APPEND=1 SEEDS="2" workflows/results/reproduce.sh mt-ssn-seeds   # add a seed to a committed experiment
#
# Each experiment runs the README's documented commands with `defectflow` into ./defectflow-data (the default
# storage root), then copies what the README quotes (metrics.json, history.json, bench JSON/Markdown, synthesis
# reports, contact sheets, the command lines and the machine) into workflows/results/<experiment>/.
# Needs ../shared/datasets beside the repository for the real datasets.
#
# SMOKE=1 RESULTS_DIR=<dir> DEFECTFLOW_ROOT=<dir>: the same commands with tiny training budgets (1 epoch on 48
# training images), written to RESULTS_DIR instead of workflows/results: checks in minutes that an experiment still
# runs end to end and still produces its table (CI runs it; the figures it writes mean nothing).
set -euo pipefail
cd "$(dirname "$0")/../.."
DF="${DEFECTFLOW:-.venv/bin/defectflow}"
DATA="${DATASETS_DIR:-../shared/datasets}"
ROOT="${DEFECTFLOW_ROOT:-./defectflow-data}"
RESULTS="${RESULTS_DIR:-workflows/results}"
TRAIN_SETS=()
if [ "${SMOKE:-0}" = 1 ]; then
  [ -n "${RESULTS_DIR:-}" ] || { echo "SMOKE=1 needs RESULTS_DIR (smoke figures never replace the committed ones)" >&2; exit 2; }
  TRAIN_SETS=(--set optim.epochs=1 --set data.max_train_samples=48 --set eval.sheet_images=0)
fi

run() {  # the command line to commands.txt, what the command prints (its result) to output.txt
  echo "+ $*" | tee -a "$OUT/commands.txt"
  "$@" | tee -a "$OUT/output.txt"
}
begin() {  # APPEND=1 adds runs (e.g. more SEEDS) to an experiment's folder instead of starting it afresh
  OUT="$RESULTS/$1"
  if [ "${APPEND:-0}" != 1 ]; then rm -rf "$OUT"; mkdir -p "$OUT"; : > "$OUT/commands.txt"; : > "$OUT/output.txt"
  else mkdir -p "$OUT"; fi
  { date -u +"%Y-%m-%dT%H:%M:%SZ"; uname -m; nproc; "$PWD/.venv/bin/python" -c \
    'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'; git rev-parse --short HEAD; } \
    >> "$OUT/machine.txt"
  SECONDS=0
}
end() { echo "$SECONDS" >> "$OUT/seconds.txt"; echo "== $1 done in $SECONDS s -> $OUT"; }
keep_report() {  # <report name> <dest name>: metrics, history and the run's curves/sheet of one train run
  local src="$ROOT/reports/$1" dst="$OUT/$2"; mkdir -p "$dst"
  cp "$src/metrics.json" "$dst/"; [ -f "$src/history.json" ] && cp "$src/history.json" "$dst/"
  for f in curves.png sheet.png; do [ -f "$src/$f" ] && cp "$src/$f" "$dst/"; done
  [ -f "$ROOT/runs/$1/artifact/detector.json" ] && cp "$ROOT/runs/$1/artifact/detector.json" "$dst/"
  return 0
}
fresh() {  # <run/set name>...: start from scratch (a run of the same name would resume, a set would be reused)
  for n in "$@"; do rm -rf "$ROOT/runs/$n" "$ROOT/reports/$n" "$ROOT/synthetic/$n" "$ROOT/models/$n"; done
}
sheet() {  # <contact_sheet.png> <dest.jpg>: a JPEG keeps the repository small
  "$PWD/.venv/bin/python" -c 'import sys; from PIL import Image; Image.open(sys.argv[1]).convert("RGB").save(sys.argv[2], quality=85)' "$1" "$2"
}
ingest_mt() { run "$DF" ingest --dataset magnetic_tile --root "$DATA/magnetic_tile" \
  --out "$ROOT/datasets/magnetic_tile/manifest.parquet"; }

sd900() {
  begin sd900
  fresh gmbinet-sd900-results
  run "$DF" ingest --config workflows/configs/ingest_sd900.yaml --set "storage.root=$ROOT"
  run "$DF" train --config workflows/configs/gmbinet_sd900.yaml --set name=gmbinet-sd900-results \
    --set "data.manifest=$ROOT/datasets/sd900/manifest.parquet" --set "storage.root=$ROOT" ${TRAIN_SETS[@]+"${TRAIN_SETS[@]}"}
  keep_report gmbinet-sd900-results gmbinet-sd900
  end sd900
}

# gmbinet_sd900.yaml's earlier recipe (before the 60-minute one): 256x256, cosine, flips only, BCE + Dice, no EMA
SD900_EARLIER=(--set 'data.image_size=[256,256]' --set data.augment.rot90=false --set data.augment.brightness=0
               --set data.augment.contrast=0 --set optim.lr_schedule=cosine --set optim.ema_decay=null
               --set loss.iou_weight=0)

sd900_ablation() {  # what each change of gmbinet_sd900.yaml buys, cumulatively, at ABL_EPOCHS (default 60) epochs
  # rows (ROWS to pick some): baseline = the earlier recipe (256x256, cosine, flips, BCE + Dice), then one change
  # at a time: native-200, onecycle, augment (rot90, brightness, contrast), ema, iou (the 60-minute candidate recipe at ABL_EPOCHS)
  begin sd900-ablation
  run "$DF" ingest --config workflows/configs/ingest_sd900.yaml --set "storage.root=$ROOT"
  local sets=("${SD900_EARLIER[@]}")
  for r in baseline native-200 onecycle augment ema iou; do
    case "$r" in
      native-200) sets+=(--set 'data.image_size=[200,200]') ;;
      onecycle) sets+=(--set optim.lr_schedule=onecycle) ;;
      augment) sets+=(--set data.augment.rot90=true --set data.augment.brightness=0.1 --set data.augment.contrast=0.1) ;;
      ema) sets+=(--set optim.ema_decay=0.999) ;;
      iou) sets+=(--set loss.iou_weight=1.0) ;;
    esac
    [[ " ${ROWS:-baseline native-200 onecycle augment ema iou} " == *" $r "* ]] || continue
    grep -qx "$r" "$OUT/rows.txt" 2>/dev/null || echo "$r" >> "$OUT/rows.txt"  # the table keeps this order
    for s in ${SEEDS:-42}; do
      n="sd900-abl-$r-seed$s"; fresh "$n"
      run "$DF" train --config workflows/configs/gmbinet_sd900.yaml --set "name=$n" --set "output.model_name=$n" \
        --set "data.manifest=$ROOT/datasets/sd900/manifest.parquet" --set "storage.root=$ROOT" --set "seed=$s" \
        --set "optim.epochs=${ABL_EPOCHS:-60}" "${sets[@]}" ${TRAIN_SETS[@]+"${TRAIN_SETS[@]}"}
      keep_report "$n" "$r-seed$s"
    done
  done
  "$PWD/.venv/bin/python" workflows/results/table.py "$OUT" | tee -a "$OUT/output.txt"
  end sd900-ablation
}

bench_gmbinet() {
  begin bench-gmbinet
  run "$DF" bench gmbinet --size 512 --n 1 --n 2 --n 4 --n 8 --threads 2 --out "$OUT"
  end bench-gmbinet
}

bench_supersimplenet() {
  begin bench-supersimplenet
  run "$DF" bench supersimplenet --size 256 --threads 2 --out "$OUT"
  end bench-supersimplenet
}

bench_synth() {
  begin bench-synth
  run "$DF" bench synth --size 256 --count 16 --threads 2 --out "$OUT"
  end bench-synth
}

MT_ROWS="weak mixed full mixed-weak-loss full-weak-loss full-global-clip unsupervised"
mt_ssn_seeds() {  # SEEDS="0 1 2", UNSUP_SEEDS="0", ROWS (default $MT_ROWS)
  # one run per row and seed, seeds outermost (a cut-short run still has every row of its first seeds);
  # the ablations: *-weak-loss trains with masks but the weak regime's loss settings (Perlin threshold 0.2, no mask
  # dilation, no distance-transform weights) instead of the authors' supervised ones (0.6, 7, [3, 2]) in the
  # configs; full-global-clip clips one global gradient norm, as the authors' code
  begin mt-ssn-seeds
  ingest_mt
  local weak_loss=(--set loss.perlin_threshold=0.2 --set loss.dilate=0 --set loss.dt_weight=null)
  for s in ${SEEDS:-0 1 2}; do
    for r in ${ROWS:-$MT_ROWS}; do
      [ "$r" = unsupervised ] && [[ " ${UNSUP_SEEDS:-0} " != *" $s "* ]] && continue
      n="mt-ssn-$r-seed$s"; fresh "$n"
      extra=(); cfg="${r%%-*}"
      [ "$cfg" = mixed ] && extra=(--set data.mixed_masks=50)
      [[ "$r" == *-weak-loss ]] && extra+=("${weak_loss[@]}")
      [ "$r" = full-global-clip ] && extra+=(--set optim.grad_clip_per_group=false)
      run "$DF" train --config "workflows/configs/ssn_$cfg.yaml" --set "name=$n" --set "output.model_name=$n" \
        --set "data.manifest=$ROOT/datasets/magnetic_tile/manifest.parquet" --set "seed=$s" \
        --set "storage.root=$ROOT" --set scaling.cpus_per_worker=2 ${extra[@]+"${extra[@]}"} ${TRAIN_SETS[@]+"${TRAIN_SETS[@]}"}
      keep_report "$n" "$r-seed$s"
      "$PWD/.venv/bin/python" workflows/results/table.py "$OUT" > /dev/null
    done
  done
  "$PWD/.venv/bin/python" workflows/results/table.py "$OUT" | tee -a "$OUT/output.txt"
  end mt-ssn-seeds
}

mt_synth() {
  begin mt-synth
  fresh mt-cutpaste-results
  ingest_mt
  run "$DF" synthesize --config workflows/configs/synth_magnetic_tile.yaml --set name=mt-cutpaste-results
  cp "$ROOT/synthetic/mt-cutpaste-results/_report.json" "$OUT/"
  sheet "$ROOT/synthetic/mt-cutpaste-results/contact_sheet.png" "$OUT/contact_sheet.jpg"
  end mt-synth
}

procedural_ddpm() {
  begin procedural-ddpm
  fresh ddpm-procedural procedural-ddpm
  run "$DF" ingest --dataset procedural --option count=400 --option size=128 \
    --out "$ROOT/datasets/procedural/manifest.parquet"
  run "$DF" train-synth --config workflows/configs/ddpm_procedural.yaml
  run "$DF" synthesize --config workflows/configs/synth_procedural_ddpm.yaml
  cp "$ROOT/synthetic/procedural-ddpm/_report.json" "$OUT/"
  sheet "$ROOT/synthetic/procedural-ddpm/contact_sheet.png" "$OUT/contact_sheet.jpg"
  end procedural-ddpm
}

mt_synthetic_mix() {  # GMBINet with 10 real masks, without and with 100 synthetic defects made from them
  begin mt-synthetic-mix
  fresh mt-cutpaste-mixed10 mt-gmbinet-mixed10-syn0 mt-gmbinet-mixed10-syn100
  ingest_mt
  run "$DF" synthesize --config workflows/configs/synth_magnetic_tile.yaml --set name=mt-cutpaste-mixed10 \
    --set source_regime.regime=mixed --set source_regime.mixed_masks=10 --set source_regime.seed=42
  cp "$ROOT/synthetic/mt-cutpaste-mixed10/_report.json" "$OUT/synthesis_report.json"
  for n in 0 100; do
    extra=(); [ "$n" = 100 ] && extra=(--set "data.synthetic.source=$ROOT/synthetic/mt-cutpaste-mixed10"
                                        --set data.synthetic.count=100)
    run "$DF" train --config workflows/configs/gmbinet_sd900.yaml --set "name=mt-gmbinet-mixed10-syn$n" \
      --set "output.model_name=mt-gmbinet-mixed10-syn$n" \
      --set "data.manifest=$ROOT/datasets/magnetic_tile/manifest.parquet" \
      "${SD900_EARLIER[@]}" --set data.regime=mixed --set data.mixed_masks=10 --set 'data.image_size=[128,128]' \
      --set optim.epochs=30 --set checkpoint.metric=val_iou_pooled ${extra[@]+"${extra[@]}"} \
      ${TRAIN_SETS[@]+"${TRAIN_SETS[@]}"}
    keep_report "mt-gmbinet-mixed10-syn$n" "syn$n"
  done
  end mt-synthetic-mix
}

crackforest_layouts() {  # GMBINet on CrackForest's 1-3 px cracks (480x320): squashed to 128x128, at native size,
  # and on overlapping 128x128 tiles at native resolution (SEEDS, default "0")
  begin crackforest-layouts
  run "$DF" ingest --dataset crackforest --root "$DATA/crackforest" --out "$ROOT/datasets/crackforest/manifest.parquet"
  for s in ${SEEDS:-0}; do
    for r in squash-128 squash-native tile-128; do
      n="cf-gmbinet-$r-seed$s"; fresh "$n"
      case "$r" in
        squash-128) extra=(--set model.preprocessing.layout=squash) ;;
        squash-native) extra=(--set model.preprocessing.layout=squash --set 'data.image_size=[320,480]') ;;
        tile-128) extra=() ;;
      esac
      run "$DF" train --config workflows/configs/gmbinet_crackforest_tile.yaml --set "name=$n" \
        --set "output.model_name=$n" --set "data.manifest=$ROOT/datasets/crackforest/manifest.parquet" \
        --set "seed=$s" --set "storage.root=$ROOT" "${extra[@]}" ${TRAIN_SETS[@]+"${TRAIN_SETS[@]}"}
      keep_report "$n" "$r-seed$s"
    done
  done
  "$PWD/.venv/bin/python" workflows/results/table.py "$OUT" | tee -a "$OUT/output.txt"
  end crackforest-layouts
}

demo() {
  begin demo
  run "$DF" demo --out ./defectflow-demo
  cp ./defectflow-demo/reports/demo.json "$OUT/"
  cp ./defectflow-demo/reports/gmbinet-procedural/metrics.json "$OUT/train_metrics.json"
  end demo
}

EXPERIMENTS=(sd900 sd900-ablation bench-gmbinet bench-supersimplenet bench-synth mt-ssn-seeds mt-synth procedural-ddpm
             mt-synthetic-mix crackforest-layouts demo)
[ $# -gt 0 ] || { echo "usage: $0 all | ${EXPERIMENTS[*]}" >&2; exit 2; }
[ "$1" = all ] && set -- "${EXPERIMENTS[@]}"
for e in "$@"; do
  case " ${EXPERIMENTS[*]} " in *" $e "*) "${e//-/_}" ;; *) echo "unknown experiment $e" >&2; exit 2 ;; esac
done
