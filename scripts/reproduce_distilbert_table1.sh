#!/usr/bin/env bash
# DistilBERT Table 1 (teacher vs DistilBERT on the GLUE dev sets).
# Usage: scripts/reproduce_distilbert_table1.sh [scale=cpu|paper] [kdrun overrides...]
source "$(dirname "$0")/reproduce_common.sh"
tasks=${TASKS:-cola,mnli,mrpc,qnli,qqp,rte,sst2,stsb,wnli}
reproduce distilbert_table1 distilbert_table1 recipe "experiment=$(experiments_for teacher "$tasks"),$(experiments_for distilbert "$tasks")" "$@"
