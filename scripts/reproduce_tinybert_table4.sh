#!/usr/bin/env bash
# TinyBERT Table 4 (layer mapping: uniform, top, bottom), default columns MNLI, MRPC, CoLA (TASKS=...).
# Usage: scripts/reproduce_tinybert_table4.sh [scale=cpu|paper] [kdrun overrides...]
source "$(dirname "$0")/reproduce_common.sh"
reproduce tinybert_table4 tinybert_table4 ablation "experiment=$(experiments_for tinybert "${TASKS:-mnli,mrpc,cola}")" ablation=none,map_top,map_bottom "$@"
