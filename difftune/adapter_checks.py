"""What the adapter loader checks about a file's tensors, so that a file anyone can write cannot exhaust the machine or
silently poison outputs (issues 17, 29, 32). `difftune.serialization` calls these in order:

1. `check_safetensors_header` before the file is opened: its header is at most ``MAX_TENSOR_HEADER_BYTES`` and
   ``MAX_HEADER_FIELDS`` JSON fields, counted on the raw bytes (a 67 MB header of 10⁶ empty entries cost 27 CPU-s and
   2.3 GB inside safetensors before anything could refuse it; now it is refused in milliseconds).
2. `check_dtype` as each tensor is read: only the dtypes difftune writes (float8 has no ``isfinite`` on the CPU).
3. `check_values` before `inject`: floating values are finite and at most ``MAX_VALUE`` in magnitude.
4. `check_loaded` after the values are in the model: each adapted layer's change is finite in the model's dtype and at
   most ``MAX_GAIN`` times the base layer's own size, measured on random inputs: ΔW·x for weight-space adapters
   (through their own ``delta``, never materializing ΔW), the adapter's output or input rewrite for the others, with
   the per-call inputs the method asks for (`MethodConfig.probe_inputs`: class labels, a control image), and the Δ
   entries of sparse adapters (`_route`). Finite but huge values (a 1e30 ``lora_B``, an SPM ``alpha`` of 1e30)
   loaded cleanly before and turned the output into NaN.

A trained adapter changes a layer by a fraction of its size; ``MAX_GAIN`` = 1000 leaves three orders of magnitude of
room and keeps every output finite (a chain of such layers stays far below the float32 range).
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .errors import DifftuneError
from .methods.base import Adapter, MethodConfig
from .methods.context import adapter_inputs
from .methods.model import MODEL_KEY, get_config, hosts, model_part
from .targeting import canonical_name

MAX_TENSOR_HEADER_BYTES = 64 << 20  #: safetensors allows 100 MB; an SDXL LoRA's header is ~0.7 MB
MAX_HEADER_FIELDS = 1_000_000  #: each tensor entry has 4 (name, dtype, shape, offsets): 250,000 tensors
MAX_VALUE = 1e5  #: beyond float16's 65,504; trained adapter values are O(1)
MAX_GAIN = 1e3  #: the largest change of a layer, relative to the layer (see the module docstring)
FLOOR = 1e-2  #: the size a layer counts as at least (RMS), so a zero base layer may still be adapted
#: what difftune writes: float values, integer masks and indices
READABLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.uint8,
                             torch.int8, torch.int16, torch.int32, torch.int64})


def check_safetensors_header(path: Path) -> None:
    """Refuse a safetensors file whose header is too large to parse cheaply, before safetensors parses it.

    Fields are counted as ``:`` characters: every JSON member has one outside strings, and no escape can hide it
    (a string can only add more). Files too short to hold a header are left for safetensors to report.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return
            (size,) = struct.unpack("<Q", head)
            if size > MAX_TENSOR_HEADER_BYTES:
                raise DifftuneError(f"{path}: its safetensors header claims {size:,} bytes, over the "
                                    f"{MAX_TENSOR_HEADER_BYTES:,} an adapter may have; the file is damaged or hostile")
            raw = f.read(size)
    except OSError as e:
        raise DifftuneError(f"{path} could not be read ({e})") from e
    fields = raw.count(b":")
    if fields > MAX_HEADER_FIELDS:
        raise DifftuneError(f"{path}: its safetensors header has {fields:,} fields, over the {MAX_HEADER_FIELDS:,} an "
                            f"adapter may have (4 per tensor); the file is damaged or hostile")


def check_dtype(key: str, tensor: Tensor, where: Any) -> None:
    if tensor.dtype not in READABLE_DTYPES:
        raise DifftuneError(
            f"{where}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, which difftune adapters "
            "never hold (float32/float16/bfloat16/float64 values, integer masks). Convert the file's values to "
            "float16 or float32 and load it again")


def is_statistic(key: str, config: MethodConfig) -> bool:
    """Whether saved tensor ``key`` is one of the method's statistics (`MethodConfig.saved_statistics`)."""
    local = key.rsplit(".", 1)[-1]
    return any(local.startswith(p) for p in type(config).saved_statistics)


def check_values(tensors: dict[str, Tensor], config: MethodConfig, where: Any) -> None:
    """Saved floating values are finite and at most ``MAX_VALUE`` in magnitude (statistics excepted)."""
    nonfinite, huge = [], []
    for k, v in tensors.items():
        if not v.is_floating_point() or not v.numel() or is_statistic(k, config):
            continue
        if not bool(torch.isfinite(v).all()):
            nonfinite.append(k)
        else:
            largest = float(v.abs().max())
            if largest > MAX_VALUE:
                huge.append(f"{k} (|value| up to {largest:.3g})")
    if nonfinite:
        raise DifftuneError(f"adapter {str(where)!r} holds NaN/inf values in {len(nonfinite)} tensor(s) (first: "
                            f"{nonfinite[:3]}); it is damaged or its training diverged")
    if huge:
        raise DifftuneError(f"adapter {str(where)!r} holds values beyond ±{MAX_VALUE:g} in {len(huge)} tensor(s) "
                            f"(first: {huge[:3]}); trained adapters hold values of order 1, so it is damaged or its "
                            "training diverged, and loading it would overflow the model's outputs")


def check_loaded(model: nn.Module, name: str, where: Any) -> None:
    """Refuse adapter ``name`` of ``model`` (just loaded from ``where``) when a layer's change is not finite in the
    model's dtype or is more than ``MAX_GAIN`` times the layer; the message names the layer and its largest tensors."""
    config = get_config(model, name)
    part = model_part(model, name)
    layers = [(canonical_name(n), h.base_layer, h.adapters[name]) for n, h in hosts(model) if name in h.adapters]
    owners = [(f"{m}.", a) for m, _, a in layers] + ([(f"{MODEL_KEY}.", part)] if part is not None else [])
    # `check_values` saw the file's values finite and within MAX_VALUE: only a float16 copy can have overflowed
    bad = [(f"{where_}{k}", v.dtype) for where_, owner in owners
           for k, v in itertools.chain(owner.named_parameters(), owner.named_buffers())  # not state_dict: no packing
           if v.dtype == torch.float16 and not is_statistic(k, config) and not bool(torch.isfinite(v).all())]
    if bad:
        raise DifftuneError(f"adapter {str(where)!r}: {len(bad)} tensor(s) do not fit this model's "
                            f"{str(bad[0][1]).removeprefix('torch.')} (first: {[k for k, _ in bad[:3]]}); their "
                            "values overflow it. Load it into a float32 model, or the file is damaged")
    batch, inputs = config.probe_inputs(name)
    begin = getattr(part, "begin_call", None)
    # A part that prepares per-call state (e.g. encodes the control image) does it for the probe; the model's next
    # call prepares its own (`InputCapture` calls begin_call before any layer runs).
    begin = begin if any(_route(a, base) == "probe" for _, base, a in layers) else None
    with torch.no_grad(), adapter_inputs(**inputs) as view:
        for i, (module, base, adapter) in enumerate(layers):
            try:
                if begin is not None and i == 0:
                    begin(view)
                changes = _changes(adapter, base, batch)
            except Exception as e:  # noqa: BLE001 - named as what it is: a method that cannot be probed
                raise DifftuneError(
                    f"adapter {str(where)!r}: its {config.method} layer {module!r} could not be probed after loading "
                    f"({type(e).__name__}: {e}). A method whose layers read per-call inputs must name them in "
                    "`MethodConfig.probe_inputs` (a bug in the method, not in the file)") from e
            involved = [(f"{module}.", adapter)] + ([(f"{MODEL_KEY}.", part)] if part is not None else [])
            for what, change, ref in changes:
                _judge(what, change, ref, module, involved, where)


def _route(adapter: Adapter, base: nn.Module) -> str:
    """How a layer is judged. "delta x": a weight-space adapter on a layer the probe can run, by ΔW·x through its
    own `Adapter.delta` (what fusing it adds: SPM's per-prompt γ only scales it down); "sparse": by its Δ entries (a
    probe would copy the whole weight); "delta": by its dense Δ; "probe": through its forward and input rewrite,
    which may read per-call inputs (`MethodConfig.probe_inputs`)."""
    params = {p for p, _ in base.named_parameters(recurse=False)}
    if adapter.mergeable and adapter.sparse and all(p in params for p in adapter.merge_params()):
        return "sparse"
    if adapter.mergeable and _runnable(base):
        return "delta x"
    if adapter.mergeable and all(p in params for p in adapter.merge_params()):
        return "delta"
    return "probe"


def _changes(adapter: Adapter, base: nn.Module, batch: int) -> list[tuple[str, Tensor | float, Tensor | float]]:
    """(what, change, reference) for one layer: a tensor pair, or (for a sparse adapter) two RMS values.

    A probe costs a few rows through the adapter's own `Adapter.delta` (LoRA: x·A·B, never ΔW), so loading stays
    cheap; its inputs are drawn fresh each time, so no file can be made to hide its values from them.
    """
    route = _route(adapter, base)
    if route == "sparse":  # its floating parameters are its Δ entries: RMS over the whole parameters
        numel = sum(getattr(base, p).numel() for p in adapter.merge_params())
        delta_sq = sum(_rms(p) ** 2 * p.numel() for p in adapter.parameters() if p.is_floating_point())
        ref_sq = sum(_rms(_sample(getattr(base, p))) ** 2 * getattr(base, p).numel() for p in adapter.merge_params())
        return [("Δ", math.sqrt(delta_sq / max(numel, 1)), math.sqrt(ref_sq / max(numel, 1)))]
    if route == "delta":
        return [(f"Δ{p}", d, getattr(base, p).detach()) for p, d in adapter.delta_params().items()]
    x = _probe_input(base, batch)
    if x is None:
        return []
    if route == "delta x":
        return [("ΔW·x", adapter.delta(x, base), _output_rms(base))]
    x1 = adapter.pre_forward(x, 1.0)
    if not _runnable(base):
        return [("input rewrite", x1 - x, x)]  # e.g. a skip tuner on a resnet's input
    if type(adapter).forward is Adapter.forward and x1 is x:  # out + w·δ(x): δ alone, no pass over the base
        change = adapter.delta(x, base)
        return [("output", change if change is not None else torch.zeros(()), _output_rms(base))]
    out0 = base(x)
    return [("output", adapter(x1, out0 if x1 is x else base(x1), 1.0, base) - out0, out0)]


def _runnable(base: nn.Module) -> bool:
    return isinstance(base, (nn.Linear, nn.Conv2d, nn.Embedding)) or getattr(base, "_difftune_linear_like", False)


def _output_rms(base: nn.Module) -> float:
    """The RMS of ``base``'s output on the probe's unit-variance inputs, estimated from its weights: an embedding's
    rows, or a weight's RMS times the square root of its fan-in (a layer with no weight of its own is run)."""
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        x = _probe_input(base, 4)
        return _rms(base(x)) if x is not None else 0.0
    fan_in = 1 if isinstance(base, nn.Embedding) else math.prod(weight.shape[1:])
    return _rms(_sample(weight)) * math.sqrt(fan_in)


def _sample(t: Tensor, n: int = 4096) -> Tensor:
    """About ``n`` evenly spaced entries of ``t``: enough for its typical size, without a pass over all of it."""
    flat = t.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // n)]


def _probe_input(base: nn.Module, batch: int) -> Tensor | None:
    """Random inputs for ``base``: (batch, in) for a linear, (batch, C, S, S) for a conv (S: its receptive field, so
    every tap is used), every row's index for an embedding, (batch, C, 1, 1) for another module with
    ``in_channels`` (its adapter's input rewrite only)."""
    param = next((p for p in base.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    if isinstance(base, nn.Embedding):
        return torch.arange(min(base.num_embeddings, 1 << 16), device=device)
    if isinstance(base, nn.Linear) or getattr(base, "_difftune_linear_like", False):
        shape: tuple[int, ...] = (batch, base.in_features)
    elif isinstance(base, nn.Conv2d):
        side = max(d * (k - 1) + 1 for d, k in zip(base.dilation, base.kernel_size, strict=True))
        shape = (batch, base.in_channels, side, side)
    elif isinstance(getattr(base, "in_channels", None), int):
        shape = (batch, base.in_channels, 1, 1)
    else:
        return None
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)  # the global RNG is not touched
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _rms(t: Tensor) -> float:
    """Root mean square, without overflow (values near the float32 limit square to inf)."""
    if not t.numel():
        return 0.0
    t = t.detach().float()
    rms = float(torch.linalg.vector_norm(t)) / math.sqrt(t.numel())
    if math.isfinite(rms):
        return rms
    top = float(t.abs().max())
    if top == 0 or not math.isfinite(top):
        return top
    return top * float(torch.linalg.vector_norm(t / top)) / math.sqrt(t.numel())


def _judge(what: str, change: Tensor | float, ref: Tensor | float, module: str, owners: list[tuple[str, nn.Module]],
           where: Any) -> None:
    """Refuse when ``change`` is not finite or its largest item (a batch row: one class's, one embedding row's) is
    more than MAX_GAIN times the layer's size ``ref``, naming the layer and the largest tensors involved."""
    size = _largest_item_rms(change) if isinstance(change, Tensor) else change
    base = max(_rms(ref) if isinstance(ref, Tensor) else ref, FLOOR)
    finite = bool(torch.isfinite(change).all()) if isinstance(change, Tensor) else math.isfinite(change)
    if finite and size <= MAX_GAIN * base:
        return
    found = sorted(((float(v.detach().float().abs().max()), f"{prefix}{k}") for prefix, owner in owners
                    for k, v in itertools.chain(owner.named_parameters(), owner.named_buffers())
                    if v.is_floating_point() and v.numel()), reverse=True)[:2]
    largest = ", ".join(f"{k} (|value| up to {m:.3g})" for m, k in found)
    how = "is not finite" if not finite else f"is {size / base:.3g} times the layer's own size (at most {MAX_GAIN:g})"
    raise DifftuneError(f"adapter {str(where)!r}: its {what} of {module!r} {how}, so every output would be NaN/inf or "
                        f"meaningless; largest tensors involved: {largest or 'none'}. The file is damaged or its "
                        "training diverged")


def _largest_item_rms(t: Tensor) -> float:
    """The largest RMS of one item (row along the first dimension): a change confined to one class or one row is not
    averaged away by the others."""
    t = t.detach().float()
    if not t.numel():
        return 0.0
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    top = float(rows.abs().max())
    if top == 0 or not math.isfinite(top):
        return top
    return top * float((rows / top).square().mean(dim=1).sqrt().max())


_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
              torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full}


class AllocationGuard(TorchFunctionMode):
    """Refuse any factory allocation (``torch.empty/zeros/...``, ``Tensor.new_*``) of more than ``limit`` values.

    Loading an adapter allocates its state in `inject` from sizes read from the file's header. The header's sizes must
    agree with the tensors (`MethodConfig.check_saved`), but a method that does not implement that check must not
    allocate whatever a hostile header asks for either: no adapter tensor is larger than all the file's tensors
    together plus the largest tensor of the base model (what a method may derive from the base, e.g. a mask).
    """

    def __init__(self, limit: int, path: Any) -> None:
        super().__init__()
        self.limit, self.path = limit, path

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES:
            shape_args = args[1:] if func.__name__.startswith("new_") else args
            if func in (torch.full, torch.Tensor.new_full):
                shape_args = shape_args[:1]
            if func is torch.randint:
                shape_args = shape_args[-1:] if shape_args else ()
            size = kwargs.get("size", shape_args[0] if len(shape_args) == 1 else shape_args)
            dims = list(size) if isinstance(size, (tuple, list, torch.Size)) else [size]
            if all(isinstance(d, int) for d in dims):
                numel = math.prod(dims)
                if numel > self.limit:
                    raise DifftuneError(f"adapter {str(self.path)!r}: its header asks for a tensor of shape "
                                        f"{tuple(dims)} ({numel:,} values), more than the file and the base model "
                                        f"could need ({self.limit:,}); the header is damaged (e.g. its rank)")
        return func(*args, **kwargs)
