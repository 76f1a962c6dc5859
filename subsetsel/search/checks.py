"""Checks made once before any trial runs, and the data every trial of a worker trains on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from subsetsel.search.space import SearchSpaceError
from subsetsel.search.study import SearchSettings
from subsetsel.train import TrainConfig

if TYPE_CHECKING:
    from subsetsel.data import Dataset
    from subsetsel.store import SelectionStore


def load_base_dataset(base: TrainConfig) -> Dataset:
    """The data of `base` (every trial's data: no searched field changes it), on its device.
    Raises ValueError (one line) for an unknown or unavailable device."""
    from subsetsel.data import load_dataset
    from subsetsel.train import resolve_device

    device = resolve_device(base.device)
    return load_dataset(
        base.dataset, root=base.data_root, seed=base.data_seed, train_size=base.train_size,
        test_size=base.test_size, device=device,
    )


def preflight(settings: SearchSettings, store: SelectionStore | None = None) -> Dataset:
    """Fail before any trial on what would fail every trial; return the loaded data.

    Checks: the base options (TrainConfig.validate), the device, the data, the selection file
    (readable, at least one round, a round at epoch 0, made for these data) and that every model
    of the space (or the base model) builds on the data. Raises ValueError subclasses for bad
    options and SelectionFileError / IncompatibleSelectionError for a bad file.
    """
    from subsetsel.models import build_model, default_model
    from subsetsel.store import SelectionStore

    base = settings.base
    base.validate()
    dataset = load_base_dataset(base)
    if base.replay is not None:
        store = store or SelectionStore.open(base.replay)
        store.check_replayable(base.allow_incomplete)
        store.check_compatible(
            fingerprint=dataset.fingerprint(), dataset_size=len(dataset), dataset=base.dataset
        )
    models = {base.model or default_model(base.dataset, dataset.input_shape)}
    for p in settings.space:
        if p.name == "model":
            models.update(p.choices)
    for name in sorted(models):
        try:
            build_model(name, dataset.input_shape, dataset.num_classes)
        except (ValueError, RuntimeError) as err:
            raise SearchSpaceError(
                f"model {name!r} does not fit {base.dataset} inputs {dataset.input_shape}: "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from None
    return dataset
