"""Self-contained PyTorch reference of PMG (ECCV 2020) and of PMG-V2 (T-PAMI 2021), written from the project's
behaviour spec (PMG-V2: docs of issue "PMG-V2 beside PMG": tiled stages, three heads, the consistency loss).

Used by the parity tests against the Flax model and by the benchmarks. No torchvision:
the ResNet below reproduces torchvision's module names so its state dicts load.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "make_resnet",
    "BasicConv",
    "PMG",
    "jigsaw",
    "sample_cycle",
    "make_optimizer",
    "set_lr",
    "train_iteration",
    "evaluate_logits",
    "split_block",
    "concat_block",
    "consistency_feature",
    "PMGV2",
    "V2_UPDATES",
    "train_iteration_v2",
]

JIGSAW_STEPS: tuple[tuple[int, int], ...] = ((8, 0), (4, 1), (2, 2))


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with symmetric padding 1 and no bias."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with identity/projection shortcut (ResNet18/34)."""

    expansion: int = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual forward pass."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 bottleneck with expansion 4."""

    expansion: int = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual forward pass."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """torchvision-compatible ResNet whose forward returns the four stage outputs (NCHW)."""

    def __init__(self, block: Block, layers: Sequence[int], width: int = 64) -> None:
        super().__init__()
        self.in_ch = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.stage_channels: tuple[int, ...] = tuple(m * width * block.expansion for m in (1, 2, 4, 8))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """Build one stage; the first block carries the stride and any projection."""
        downsample = None
        if stride != 1 or self.in_ch != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.in_ch, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.in_ch, planes, stride, downsample)]
        self.in_ch = planes * block.expansion
        mods.extend(block(self.in_ch, planes) for _ in range(1, blocks))
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (layer1, layer2, layer3, layer4) outputs; avgpool/fc are unused."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        l1 = self.layer1(x)
        l2 = self.layer2(l1)
        l3 = self.layer3(l2)
        l4 = self.layer4(l3)
        return l1, l2, l3, l4


_RESNET_SPECS: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def make_resnet(name: str, width: int = 64, stage_sizes: Sequence[int] | None = None) -> ResNet:
    """Build a named ResNet, optionally overriding the per-stage block counts."""
    if name not in _RESNET_SPECS:
        raise ValueError(f"unknown resnet {name!r}; expected one of {sorted(_RESNET_SPECS)}")
    block, layers = _RESNET_SPECS[name]
    if stage_sizes is not None:
        if len(stage_sizes) != 4:
            raise ValueError(f"stage_sizes must have 4 entries, got {tuple(stage_sizes)}")
        layers = tuple(stage_sizes)
    return ResNet(block, layers, width=width)


def resnet18(width: int = 64) -> ResNet:
    """ResNet18 with base width `width`."""
    return make_resnet("resnet18", width)


def resnet34(width: int = 64) -> ResNet:
    """ResNet34 with base width `width`."""
    return make_resnet("resnet34", width)


def resnet50(width: int = 64) -> ResNet:
    """ResNet50 with base width `width`."""
    return make_resnet("resnet50", width)


def resnet101(width: int = 64) -> ResNet:
    """ResNet101 with base width `width`."""
    return make_resnet("resnet101", width)


def resnet152(width: int = 64) -> ResNet:
    """ResNet152 with base width `width`."""
    return make_resnet("resnet152", width)


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm2d (momentum 0.01) -> ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-5, momentum=0.01)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply conv, BN and ReLU."""
        return self.relu(self.bn(self.conv(x)))


def _conv_block(in_ch: int, feature_size: int) -> nn.Sequential:
    """Granularity block: 1x1 to feature_size, then 3x3 (pad 1) to 2 * feature_size."""
    return nn.Sequential(
        BasicConv(in_ch, feature_size, kernel_size=1),
        BasicConv(feature_size, 2 * feature_size, kernel_size=3, padding=1),
    )


def _classifier(in_features: int, feature_size: int, num_classes: int) -> nn.Sequential:
    """Head: BN1d -> Linear -> BN1d -> ELU -> Linear."""
    return nn.Sequential(
        nn.BatchNorm1d(in_features),
        nn.Linear(in_features, feature_size),
        nn.BatchNorm1d(feature_size),
        nn.ELU(inplace=True),
        nn.Linear(feature_size, num_classes),
    )


class PMG(nn.Module):
    """Progressive multi-granularity network: three block heads plus a concat head."""

    def __init__(self, features: ResNet, feature_size: int = 512, num_classes: int = 200) -> None:
        super().__init__()
        self.features = features
        _, c2, c3, c4 = features.stage_channels
        hidden = 2 * feature_size
        self.conv_block1 = _conv_block(c2, feature_size)
        self.classifier1 = _classifier(hidden, feature_size, num_classes)
        self.conv_block2 = _conv_block(c3, feature_size)
        self.classifier2 = _classifier(hidden, feature_size, num_classes)
        self.conv_block3 = _conv_block(c4, feature_size)
        self.classifier3 = _classifier(hidden, feature_size, num_classes)
        self.classifier_concat = _classifier(3 * hidden, feature_size, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (head1, head2, head3, concat) logits."""
        _, l2, l3, l4 = self.features(x)
        p1 = self.conv_block1(l2).amax(dim=(2, 3))
        p2 = self.conv_block2(l3).amax(dim=(2, 3))
        p3 = self.conv_block3(l4).amax(dim=(2, 3))
        concat = torch.cat([p1, p2, p3], dim=-1)
        return self.classifier1(p1), self.classifier2(p2), self.classifier3(p3), self.classifier_concat(concat)


def jigsaw(images: torch.Tensor, n: int, src: Sequence[int]) -> torch.Tensor:
    """Rearrange an n x n grid of blocks: output block i (row-major) is input block src[i]."""
    b, c, h, w = images.shape
    if h % n or w % n:
        raise ValueError(f"image size {h}x{w} is not divisible by n={n}")
    if sorted(int(s) for s in src) != list(range(n * n)):
        raise ValueError(f"src must be a permutation of range({n * n}), got {list(src)}")
    bh, bw = h // n, w // n
    blocks = images.reshape(b, c, n, bh, n, bw).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, bh, bw)
    index = torch.as_tensor([int(s) for s in src], dtype=torch.long, device=images.device)
    out = blocks[:, index].reshape(b, n, n, c, bh, bw).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(b, c, h, w)


def sample_cycle(n: int, rng: random.Random) -> list[int]:
    """Draw the reference's single-cycle permutation of the n*n blocks as a `src` list.

    Like the reference, it shuffles all n*n positions (same RNG consumption) and
    uses the nonzero ones in that order as p1..pm: out[p1] = in[0],
    out[p(k+1)] = in[pk], out[0] = in[pm].
    """
    positions = list(range(n * n))
    rng.shuffle(positions)
    order = [p for p in positions if p != 0]
    src = [0] * (n * n)
    prev = 0
    for p in order:
        src[p] = prev
        prev = p
    src[0] = prev
    return src


def make_optimizer(model: PMG, lr_new: float = 0.002, lr_backbone: float = 0.0002) -> torch.optim.SGD:
    """SGD (momentum 0.9, wd 5e-4) with backbone and new-layer param groups; records initial_lr."""
    backbone = list(model.features.parameters())
    backbone_ids = {id(p) for p in backbone}
    new = [p for p in model.parameters() if id(p) not in backbone_ids]
    optimizer = torch.optim.SGD(
        [{"params": backbone, "lr": lr_backbone}, {"params": new, "lr": lr_new}],
        lr=lr_new,
        momentum=0.9,
        weight_decay=5e-4,
        nesterov=False,
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    _ensure_grads(optimizer)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, epoch: int, num_epochs: int) -> None:
    """Set each group's lr to initial_lr / 2 * (cos(pi * epoch / num_epochs) + 1)."""
    factor = 0.5 * (math.cos(math.pi * epoch / num_epochs) + 1.0)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def _ensure_grads(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter a zero .grad so SGD applies decay/momentum even outside the loss."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)


def train_iteration(
    model: PMG,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    perms: dict[int, Sequence[int]] | None = None,
    rng: random.Random | None = None,
    concat_weight: float = 2.0,
) -> dict[str, float]:
    """One reference iteration: jigsaw passes n=8,4,2 on heads 1-3, then the concat pass; 4 SGD steps.

    `perms` maps n to an explicit `src`; otherwise `sample_cycle(n, rng)` draws one
    (a fresh unseeded Random if `rng` is None). Returns the four losses as optimised
    ('loss_concat' includes `concat_weight`) and the pass-4 train accuracy.
    """
    rng = rng if rng is not None else random.Random()
    model.train()
    _ensure_grads(optimizer)
    losses: dict[str, float] = {}
    for n, head in JIGSAW_STEPS:
        optimizer.zero_grad(set_to_none=False)
        src = perms[n] if perms is not None else sample_cycle(n, rng)
        loss = F.cross_entropy(model(jigsaw(images, n, src))[head], labels)
        loss.backward()
        optimizer.step()
        losses[f"loss{head + 1}"] = loss.item()
    optimizer.zero_grad(set_to_none=False)
    logits = model(images)[3]
    loss = concat_weight * F.cross_entropy(logits, labels)
    loss.backward()
    optimizer.step()
    losses["loss_concat"] = loss.item()
    losses["train_acc"] = (logits.argmax(dim=-1) == labels).float().mean().item()
    return losses


@torch.no_grad()
def evaluate_logits(model: PMG, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eval-mode forward without gradients; returns (head1, head2, head3, concat) logits."""
    model.eval()
    return model(images)


# PMG-V2's updates: the tiling of (layer1, layer2, layer3, layer4), the head trained, the consistency weight.
V2_UPDATES: tuple[tuple[tuple[int, int, int, int], int, float], ...] = (
    ((8, 8, 0, 0), 0, 0.01),
    ((4, 4, 4, 0), 1, 0.05),
    ((2, 2, 2, 2), 2, 0.1),
)


def split_block(x: torch.Tensor, n: int) -> torch.Tensor:
    """NCHW `x` cut into n x n tiles concatenated along the batch, tile row i outer, column j inner (0: x)."""
    if n == 0:
        return x
    th, tw = x.shape[2] // n, x.shape[3] // n
    return torch.cat([x[:, :, i * th : (i + 1) * th, j * tw : (j + 1) * tw] for i in range(n) for j in range(n)])


def concat_block(y: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of split_block: batch chunk i * n + j goes back to tile row i, column j."""
    if n == 0:
        return y
    chunks = y.chunk(n * n)
    rows = [torch.cat(chunks[i * n : (i + 1) * n], dim=3) for i in range(n)]
    return torch.cat(rows, dim=2)


def consistency_feature(x: torch.Tensor) -> torch.Tensor:
    """(B, C): 7x7 stride-7 average pool (the whole map when under 7), global max, min-max over the channels."""
    k = (min(7, x.shape[2]), min(7, x.shape[3]))
    f = F.avg_pool2d(x, k, k).amax(dim=(2, 3))
    low, high = f.min(dim=1, keepdim=True)[0], f.max(dim=1, keepdim=True)[0]
    return (f - low) / (high - low + 1e-9)


class BiasedBasicConv(BasicConv):
    """PMG-V2's BasicConv: the conv has a bias."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__(in_ch, out_ch, kernel_size, padding=padding)
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, bias=True)


class PMGV2(nn.Module):
    """PMG-V2: three blocks (biased convs) and heads (BN1d, Linear, BN1d, ReLU, Linear) on layer2..4; in
    training, stage s runs on tiles[s] x tiles[s] tiles of its input (split_block -> stage -> concat_block)."""

    def __init__(self, features: ResNet, feature_size: int = 512, num_classes: int = 200) -> None:
        super().__init__()
        self.features = features
        hidden = 2 * feature_size
        for k, c in enumerate(features.stage_channels[1:], start=1):
            block = nn.Sequential(
                BiasedBasicConv(c, feature_size, 1), BiasedBasicConv(feature_size, hidden, 3, padding=1)
            )
            head = nn.Sequential(
                nn.BatchNorm1d(hidden),
                nn.Linear(hidden, feature_size),
                nn.BatchNorm1d(feature_size),
                nn.ReLU(inplace=True),
                nn.Linear(feature_size, num_classes),
            )
            setattr(self, f"conv_block{k}", block)
            setattr(self, f"classifier{k}", head)

    def forward(self, x: torch.Tensor, tiles: Sequence[int] = (0, 0, 0, 0)) -> tuple[torch.Tensor, ...]:
        """(head1, head2, head3, f1, f2, f3): the logits and the consistency features of layer2..4."""
        r = self.features
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        maps = []
        for layer, n in zip((r.layer1, r.layer2, r.layer3, r.layer4), tiles):
            n = n if self.training else 0
            x = concat_block(layer(split_block(x, n)), n)
            maps.append(x)
        logits = [
            getattr(self, f"classifier{k}")(getattr(self, f"conv_block{k}")(m).amax(dim=(2, 3)))
            for k, m in enumerate(maps[1:], start=1)
        ]
        return (*logits, *(consistency_feature(m) for m in maps[1:]))


def train_iteration_v2(
    model: PMGV2, optimizer: torch.optim.Optimizer, images: torch.Tensor, positives: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """One PMG-V2 iteration: three SGD steps, each on anchors + positives (2B) with its tiling, CE of its head
    plus alpha * (CE / MSE, a constant) * MSE of its consistency features between anchors and positives."""
    model.train()
    _ensure_grads(optimizer)
    x, y, b = torch.cat([images, positives]), torch.cat([labels, labels]), images.shape[0]
    losses: dict[str, float] = {}
    for tiles, head, alpha in V2_UPDATES:
        optimizer.zero_grad(set_to_none=False)
        out = model(x, tiles)
        ce = F.cross_entropy(out[head], y)
        f = out[3 + head]
        mse = F.mse_loss(f[:b], f[b:])
        loss = ce + mse * (ce.item() / mse.item()) * alpha
        loss.backward()
        optimizer.step()
        losses[f"loss{head + 1}"] = loss.item()
    return losses
