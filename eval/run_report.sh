#!/usr/bin/env bash
# Rebuild eval/RESULTS.md: baselines + every saved embedder listed in eval/models.txt or given as arguments,
# each on the task set (default: full = every evaluation task in ../shared/data).
# Rerunnable: a model whose fingerprint, task checksums and instructions match its stored results is not rerun,
# so adding a trained model only evaluates that model.
#   eval/run_report.sh                         # baselines + eval/models.txt
#   eval/run_report.sh runs/train/my-embedder  # ... plus this saved embedder folder
# Env: TASK_SET (full), DATA (../shared/data), THREADS (torch threads; 1 is fastest on a busy shared machine),
#      EXTRA (more options for every `embedkit eval`, e.g. "--rerun").
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PY:-.venv/bin/python}
TASK_SET=${TASK_SET:-full}
RESULTS=${RESULTS:-eval/results}
COMMON=(--task-set "$TASK_SET" ${DATA:+--data "$DATA"} ${THREADS:+--threads "$THREADS"} ${EXTRA:-})

run() {  # run NAME MODEL [options...]
  local name=$1; shift
  echo "== $name"
  "$PY" -m embedkit eval "$@" --name "$name" --output "$RESULTS/$name" "${COMMON[@]}"
}

# Baselines: the encoder everyone knows, and the raw backbone (causal mean pooling, and PromptEOL).
run all-MiniLM-L6-v2 all-MiniLM-L6-v2
run smollm2-135m-causal-mean smollm2-135m --attention causal --pooling mean
run smollm2-135m-prompteol smollm2-135m --attention causal --pooling last --template prompteol

# Saved embedders (training outputs): one folder per line in eval/models.txt ('#' comments), or arguments.
models=("$@")
if [[ -f eval/models.txt ]]; then
  while IFS= read -r line; do
    line=${line%%#*}; line=$(echo "$line" | xargs)
    [[ -n $line ]] && models+=("$line")
  done < eval/models.txt
fi
for model in "${models[@]}"; do
  run "$(basename "$model")" "$model"
done

"$PY" -m embedkit eval compare "$RESULTS" --markdown eval/RESULTS.md --csv "$RESULTS/comparison.csv" \
  --plot "$RESULTS/comparison.png" --title "embedkit evaluation results ($TASK_SET task set)" \
  --preamble eval/results_intro.md
