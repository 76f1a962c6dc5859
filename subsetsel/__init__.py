"""subsetsel: train PyTorch models on well-chosen, weighted subsets of the data."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("subsetsel")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
