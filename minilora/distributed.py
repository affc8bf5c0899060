"""Beyond one GPU: minilora under torch.distributed, DDP and FSDP2 (`fully_shard`).

Data parallelism runs one copy of the training step per process (rank) on its own slice of the batch and
averages the gradients, so N ranks take the step one process would take on the whole batch:

    g = (1/N) Σ_k g_k,         g_k = ∇ mean-loss on rank k's batch slice (equal slices)

Two ways to lay out the model across ranks (PyTorch's own, not a new framework):

* DDP (`DistributedDataParallel`): every rank holds the whole model; after backward the gradients are
  all-reduced. DDP registers only parameters with `requires_grad=True`, so under LoRA only the adapters'
  gradients travel: 2·r·(in + out) numbers per adapted layer instead of in·out.
* FSDP2 (`torch.distributed.fsdp.fully_shard`): every parameter is cut into N pieces along dim 0, and a
  rank keeps one piece. A wrapped block all-gathers its pieces just before its forward (and again before
  its backward) and frees the whole copy after; trainable gradients are reduce-scattered, so each rank
  keeps the gradient of its own piece only. Persistent bytes per rank: about 1/N of the model.

QLoRA under FSDP2 meets one obstacle. `minilora.qlora.LinearNF4` keeps its 4-bit weight as *buffers*
(packed codes, block scales), and FSDP2 shards parameters only: each rank would hold the whole 4-bit base,
the saving that lets a 70B model fit would be gone. The known ways round it store the bytes in a float
dtype (bitsandbytes' `quant_storage`), which must then match the model's dtype exactly, and whose copies
can rewrite NaN bit patterns of the packed words on CUDA. Here every part of the 4-bit weight becomes a
frozen **uint8** parameter instead (the float32 block scales too, as their 4 bytes each):

* FSDP2 shards and all-gathers them like any parameter: its flat all-gather buffer is uint8 whenever the
  tensors in it differ in dtype (or are all uint8), so the bytes are copied as bytes, never read as floats;
* its mixed-precision policy casts floating parameters only, so nothing converts the codes or the scales;
* the `NF4Tensor` is rebuilt from the layer's own tensors at each forward: no quantization state lives
  outside the module to be lost when FSDP2 replaces a parameter.

`ShardableLinearNF4` is that layer: `LinearNF4`'s math, its storage as byte parameters. `shard_model`
converts a model's LinearNF4 layers and applies `fully_shard` to each block and to the root. The chapter's
own `LinearNF4` stays as it was; this file plugs in from outside.

Adapter files: `save_adapter` gathers the adapters' pieces on every rank, rank 0 writes them with
`minilora.io.save_adapter` (atomic: temporary files, then renames) while the others wait for its verdict;
the file is byte for byte what one process writes. `load_adapter` reads the file on every rank and keeps
each rank's piece.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from minilora import io as adapter_io
from minilora.double_quant import DoubleQuantAbsmax
from minilora.inject import lora_layers
from minilora.lora import LoRALinear
from minilora.nf4 import NF4Tensor
from minilora.qlora import LinearNF4

__all__ = [
    "ShardableLinearNF4",
    "make_shardable",
    "shard_model",
    "wrap_ddp",
    "unwrap",
    "rank_and_world",
    "gathered_adapters",
    "save_adapter",
    "load_adapter",
    "held_bytes",
    "CommCounter",
]

# LinearNF4's storage, in the order an NF4Tensor is built from it, and the dtype each part has there
_STORAGE = {"weight_packed": torch.uint8, "weight_absmax": torch.float32, "weight_absmax_codes": torch.uint8,
            "weight_absmax_scales": torch.float32, "weight_absmax_offset": torch.float32}
_ADAPTER_DICTS = ("lora_A", "lora_B", "lora_magnitude_vector")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (whose parameter names all start with "module."), else the model."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _local(t: Tensor) -> Tensor:
    """A DTensor's local piece (what this rank stores); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


# ---------------------------------------------------------------------------------------------------------
# The 4-bit weight as byte parameters


class ShardableLinearNF4(LinearNF4):
    """`LinearNF4` whose 4-bit weight is held as frozen uint8 Parameters, which FSDP2 shards.

    Same forward, same numbers. Parts (n = in·out weights, B = ceil(n / blocksize) blocks):
    weight_packed (ceil(n/2),) codes; double quant: weight_absmax_codes (B,), weight_absmax_scales
    (4·ceil(B/256),) = the float32 scales' bytes, weight_absmax_offset (4,) = one float32's bytes;
    otherwise weight_absmax (4·B,). Made from a LinearNF4 by `make_shardable` (in place).
    """

    @property
    def quantized(self) -> NF4Tensor:
        """The weight as an NF4Tensor of this layer's tensors, built at each call.

        Not cached: FSDP2 swaps these parameters for gathered copies before each forward and back after.
        The float32 parts are reinterpreted from their bytes (a view, no copy and no rounding).
        """
        def part(name: str) -> Tensor:
            t = getattr(self, name)
            return t if _STORAGE[name] == torch.uint8 else t.view(torch.float32)

        if self.double_quant:
            absmax: Tensor | DoubleQuantAbsmax = DoubleQuantAbsmax(
                codes=part("weight_absmax_codes"), scales=part("weight_absmax_scales"),
                offset=part("weight_absmax_offset").reshape(()))
        else:
            absmax = part("weight_absmax")
        return NF4Tensor(packed=part("weight_packed"), absmax=absmax,
                         shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype,
                         blocksize=self.blocksize)

    @torch.no_grad()
    def load_quantized(self, q: NF4Tensor) -> None:
        """As `LinearNF4.load_quantized` (same checks, same messages), each part copied as its bytes."""
        plain = LinearNF4(self.in_features, self.out_features, bias=False, blocksize=self.blocksize,
                          double_quant=self.double_quant, device=self.weight_packed.device)
        plain.load_quantized(q)
        for name, buffer in plain.named_buffers():
            getattr(self, name).copy_(buffer.reshape(-1).view(torch.uint8))
        self.weight_dtype = plain.weight_dtype

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # uint8 parameters follow .to(device) and ignore .to(dtype) already (Module casts floating tensors
        # only); nothing else to protect
        return nn.Module._apply(self, fn, recurse)


def make_shardable(model: nn.Module) -> nn.Module:
    """Turn every `LinearNF4` in `model` into a `ShardableLinearNF4`, in place; returns the model.

    Each storage buffer becomes a frozen uint8 Parameter of the same bytes (float32 parts viewed as their
    bytes). Idempotent; a model without LinearNF4 layers is returned unchanged.
    """
    for module in model.modules():
        if type(module) is not LinearNF4:
            continue
        for name, dtype in _STORAGE.items():
            buffer = module._buffers.pop(name, None)
            if buffer is None:
                continue
            if buffer.dtype != dtype:
                raise TypeError(f"{name} is {buffer.dtype}, LinearNF4 stores it as {dtype}")
            stored = buffer.reshape(-1).contiguous().view(torch.uint8)  # 0-dim offset -> 4 bytes
            module.register_parameter(name, nn.Parameter(stored, requires_grad=False))
        module.__dict__.pop("_quantized", None)
        module.__class__ = ShardableLinearNF4
    return model


# ---------------------------------------------------------------------------------------------------------
# Wrapping a model: FSDP2 and DDP


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the entries of every nn.ModuleList (a Llama's decoder layers)."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def shard_model(model: nn.Module, mesh: Any = None, *, blocks: Iterable[nn.Module] | None = None,
                **fully_shard_kwargs: Any) -> nn.Module:
    """FSDP2 over `model`: `fully_shard` each block, then the root; LinearNF4 layers sharded as bytes.

    blocks: the modules that gather and free their parameters together (default: the entries of every
    nn.ModuleList, i.e. a transformer's layers). One block is whole on a rank at a time, so the peak is
    about (model / N) + one block. `mesh`: a 1-D DeviceMesh (default: all ranks). Other keywords go to
    `fully_shard` (`mp_policy`, `reshard_after_forward`, ...). Inject the adapters before sharding:
    FSDP2 fixes the parameters it manages when it is applied.
    """
    from torch.distributed.fsdp import fully_shard

    if not any(isinstance(m, LoRALinear) for m in model.modules()) and not any(
            p.requires_grad for p in model.parameters()):
        raise ValueError("the model has nothing to train: inject adapters (or unfreeze it) before sharding")
    make_shardable(model)
    for block in list(_blocks(model) if blocks is None else blocks):
        fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def wrap_ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """DDP over `model` as minilora wants it: only trainable parameters are all-reduced (DDP's rule), and
    buffers are not broadcast at every forward (`forward_sync_buffers=False`): LinearNF4's 4-bit weight is
    buffers, constant during training, and broadcasting it would send the whole base model each step.
    All ranks start from rank 0's parameters and buffers (DDP broadcasts them once, when it is built)."""
    ddp_kwargs.setdefault("forward_sync_buffers", False)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


# ---------------------------------------------------------------------------------------------------------
# Adapter files from a sharded model


def _adapter_slots(model: nn.Module) -> list[tuple[nn.ParameterDict, str]]:
    """(dict, key) of every adapter parameter, in a fixed order (the same on every rank)."""
    return [(getattr(layer, kind), key) for _, layer in lora_layers(model)
            for kind in _ADAPTER_DICTS for key in getattr(layer, kind)]


def _piece(full: Tensor, like: Tensor) -> Tensor:
    """This rank's piece of `full` under `like`'s placement (FSDP2: dim 0 in torch.chunk pieces)."""
    from torch.distributed.tensor import distribute_tensor

    # distribute_tensor with src_data_rank=None cuts locally, no communication: every rank holds `full`
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


@contextlib.contextmanager
def gathered_adapters(model: nn.Module, write_back: bool = False) -> Iterator[nn.Module]:
    """Inside the block the adapter parameters of `model` are whole on every rank; yields the bare model.

    Sharded (DTensor) parameters are all-gathered (a collective: every rank must enter) and put in their
    place; on leaving, the sharded ones come back. With `write_back`, each rank first copies its piece of
    the whole tensors into its shard (how a loaded adapter reaches the shards); not if the block raised.
    Plain parameters (DDP, one process) are left alone: they are whole already.
    """
    model = unwrap(model)
    swapped: list[tuple[nn.ParameterDict, str, nn.Parameter, nn.Parameter]] = []
    try:
        for params, key in _adapter_slots(model):
            sharded = params[key]
            if hasattr(sharded, "full_tensor"):
                whole = nn.Parameter(sharded.full_tensor().detach().clone(), requires_grad=sharded.requires_grad)
                params[key] = whole
                swapped.append((params, key, sharded, whole))
        yield model
        if write_back:
            with torch.no_grad():
                for _, _, sharded, whole in swapped:
                    _local(sharded).copy_(_piece(whole.detach(), sharded))
    finally:
        for params, key, sharded, _ in swapped:
            params[key] = sharded


def _agree(ok: bool) -> bool:
    """True on every rank iff `ok` on every rank (an all-reduce of one number; no-op in one process)."""
    if rank_and_world()[1] == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", **kwargs: Any) -> Path:
    """`minilora.io.save_adapter` from a DDP or FSDP2 model: the same file one process writes. Collective.

    1. every rank checks what it can alone (the adapter exists) and all agree before any collective;
    2. the adapters' pieces are all-gathered (`gathered_adapters`);
    3. rank 0 writes atomically (temporary files, then renames: a failure leaves the previous pair);
    4. rank 0 broadcasts whether it succeeded, so the others wait for the file and fail with it.
    If any step fails on any rank, no rank returns normally and `path` keeps what it held before.
    """
    rank, _ = rank_and_world()
    bare = unwrap(model)
    try:
        adapter_io._adapter_layers(bare, adapter_name)  # the same check, with the same message, on each rank
        error: BaseException | None = None
    except ValueError as err:
        error = err
    if not _agree(error is None):
        raise error or RuntimeError("another rank could not save the adapter; nothing was written")
    written: Path | None = None
    with gathered_adapters(bare) as whole:
        if rank == 0:
            try:
                written = adapter_io.save_adapter(whole, path, adapter_name, **kwargs)
            except BaseException as err:  # noqa: BLE001 - reported to every rank, then raised here
                error = err
        ok = torch.tensor([1 if error is None else 0], dtype=torch.int32)
        if rank_and_world()[1] > 1:
            dist.broadcast(ok, src=0)  # the others wait here until rank 0 has written (or failed)
    if error is not None:
        raise error
    if not bool(ok.item()):
        raise RuntimeError(f"rank 0 failed to write the adapter to {path}; the previous files there are intact")
    return written or Path(path)


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> dict[str, Any]:
    """`minilora.io.load_adapter` into a DDP or FSDP2 model: every rank reads the file and keeps its piece.

    The adapter must already be in the model (inject before sharding, with the same settings): FSDP2
    cannot take new parameters after `fully_shard`. Every check of `io.load_adapter` runs on every rank,
    and the ranks agree before any keeps what it read: if one fails (a file it cannot see), none changes.
    Collective (the current adapters are gathered first).
    """
    bare = unwrap(model)
    if not any(adapter_name in layer.lora_A for _, layer in lora_layers(bare)):
        raise ValueError(f"the model has no adapter {adapter_name!r}: inject it (same r, alpha) before sharding, "
                         "then load into it")
    with gathered_adapters(bare, write_back=True) as whole:
        try:
            config, error = adapter_io.load_adapter(whole, path, adapter_name), None
        except (ValueError, OSError) as err:  # io validates before it copies: nothing changed on this rank
            config, error = None, err
        if not _agree(error is None):  # all ranks load, or none keeps what it read
            raise error or RuntimeError(f"another rank could not load the adapter from {path}; nothing changed")
    return config


# ---------------------------------------------------------------------------------------------------------
# Measuring: what a rank holds, what it sends


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of tensors this rank stores now, by kind (its own pieces only, for sharded ones).

    base_4bit: the 4-bit weights' codes and scales; base: other frozen parameters and buffers; adapters:
    trainable parameters; grads; optimizer: its state (Adam's moments and step counters); total.
    """
    bare = unwrap(model)
    storage = {id(t) for m in bare.modules() if isinstance(m, LinearNF4)
               for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
               if name in _STORAGE}
    out = dict.fromkeys(("base_4bit", "base", "adapters", "grads", "optimizer"), 0)
    for t in list(bare.parameters()) + list(bare.buffers()):
        nbytes = _local(t).nbytes
        kind = "base_4bit" if id(t) in storage else "adapters" if t.requires_grad else "base"
        out[kind] += nbytes
        if isinstance(t, nn.Parameter) and t.grad is not None:
            out["grads"] += _local(t.grad).nbytes
    if optimizer is not None:
        out["optimizer"] = sum(_local(s).nbytes for state in optimizer.state.values()
                               for s in state.values() if isinstance(s, Tensor))
    out["total"] = sum(out.values())
    return out


@dataclass
class CommCounter:
    """Counts the bytes this rank hands to collectives, by kind.

    DDP: `attach(ddp_model)` installs a communication hook that counts each gradient bucket and then
    all-reduces it as DDP does by default (sum, then divide by N). FSDP2: `with counter.watch():` counts
    the all-gathers and reduce-scatters it issues (`torch.distributed.all_gather_single` /
    `reduce_scatter_single`, input bytes per rank). `bytes` maps a kind to a total, `dtypes` to the dtypes
    it carried; `reset()` zeroes both.
    """

    bytes: dict[str, int] = field(default_factory=dict)
    dtypes: dict[str, set[torch.dtype]] = field(default_factory=dict)  # the dtypes each kind carried

    def add(self, kind: str, tensor: Tensor) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + tensor.numel() * tensor.element_size()
        self.dtypes.setdefault(kind, set()).add(tensor.dtype)

    def reset(self) -> None:
        self.bytes.clear()
        self.dtypes.clear()

    def attach(self, ddp_model: nn.parallel.DistributedDataParallel) -> None:
        """Count DDP's gradient all-reduces (the bucket's flat gradient buffer, per step)."""
        def hook(state, bucket):  # no annotations: DDP checks them against the real classes, not strings
            buffer = bucket.buffer()
            self.add("all_reduce", buffer)
            buffer.div_(dist.get_world_size())
            return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])

        ddp_model.register_comm_hook(None, hook)

    @contextlib.contextmanager
    def watch(self) -> Iterator["CommCounter"]:
        """Count FSDP2's all-gathers and reduce-scatters while the block runs."""
        originals: dict[str, Callable[..., Any]] = {}

        def counting(name: str, kind: str, key: str) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                tensor = kwargs[key] if key in kwargs else args[1]  # (output, input, ...)
                self.add(kind, tensor)
                return originals[name](*args, **kwargs)
            return call

        for name, kind, key in (("all_gather_single", "all_gather", "input_tensor"),
                                ("reduce_scatter_single", "reduce_scatter", "input")):
            originals[name] = getattr(dist, name)
            setattr(dist, name, counting(name, kind, key))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
