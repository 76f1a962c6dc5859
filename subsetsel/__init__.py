"""subsetsel: train PyTorch models on well-chosen, weighted subsets of the data."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("subsetsel")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"


def __getattr__(name: str) -> object:
    """`subsetsel.SubsetLoader` without importing torch at `import subsetsel`."""
    if name == "SubsetLoader":
        from subsetsel.loader import SubsetLoader

        return SubsetLoader
    raise AttributeError(f"module 'subsetsel' has no attribute {name!r}")
