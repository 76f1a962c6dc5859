"""Hyperparameter search over replayed selections (Optuna).

Every trial trains one configuration on the subsets stored in one selection file (replay: no
selection cost), or on the full data (`selections=None`, the reference search). The study lives in
an Optuna RDB storage (SQLite by default; any SQLAlchemy URL lets several machines join), so an
interrupted search resumes where it stopped and finished trials are never re-run.

Modules, one job each (imports only go down this list):
- `space`: `--param` parsing (`name=v1,v2`, `name=LO:HI`, `name=log:LO:HI`) into `Param`s, the
  grid and the default space (`default_space`, used when no --param is given).
- `bookkeeping`: which trials count (COMPLETE, PRUNED), retry of killed, interrupted and failed
  trials, reaping of dead workers.
- `study`: `SearchSettings`, the RDB storage, the study, its sampler and pruner.
- `checks`: `preflight` (everything that would fail every trial, checked before any trial) and
  the data every trial of a worker shares.
- `trials`: `Objective`, one trial = one `subsetsel.run.run` in `<out>/trials/<number>`.
- `workers`: `work` (one process's trial loop) and `run_search` (a whole search, N processes).
- `results`: `Reference`, the results table (printed, CSV, JSON), `retrain_best`.
"""

from subsetsel.search.bookkeeping import (
    MAX_RETRY,
    StudyCounts,
    is_counted,
    is_failed,
    reap_dead_trials,
    requeue_failed,
    requeue_interrupted,
    study_counts,
)
from subsetsel.search.checks import load_base_dataset, preflight
from subsetsel.search.results import (
    Reference,
    failure_summary,
    format_table,
    results,
    retrain_best,
    speedup_note,
    write_results,
)
from subsetsel.search.space import (
    PARAM_TYPES,
    Param,
    SearchSpaceError,
    default_space,
    grid_points,
    grid_size,
    parse_param,
    parse_space,
)
from subsetsel.search.study import (
    DEFAULT_TRIALS,
    PRUNERS,
    SAMPLERS,
    SearchError,
    SearchSettings,
    claim_out_dir,
    hide_password,
    make_pruner,
    make_sampler,
    open_storage,
    open_study,
)
from subsetsel.search.trials import Objective
from subsetsel.search.workers import new_session, run_search, work

__all__ = [
    "DEFAULT_TRIALS",
    "MAX_RETRY",
    "PARAM_TYPES",
    "PRUNERS",
    "SAMPLERS",
    "Objective",
    "Param",
    "Reference",
    "SearchError",
    "SearchSettings",
    "SearchSpaceError",
    "StudyCounts",
    "claim_out_dir",
    "default_space",
    "failure_summary",
    "format_table",
    "grid_points",
    "grid_size",
    "hide_password",
    "is_counted",
    "is_failed",
    "load_base_dataset",
    "make_pruner",
    "make_sampler",
    "new_session",
    "open_storage",
    "open_study",
    "parse_param",
    "parse_space",
    "preflight",
    "reap_dead_trials",
    "requeue_failed",
    "requeue_interrupted",
    "results",
    "retrain_best",
    "run_search",
    "speedup_note",
    "study_counts",
    "work",
    "write_results",
]
