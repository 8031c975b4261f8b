#!/usr/bin/env bash
# The scale study: sequential batches of 100 over N CounterFact edits (counterfact-edit.json, file order,
# unfiltered) per editor, a checkpoint every 200 edits with downstream sst2 and mmlu at n = 200.
# Part b then runs finding (iii) at N = 1,024 (scripts/finding_iii.py: MEMIT and EMMET, arms A and B, two
# orderings, layers 3-7 and one swept layer) before r-ROME.
# Resumable: run it again and every run continues where it stopped. Two processes, one thread each:
#   OMP_NUM_THREADS=1 scripts/scale_study.sh a &   OMP_NUM_THREADS=1 scripts/scale_study.sh b &
set -u
PART=${1:-a}
OUT=${OUT:-$HOME/collapsediag-runs/scale}
DATA=${DATA:-../shared/data/counterfact_mend/counterfact-edit.json}
GLUE=${GLUE:-../shared/data/glue_eval}
N=${N:-2000}
mkdir -p "$OUT"
one() {  # one() NAME EDITOR BATCH N [--hparam ...]
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
if [ "$PART" = a ]; then
  one memit-b100 memit 100 "$N" --layers 3 4 5 6 7
  one emmet-b100 emmet 100 "$N" --layers 3 4 5 6 7
  one d4s-b100 d4s 100 "$N" --layers 3 4 5 6 7
  one d4s-remeasure-b100 d4s 100 "$N" --layers 3 4 5 6 7 --hparam remeasure_residuals=true
else
  one alphaedit-b100 alphaedit 100 "$N" --layers 3 4 5 6 7
  one encore-b100 encore 100 "$N" --layers 3 4 5 6 7
  python "$(dirname "$0")/finding_iii.py" --out "${III:-$HOME/collapsediag-runs/iii}" --data "$DATA"
  echo "$(date -Is) finding_iii exit $?" >> "$OUT/log.txt"
  one r-rome-b1 r-rome 1 1000 --layers 5
fi
