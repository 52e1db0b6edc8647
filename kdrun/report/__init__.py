"""Sweeps into paper tables: collect runs, place published numbers beside them, render tables and plots.

``runs`` reads results.json files and reference YAMLs, ``tables`` aggregates and
renders, ``plots`` draws figures, ``callback`` renders every multirun.
``python -m kdrun.report DIR...`` re-renders any set of runs.
"""

from kdrun.report.runs import REFERENCES_DIR, ReportError, load_reference, load_runs
from kdrun.report.tables import build_table, main, write_report

__all__ = ["REFERENCES_DIR", "ReportError", "build_table", "load_reference", "load_runs", "main", "write_report"]
