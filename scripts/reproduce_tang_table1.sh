#!/usr/bin/env bash
# Tang et al. Table 1: teacher, BiLSTM distilled on augmented data, BiLSTM without distillation (SST-2, QQP, MNLI).
# Usage: scripts/reproduce_tang_table1.sh [scale=cpu|paper] [kdrun overrides...]
source "$(dirname "$0")/reproduce_common.sh"
tasks=${TASKS:-sst2,qqp,mnli}
reproduce tang_table1 tang_table1 recipe "experiment=$(experiments_for teacher "$tasks"),$(experiments_for bilstm "$tasks"),$(experiments_for bilstm_nokd "$tasks")" "$@"
