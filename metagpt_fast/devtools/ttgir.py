"""Reads Triton's GPU IR (``compiled.asm["ttgir"]``): the layout of every matmul, and whether warps repeat its work.

A distributed layout assigns each element of a tensor to threads and warps by tiling the tensor with a fixed
per-CTA pattern. When that pattern is larger than the tensor along a dimension, it wraps around: several warps hold
(and compute) the same elements. For the result of a matmul this is duplicated tensor-core work.

For NVIDIA MMA layouts (``#ttg.nvidia_mma``) the pattern covers ``warpsPerCTA[i] * instrShape[i]`` elements along
dimension ``i``: each warp of an ``mma.sync`` layout (``versionMajor = 2``, ``instrShape = [16, 8]``) owns 16 x 8
tiles, and a Hopper ``wgmma`` layout (``versionMajor = 3``, ``instrShape = [16, N, 16]``) gives each warp 16 rows of
its warpgroup's 64-row instruction, so ``warpsPerCTA[0] = 8`` (two warpgroups) covers 128 rows. A product of
shape (M, N) is therefore computed ``ceil(warpsPerCTA[0] * instrShape[0] / M) * ceil(warpsPerCTA[1] *
instrShape[1] / N)`` times (factors below 1 count as 1). Example: dK/dV's 64 x 32 score tile under
``warpsPerCTA = [8, 1], instrShape = [16, 16, 16]`` needs 128 rows for one pass: both warpgroups compute all of it.

Products on FMA units (float32 with ``input_precision="ieee"``) have a ``#ttg.blocked`` result; their per-CTA
pattern is ``sizePerThread * threadsPerWarp * warpsPerCTA``, and the same rule gives how many times they repeat.
"""

from __future__ import annotations

import dataclasses
import math
import re

_LAYOUT = re.compile(r"^(#\w+)\s*=\s*#ttg\.(nvidia_mma|blocked)<\{(.*)\}>\s*$")
_FIELD = re.compile(r"(\w+)\s*=\s*\[([0-9,\s]*)\]")
_VERSION = re.compile(r"versionMajor\s*=\s*(\d+)")
# "%s = ttng.warp_group_dot %a, %b, %c {...} : ... -> tensor<64x32xf32, #mma> loc(...)", likewise "tt.dot".
_DOT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s.*->\s*tensor<((?:\d+x)+)\w+,\s*(#\w+)>")


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str  # "#mma1"
    kind: str  # "nvidia_mma" or "blocked"
    version: int  # MMA version: 2 (mma.sync), 3 (wgmma); 0 for blocked
    warps: tuple[int, ...]  # warpsPerCTA
    tile: tuple[int, ...]  # elements one pass of the layout covers per dimension (per CTA)


@dataclasses.dataclass(frozen=True)
class Dot:
    op: str  # "tt.dot" or "ttng.warp_group_dot"
    shape: tuple[int, ...]  # result (M, N)
    layout: Layout

    @property
    def tensor_core(self) -> bool:
        return self.layout.kind == "nvidia_mma"

    @property
    def replication(self) -> int:
        """How many times the warps compute each element of the result (1: no duplicated work)."""
        return math.prod(max(1, math.ceil(t / s)) for t, s in zip(self.layout.tile, self.shape, strict=False))

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape))
        kind = f"mma v{self.layout.version}" if self.tensor_core else "fma"
        return f"{shape} {kind} warpsPerCTA={list(self.layout.warps)} x{self.replication}"


def layouts(text: str) -> dict[str, Layout]:
    """The MMA and blocked layouts a TTGIR module defines, by alias."""
    found = {}
    for line in text.splitlines():
        m = _LAYOUT.match(line.strip())
        if not m:
            continue
        name, kind, body = m.groups()
        fields = {key: tuple(int(v) for v in values.split(",") if v.strip()) for key, values in _FIELD.findall(body)}
        warps = fields.get("warpsPerCTA", ())
        if kind == "nvidia_mma":
            version = int(_VERSION.search(body).group(1))
            instr = fields.get("instrShape", ())
            tile = tuple(w * i for w, i in zip(warps, instr, strict=False))
        else:
            version = 0
            size, threads = fields.get("sizePerThread", ()), fields.get("threadsPerWarp", ())
            tile = tuple(s * t * w for s, t, w in zip(size, threads, warps, strict=True))
        found[name] = Layout(name, kind, version, warps, tile)
    return found


def dots(text: str) -> list[Dot]:
    """Every matmul of a TTGIR module (``tt.dot``, ``ttng.warp_group_dot``) with its result's layout, in text order.
    Results in a layout other than MMA or blocked (none seen) are left out."""
    defined = layouts(text)
    found = []
    for line in text.splitlines():
        m = _DOT.search(line)
        if m and m.group(3) in defined:
            shape = tuple(int(d) for d in m.group(2).rstrip("x").split("x"))
            found.append(Dot(m.group(1), shape, defined[m.group(3)]))
    return found


def replicated(text: str) -> list[Dot]:
    """The matmuls whose warps repeat each other's work (see the module docstring)."""
    return [dot for dot in dots(text) if dot.replication > 1]
