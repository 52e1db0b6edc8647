#!/usr/bin/env bash
# Q-BERT group-wise ablation at 4-bit: 1, 12, 128 groups and one per row (default SST-2; the paper: MNLI, CoNLL, SQuAD).
# Usage: scripts/reproduce_qbert_groups.sh [scale=cpu|paper] [kdrun overrides...]
source "$(dirname "$0")/reproduce_common.sh"
reproduce qbert_groups qbert_groups ablation "experiment=$(experiments_for qbert "${TASKS:-sst2}")" ablation=qbert_g1,qbert_g12,qbert_g128,qbert_grow "$@"
