"""The judge: a small MNIST CNN shipped with its weights, trained on the training split only.

Its penultimate layer (128 features) is the feature space for Fréchet distance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DifftuneError

WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "mnist_classifier.safetensors"


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, stride=2, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, 128)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(128, 10)

    def features(self, x: Tensor) -> Tensor:
        """(B, 1, 28, 28) in [0, 1] → (B, 128)."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))  # (B, 64, 14, 14)
        x = F.relu(self.conv3(x))  # (B, 64, 7, 7)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


def _shift(batch: Tensor, generator: torch.Generator, max_shift: int = 2) -> Tensor:
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=generator)).tolist()
    return torch.roll(batch, shifts=(dy, dx), dims=(2, 3))


def train_classifier(epochs: int = 30, seed: int = 0) -> DigitClassifier:
    """Train on the 4,000-digit training split (random ±2 px shifts)."""
    from ..zoo.mnist import split

    x, y = split("train")
    xt = torch.from_numpy(x).float().div(255).unsqueeze(1)
    yt = torch.from_numpy(y)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * ((len(yt) + 63) // 64))
    for _ in range(epochs):
        perm = torch.randperm(len(yt), generator=g)
        for i in range(0, len(yt), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(_shift(xt[idx], g)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def load_classifier(path: str | Path = WEIGHTS) -> DigitClassifier:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise DifftuneError(f"classifier weights not found at {path}; regenerate: python -m difftune.eval.classifier")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def to_tensor(digits: np.ndarray) -> Tensor:
    """(N, 28, 28) uint8 or float in [0, 1] → (N, 1, 28, 28) float."""
    t = torch.from_numpy(np.asarray(digits)).float()
    if t.max() > 1.5:
        t = t / 255.0
    return t.unsqueeze(1)


@torch.no_grad()
def accuracy(model: DigitClassifier, digits: np.ndarray, labels: np.ndarray) -> float:
    pred = model(to_tensor(digits)).argmax(1).numpy()
    return float((pred == labels).mean())


if __name__ == "__main__":
    from safetensors.torch import save_file

    from ..zoo.mnist import split

    clf = train_classifier()
    xh, yh = split("heldout")
    print(f"held-out accuracy: {accuracy(clf, xh, yh):.4f}")
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(WEIGHTS))
    print(f"wrote {WEIGHTS}")
