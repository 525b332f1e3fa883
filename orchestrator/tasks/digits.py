"""Built-in tasks on scikit-learn's bundled 8x8 handwritten digits (no download needed).

Each model trains in seconds on first use and is cached in the user cache directory
(`$PRUNESEARCH_CACHE`, else `$XDG_CACHE_HOME/prunesearch`, else `~/.cache/prunesearch`);
later loads use `torch.load(weights_only=True)`, so the base metric is the same every run.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from orchestrator.batches import Batch
from orchestrator.cache import cache_dir
from orchestrator.task import Task

# Bump when a model definition or its training recipe changes: old caches are ignored.
CACHE_VERSION = 2
SPLIT_SEED = 0
TRAIN_SEED = 0
N_VALIDATION = 360
BATCH = 60


@functools.lru_cache(maxsize=1)
def _split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed train/validation split of the 1797 digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)  # N,1,8,8
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(SPLIT_SEED).permutation(len(labels)))
    val, train = order[:N_VALIDATION], order[N_VALIDATION:]
    return images[train], labels[train], images[val], labels[val]


def _batches(images: torch.Tensor, labels: torch.Tensor, view: Callable) -> list[Batch]:
    return [
        (view(images[i : i + BATCH]), labels[i : i + BATCH]) for i in range(0, len(labels), BATCH)
    ]


class DigitsCNN(nn.Module):
    """A small conv net with BatchNorm: 3 conv blocks and a 2-layer classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DigitsLSTM(nn.Module):
    """An LSTM reading each 8x8 image row by row (8 steps of 8 pixels): the recurrent case."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut, ReLU after the sum (He et al. 2016, "Deep
    Residual Learning"). A block that changes stride or width gets the downsampling
    shortcut, a 1x1 conv + BN; otherwise the shortcut is the identity."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small ResNet (38k parameters): stem, three residual blocks (the second halves the
    8x8 map through a downsampling shortcut), global average pooling, a linear head. The
    residual sums couple channels across layers: the stem with block 1, and block 2's
    output with its shortcut and block 3, each pruned as one group."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())  # fmt: skip
        self.layer1 = ResidualBlock(width, width)
        self.layer2 = ResidualBlock(width, 2 * width, stride=2)
        self.layer3 = ResidualBlock(2 * width, 2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def _rows(images: torch.Tensor) -> torch.Tensor:
    return images.squeeze(1)  # N,8,8: 8 time steps of 8 features


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


def _train(model: nn.Module, view: Callable, *, epochs: int, lr: float) -> nn.Module:
    x_train, y_train, _, _ = _split()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    generator = torch.Generator().manual_seed(TRAIN_SEED)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(0, len(order), 32):
            idx = order[i : i + 32]
            loss = nn.functional.cross_entropy(model(view(x_train[idx])), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


def _cached_model(name: str, build: Callable[[], nn.Module], view: Callable, **train) -> nn.Module:
    """Load the trained model from the cache, training and caching it on first use."""
    path = cache_dir() / f"{name}-v{CACHE_VERSION}.pt"
    if path.exists():
        model = build()
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception:  # a damaged cache file is retrained, not trusted
            pass
    threads = torch.get_num_threads()
    # Seeded initialization and one thread: the same weights on every machine and core
    # count; fork_rng leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN_SEED)
        torch.set_num_threads(1)
        try:
            model = _train(build(), view, **train)
        finally:
            torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: concurrent first uses never see a torn file
    return model.eval()


def _make_task(name: str, build: Callable[[], nn.Module], view: Callable, **train) -> Task:
    def validation() -> list[Batch]:
        _, _, x_val, y_val = _split()
        return _batches(x_val, y_val, view)

    def calibration() -> list[Batch]:
        x_train, y_train, _, _ = _split()
        return _batches(x_train[:256], y_train[:256], view)

    def train_batches() -> list[Batch]:
        x_train, y_train, _, _ = _split()
        return _batches(x_train, y_train, view)

    return Task(
        name=name,
        model=functools.partial(_cached_model, name, build, view, **train),
        example_inputs=lambda: view(_split()[2][:1]),
        calibration=calibration,
        validation=validation,
        train=train_batches,
    )


def digits_cnn() -> Task:
    return _make_task("digits-cnn", DigitsCNN, _identity, epochs=15, lr=3e-3)


def digits_resnet() -> Task:
    return _make_task("digits-resnet", DigitsResNet, _identity, epochs=10, lr=3e-3)


def digits_lstm() -> Task:
    return _make_task("digits-lstm", DigitsLSTM, _rows, epochs=30, lr=1e-2)
