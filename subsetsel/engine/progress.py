"""A tqdm progress bar over a run's periods, as an engine callback."""

from __future__ import annotations

from typing import Any


class ProgressBar:
    """Shows periods done, the last test accuracy and the subset size."""

    def __init__(self, total: int, desc: str = "train", done: int = 0) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, desc=desc, unit="epoch", leave=False)

    def __call__(self, engine: Any, record: dict[str, Any]) -> None:
        acc = record.get("test_acc")
        postfix = {"acc": "-" if acc is None else f"{acc:.3f}"}
        if "subset_size" in record:
            postfix["subset"] = record["subset_size"]
        self.bar.set_postfix(postfix)
        self.bar.update(1)
        if self.bar.n >= (self.bar.total or 0):
            self.bar.close()
