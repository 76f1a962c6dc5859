"""Device speed settings shared by training, evaluation and the selection forward:
bf16 autocast (`amp`) and the channels_last memory format for convolutional models."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Precision:
    """amp: run forwards under bf16 autocast (losses and gradient factors stay float32);
    channels_last: keep 4-D inputs and the model's conv weights in NHWC layout."""

    device: torch.device = torch.device("cpu")
    amp: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.amp and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--amp needs bfloat16 support, which {self.device} lacks")
        if self.amp and self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"--amp is supported on cpu and cuda, not {self.device.type}")

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast when `amp`, else nothing."""
        if not self.amp:
            yield
            return
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            yield

    def model(self, model: nn.Module) -> nn.Module:
        """The model in channels_last layout when asked and it has 2-D convolutions."""
        if self.channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model

    @contextlib.contextmanager
    def eval_pass(self, model: nn.Module) -> Iterator[Precision]:
        """The settings for one eval pass over many batches (the selection forward, the test
        evaluation). On the CPU, a model with 2-D convolutions whose weights are in the standard
        layout runs the pass in channels_last and is put back after: NCHW pooling is slow on
        CPUs (measured eval forwards: smallcnn 1.87x, lenet 1.57x, mobilenet_v2 1.45x faster,
        resnet18 the same; converting both ways takes 0.3-21 ms). Everywhere else: self."""
        weights = [p for m in model.modules() if isinstance(m, nn.Conv2d)
                   for p in m.parameters(recurse=False) if p.dim() == 4]
        if (self.channels_last or self.device.type != "cpu" or not weights
                or not all(p.is_contiguous() for p in weights)):
            yield self
            return
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        try:
            yield dataclasses.replace(self, channels_last=True)
        finally:
            model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """4-D inputs in channels_last layout when asked."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """model(x) with these settings; logits as float32."""
        with self.autocast():
            return model(self.inputs(x)).float()


FULL = Precision()
