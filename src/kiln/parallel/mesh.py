"""Process group and DeviceMesh from `parallel.*`: pp x dp_replicate x dp_shard x tp.

Under torchrun (WORLD_SIZE > 1) the layout's product must equal the world size; that is checked
from the environment before any process-group call, so a bad layout fails at once with one line
instead of hanging. NCCL on CUDA, gloo on CPU, chosen automatically. The mesh always has the four
named dims (size 1 where unused), plus "dp" (replicate x shard flattened) for data-parallel
collectives, so every consumer indexes it the same way.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from kiln.config import ModelConfig, ParallelConfig
from kiln.device import pick_device
from kiln.errors import ConfigError
from kiln.parallel.pipeline import stages_per_rank

DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class Layout:
    """This process's place in the run. A single-process run has world_size 1 and no mesh."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh with DIMS, or None
    dp_mesh: Any = None  # dp_replicate x dp_shard flattened into one dim, "dp" (kept: torch no longer slices it out)
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def _sub(self, dim: str) -> Any:
        return self.dp_mesh if dim == "dp" else self.mesh[dim]

    def coord(self, dim: str) -> int:
        return 0 if self.mesh is None else self._sub(dim).get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self.coord("dp")

    @property
    def pp_rank(self) -> int:
        return self.coord("pp")

    @property
    def tp_rank(self) -> int:
        return self.coord("tp")

    def group(self, dim: str) -> Any:
        return None if self.mesh is None else self._sub(dim).get_group()

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in DIMS if getattr(self, k) > 1]
        return f"{self.world_size} processes ({' x '.join(parts) or 'replicated'})" if self.distributed else "1 process"


def env_world() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from torchrun's environment, (1, 0, 0) without it."""
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


def check_layout(p: ParallelConfig, m: ModelConfig, world_size: int, *, where: str = "parallel") -> None:
    """Static checks of parallel.* against the model and the world size (no process group needed): the config's
    own first, so a layout that could run on no number of processes says so before the count is asked for."""
    check_model_split(p, m, where=where)
    product = p.pp * p.dp_replicate * p.dp_shard * p.tp
    if product != world_size:
        raise ConfigError(
            f"{where}: parallel.pp x dp_replicate x dp_shard x tp = {p.pp} x {p.dp_replicate} x {p.dp_shard} x "
            f"{p.tp} = {product}, but {world_size} process{'es' if world_size > 1 else ''} "
            f"{'were' if world_size > 1 else 'was'} started; make the product equal the number of processes "
            "(torchrun --nproc_per_node)")


def check_model_split(p: ParallelConfig, m: ModelConfig, *, where: str = "parallel") -> None:
    """The checks of parallel.* that need only the config: tensor parallelism divides the heads and the
    FFN, and the pipeline has a layer and a microbatch for every stage (`kiln estimate` and `kiln doctor` run
    them too)."""
    if p.tp > 1:
        for key, n in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.n_kv_heads),
                       ("model.ffn_dim", m.ffn_dim)):
            if n % p.tp:
                raise ConfigError(f"{where}: parallel.tp={p.tp} must divide {key}={n}; pick a parallel.tp that "
                                  "divides it")
    if p.pp > 1:
        n_stages = p.pp * stages_per_rank(p.pp_schedule)
        if n_stages > m.n_layers:
            raise ConfigError(f"{where}: parallel.pp={p.pp} with {p.pp_schedule} needs {n_stages} pipeline stages "
                              f"but the model has only model.n_layers={m.n_layers}; lower parallel.pp")
        # torch's 1F1B and DualPipeV refuse it on every rank, mid-setup (GPipe and the looped ones run it)
        if p.pp_schedule in ("1F1B", "DualPipeV") and 0 < p.pp_microbatches < n_stages:
            per = "one stage per rank" if n_stages == p.pp else f"{n_stages // p.pp} stages per rank"
            raise ConfigError(f"{where}: parallel.pp_microbatches={p.pp_microbatches} is fewer than the pipeline's "
                              f"{n_stages} stages (parallel.pp={p.pp}, {per} with {p.pp_schedule}); a pipeline step "
                              f"needs a microbatch for every stage: set --parallel.pp_microbatches {n_stages} or more, "
                              "or 0 (one per stage)")


def end_with_launcher() -> None:
    """torchrun starts each worker in a session of its own, so a `kill -9` of the launcher (or of its process
    group) does not reach them: they trained on, holding the run folder. Ask Linux to send this worker SIGTERM
    when its parent, the launcher, is gone: the run saves at the end of the step and exits, and the same command
    resumes it. Elsewhere (no prctl) nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        import ctypes

        pr_set_pdeathsig = 1
        if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher went before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def init_layout(p: ParallelConfig, model: ModelConfig, device_choice: str = "auto") -> Layout:
    """Initialise torch.distributed (when launched by torchrun) and build the mesh for `parallel.*`
    (`model` is checked against it: tensor-parallel divisibility, enough layers for the stages)."""
    world_size, rank, local_rank = env_world()
    check_layout(p, model, world_size)
    use_cuda = pick_device(device_choice).type == "cuda"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    layout = Layout(world_size=world_size, rank=rank, local_rank=local_rank, device=device, pp=p.pp,
                    dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
    if world_size == 1:
        return layout
    end_with_launcher()
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=int(os.environ.get("KILN_DIST_TIMEOUT_MIN",
                                                                                          "30")))}
        if use_cuda:
            kwargs["device_id"] = device
        dist.init_process_group(backend, **kwargs)
    mesh = init_device_mesh(device.type, (p.pp, p.dp_replicate, p.dp_shard, p.tp), mesh_dim_names=DIMS)
    layout.mesh, layout.dp_mesh = mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return layout


def shutdown(layout: Layout) -> None:
    if layout.distributed and dist.is_initialized():
        dist.destroy_process_group()
