"""Facts read from a compiled TPU program's text (Compiled.as_text()): its collectives with their bytes, the
compiler's per-kernel cycle estimates, and the custom calls that spoil XLA's cost estimate."""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
DTYPE_BYTES.update({"f64": 8, "s64": 8, "u64": 8})
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>\S+) = (?P<type>.*?) (?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\((?P<rest>.*)$",
    re.M,
)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
# libtpu's cost analysis counts each of these custom calls as -1 second in optimal_seconds (found by counting
# them: the train step's estimate is minus their number plus a plausible remainder; the eval step has none).
NEGATIVE_COST_CALL = 'custom_call_target="ConcatBitcast"'


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # all-reduce, all-gather, ...
    dtypes: tuple[str, ...]  # of its arrays, in order of first appearance
    arrays: int  # how many arrays it moves at once (XLA combines many into one)
    bytes: int  # of its result on one device
    group_size: int  # devices in each of its replica groups


def collectives(text: str, device_count: int) -> list[Collective]:
    """Every collective of the program, in program order (the async -start of a pair counted once)."""
    found = []
    for match in _INSTRUCTION.finditer(text):
        arrays = _ARRAY.findall(match["type"])
        if match["type"].startswith("((") and "-start" in match.group(0):  # (operands, results) of an async start
            arrays = arrays[len(arrays) // 2 :]
        dtypes = tuple(dict.fromkeys(dtype for dtype, _ in arrays))
        size = sum(
            DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in arrays
        )
        found.append(Collective(match["op"], dtypes, len(arrays), size, group_size(match["rest"], device_count)))
    return found


def grouped(found: list[Collective]) -> list[str]:
    """One line per kind of collective (operation, dtypes, group size), with how many there are and their bytes,
    largest first: "1 all-reduce (bf16) over groups of 4 chips: 174 arrays, 5.77 MiB per chip in all"."""
    kinds: dict[tuple, list[Collective]] = {}
    for collective in found:
        kinds.setdefault((collective.op, collective.dtypes, collective.group_size), []).append(collective)
    lines = []
    for (op, dtypes, size), members in sorted(kinds.items(), key=lambda item: -sum(c.bytes for c in item[1])):
        total, arrays = sum(c.bytes for c in members), sum(c.arrays for c in members)
        lines.append(
            f"{len(members)} {op} ({'/'.join(dtypes)}) over groups of {size} chips: {arrays} arrays, "
            f"{total / 2**20:.2f} MiB per chip in all"
        )
    return lines


def group_size(attributes: str, device_count: int) -> int:
    """The size of the replica groups, in any of XLA's forms: replica_groups={{0,1},{2,3}}, the iota form
    replica_groups=[2,2]<=[4], or the mesh form replica_groups=mesh['axis_0'=16,'axis_1'=16] {'axis_1'}."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if mesh:
        sizes = {name: int(size) for name, size in re.findall(r"'(\w+)'=(\d+)", mesh[1])}
        return math.prod(sizes[name] for name in re.findall(r"'(\w+)'", mesh[2]))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", attributes)
    if iota:
        return int(iota[2])
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
    if listed and listed[1]:
        return len(listed[1].split(","))
    return device_count  # replica_groups={}: all devices


def summed_cycles(text: str) -> int:
    """The compiler's estimated cycles summed over every kernel it annotated (each counted once, loops too)."""
    return sum(int(cycles) for cycles in _CYCLES.findall(text))


def negative_cost_calls(text: str) -> int:
    return text.count(NEGATIVE_COST_CALL)
