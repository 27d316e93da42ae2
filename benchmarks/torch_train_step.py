"""Time the reference PyTorch XCiT's eager training step (forward, backward, torch.optim.AdamW, BatchNorm
statistics), the figure our JAX step must match on the same machine.

    python benchmarks/torch_train_step.py --model xcit_nano_12_p16 --batch-size 32 --image-size 224 --steps 10

The model is `qkv_vit/torch_xcit.py` (timm's XCiT, proven equal to timm on the fixtures by tests/test_benchmarks.py),
trained as timm's train.py trains it: soft-target cross entropy (mixup / label smoothing targets), AdamW
with weight decay 0.05 except on biases, norms and 1-d parameters (timm's `param_groups_weight_decay`),
eager mode, float32, NCHW, `torch.set_num_threads(cores)`. Same timing protocol and JSON fields as
train_step.py: the first step, `--warmup` untimed steps, then the median of `--steps` timed steps.
"""

import argparse
import time
from typing import Any

import harness

ADAMW_IMPLEMENTATIONS = ("default", "foreach", "fused")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from qkv_vit import torch_xcit

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="xcit_nano_12_p16", choices=list(torch_xcit.TIMM_MODELS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first one")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--depth", type=int, help="override the model's depth (e.g. 1 for a smoke test)")
    parser.add_argument("--embed-dim", type=int, help="override the token width")
    parser.add_argument("--cls-attn-layers", type=int, help="override the number of class-attention blocks")
    parser.add_argument("--num-heads", type=int, help="override the head count")
    parser.add_argument("--threads", type=int, default=harness.available_cores(), help="torch.set_num_threads")
    parser.add_argument(
        "--adamw",
        default="default",
        choices=ADAMW_IMPLEMENTATIONS,
        help="torch.optim.AdamW implementation (default: what PyTorch picks)",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--steps and --threads must be >= 1, --warmup >= 0")
    return args


def adamw(model, implementation: str, lr: float = 5e-4 * 32 / 512, weight_decay: float = 0.05):
    """timm's optimizer for XCiT: AdamW, no weight decay on 1-d parameters and biases."""
    import torch

    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim <= 1 or name.endswith(".bias") or name == "cls_token" else decay).append(parameter)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    options = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[implementation]
    return torch.optim.AdamW(groups, lr=lr, eps=1e-8, **options)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from qkv_vit import torch_xcit

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rss_before_model = harness.peak_rss_bytes()
    overrides = {
        "depth": args.depth,
        "embed_dim": args.embed_dim,
        "num_heads": args.num_heads,
        "cls_attn_layers": args.cls_attn_layers,
    }
    model = torch_xcit.create(
        args.model, num_classes=args.num_classes, **{k: v for k, v in overrides.items() if v is not None}
    ).train()
    optimizer = adamw(model, args.adamw)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, args.num_classes, (args.batch_size,))
    targets = F.one_hot(labels, args.num_classes).float() * 0.9 + 0.1 / args.num_classes
    last_loss = float("nan")

    def step() -> None:
        nonlocal last_loss
        logits = model(images)
        loss = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()  # timm SoftTargetCrossEntropy
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last_loss = loss.item()

    first_step_s = harness.time_calls(step, 1)[0]
    harness.time_calls(step, args.warmup)
    cpu_start = time.process_time()
    times = harness.time_calls(step, args.steps)
    cpu_per_step = (time.process_time() - cpu_start) / args.steps
    step_s = harness.median(times)
    return {
        "benchmark": "torch_train_step",
        "model": args.model,
        "qkv": "linear",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "num_classes": args.num_classes,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "step_time_s": step_s,
        "step_times_s": times,
        "cpu_time_per_step_s": cpu_per_step,
        "images_per_sec": args.batch_size / step_s,
        "first_step_s": first_step_s,
        "final_loss": last_loss,
        "threads": torch.get_num_threads(),
        "adamw": args.adamw,
        "torch": torch.__version__,
        "rss_before_model_bytes": rss_before_model,
        "peak_memory_bytes": harness.peak_rss_bytes(),
        "peak_memory_source": "process peak RSS",
        **harness.machine(),
    }


def main(argv: list[str] | None = None) -> None:
    result = benchmark(parse_args(argv))
    print(
        f"PyTorch {result['torch']} eager {result['model']} batch {result['batch_size']} at "
        f"{result['image_size']}px, "
        f"{result['threads']} threads, AdamW {result['adamw']}, {result['cpu']}, {result['cores']} cores"
    )
    print(
        f"  params {result['params']:,}; step {result['step_time_s'] * 1e3:.1f} ms (median of {result['steps']}), "
        f"{result['images_per_sec']:.1f} images/s; first step {result['first_step_s']:.1f} s; "
        f"peak RSS {result['peak_memory_bytes'] / 2**30:.2f} GiB"
    )
    harness.emit(result)


if __name__ == "__main__":
    main()
