#!/usr/bin/env bash
# TinyBERT Table 1 (teacher vs TinyBERT4 on GLUE; the paper reports the test set, kdrun the dev set).
# Usage: scripts/reproduce_tinybert_table1.sh [scale=cpu|paper] [kdrun overrides...]
source "$(dirname "$0")/reproduce_common.sh"
tasks=${TASKS:-mnli,qqp,qnli,sst2,cola,stsb,mrpc,rte}
reproduce tinybert_table1 tinybert_table1 recipe "experiment=$(experiments_for teacher "$tasks"),$(experiments_for tinybert "$tasks")" "$@"
