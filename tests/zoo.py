"""Small architectures covering every coupling case structured pruning must handle."""

from __future__ import annotations

import torch
from torch import nn


class PlainCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 24), nn.ReLU(),
                                  nn.Linear(24, 10))  # fmt: skip

    def forward(self, x):
        return self.head(self.features(x))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # the downsampling shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())  # fmt: skip
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class MobileBlock(nn.Module):
    """Depthwise-separable: depthwise 3x3 then pointwise 1x1 (MobileNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn1 = nn.BatchNorm2d(8)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.depthwise(x)))
        x = torch.relu(self.bn2(self.pointwise(x)))
        return self.fc(x.mean(dim=(2, 3)))


class ConcatBlock(nn.Module):
    """Inception-style: two branches concatenated along channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.branch1 = nn.Conv2d(8, 6, 1)
        self.branch3 = nn.Conv2d(8, 10, 3, padding=1)
        self.merge = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([torch.relu(self.branch1(x)), torch.relu(self.branch3(x))], dim=1)
        return self.fc(torch.relu(self.merge(x)).mean(dim=(2, 3)))


class RNNClassifier(nn.Module):
    def __init__(self, kind: type[nn.Module], layers: int = 1, bidirectional: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 12)
        self.rnn = kind(12, 16, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.head = nn.Linear(16 * (1 + bidirectional), 10)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.embed(x)))
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


IMAGE = (1, 1, 8, 8)
SEQUENCE = (1, 8, 8)
ZOO = {
    "plain-cnn": (PlainCNN, IMAGE),
    "residual-cnn": (ResidualCNN, IMAGE),
    "mobilenet-block": (MobileBlock, IMAGE),
    "concat-block": (ConcatBlock, IMAGE),
    "lstm": (lambda: RNNClassifier(nn.LSTM), SEQUENCE),
    "gru": (lambda: RNNClassifier(nn.GRU), SEQUENCE),
    "lstm-2": (lambda: RNNClassifier(nn.LSTM, 2), SEQUENCE),
    "gru-2": (lambda: RNNClassifier(nn.GRU, 2), SEQUENCE),
    "bilstm-2": (lambda: RNNClassifier(nn.LSTM, 2, bidirectional=True), SEQUENCE),
    "bigru": (lambda: RNNClassifier(nn.GRU, bidirectional=True), SEQUENCE),
    "transformer": (TinyTransformer, SEQUENCE),
}


class SelfAttention(nn.Module):
    """Separate q/k/v/out projections and `num_heads` (the Hugging Face layout): whole
    heads can be cut."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape

        def heads(y):
            return y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        attn = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.out_proj(out)


class HeadTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.norm1, self.norm2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.attn = SelfAttention(16, 4)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


ZOO["transformer-heads"] = (HeadTransformer, SEQUENCE)
