"""The PyTorch reference for `configs/cifar10.py:recipe=short`: a plain PyTorch CIFAR-10 script, timm's XCiT.

    python benchmarks/torch_cifar_short.py --seed 0                      # CIFAR-10 from ../shared/data, 3 epochs
    python benchmarks/torch_cifar_short.py --path DIR_OR_TAR --seed 1 --epochs 3
    python benchmarks/torch_cifar_short.py --smoke                       # a 1-block model, a few steps (tests)

What such a script does, with nothing of ours in the training: qkv_vit/torch_xcit.py's port of timm's
XCiT-N12/8 (timm's init), `torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)` (every parameter
decays), a per-step schedule of linear warmup from 4e-5 over the first 10% of steps then cosine to 0,
`CrossEntropyLoss(label_smoothing=0.1)`, batch 128 reshuffled each epoch with the last partial batch kept
(DataLoader's drop_last=False), a horizontal flip with probability 0.5 per image, CIFAR-10's mean and std, and
after each epoch top-1 on every test image. The images are the in-memory pipeline's arrays (PIL-decoded once,
as torchvision's ImageFolder would decode them), so both trainers see the same pixels. Prints one line per
epoch and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import harness
import numpy as np
import torch
import torch.nn.functional as F

from qkv_vit import torch_xcit

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", default=str(ARCHIVE), help="CIFAR-10 as a folder or tar of train/ and test/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache-dir", default="", help="where the arrays are cached (default ~/.cache/qkv_vit)")
    parser.add_argument("--smoke", action="store_true", help="a 1-block model, 3 steps an epoch, 2 epochs")
    return parser.parse_args(argv)


def load_arrays(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train"/"test": (uint8 images (N, 3, 32, 32), int64 labels)} through the in-memory pipeline's decoding."""
    from qkv_vit import data

    config = data.get_config("none", source="image_folder" if args.path else "digits", pipeline="in_memory")
    config.path, config.cache_dir = (args.path or None), (args.cache_dir or None)
    source = data.open_source(config)
    arrays = {}
    for name, split in (("train", source.info.train_split), ("test", source.info.eval_split)):
        images, labels = source.splits[split].images, source.splits[split].labels
        images = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()  # NCHW, a writable copy
        arrays[name] = (images, torch.from_numpy(np.array(labels)).long())
    return arrays


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def lr_at(step: int, total: int, warmup: int, peak: float = 1e-3, start: float = 4e-5) -> float:
    if step < warmup:
        return start + (peak - start) * step / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for first in range(0, len(labels), batch_size):
            logits = model(normalize(images[first : first + batch_size]))
            correct += int((logits.argmax(1) == labels[first : first + batch_size]).sum())
    model.train()
    return correct / len(labels)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    arrays = load_arrays(args)
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    overrides = dict(depth=1, embed_dim=32, num_heads=4, cls_attn_layers=1) if args.smoke else {}
    model = torch_xcit.create("xcit_nano_12_p8", num_classes=10, **overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(train_y) / args.batch_size)
    if args.smoke:
        args.epochs, steps_per_epoch = 2, 3
    total = steps_per_epoch * args.epochs
    warmup = int(0.1 * total)
    top1, step, started = [], 0, time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_y))
        for index in range(steps_per_epoch):
            rows = order[index * args.batch_size : (index + 1) * args.batch_size]
            images = train_x[rows]
            flip = torch.rand(len(rows)) < 0.5
            images[flip] = images[flip].flip(3)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup)
            loss = F.cross_entropy(model(normalize(images)), train_y[rows], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        top1.append(evaluate(model, test_x, test_y, 500))
        print(f"epoch {epoch + 1}: top-1 {100 * top1[-1]:.2f}% ({time.perf_counter() - started:.0f} s)", flush=True)
    result = {
        "top1_per_epoch": top1,
        "seed": args.seed,
        "epochs": args.epochs,
        "steps": step,
        "seconds": round(time.perf_counter() - started, 1),
        "data": args.path or "digits",
        "machine": harness.machine(),
    }
    harness.emit(result)
    return result


if __name__ == "__main__":
    main()
