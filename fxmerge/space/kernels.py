"""The kernel search: what each block's kept convs merge into, and which blocks are legal.

A `MergeState` is what a block's kept convs merge into so far; keeping one more conv widens
it (docs/method.md §4). A block's kernel options are the states reachable keeping its
irreducible convs and any of the others, within the space's `max_kernel_bytes`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import PlanError
from ..sides import compact, per_axis
from .records import IDENTITY, Conv, Entry, KernelOption, MergedConv, SpaceView


class MergeState(NamedTuple):
    """What a block's kept convs merge into so far; per-axis fields are empty until a conv
    is kept."""

    extent: tuple[int, ...] = ()  # the merged kernel's span per axis, in input pixels
    stride: tuple[int, ...] = ()  # the kept convs' strides multiplied, per axis
    depthwise: bool = True  # every kept conv is depthwise
    kept: bool = False  # some conv is kept
    step: tuple[int, ...] = ()  # the taps' spacing per axis: gcd of the kept's
    # `dilation * stride` (0: no tap yet)
    groups: int = 0  # gcd of the kept convs' groups (0: none yet; gcd(0, n) = n)
    over: bool = False  # merging it materialises more than `max_kernel_bytes`

    def keep(self, c: Conv) -> MergeState:
        """Also keep conv `c`: on each axis its kernel, taps `dilation * stride` apart,
        widens the field; strides multiply; the taps lie on the gcd of the steps (an axis
        of one tap has none); groups are the gcd of theirs; depthwise only if every conv
        is. Whether it goes over the bound is `extend`'s to say."""
        rank = c.rank
        extent, stride = self.extent or (1,) * rank, self.stride or (1,) * rank
        kernel, dilation = per_axis(c.kernel, rank), per_axis(c.dilation, rank)
        tap = [d * s if k > 1 else 0 for k, d, s in zip(kernel, dilation, stride)]
        return self._replace(
            extent=tuple(e + (k - 1) * t for e, k, t in zip(extent, kernel, tap)),
            stride=tuple(s * t for s, t in zip(stride, per_axis(c.stride, rank))),
            depthwise=self.depthwise and c.depthwise, kept=True,
            step=tuple(math.gcd(s, t) for s, t in zip(self.step or (0,) * rank, tap)),
            groups=math.gcd(self.groups, c.groups))

    @property
    def taps(self) -> tuple[int, ...]:
        """Taps per axis of the merged kernel."""
        return tuple((e - 1) // s + 1 if s else 1 for e, s in zip(self.extent, self.step))

    @property
    def option(self) -> KernelOption:
        return KernelOption(compact(self.extent), self.depthwise)


EMPTY = MergeState()


def composition_bytes(space: SpaceView, i: int, state: MergeState, c: Conv,
                      new: MergeState) -> int:
    """The most a merge of block `(i, ...)` materialises when it composes conv `c` onto the
    convs merged into `state`, giving `new` (0 when `c` comes first): the new kernel, or the
    merged one re-grouped to the new groups, whichever has more outputs."""
    if not state.kept:
        return 0
    in_per_group = space.convs[i].in_channels // new.groups
    return max(c.in_channels, c.out_channels) * in_per_group * math.prod(new.taps) * 8


def extend(space: SpaceView, i: int, state: MergeState, c: Conv) -> MergeState:
    """`state.keep(c)`, marked `over` once block `(i, ...)`'s merge exceeds the bound."""
    new = state.keep(c)
    over = state.over or composition_bytes(space, i, state, c, new) > space.max_kernel_bytes
    return new._replace(over=over)


def kernel_of(space: SpaceView, kept: Iterable[int]) -> KernelOption:
    """Merged (kernel, depthwise) of the convs with these indices, in order."""
    state = EMPTY
    for idx in sorted(kept):
        state = state.keep(space.convs[idx - 1])
    return state.option


def merge_peak_bytes(space: SpaceView, i: int, kept: Iterable[int]) -> int:
    """The most merging these convs (indices) of a block starting at `i` materialises."""
    state, peak = EMPTY, 0
    for idx in sorted(kept):
        c = space.convs[idx - 1]
        new = state.keep(c)
        peak = max(peak, composition_bytes(space, i, state, c, new))
        state = new
    return peak


def reachable_states(space: SpaceView, i: int, j: int) -> set[MergeState]:
    """Every state reachable keeping block `(i, j)`'s irreducible convs and any others."""
    states = {EMPTY}
    for c in space.convs[i:j]:
        kept = {extend(space, i, state, c) for state in states}
        states = kept if c.irreducible else kept | states
    return states


def merged_conv(space: SpaceView, i: int, j: int, state: MergeState) -> MergedConv:
    """The native conv block `(i, j)` becomes from `state`: its taps, their dilation, its
    groups (1 where it fuses a projection shortcut) and kernel bytes."""
    groups = state.groups
    if any(i <= s.source and s.target <= j and s.projection for s in space.skips):
        groups = 1
    in_channels, out_channels = space.convs[i].in_channels, space.convs[j - 1].out_channels
    return MergedConv(compact(state.taps), compact([s or 1 for s in state.step]), groups,
                      out_channels * (in_channels // groups) * math.prod(state.taps) * 8)


@dataclass(frozen=True)
class Blocks:
    """The legal blocks of a space and their kernel options."""

    options: Mapping[tuple[int, int], tuple[KernelOption, ...]]
    merged: Mapping[Entry, MergedConv]  # each entry's merged conv (the largest way to it)
    over_bound: int  # kernel options left out for their size
    oversized: frozenset[tuple[int, int]]  # blocks the bound left without any option


def _option_order(option: KernelOption) -> tuple:
    """Kernel options in a fixed order (a kernel is an int or one per axis)."""
    k = option.kernel
    return (k,) if isinstance(k, int) else tuple(k), option.depthwise


def _crosses_segment(space: SpaceView, i: int, j: int) -> bool:
    return any((i < s.source < j < s.target) or (s.source < i < s.target < j)
               for s in space.skips)


def enumerate_blocks(space: SpaceView) -> Blocks:
    """Every legal block `(i, j)`: no break inside, no residual segment crossed; its
    options are the kernels its reachable states give within the bound."""
    options: dict[tuple[int, int], tuple[KernelOption, ...]] = {}
    every: dict[Entry, MergedConv] = {}
    over_bound, oversized = 0, set()
    L = len(space.convs)
    for i in range(L):
        for j in range(i + 1, L + 1):
            if j - 1 > i and (j - 1) in space.breaks:
                break
            if _crosses_segment(space, i, j):
                continue
            merged: dict[KernelOption, MergedConv] = {}
            over: set[KernelOption] = set()
            for state in reachable_states(space, i, j):
                if not state.kept:
                    continue
                if state.over:  # its merge would materialise too much
                    over.add(state.option)
                    continue
                conv = merged_conv(space, i, j, state)
                if state.option not in merged or conv.bytes > merged[state.option].bytes:
                    merged[state.option] = conv
            over_bound += len(over - set(merged))
            every.update({Entry(i, j, *o): conv for o, conv in merged.items()})
            if merged:
                options[(i, j)] = tuple(sorted(merged, key=_option_order))
            elif over:
                oversized.add((i, j))
    for p in _removable_alone(space, options):
        options[(p - 1, p)] = (IDENTITY, *options[(p - 1, p)])
    return Blocks(options, every, over_bound, frozenset(oversized))


def _removable_alone(space: SpaceView, options: Mapping[tuple[int, int], object]
                     ) -> list[int]:
    """Reducible convs that only a block of their own can hold, outside every residual
    segment (the 3x3 conv after an upsample): removing them is an entry of its own, since
    no neighbouring block can absorb the identity."""
    return [c.index for c in space.convs
            if not c.irreducible
            and [b for b in options if b[0] < c.index <= b[1]] == [(c.index - 1, c.index)]
            and not any(s.source < c.index <= s.target for s in space.skips)]


# ---- eq. 3: which convs a block keeps for each kernel it can give ----------------------
Chosen = dict[KernelOption, tuple[float, tuple[str, ...]]]  # option -> (score, kept convs)


def best_subsets(space: SpaceView, i: int, scores: Mapping[str, float] | None = None
                 ) -> Iterator[Chosen]:
    """Eq. 3 for the blocks starting at `i`, by their end `j = i + 1, i + 2, ...`: for each
    kernel option the block can give, its highest-scoring kept-conv subset that contains
    every irreducible conv and merges within `max_kernel_bytes` (`space.conv_scores`
    unless given). One pass: a block's subsets extend the shorter block's."""
    scores = space.conv_scores if scores is None else scores
    best: dict[MergeState, tuple[float, tuple[str, ...]]] = {MergeState(): (0.0, ())}
    for c in space.convs[i:]:
        nxt: dict[MergeState, tuple[float, tuple[str, ...]]] = {}
        for state, (score, kept) in best.items():
            options = [(extend(space, i, state, c), (score + scores[c.name], kept + (c.name,)))]
            if not c.irreducible:
                options.append((state, (score, kept)))
            for key, value in options:
                if not key.over and (key not in nxt or value[0] > nxt[key][0]):
                    nxt[key] = value
        best = nxt
        chosen: Chosen = {}
        for state, value in best.items():
            if state.kept and (state.option not in chosen or value > chosen[state.option]):
                chosen[state.option] = value
        yield chosen


def choose_convs(space: SpaceView, i: int, j: int, k: int, dw: bool,
                 scores: Mapping[str, float] | None = None) -> tuple[str, ...]:
    """Eq. 3 for entry `(i, j, k, dw)` (`best_subsets`): the kept convs; () for identity."""
    if (k, dw) == IDENTITY:
        return ()
    chosen = next(itertools.islice(best_subsets(space, i, scores), j - i - 1, None), {})
    if (k, dw) not in chosen:
        raise PlanError(f"no kept-conv subset of block ({i}, {j}) gives kernel {k}, dw={dw}")
    return chosen[KernelOption(k, dw)][1]
