"""A plain PyTorch reference of kd_histo's distillation step and inference, for benchmarks only.

    /tmp/torchvenv/bin/python benchmarks/torch_step.py --factors=2 --modes=uncached,cached

Run by ``benchmarks/bench_step.py --compare_torch --torch_python=...`` in a separate interpreter
(torch is an optional benchmark dependency, not installed in the project's environment; this
file imports neither TensorFlow nor kd_histo). The same step as bench_step's: the paper's
ResNet-GN (ImageNet stem 7x7/2 conv + 3x3/2 max-pool, one BasicBlock per stage of 32-64-128-256,
GroupNorm with gcd(C, 8) groups, input normalised by mean/std in the net), a frozen teacher on the
``hr_px`` view and a student on ``hr_px / factor``; loss = KD (KL at T = 4, x T^2, batch mean) +
L2 between the student's map and the mean of the adaptive max-pool and the bicubic resize
(``align_corners=False``) of the teacher's map; Adam 1e-3. "cached" feeds the teacher logits and
resized map computed once; "infer" times the net's forward pass (``inference_mode``) at each of
``--infer_px``. float32, PyTorch's default NCHW layout, or with ``--channels_last`` nets and inputs
in ``torch.channels_last`` (NHWC in memory, as TensorFlow's; faster for oneDNN's CPU convs); random
inputs already in memory. Prints one JSON object per configuration, with the median images/s of
``--repeats`` timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 4.0
CLOCK = time.perf_counter  # --clock=process: time.process_time


def gn(channels: int, groups: int = 8) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, groups), channels, eps=1e-5)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.norm1 = gn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.norm2 = gn(planes)
        self.down = None
        if stride != 1 or cin != planes:
            self.down = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), gn(planes))

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNetGN(nn.Module):
    """Returns (logits, last feature map), as kd_histo's nets return a dict of both."""

    def __init__(self, planes=(32, 64, 128, 256), num_classes: int = 3):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.7, 0.5, 0.7]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.15, 0.2, 0.15]).view(1, 3, 1, 1))
        self.stem = nn.Sequential(
            nn.Conv2d(3, planes[0], 7, 2, 3, bias=False),
            gn(planes[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, cin = [], planes[0]
        for s, p in enumerate(planes):
            blocks.append(BasicBlock(cin, p, 2 if s > 0 else 1))
            cin = p
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(planes[-1], num_classes)

    def forward(self, x):
        f = self.blocks(self.stem((x - self.mean) / self.std))
        return self.head(f.mean((2, 3))), f


def feature_target(t_feat, size):
    """The teacher's map at the student's size: mean of adaptive max-pool and bicubic resize."""
    return 0.5 * (
        F.adaptive_max_pool2d(t_feat, size)
        + F.interpolate(t_feat, size=size, mode="bicubic", align_corners=False)
    )


def student_loss(s_logits, s_feat, t_logits, target):
    kd = (
        F.kl_div(
            F.log_softmax(s_logits / TEMPERATURE, 1),
            F.log_softmax(t_logits / TEMPERATURE, 1),
            reduction="batchmean",
            log_target=True,
        )
        * TEMPERATURE**2
    )
    return kd + F.mse_loss(s_feat, target)


def _time(fn, *, steps: int, warmup: int, repeats: int, batch: int) -> list[float]:
    for _ in range(warmup):
        fn()
    rates = []
    for _ in range(repeats):
        start = CLOCK()
        for _ in range(steps):
            fn()
        rates.append(steps * batch / (CLOCK() - start))
    return rates


def _layout(t, a):
    return t.to(memory_format=torch.channels_last) if a.channels_last else t


def bench_step(factor: int, mode: str, a) -> dict:
    torch.manual_seed(0)
    planes = tuple(int(p) for p in a.planes.split(","))
    teacher = _layout(ResNetGN(planes).eval(), a)
    student = _layout(ResNetGN(planes).train(), a)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    lr_px = a.hr_px // factor
    gen = torch.Generator().manual_seed(0)
    hr = _layout(torch.rand(a.batch, 3, a.hr_px, a.hr_px, generator=gen), a)
    lr = _layout(torch.rand(a.batch, 3, lr_px, lr_px, generator=gen), a)
    size = student(lr[:1])[1].shape[-2:]
    with torch.no_grad():
        cached_logits, t_feat = teacher(hr)
        cached_target = feature_target(t_feat, size)

    def step():
        if mode == "cached":
            t_logits, target = cached_logits, cached_target
        else:
            with torch.no_grad():
                t_logits, t_feat = teacher(hr)
                target = feature_target(t_feat, size)
        s_logits, s_feat = student(lr)
        loss = student_loss(s_logits, s_feat, t_logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # CPU ops are synchronous: the step is done when this returns

    rates = _time(step, steps=a.steps, warmup=a.warmup, repeats=a.repeats, batch=a.batch)
    return {
        "factor": factor,
        "mode": mode,
        "student_px": lr_px,
        "images_per_s": round(statistics.median(rates), 1),
        "runs": [round(r, 1) for r in rates],
    }


def bench_infer(px: int, a) -> dict:
    torch.manual_seed(0)
    net = _layout(ResNetGN(tuple(int(p) for p in a.planes.split(","))).eval(), a)
    x = _layout(torch.rand(a.batch, 3, px, px, generator=torch.Generator().manual_seed(0)), a)

    def run():
        with torch.inference_mode():
            return net(x)[0].sum().item()

    rates = _time(run, steps=a.steps, warmup=a.warmup, repeats=a.repeats, batch=a.batch)
    return {
        "px": px,
        "mode": "infer",
        "images_per_s": round(statistics.median(rates), 1),
        "runs": [round(r, 1) for r in rates],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factors", default="1,2,4,8")
    p.add_argument("--modes", default="uncached,cached")
    p.add_argument("--infer_px", default="", help="comma-separated input sizes to time inference")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hr_px", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--planes", default="32,64,128,256")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--channels_last", action="store_true", help="NHWC memory layout")
    p.add_argument("--clock", choices=("wall", "process"), default="wall")
    a = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if a.clock == "process" else time.perf_counter
    torch.set_num_threads(a.threads)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "layout": "channels_last" if a.channels_last else "nchw",
        "batch": a.batch,
    }
    for f in [int(v) for v in a.factors.split(",") if v]:
        for mode in [m for m in a.modes.split(",") if m]:
            print(json.dumps({**bench_step(f, mode, a), **meta}), flush=True)
    for px in [int(v) for v in a.infer_px.split(",") if v]:
        print(json.dumps({**bench_infer(px, a), **meta}), flush=True)


if __name__ == "__main__":
    main()
