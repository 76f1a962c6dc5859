"""Device speed settings shared by training, evaluation and the selection forward:
bf16 autocast (`amp`) and the channels_last memory format for convolutional models."""

from __future__ import annotations

import contextlib
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
