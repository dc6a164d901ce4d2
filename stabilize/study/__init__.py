"""Studies: grids of runs that turn the article's claims into measured tables and plots (``stabilize study``)."""

from stabilize.study.grid import BUDGETS, Budget, Grid, RunSpec, load_grid
from stabilize.study.recorder import StudyRecorder
from stabilize.study.results import RunResult
from stabilize.study.runner import run_study

__all__ = ["BUDGETS", "Budget", "Grid", "RunResult", "RunSpec", "StudyRecorder", "load_grid", "run_study"]
