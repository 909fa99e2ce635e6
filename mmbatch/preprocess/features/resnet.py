"""ResNet-18/34/50 in plain torch, with torchvision's exact ``state_dict`` key names.

Standard ImageNet checkpoints (``torchvision.models.resnet18(weights=...)
.state_dict()`` saved with ``torch.save``) load here without torchvision:
``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``layer4.1.bn2``, ``downsample.0``
(1x1 conv) / ``downsample.1`` (BN), ``fc``. Key counts including the BN
``num_batches_tracked`` buffers: resnet18 122, resnet34 218, resnet50 320.

The architecture is torchvision's "v1.5" (stride 2 on the 3x3 conv of a
Bottleneck), which is what torchvision's ImageNet weights are trained for.
:meth:`ResNet.features` returns the global-average-pooled vector (512 for
18/34, 2048 for 50) that the image ``cnn`` extractor uses; ``fc`` is kept only
so full checkpoints load strictly.

Kept instead of ``torchvision.models`` on purpose: PyPI's ``torchvision==0.28.0``
(the release built for torch 2.13.0) is a CUDA build; beside the CPU wheel
``torch==2.13.0+cpu`` it installs without touching torch but fails on import
(``_C.so`` needs ``libc10_cuda.so``; ``RuntimeError: operator torchvision::nms
does not exist``), so a CPU install cannot use it.
"""
from __future__ import annotations

import io
from typing import Mapping, Optional, Type, Union

import torch
from torch import Tensor, nn

from mmbatch.engine import storage


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = 512 * block.expansion
        self.fc = nn.Linear(self.feature_dim, num_classes)
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: Tensor) -> Tensor:
        """[n, 3, H, W] normalised images -> [n, feature_dim] global-average-pooled features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}


def build_resnet(arch: str, num_classes: int = 1000) -> ResNet:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    block, layers = ARCHS[arch]
    return ResNet(block, layers, num_classes)


def resnet18(num_classes: int = 1000) -> ResNet:
    return build_resnet("resnet18", num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    return build_resnet("resnet34", num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return build_resnet("resnet50", num_classes)


# --- checkpoints -----------------------------------------------------------------
def parse_state_dict(raw: bytes, source: str = "checkpoint") -> dict[str, Tensor]:
    """``torch.load(weights_only=True)`` of checkpoint bytes -> a plain ``state_dict``.

    Accepts a raw ``state_dict`` or a dict wrapping one under ``state_dict`` or
    ``model``; a ``module.`` prefix (DataParallel/DDP) is stripped.
    """
    obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source}: not a state_dict (a mapping of names to tensors), "
                         "nor a dict holding one under 'state_dict' or 'model'")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Strict load of the backbone; ``fc.*`` may be absent or of another class count (it is unused)."""
    own = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items()
                  if not (k.startswith("fc.") and k in own and own[k].shape != v.shape)}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(f"{source} does not match {type(model).__name__}: "
                         f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                         f"unexpected keys {list(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''} "
                         f"({len(unexpected)})")


def build_or_load(build, weights: Optional[str], seed: int, warning: str, load=None):
    """``(model.eval(), sha256 of the weights file or None)``.

    ``weights`` None: ``build()`` with seeded random weights, warning loudly (``warnings`` and the log).
    Otherwise the state_dict at ``weights`` (local path or fsspec URI) is loaded with ``load(model, sd)``
    (default: strict ``load_state_dict``).
    """
    import hashlib
    import logging
    import warnings

    if weights is None:
        warnings.warn(warning, RuntimeWarning, stacklevel=3)
        logging.getLogger("mmbatch.preprocess.features").warning(warning)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()
        return model.eval(), None
    raw = storage.read_bytes(weights)
    model = build()
    state = parse_state_dict(raw, weights)
    if load is None:
        model.load_state_dict(state, strict=True)
    else:
        load(model, state)
    return model.eval(), hashlib.sha256(raw).hexdigest()
