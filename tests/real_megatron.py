"""Real Megatron on CPU: train, save, load and resume with megatron-core 0.6.0's own code.

The fixture generator (tests/megatron_fixture.py) re-derives Megatron's layout rules; this harness
runs Megatron itself — mcore GPTModel (local layer spec, dropout on), DistributedDataParallel with
small buckets, the DistributedOptimizer (Adam, bf16 params, fp32 main params and grads) and the
pipeline schedules — in `world_size` CPU processes over gloo, so its checkpoints are what
Megatron-LM core_r0.6.0 writes (the non-distributed checkpoint format) and its loads are what
Megatron reads.

    from tests.real_megatron import MegatronSpec, save_real_checkpoint, dump_loaded_state, resume_and_train
    spec = MegatronSpec(tp=2, dp=2, bucket_size=2000)
    saved = save_real_checkpoint(tmp_path / "save", spec, steps=2)   # saved.path, saved.state
    state = dump_loaded_state(tmp_path / "save", spec.with_dp(4))     # loaded with a different dp
    losses, state = resume_and_train(tmp_path / "save", spec, steps=2)

A state is {"tp{t}/pp{p}/chunk{v}/<name>": {"param", "exp_avg", "exp_avg_sq" (fp32), "model" (bf16),
"bucket"}} merged over the dp-rank-0 processes, with names as in `named_parameters()` minus the
`module` wrappers (layer numbers local to the chunk); per-(tp, pp) extras (param_groups,
per_bucket_numel, layer offsets) are under "ranks" keyed (tp, pp). With MoE, expert-parallel parameters
are keyed "tp{t}/pp{p}/ep{e}/chunk{v}/<name>" and their optimizer's extras are under (tp, pp, ep).

Workers are subprocesses (tests/real_megatron_worker.py) in their own sessions, killed with their
session when any of them fails or the job times out. Megatron's missing GPU dependencies (apex,
amp_C, transformer_engine, pkg_resources) are stood in for by tests/megatron_stubs, which only the
workers put on sys.path.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

WORKER = Path(__file__).resolve().parent / "real_megatron_worker.py"
PARAM_MAP_PATCH = Path(__file__).resolve().parent.parent / "patch" / "param_map.patch"
ACTIONS = ("train", "save", "load", "dump")


@dataclass(frozen=True)
class MegatronSpec:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    num_layers: int = 2
    hidden: int = 32
    heads: int = 4
    ffn: int = 64
    vocab: int = 64
    make_vocab_size_divisible_by: int = 16
    seq: int = 16
    micro_batch: int = 2
    num_microbatches: int = 2
    bucket_size: int = 2000
    overlap_grad_reduce: bool = True
    untie_embeddings: bool = False
    # mcore-style options of the local spec (RMSNorm needs Transformer Engine's spec, not stood in for)
    position_embedding: str = "learned_absolute"  # or "rope"
    query_groups: int | None = None  # GQA when set (divides heads and is divisible by tp)
    swiglu: bool = False
    linear_bias: bool = True
    num_experts: int | None = None  # MoE (local spec, SequentialMLP experts) when set
    ep: int = 1                     # expert parallel size; divides dp, as in Megatron
    moe_topk: int = 2
    dropout: float = 0.1
    data: str = "random"            # the synthetic tokens: "random", or "repeated" (second half = first)
    seed: int = 1234
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_iters: int = 2
    decay_iters: int = 20

    def __post_init__(self):
        if self.num_layers % (self.pp * self.vpp):
            raise ValueError(f"num_layers {self.num_layers} not divisible by pp*vpp {self.pp * self.vpp}")
        if self.vpp > 1 and self.pp < 3:
            raise ValueError("vpp > 1 needs pp > 2 (megatron.core 0.6.0 initialize_model_parallel)")
        if self.vpp > 1 and self.num_microbatches % self.pp:
            raise ValueError("the interleaved schedule needs num_microbatches divisible by pp")
        if self.ep > 1 and (self.num_experts is None or self.num_experts % self.ep or self.dp % self.ep):
            raise ValueError("ep > 1 needs num_experts divisible by ep and dp divisible by ep")
        if self.data not in ("random", "repeated"):
            raise ValueError(f"data {self.data!r} is neither 'random' nor 'repeated'")
        if self.query_groups is not None and (self.heads % self.query_groups or self.query_groups % self.tp):
            raise ValueError("query_groups must divide heads and be divisible by tp")
        if self.heads % self.tp or self.ffn % self.tp:
            raise ValueError("heads and ffn must be divisible by tp")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def padded_vocab(self) -> int:
        """Megatron's _vocab_size_with_padding: a multiple of make_vocab_size_divisible_by * tp."""
        multiple = self.make_vocab_size_divisible_by * self.tp
        return -(-self.vocab // multiple) * multiple

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.num_microbatches * self.dp

    def with_dp(self, dp: int) -> "MegatronSpec":
        """The same run at another dp size: the global batch stays, the micro-batches per step change
        (as when a Megatron job is restarted on another number of GPUs)."""
        per_step = self.micro_batch * dp
        if self.global_batch % per_step:
            raise ValueError(f"global batch {self.global_batch} not divisible by micro_batch*dp {per_step}")
        return replace(self, dp=dp, num_microbatches=self.global_batch // per_step)

    def job_fields(self) -> dict:
        return {**asdict(self), "padded_vocab": self.padded_vocab, "global_batch": self.global_batch}


@dataclass
class RunResult:
    losses: list[float]              # per step, from the last pipeline stage's dp rank 0
    grad_norms: list[float]          # per step, the norm the optimizer clipped with (rank 0's)
    dumps: dict[str, dict]           # tag -> merged state (see the module docstring)


@dataclass
class SavedCheckpoint:
    path: Path                       # the iter_XXXXXXX folder
    state: dict                      # the saving processes' dump right after saving
    losses: list[float]              # losses of every step run (before and after the save)
    final_state: dict | None         # dump at the end when steps continued after the save
    grad_norms: list[float] = field(default_factory=list)  # every step's, as losses


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _terminate(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # each worker leads its own session
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


class WorkerFailed(RuntimeError):
    pass


def patched_megatron_core(into: Path) -> Path:
    """A copy of the installed megatron.core with patch/param_map.patch applied (its megatron/core
    hunks; megatron/training is not part of the package), under `into`; returns the folder to put
    first on the workers' path."""
    import megatron.core
    installed = Path(megatron.core.__file__).resolve().parent.parent
    shutil.copytree(installed, into / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "apply", "--include=megatron/core/*", str(PARAM_MAP_PATCH)], cwd=into, check=True,
                   capture_output=True)
    return into


def run_megatron(spec: MegatronSpec, actions: list[tuple[str, object]], *, timeout: float = 240,
                 param_map_dir: Path | None = None) -> RunResult:
    """Run `actions` (("train", n), ("save", root), ("load", root), ("dump", tag)) on spec.world_size
    CPU processes; raise with the failing rank's log if any fails or the deadline passes. With
    param_map_dir the workers run megatron.core patched with patch/param_map.patch, which writes the
    param_map files there while the model is built."""
    unknown = [a for a, _ in actions if a not in ACTIONS]
    if unknown:
        raise ValueError(f"unknown actions {unknown}; known: {ACTIONS}")
    try:
        return _run_once(spec, actions, timeout, param_map_dir)
    except WorkerFailed as e:
        # The free port can be taken by another process before rank 0 binds it; nothing ran yet then.
        if "EADDRINUSE" not in str(e):
            raise
        return _run_once(spec, actions, timeout, param_map_dir)


def _run_once(spec: MegatronSpec, actions: list[tuple[str, object]], timeout: float,
              param_map_dir: Path | None = None) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="real_megatron_") as tmp:
        tmp = Path(tmp)
        job = {"spec": spec.job_fields(), "actions": [(a, str(x) if isinstance(x, Path) else x) for a, x in actions],
               "out_dir": str(tmp), "param_map_dir": str(param_map_dir) if param_map_dir else None}
        torch.save(job, tmp / "job.pt")
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "WORLD_SIZE": str(spec.world_size), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        if param_map_dir:
            patched = patched_megatron_core(tmp / "patched")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(patched), os.environ.get("PYTHONPATH")]))
        procs = []
        try:
            for rank in range(spec.world_size):
                with open(tmp / f"rank{rank}.log", "wb") as log:
                    procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp / "job.pt"), str(rank)],
                                                  stdout=log, stderr=subprocess.STDOUT,
                                                  env={**env, "RANK": str(rank)}, start_new_session=True))
            _wait_all(procs, tmp, time.monotonic() + timeout)
        finally:
            _terminate(procs)
        results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(spec.world_size)]
    return RunResult(losses=_losses(results), grad_norms=results[0]["grad_norms"], dumps=_merge_dumps(results))


def _wait_all(procs: list[subprocess.Popen], tmp: Path, deadline: float) -> None:
    while True:
        codes = [p.poll() for p in procs]
        failed = [r for r, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            raise WorkerFailed(f"Megatron worker rank {failed[0]} exited with {codes[failed[0]]}:\n"
                               + _tail(tmp / f"rank{failed[0]}.log"))
        if all(code == 0 for code in codes):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("Megatron workers timed out; rank 0 log:\n" + _tail(tmp / "rank0.log"))
        time.sleep(0.05)


def _losses(results: list[dict]) -> list[float]:
    """The losses the last pipeline stage logged (the other stages report nan)."""
    for result in reversed(results):
        if result["losses"] and all(x == x for x in result["losses"]):
            return result["losses"]
    return results[0]["losses"]


def _merge_dumps(results: list[dict]) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for result in results:
        for tag, dump in result["dumps"].items():
            into = merged.setdefault(tag, {"params": {}, "ranks": {}})
            for part in ("params", "ranks"):
                overlap = set(into[part]) & set(dump[part])
                assert not overlap, (part, sorted(overlap)[:3])
                into[part].update(dump[part])
    return merged


def save_real_checkpoint(root: Path, spec: MegatronSpec, steps: int, *, steps_after: int = 0,
                         timeout: float = 240, param_map: bool = False) -> SavedCheckpoint:
    """Train `steps` iterations, save to `root` as Megatron does, dump the state; optionally train
    `steps_after` more iterations and dump again. With param_map, Megatron runs with
    patch/param_map.patch applied and records `root/param_map`, as the patched trainer does."""
    actions = [("train", steps), ("save", Path(root)), ("dump", "saved")]
    if steps_after:
        actions += [("train", steps_after), ("dump", "final")]
    run = run_megatron(spec, actions, timeout=timeout, param_map_dir=Path(root) / "param_map" if param_map else None)
    return SavedCheckpoint(path=Path(root) / f"iter_{steps:07d}", state=run.dumps["saved"], losses=run.losses,
                           final_state=run.dumps.get("final"), grad_norms=run.grad_norms)


def dump_loaded_state(root: Path, spec: MegatronSpec, *, timeout: float = 240) -> dict:
    """Load the checkpoint in `root` with Megatron's code (dp may differ from the saving run) and dump."""
    return run_megatron(spec, [("load", Path(root)), ("dump", "loaded")], timeout=timeout).dumps["loaded"]


def resume_and_train(root: Path, spec: MegatronSpec, steps: int, *, timeout: float = 240) -> tuple[list[float], dict]:
    """Load the checkpoint in `root`, train `steps` more iterations; (per-step losses, final state)."""
    run = run_megatron(spec, [("load", Path(root)), ("train", steps), ("dump", "final")], timeout=timeout)
    return run.losses, run.dumps["final"]


STATES = ("param", "exp_avg", "exp_avg_sq", "model")
# the tensor-parallel axis of each mcore (local spec) parameter; the others are replicated
SPLIT_DIM = {"word_embeddings.weight": 0, "output_layer.weight": 0, "linear_qkv.weight": 0, "linear_qkv.bias": 0,
             "linear_fc1.weight": 0, "linear_fc1.bias": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1}


def split_dim(name: str) -> int | None:
    return next((dim for suffix, dim in SPLIT_DIM.items() if name.endswith(suffix)), None)


def global_state(dump: dict, spec: MegatronSpec,
                 states: tuple[str, ...] = STATES) -> dict[str, dict[str, torch.Tensor]]:
    """name with global layer numbers -> state -> the whole tensor, from a dump's per-rank shards:
    tp shards concatenated on their split axis (replicated ones checked equal), layers renumbered by
    stage (Megatron's even split), the tied head copy of the last stage left out (it is the embedding).
    A dump taken before the first step holds only the "model" state."""
    per_stage = spec.num_layers // spec.pp
    shards: dict[str, dict[int, dict]] = {}
    for key, entry in dump["params"].items():
        tp, pp, _chunk, name = re.fullmatch(r"tp(\d+)/pp(\d+)/chunk(\d+)/(.*)", key).groups()
        if name == "output_layer.weight" and not spec.untie_embeddings:
            continue
        name = re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + int(pp) * per_stage}.", name)
        shards.setdefault(name, {})[int(tp)] = entry
    out = {}
    for name, by_tp in shards.items():
        assert sorted(by_tp) == list(range(spec.tp)), name
        dim = split_dim(name)
        out[name] = {}
        for state in states:
            parts = [by_tp[t][state] for t in range(spec.tp)]
            if dim is None:
                assert all(p.view(torch.uint8).equal(parts[0].view(torch.uint8)) for p in parts), (name, state)
                out[name][state] = parts[0]
            elif spec.swiglu and ".linear_fc1." in name:  # each rank is [gate_r; up_r]: global [gates; ups]
                halves = [p.chunk(2, dim) for p in parts]
                out[name][state] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
            else:
                out[name][state] = torch.cat(parts, dim)
    return out


TP_DP = MegatronSpec(tp=2, dp=2, num_layers=2, ffn=66, bucket_size=1500)


PP_VPP = MegatronSpec(pp=3, vpp=2, dp=1, num_layers=6, ffn=66, num_microbatches=3)


def assert_same_state(got: dict, want: dict) -> None:
    """Same parameters, every tensor bitwise equal (dtype, shape and bytes), same optimizer metadata."""
    assert sorted(got["params"]) == sorted(want["params"])
    for key, entry in want["params"].items():
        for state in ("param", "exp_avg", "exp_avg_sq", "model"):
            a, b = got["params"][key][state], entry[state]
            assert a.dtype == b.dtype and a.shape == b.shape, (key, state)
            assert a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8)), (key, state)
    for rank, meta in want["ranks"].items():
        for what in ("param_groups", "scheduler", "iteration", "per_bucket_numel_unpadded", "layer_offset"):
            assert got["ranks"][rank][what] == meta[what], (rank, what)
