"""GLUE data access for kdrun: task registry, TSV/hub loaders and submission writers.

Kept free of heavy imports so that ``kdrun.data.tasks`` stays cheap to import from
config validation code.
"""
