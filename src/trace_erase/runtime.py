"""One runtime setting — device, dtype, offload, generation batch size — threaded through every command.

A :class:`Runtime` is validated when it is built (before any model loads): a device that is not there, a dtype the
device cannot train in, an offload mode the device cannot do, a batch size below 1 are each one line naming the fix.
``resolve()`` turns ``auto`` into what this machine has: the accelerator when present (the process's own GPU under
``accelerate launch``), bf16 where the device supports it, else fp16, fp32 on the CPU.

Offload modes (ours, following diffusers' own):

- ``text-encoders``: the text encoders stay in CPU memory and run there; only their outputs go to the device. The
  engines encode every prompt they need once, up front, so training never waits on them.
- ``model``: generation uses diffusers' model CPU offload (each component on the device only while it runs);
  training keeps only the denoiser on the device (text encoders and VAE in CPU memory).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .errors import TraceEraseError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
OFFLOADS = ("none", "text-encoders", "model")
# which scaled-dot-product-attention kernels a backward pass may use on CUDA (see :func:`training_attention`)
ATTENTION_KERNELS = ("auto", "math", "torch")
MAX_BATCH = 64


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        raise TraceEraseError(f"unsupported dtype {dtype}; use fp32, fp16 or bf16")
    name = DTYPE_ALIASES.get(str(dtype).strip().lower(), str(dtype).strip().lower())
    if name != "auto" and name not in DTYPES:
        raise TraceEraseError(f"unknown --dtype '{dtype}'; choose auto, fp32, fp16 or bf16")
    return name


def _device_name(device: str | torch.device | None) -> str:
    if device is None:
        return "auto"
    name = str(device).strip().lower()
    if name == "auto":
        return name
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        raise TraceEraseError(f"unknown --device '{device}'; use auto, cpu, cuda, cuda:N or mps") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise TraceEraseError(f"unsupported --device '{device}'; use auto, cpu, cuda, cuda:N or mps")
    return name


def accelerator_device() -> torch.device:
    """The device ``auto`` means here: this process's GPU (``LOCAL_RANK`` under accelerate/torchrun), MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(device: torch.device) -> None:
    """One line when ``device`` is not on this machine (instead of torch's assertion deep in a load)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise TraceEraseError(f"--device {device} is not available ({why}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TraceEraseError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                  f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TraceEraseError(f"--device {device} is not available (no Apple MPS here); use --device cpu or auto")


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (CPU: yes, emulated or AMX; CUDA: Ampere and newer)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu"


def check_trainable(device: torch.device, dtype: torch.dtype) -> None:
    """fp16 training needs loss scaling, which the CPU lacks (and its fp16 kernels are slow): refuse it there."""
    if dtype == torch.float16 and device.type == "cpu":
        raise TraceEraseError("--dtype fp16 cannot train on the CPU (no fp16 loss scaling there, slow kernels); "
                              "use --dtype bf16 or fp32")


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision models run. Fields are the CLI's ``--device/--dtype/--offload/--batch-size``."""

    device: str = "auto"
    dtype: str = "auto"
    offload: str = "none"
    batch_size: int | None = None  # generation images per pipeline call (None: sized from the resolution)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", _device_name(self.device))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if self.offload not in OFFLOADS:
            raise TraceEraseError(f"unknown --offload '{self.offload}'; choose {', '.join(OFFLOADS)}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or int(self.batch_size) < 1):
            raise TraceEraseError(f"--batch-size must be ≥ 1 (got {self.batch_size}); e.g. --batch-size 1 at 1024 px")
        device = self.torch_device
        check_device(device)
        if self.offload != "none" and device.type == "cpu":
            raise TraceEraseError(f"--offload {self.offload} moves models off an accelerator, but the device is the "
                                  "CPU (everything is in CPU memory already); use --offload none or --device cuda")
        if self.torch_dtype == torch.bfloat16 and not bf16_supported(device):
            raise TraceEraseError(f"--dtype bf16 is not supported on {device}; use --dtype fp16 or auto")

    # ---- resolved values --------------------------------------------------------------------------------------------
    @property
    def torch_device(self) -> torch.device:
        return accelerator_device() if self.device == "auto" else torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        device = self.torch_device
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if bf16_supported(device) else torch.float16

    def check_training(self) -> None:
        """Refuse what cannot train correctly (see :func:`check_trainable`)."""
        check_trainable(self.torch_device, self.torch_dtype)

    def generation_batch(self, batch_pixels: int, resolution: int, width: int | None = None) -> int:
        """Images per pipeline call: ``batch_size`` if set, else as many images of ``resolution``² (or
        ``resolution`` high × ``width`` wide) as ``batch_pixels`` (the family adapter's: what fits a 24 GB card)
        holds."""
        if self.batch_size is not None:
            return int(self.batch_size)
        return max(1, min(MAX_BATCH, batch_pixels // (max(resolution, 1) * max(width or resolution, 1))))

    def describe(self) -> dict[str, Any]:
        """What was asked and what it resolved to (recorded in erasure.json / results.json)."""
        return {**asdict(self), "resolved_device": str(self.torch_device),
                "resolved_dtype": _dtype_name(self.torch_dtype)}


def as_runtime(runtime: Runtime | None = None, **fields: Any) -> Runtime:
    """A :class:`Runtime` from one, or from loose fields (``device=…, dtype=…``; ``None`` values are defaults)."""
    if runtime is not None:
        return runtime
    return Runtime(**{k: v for k, v in fields.items() if v is not None})


# ---- placement ------------------------------------------------------------------------------------------------------
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _keep_on_cpu(module: torch.nn.Module) -> None:
    """Run ``module`` in CPU memory while its callers pass device tensors: inputs go to the CPU, outputs come back to
    the caller's device (accelerate's hook; diffusers' own offloading uses the same mechanism)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    module.to("cpu")
    add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))


def place(pipe: Any, runtime: Runtime, phase: str) -> None:
    """Put the pipeline's components where ``runtime`` says for ``phase`` ('train' or 'generate')."""
    device = runtime.torch_device
    if hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()
    if runtime.offload == "model" and phase == "generate":
        pipe.enable_model_cpu_offload(device=device)
        return
    modules = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    for name, module in modules.items():
        if runtime.offload != "none" and name in TEXT_ENCODERS:
            _keep_on_cpu(module)
        elif runtime.offload == "model" and name == "vae":
            module.to("cpu")
        else:
            module.to(device)


def training_attention(device: torch.device, kernels: str = "auto") -> Any:
    """Context for code that backpropagates through attention: which SDPA kernels torch may pick on CUDA.

    ``auto`` (the default) allows flash, memory-efficient and math but not cuDNN's: its bf16 backward returns NaN
    gradients with finite inputs on H100/H200 at some shapes (pytorch/pytorch#196678, huggingface/trl#7181). On an
    H200 (torch 2.11) a bf16 FLUX fine-tune went to NaN at its first step under torch's own choice and trained
    cleanly with the math kernel. ``math`` is the reference kernel alone (slow, holds every score matrix);
    ``torch`` leaves the choice to torch. Elsewhere than CUDA this does nothing."""
    from contextlib import nullcontext

    if kernels not in ATTENTION_KERNELS:
        raise TraceEraseError(f"unknown attention kernels '{kernels}'; choose {', '.join(ATTENTION_KERNELS)}")
    if device.type != "cuda" or kernels == "torch":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kernels == "math":
        return sdpa_kernel([SDPBackend.MATH])
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def finite_gradients(params: Any) -> bool:
    """Whether every gradient of ``params`` (tensors, or an optimiser's parameter groups) is finite. A step is
    checked before the optimiser applies it: a NaN gradient under a finite loss (on CUDA in bf16, an attention
    kernel's backward) would otherwise be written into the weights and surface a step later as a NaN loss."""
    if isinstance(params, torch.optim.Optimizer):
        params = [p for group in params.param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def process_state() -> Any:
    """accelerate's process state; on a CPU-only machine the processes talk over gloo (launch them with
    ``accelerate launch --multi_gpu --num_processes N``, which starts them through torchrun)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
