#!/bin/bash
# eva_stepmath study driver: one process at a time; each run's log under logs/.
cd /work/wt/eva
export PYTHONPATH=$PWD/src
PY=/work/main/.venv/bin/python
S=/work/runs/eva/study
mkdir -p $S/logs
run() {  # run NAME[@lr=X] SEED
  local name=$1 seed=$2 cfg=${1%@*} lrx=""
  if [[ "$name" == *@lr=* ]]; then lrx="--config.eva.optimizer.learning_rate=${name#*@lr=}"; name="${cfg}_lr${name#*@lr=}"; fi
  if [ -f $S/$name/seed_$seed/results.json ] && grep -q '"eva"\|"sft"' $S/$name/seed_$seed/results.json; then return; fi
  echo "$(date -u +%H:%M:%S) start $name seed $seed" >> $S/driver.log
  local extra=""
  [ "$name" != sft ] && extra="--config.checkpoint.path=$S/sft/seed_{seed}"
  $PY experiments/launch.py --config=experiments/configs/eva_stepmath.py:$cfg \
      --workdir=$S/$name --seeds=$seed --resume $extra $lrx > $S/logs/${name}_s$seed.log 2>&1
  echo "$(date -u +%H:%M:%S) end $name seed $seed rc=$?" >> $S/driver.log
}
for a in "$@"; do run ${a%:*} ${a#*:}; done
