# Shared by scripts/reproduce_<paper>_<table>.sh: run one sweep into a named directory, then render
# its table beside the paper's numbers. Arguments after the script name are kdrun overrides
# (e.g. scale=cpu, the default; scale=paper on a GPU); TASKS=mrpc,cola picks the table's columns.
set -euo pipefail

# experiments_for <prefix> <comma-separated tasks> -> prefix_task1,prefix_task2,...
experiments_for() {
    local prefix=$1 tasks=$2 out=() task
    IFS=, read -ra list <<< "$tasks"
    for task in "${list[@]}"; do out+=("${prefix}_${task}"); done
    (IFS=,; echo "${out[*]}")
}

# reproduce <table name> <reference> <report rows> -- <sweep overrides...> -- <user overrides...>
reproduce() {
    local table=$1 reference=$2 rows=$3
    shift 3
    # The pid: two scripts started in the same second get two sweep directories.
    local sweep_dir="outputs/multirun/reproduce_${table}/$(date +%Y-%m-%d_%H-%M-%S)_$$" status=0
    case " $* " in *" scale="*) ;; *) set -- "$@" scale=cpu ;; esac
    # kdrun exits non-zero when a job failed, after writing the table (failed cells marked): render it anyway.
    kdrun -m "hydra.sweep.dir=${sweep_dir}" "report.rows=${rows}" "report.reference=${reference}" "$@" || status=$?
    python -m kdrun.report "$sweep_dir" --rows "$rows" --reference "$reference"
    echo "Table written to ${sweep_dir}/summary.md (and .csv, .tex)"
    if (( status != 0 )); then echo "kdrun exited with status ${status}: some jobs failed (see the table)." >&2; fi
    return "$status"
}
