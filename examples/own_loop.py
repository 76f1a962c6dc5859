"""Grad-Match subsets in your own training loop (README's Python example).

    python scripts/make_image_folder.py data/digits-folder   # a small PNG ImageFolder, offline
    python examples/own_loop.py
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets, transforms

from subsetsel import SubsetLoader

normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
augment = transforms.Compose([transforms.RandomCrop(32, padding=4), normalize])
train = datasets.ImageFolder("data/digits-folder/train")  # PIL images, labels in .targets
test = datasets.ImageFolder("data/digits-folder/val", transform=normalize)

torch.manual_seed(0)
model = nn.Sequential(  # any nn.Module whose last nn.Linear outputs the logits
    nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
epochs = 8
loader = SubsetLoader(train, model=model, strategy="gradmatch", fraction=0.2, select_every=2,
                      epochs=epochs, batch_size=32, num_workers=2, train_transform=augment,
                      eval_transform=normalize, save_selections="digits-gm20.h5")

for epoch in range(epochs):
    model.train()
    for inputs, targets, weights in loader:  # a weighted 20 % subset, re-chosen every 2 epochs
        losses = F.cross_entropy(model(inputs), targets, reduction="none")
        loss = (losses * weights).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item()
                      for x, y in torch.utils.data.DataLoader(test, batch_size=256))
    print(f"epoch {epoch}: {len(loader.selection)} examples, "
          f"selection {loader.last_select_seconds:.1f} s, test accuracy {correct / len(test):.3f}")

# later: the same subsets for another model or learning rate, with no selection cost
replayed = SubsetLoader(train, replay="digits-gm20.h5", batch_size=32, train_transform=augment)
print(f"replaying {replayed.epochs} epochs of digits-gm20.h5")
