#!/usr/bin/env bash
# TinyBERT Table 3 (distillation objectives: w/o Embd, Pred, Trm, Attn, Hidn), default columns MNLI, MRPC, CoLA (TASKS=...).
# Usage: scripts/reproduce_tinybert_table3.sh [scale=cpu|paper] [kdrun overrides...]
source "$(dirname "$0")/reproduce_common.sh"
reproduce tinybert_table3 tinybert_table3 ablation "experiment=$(experiments_for tinybert "${TASKS:-mnli,mrpc,cola}")" ablation=none,no_embd,no_pred,no_trm,no_attn,no_hidn "$@"
