#!/usr/bin/env bash
# DistilBERT Table 4 (triple-loss ablation), as differences to the full recipe on one task (default MRPC; the paper: GLUE macro-score).
# Usage: scripts/reproduce_distilbert_table4.sh [scale=cpu|paper] [kdrun overrides...]
source "$(dirname "$0")/reproduce_common.sh"
reproduce distilbert_table4 distilbert_table4 ablation "experiment=$(experiments_for distilbert "${TASKS:-mrpc}")" ablation=none,distil_no_ce,distil_no_cos,distil_no_mlm,distil_random_init report.relative_to=none "$@"
