#!/usr/bin/env bash
# Q-BERT Table 1: fp32, Q-BERT 8/4/3/2-bit, DirectQ 4/3/2-bit, mixed precision 2/4 and 2/3 (default SST-2).
# Usage: scripts/reproduce_qbert_table1.sh [scale=cpu|paper] [kdrun overrides...]
source "$(dirname "$0")/reproduce_common.sh"
reproduce qbert_table1 qbert_table1 ablation "experiment=$(experiments_for qbert "${TASKS:-sst2}")" ablation=qbert_fp32,qbert_w8,qbert_w4,qbert_w3,qbert_w2,directq_w4,directq_w3,directq_w2,qbert_mp_2_4,qbert_mp_2_3 "$@"
