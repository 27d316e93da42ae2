"""Planning a run on a TPU slice before renting it: `python -m qkv_vit.plan` (__main__.py) compiles the trainer's own
program for a topology (planning.py), reads the compiler's figures (hlo.py) against the chip's (chips.py) and
reports them (report.py)."""

from qkv_vit.plan.planning import Plan, StepCost, plan

__all__ = ["Plan", "StepCost", "plan"]
