"""How much slower is ``analyze_ops`` than the forward pass it records?

Model: a bottleneck ResNet-50 (25.6M parameters, written here so the bench
needs no torchvision), eval mode, one 1x3x224x224 input, CPU. Both sides run
under ``torch.no_grad()`` as ``analyze_ops`` does. Runs alternate (forward,
analyze, forward, analyze, ...) after one warm-up of each, so drift in the
machine hits both alike; medians are reported. The last line is one JSON
object: both times and their ratio (target: ratio <= 3).

    .venv/bin/python bench/analyze_speed.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from torchslim.model_analyzer import analyze_ops, analyze_vars


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus the (projected) shortcut."""

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = 4 * width
        self.conv1, self.bn1 = nn.Conv2d(in_ch, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            projection = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
            self.downsample = nn.Sequential(projection, nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet50(num_classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
    ]
    in_ch = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        stage = []
        for i in range(blocks):
            stage.append(Bottleneck(in_ch, width, stride if i == 0 else 1))
            in_ch = 4 * width
        layers.append(nn.Sequential(*stage))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes)]
    return nn.Sequential(*layers)


def timed(fn) -> float:  # noqa: ANN001 - any zero-argument callable
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default: %(default)s)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, x = resnet50().eval(), torch.randn(1, 3, 224, 224)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def analyze() -> None:
        analyze_ops(model, x)

    forward(), analyze()  # warm-up: allocator, oneDNN primitive caches
    runs = [(timed(forward), timed(analyze)) for _ in range(args.repeats)]
    fwd, ana = (statistics.median(r[i] for r in runs) for i in (0, 1))
    print(f"resnet50, {analyze_vars(model)[0]:,} params, input 1x3x224x224, CPU, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved runs")
    print(f"{'':<14}{'median ms':>10}{'min ms':>10}{'max ms':>10}")
    for name, i in (("forward", 0), ("analyze_ops", 1)):
        times = [r[i] * 1e3 for r in runs]
        print(f"{name:<14}{statistics.median(times):>10.1f}{min(times):>10.1f}{max(times):>10.1f}")
    print(json.dumps({"forward_s": round(fwd, 5), "analyze_ops_s": round(ana, 5), "ratio": round(ana / fwd, 3),
                      "threads": args.threads, "repeats": args.repeats}))


if __name__ == "__main__":
    main()
