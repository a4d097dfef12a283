"""Networks and evaluation helpers for train/pretrain.py and train/linear_eval.py."""
from __future__ import annotations

import intl_ops

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_data import to_model_input

ARCHS = ("cnn", "resnet18", "resnet50")


# ------------------------------------------------------------------ backbones and projector
def small_cnn(in_channels: int, widths: tuple[int, ...] = (32, 32)) -> nn.Module:
    """3x3 conv-BN-ReLU layers at full resolution, then global average pooling: widths[-1] features.

    The digits demo's encoder. Two layers (a 5x5 receptive field, pooled over the 8x8 image) on
    purpose: deeper CNNs that keep the spatial layout already reach ~0.96 5-NN on the held-out
    digits at random init (raw pixels do better still), which leaves no room to see what INTL
    learns; this one starts at ~0.90 and the comparison in the demo's JSON line stays meaningful.
    """
    layers, c = [], in_channels
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c = w
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.num_features = c
    return net


def build_backbone(arch: str, in_channels: int = 3, small_stem: bool = False, zero_init_residual: bool = False) -> nn.Module:
    """Backbone returning pooled features (attribute num_features). ResNets are torchvision's, with
    the CIFAR variant (3x3 stride-1 stem, no max-pool) when small_stem, for small images. The official
    INTL code leaves zero_init_residual off (torchvision's default too)."""
    if arch == "cnn":
        return small_cnn(in_channels)
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    import torchvision

    net = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual)
    if small_stem:
        net.conv1, net.maxpool = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.num_features = net.fc.in_features
    net.fc = nn.Identity()
    return net


def backbone_state_dict(net_state: dict) -> dict:
    """The backbone's entries of an INTLNet state_dict, "backbone." stripped (also the "module." and
    "_orig_mod." parts DDP and torch.compile add), without an fc (the backbones have none: fc = Identity)."""
    out = {}
    for key, value in net_state.items():
        key = ".".join(p for p in key.split(".") if p not in ("module", "_orig_mod"))  # no ResNet part has these names
        if key.startswith("backbone.") and not key.startswith("backbone.fc."):
            out[key[len("backbone."):]] = value
    return out


def build_projector(in_dim: int, spec: str) -> nn.Module:
    """docs/math.md §7: Linear(no bias)-BN-ReLU for each hidden size, then Linear (bias) to the last.
    spec "8192-8192-8192" = two hidden layers of 8192 and an 8192-d embedding."""
    sizes = [in_dim] + [int(s) for s in spec.split("-")]
    layers = []
    for i, o in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(i, o, bias=False), nn.BatchNorm1d(o), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


class INTLNet(nn.Module):
    """backbone + projector; forward(list of crops) -> list of (m, d) embeddings, one pass per crop
    (crops of different sizes give equal-shape embeddings; each crop gets its own BN statistics)."""

    def __init__(self, arch: str, projector: str, in_channels: int, small_stem: bool, zero_init_residual: bool = False):
        super().__init__()
        self.backbone = build_backbone(arch, in_channels, small_stem, zero_init_residual)
        self.projector = build_projector(self.backbone.num_features, projector)

    def forward(self, crops: list[Tensor]) -> list[Tensor]:
        return [self.projector(self.backbone(c)) for c in crops]


# ------------------------------------------------------------------ batch norm over all ranks
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are taken over every rank's samples (what SyncBatchNorm
    does on GPUs; torch's SyncBatchNorm refuses CPU tensors, so gloo runs use this). Two passes
    (mean, then centred second moment) through the differentiable all_reduce, whose backward sums the
    ranks' gradients: the same gradient as one process holding the whole batch."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        mean = all_reduce(x.sum(dims)) / count
        xc = x - mean.reshape(shape)
        var = all_reduce((xc * xc).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * count / max(count - 1, 1), m)
        y = xc * torch.rsqrt(var + self.eps).reshape(shape)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape) if self.affine else y


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """SyncBatchNorm on GPUs, GlobalBatchNorm elsewhere (both: statistics of the global batch)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_bn(child, device))
    return module


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def extract_features(backbone: nn.Module, loader, device, channels_last: bool = False) -> tuple[Tensor, Tensor]:
    """(features, labels) of every sample in loader's dataset, in dataset order. Under torch.distributed
    the loader's sampler must be shard_sampler(...): each rank encodes its shard, then all gather."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
        x = to_model_input(x, device, torch.channels_last if channels_last else torch.contiguous_format)
        feats.append(backbone(x).float())
        labels.append(torch.as_tensor(y, device=device))
    backbone.train(was_training)
    f, y = torch.cat(feats), torch.cat(labels)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world, n = dist.get_world_size(), len(loader.dataset)
        parts_f = [torch.empty_like(f) for _ in range(world)]
        parts_y = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(parts_f, f)
        dist.all_gather(parts_y, y)
        # shard r holds samples r, r + world, ... (padded): interleave back to dataset order
        f = torch.stack(parts_f, 1).flatten(0, 1)[:n]
        y = torch.stack(parts_y, 1).flatten(0, 1)[:n]
    return f, y


def shard_sampler(dataset):
    """Sampler giving rank r the samples r, r + world, ... (padded to equal length), in order."""
    from torch.utils.data import DistributedSampler

    if dist.is_available() and dist.is_initialized():
        return DistributedSampler(dataset, shuffle=False, drop_last=False)
    return None


@torch.no_grad()
def knn_accuracy(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, k: int = 5,
                 chunk: int = 1024) -> float:
    """k-NN accuracy with cosine similarity: majority vote of the k nearest training samples (ties go
    to the class with the larger summed similarity)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), n_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], 1.0 + 1e-3 * sim)
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return correct / len(test_f)


def linear_probe_accuracy(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor) -> float:
    """Held-out accuracy of a logistic-regression probe on standardised frozen features (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_f.cpu().double().numpy())
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(train_f.cpu().double().numpy()), train_y.cpu().numpy())
    return float(clf.score(scaler.transform(test_f.cpu().double().numpy()), test_y.cpu().numpy()))


@torch.no_grad()
def embedding_effective_rank(z: Tensor) -> float:
    """intl_ops.effective_rank of the embeddings' features (it decomposes the small m x m Gram when d >> m)."""
    if z.device.type != "cpu":
        return float(intl_ops.effective_rank(z.detach(), axis=1))
    threads = torch.get_num_threads()  # multi-threaded CPU eigvalsh of this size can spin for seconds on a busy host
    torch.set_num_threads(1)
    try:
        return float(intl_ops.effective_rank(z.detach(), axis=1))
    finally:
        torch.set_num_threads(threads)
