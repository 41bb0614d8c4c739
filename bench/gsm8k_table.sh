#!/usr/bin/env bash
# The README's GSM8K accuracy table: SmolLM2-135M-Instruct on the first N GSM8K test problems,
# every method through `hybridfast eval` into one results file, then `hybridfast report`.
# The SAE and steering vectors come from `hybridfast demo` (SmolLM2 as both sides).
#   bash bench/gsm8k_table.sh [N] [OUT]        # defaults: 100 problems, runs/gsm8k-table
set -euo pipefail
N=${1:-100}
OUT=${2:-runs/gsm8k-table}
T=160
M=smollm2-135m
# one prompt for every base-model method: SmolLM2 answers the paper's boxed-answer power
# prompt with EOS at once, so low-temp and the power methods read the base task prompt too
BASE=$'Task: Answer the question below. Explain your reasoning step by step.\n\n\n\nQuestion:\n{q}\n\nStep by step answer:\n'
common=(--model "$M" --limit "$N" --max-new-tokens "$T" --batch-size 16 --out "$OUT")
hybridfast eval --method base "${common[@]}"
hybridfast eval --method low-temp --power-template "$BASE" "${common[@]}"
hybridfast eval --method power-mh --power-template "$BASE" "${common[@]}"
hybridfast eval --method power-smc --power-template "$BASE" "${common[@]}"
# the hybrid methods need an SAE and vectors: the demo's (it resumes its vector training)
[ -d "$OUT/demo/vectors" ] || hybridfast demo --out "$OUT/demo"
hybridfast eval --method hybrid-routed --thinking "$M" --sae "$OUT/demo/sae" --vectors "$OUT/demo/vectors" "${common[@]}"
hybridfast eval --method hybrid-paper --thinking "$M" --sae "$OUT/demo/sae" --vectors "$OUT/demo/vectors" "${common[@]}"
hybridfast report "$OUT"
