#!/usr/bin/env bash
# The scale study: sequential batches of 100 over N CounterFact edits (counterfact-edit.json, file order,
# unfiltered) per editor, a checkpoint every 200 edits with downstream sst2 and mmlu at n = 200.
# Resumable: run it again and every run continues where it stopped (the runs live under $OUT, outside the
# work tree). Give it run names, or a part: a (MEMIT, D4S, D4S re-measured, EMMET) or
# b (AlphaEdit, ENCORE, finding (iii) at N = 1,024, r-ROME sequential). Two processes, one thread each:
#   OMP_NUM_THREADS=1 scripts/scale_study.sh a &   OMP_NUM_THREADS=1 scripts/scale_study.sh b &
#   OMP_NUM_THREADS=1 scripts/scale_study.sh memit-b100 &
set -u
OUT=${OUT:-$HOME/collapsediag-runs/scale}
DATA=${DATA:-../shared/data/counterfact_mend/counterfact-edit.json}
GLUE=${GLUE:-../shared/data/glue_eval}
N=${N:-2000}
L="3 4 5 6 7"
mkdir -p "$OUT"
one() {  # one NAME EDITOR BATCH N [extra run options]
  local name=$1 editor=$2 batch=$3 n=$4; shift 4
  local dir=$OUT/$name mode=sequential-batch
  [ "$batch" = 1 ] && mode=sequential
  if [ -f "$dir/config.json" ]; then
    collapsediag run --resume --out "$dir" -q
  else
    collapsediag run --editor "$editor" --mode $mode --batch-size "$batch" --n-edits "$n" \
      --data "counterfact:$DATA" --eval-every 200 --retention-sample 200 \
      --downstream sst2,mmlu --downstream-data "$GLUE" --out "$dir" -q "$@"
  fi
  echo "$(date -Is) $name exit $?" >> "$OUT/log.txt"
}
run() {  # run NAME: one of the study's runs by name
  case $1 in
    memit-b100) one "$1" memit 100 "$N" --layers $L ;;
    emmet-b100) one "$1" emmet 100 "$N" --layers $L ;;
    d4s-b100) one "$1" d4s 100 "$N" --layers $L ;;
    d4s-remeasure-b100) one "$1" d4s 100 "$N" --layers $L --hparam remeasure_residuals=true ;;
    alphaedit-b100) one "$1" alphaedit 100 "$N" --layers $L ;;
    encore-b100) one "$1" encore 100 "$N" --layers $L ;;
    r-rome-b1) one "$1" r-rome 1 1000 --layers 5 ;;
    finding-iii)
      python "$(dirname "$0")/finding_iii.py" --out "${III:-$HOME/collapsediag-runs/iii}" --data "$DATA"
      echo "$(date -Is) finding_iii exit $?" >> "$OUT/log.txt" ;;
    *) echo "unknown run: $1" >&2; exit 2 ;;
  esac
}
[ $# -eq 0 ] && set -- a
case $1 in
  a) set -- memit-b100 d4s-b100 d4s-remeasure-b100 emmet-b100 ;;
  b) set -- alphaedit-b100 encore-b100 finding-iii r-rome-b1 ;;
esac
for name in "$@"; do run "$name"; done
