"""Out-of-distribution detection on held-out classes: train on 5 of CIFAR-10's classes, score the other 5 (and the
digits) as OOD, for XCiT's linear q/k/v and F-SNE.

    python benchmarks/ood_held_out_classes.py                  # CIFAR-10 JPEGs from ../shared/data
    python benchmarks/ood_held_out_classes.py --folder DIR     # your CIFAR-10 image folder, DIR/{train,test}/<class>/
    python benchmarks/ood_held_out_classes.py --qkv linear fsne_m8 sne --seed 1

Each model trains with `configs/cifar10.py:recipe=short,source=in_memory` (3 epochs, N12/8 at 32x32) on the
in-distribution classes (an image folder of links into the CIFAR-10 folder), then `python -m qkv_vit.evaluate`
scores the held-out classes' test images and the digits' test split against the in-distribution test split
(MSP, max logit, energy, Mahalanobis). A finished run is not trained again. Prints a markdown table, then one JSON
object with every evaluation. The CIFAR-10 JPEG archive ships with the developers' ../shared/data; elsewhere pass
--folder with CIFAR-10 as an image folder (e.g. exported from tfds or torchvision).
"""

import argparse
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import harness

ARCHIVE = harness.REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
IN_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
OUT_CLASSES = ("dog", "frog", "horse", "ship", "truck")
SCORES = ("msp", "max_logit", "energy", "mahalanobis")


def cifar_folder(folder: str | None, workdir: Path) -> Path:
    """The CIFAR-10 image folder: --folder, or the archive extracted once under `workdir`."""
    if folder:
        return Path(folder)
    extracted = workdir / "cifar10-jpeg"
    if not extracted.is_dir():
        if not ARCHIVE.is_file():
            sys.exit(f"error: no {ARCHIVE}; pass --folder with CIFAR-10 as DIR/{{train,test}}/<class>/ images.")
        with tarfile.open(ARCHIVE) as archive:
            archive.extractall(workdir, filter="data")
    return extracted


def linked_folder(root: Path, source: Path, splits: tuple[str, ...], classes: tuple[str, ...]) -> Path:
    """ROOT/<split>/<class> links to SOURCE/<split>/<class>: a class subset as an image folder, nothing copied."""
    for split in splits:
        for name in classes:
            link = root / split / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to((source / split / name).resolve(), target_is_directory=True)
    return root


def run(args: list[str]) -> None:
    print("+ python", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=harness.REPO, check=True)


def table_row(qkv: str, result: dict, held_out: str, digits: str) -> str:
    test = result["splits"]["test"]
    cells = [qkv, f"{100 * test['top1']:.1f}", f"{test['ece']:.3f}"]
    cells += [f"{result['ood'][held_out][s]['auroc']:.3f} / {result['ood'][held_out][s]['fpr95']:.3f}" for s in SCORES]
    cells += [f"{result['ood'][digits][s]['auroc']:.3f}" for s in SCORES]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", help="CIFAR-10 as an image folder (default: the archive in ../shared/data)")
    parser.add_argument("--workdir", default="workdirs/ood_held_out", help="runs, links and results go here")
    parser.add_argument("--qkv", nargs="+", default=["linear", "fsne_m8"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workdir = (harness.REPO / args.workdir).resolve()
    cifar = cifar_folder(args.folder, workdir)
    inside = linked_folder(workdir / "in_distribution", cifar, ("train", "test"), IN_CLASSES)
    outside = linked_folder(workdir / "held_out", cifar, ("test",), OUT_CLASSES)
    held_out, digits = f"image_folder:{outside}:test", "digits:test"
    results = {}
    for qkv in args.qkv:
        config = f"--config=configs/cifar10.py:recipe=short,source=in_memory,qkv={qkv},seed={args.seed},path={inside}"
        run_dir = workdir / f"{qkv}_seed{args.seed}"
        run(["-m", "qkv_vit.main", config, f"--workdir={run_dir}"])
        run(["-m", "qkv_vit.evaluate", str(run_dir), config, f"--ood={held_out}", f"--ood={digits}"])
        results[qkv] = json.loads((run_dir / "evaluation.json").read_text())
    print("| qkv | top-1 % | ECE | " + " | ".join(f"{s} AUROC / FPR95, held-out" for s in SCORES) + " | "
          + " | ".join(f"{s} AUROC, digits" for s in SCORES) + " |")  # fmt: skip
    print("| --- " * (3 + 2 * len(SCORES)) + "|")
    for qkv, result in results.items():
        print(table_row(qkv, result, held_out, digits))
    harness.emit({"seed": args.seed, "in_classes": IN_CLASSES, "results": results})


if __name__ == "__main__":
    main()
