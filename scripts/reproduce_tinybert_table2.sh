#!/usr/bin/env bash
# TinyBERT Table 2 (learning procedure: w/o GD, w/o TD, w/o DA), default columns MNLI, MRPC, CoLA (TASKS=...).
# Usage: scripts/reproduce_tinybert_table2.sh [scale=cpu|paper] [kdrun overrides...]
source "$(dirname "$0")/reproduce_common.sh"
reproduce tinybert_table2 tinybert_table2 ablation "experiment=$(experiments_for tinybert "${TASKS:-mnli,mrpc,cola}")" ablation=none,no_gd,no_td,no_da "$@"
