"""lab-attendant supervisor: queue, run records, schedules and guards (never imports torch).

The worker side lives in the sibling package `jobs`.
"""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
