"""Where layers, the embedding, the head and the experts live at a parallel layout, on either side.

Both sides number a pipeline the same way once each (chunk, stage) has its layer count: chunk v of
stage p holds the layers after those of every earlier chunk on every stage and of chunk v on the
earlier stages. They differ in the counts:

- Megatron core_r0.6.0 splits evenly (legacy asserts `L % pp == 0`, mcore silently floors), and with
  virtual pipelines deals `L / (pp·vpp)` layers per chunk round-robin (`v·L/V + p·L/(P·V) + i`, the
  numbering `topology.Topology.global_layer` implements). Forks with uneven stages exist, so a
  Megatron *source* may carry a stage list (without vpp); a Megatron *target* may not.
- MindSpeed-Core-MS takes `num_layer_list` (per stage; with vpp V×P numbers, chunk-major), else its
  `divide_layers` rule: layers over chunks, then each chunk's over stages, a remainder going one each
  to the stages counted from the second-to-last backwards (10 layers on 4 stages: [2, 3, 3, 2]).

The embedding (word and position) is in chunk 0 of stage 0; the final norm, the untied head and, at
pp > 1, the tied head copy in the last chunk of the last stage (pre_process / post_process, the same
on both sides).

    >>> mindspeed_default_counts(10, pp=4, vpp=1)
    ((2, 3, 3, 2),)
    >>> layers = layer_placement(ParallelLayout(MINDSPORE, pp=4), 10, TARGET)
    >>> layers.place(4), layers.global_layer(2, 0, 0)
    ((1, 0, 2), 5)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConvertInputError

MEGATRON = "megatron"
MINDSPORE = "mindspore"
SOURCE = "source"
TARGET = "target"


@dataclass(frozen=True, order=True)
class RankCoord:
    """One rank of a layout as far as files go: (pipeline stage, expert rank, tensor rank); dp and cp
    ranks hold copies."""

    pp: int = 0
    ep: int = 0
    tp: int = 0

    def __str__(self) -> str:
        return f"tp{self.tp} pp{self.pp} ep{self.ep}"


@dataclass(frozen=True)
class ParallelLayout:
    """The model-parallel sizes of one side. `stage_list`: per-stage layer counts (with vpp, V×P numbers,
    chunk-major, as MindSpeed's num_layer_list); empty = the side's default rule."""

    side: str
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    stage_list: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.side not in (MEGATRON, MINDSPORE):
            raise ValueError(f"ParallelLayout side {self.side!r}")

    def flag(self, what: str) -> str:
        """The command-line flag of size `what` ("tp", "pp", "vpp", "ep", "stage-list") on this side."""
        name = "stage-list" if what == "stage-list" else f"{what}-size"
        return f"--ms-{name}" if self.side == MINDSPORE else f"--{name}"

    def ranks(self) -> tuple[RankCoord, ...]:
        return tuple(RankCoord(pp, ep, tp) for pp in range(self.pp) for ep in range(self.ep) for tp in range(self.tp))

    def __str__(self) -> str:
        text = f"{self.side} tp{self.tp} pp{self.pp} vpp{self.vpp} ep{self.ep}"
        return text + (f" stage list {list(self.stage_list)}" if self.stage_list else "")


@dataclass(frozen=True)
class LayerPlacement:
    """counts[chunk][stage]: the number of layers of each (virtual chunk, pipeline stage)."""

    counts: tuple[tuple[int, ...], ...]

    @property
    def num_chunks(self) -> int:
        return len(self.counts)

    @property
    def num_stages(self) -> int:
        return len(self.counts[0])

    def offset(self, stage: int, chunk: int) -> int:
        return sum(map(sum, self.counts[:chunk])) + sum(self.counts[chunk][:stage])

    def global_layer(self, stage: int, chunk: int, local: int) -> int:
        if not 0 <= local < self.counts[chunk][stage]:
            raise ValueError(f"local layer {local} of chunk {chunk} stage {stage} (holds {self.counts[chunk][stage]})")
        return self.offset(stage, chunk) + local

    def place(self, layer: int) -> tuple[int, int, int]:
        """(stage, chunk, local layer) of a global layer."""
        for chunk, row in enumerate(self.counts):
            for stage, count in enumerate(row):
                start = self.offset(stage, chunk)
                if start <= layer < start + count:
                    return stage, chunk, layer - start
        raise ValueError(f"layer {layer} is beyond the {sum(map(sum, self.counts))} layers placed")

    @property
    def first(self) -> tuple[int, int]:
        """(stage, chunk) of the embedding."""
        return 0, 0

    @property
    def last(self) -> tuple[int, int]:
        """(stage, chunk) of the final norm, the untied head and the tied head copy."""
        return self.num_stages - 1, self.num_chunks - 1

    def stage_list(self) -> tuple[int, ...]:
        """The counts as MindSpeed's num_layer_list spells them (chunk-major)."""
        return tuple(n for row in self.counts for n in row)


def mindspeed_default_counts(num_layers: int, pp: int, vpp: int) -> tuple[tuple[int, ...], ...]:
    """MindSpeed-Core-MS's `divide_layers`: over chunks first, then each chunk's layers over stages."""
    return tuple(_divide(chunk_layers, pp) for chunk_layers in _divide(num_layers, vpp))


def _divide(count: int, parts: int) -> tuple[int, ...]:
    out = [count // parts] * parts
    for i in range(count - sum(out)):
        out[-i - 2] += 1  # the second-to-last part first, then backwards
    return tuple(out)


def layer_placement(layout: ParallelLayout, num_layers: int, role: str) -> LayerPlacement:
    """The layer counts of a layout, refusing those its side cannot run (`role` is SOURCE or TARGET:
    a Megatron target must split evenly, a Megatron source may be a fork with a stage list)."""
    if layout.pp * layout.vpp > num_layers:
        raise _layers_error(layout, num_layers, f"{layout.pp} stages x {layout.vpp} chunks need at least as many "
                                                "layers", "fewer stages or chunks")
    if layout.stage_list:
        return _listed_counts(layout, num_layers, role)
    if layout.side == MINDSPORE:
        return LayerPlacement(mindspeed_default_counts(num_layers, layout.pp, layout.vpp))
    if role == TARGET and layout.vpp > 1 and layout.pp <= 2:
        raise ConvertInputError(f"{layout.flag('vpp')} {layout.vpp} with {layout.flag('pp')} {layout.pp}",
                                expected="a pipeline of more than 2 stages (Megatron r0.6.0 interleaving asserts it)",
                                found=f"pp {layout.pp}", fix=f"drop {layout.flag('vpp')} or use more stages")
    if num_layers % (layout.pp * layout.vpp):
        valid = [p for p in range(1, num_layers + 1) if num_layers % (p * layout.vpp) == 0]
        raise _layers_error(layout, num_layers, f"{num_layers} layers split evenly over pp x vpp (Megatron builds "
                                                "equal stages: legacy asserts, mcore drops the remainder)",
                            f"a {layout.flag('pp')} from {valid}")
    per_chunk = num_layers // (layout.pp * layout.vpp)
    return LayerPlacement(((per_chunk,) * layout.pp,) * layout.vpp)


def _listed_counts(layout: ParallelLayout, num_layers: int, role: str) -> LayerPlacement:
    flag = layout.flag("stage-list")
    listed = " ".join(map(str, layout.stage_list))
    if layout.side == MEGATRON and role == TARGET:
        raise ConvertInputError(f"{flag} {listed}: a stage list for a Megatron target",
                                expected="equal stages (Megatron r0.6.0 builds no others)", found=listed,
                                fix=f"drop {flag} and choose a {layout.flag('pp')} that divides the layers")
    if layout.side == MEGATRON and layout.vpp > 1:
        raise ConvertInputError(f"{flag} {listed} with {layout.flag('vpp')} {layout.vpp}",
                                expected="no stage list (vpp layers are dealt round-robin)", found=listed,
                                fix=f"drop {flag} or {layout.flag('vpp')}")
    want = layout.pp * layout.vpp
    if len(layout.stage_list) != want or min(layout.stage_list) < 1 or sum(layout.stage_list) != num_layers:
        raise ConvertInputError(f"{flag} {listed}",
                                expected=f"{want} positive layer counts (pp {layout.pp} x vpp {layout.vpp}, "
                                         f"chunk-major) summing to {num_layers} layers",
                                found=f"{len(layout.stage_list)} counts summing to {sum(layout.stage_list)}",
                                fix=f"give {flag} the target run's num_layer_list, e.g. "
                                    + " ".join(str(n) for row in mindspeed_default_counts(num_layers, layout.pp,
                                                                                          layout.vpp) for n in row))
    rows = tuple(tuple(layout.stage_list[v * layout.pp:(v + 1) * layout.pp]) for v in range(layout.vpp))
    return LayerPlacement(rows)


def _layers_error(layout: ParallelLayout, num_layers: int, expected: str, fix: str) -> ConvertInputError:
    return ConvertInputError(f"{layout.flag('pp')} {layout.pp} {layout.flag('vpp')} {layout.vpp}: "
                             f"{num_layers} layers do not fit", expected=expected,
                             found=f"{num_layers} layers", fix=f"pass {fix}")


# ---------------------------------------------------------------------------------------------
# Experts


def expert_owner(expert: int, num_experts: int, ep: int) -> tuple[int, int]:
    """(expert-parallel rank, local index) of a global expert: ep rank e holds experts
    [e·E/ep, (e+1)·E/ep) (Megatron's moe_layer, MindSpeed alike).

    >>> expert_owner(5, 8, 2)
    (1, 1)
    """
    return divmod(expert, num_experts // ep)
