"""Selective-Backprop inside a SubsetLoader loop (docs/online.md).

    python examples/selective_backprop_loop.py
"""

import torch
import torch.nn.functional as F

from subsetsel import SubsetLoader
from subsetsel.data import load_dataset
from subsetsel.models import build_model
from subsetsel.online.selective_backprop import (
    LossHistory,
    candidate_size,
    expected_share,
    selection_probabilities,
)

torch.manual_seed(0)
data = load_dataset("mnist1d")                      # or any (input, label) torch Dataset
model = build_model("cnn1d", data.input_shape, data.num_classes)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
beta, b, epochs = 3.0, 128, 10
candidates = candidate_size(b, expected_share(beta))    # 512: about b of them are selected
loader = SubsetLoader(data, model=model, strategy="random", fraction=0.5, select_every=5,
                      epochs=epochs, batch_size=candidates)
history, draw = LossHistory(1024), torch.Generator().manual_seed(0)
for _ in range(epochs):
    for x, y, w in loader:                          # a candidate batch of a weighted subset
        model.eval()
        with torch.no_grad():                       # the scoring forward
            losses = F.cross_entropy(model(x), y, reduction="none")
        model.train()
        history.push(losses)
        p = selection_probabilities(losses, history.values(), beta)
        keep = torch.rand(p.shape, generator=draw) < p
        if not keep.any():                          # never an empty step
            keep[p.argmax()] = True
        x, y, w = x[keep], y[keep], w[keep]
        loss = (F.cross_entropy(model(x), y, reduction="none") * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
model.eval()
with torch.no_grad():
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.test_batches())
print(f"test accuracy {correct / data.test_size():.4f}")
