"""The trained LoRA switched on and off on the one denoiser: θ (adapter on), θ* (off) and θ0 (off, stage A's ΔW
taken out). One network serves all three, so stage B never holds a second copy of the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import TraceEraseError

ADAPTER_NAME = "trace_erase_train"


def full_rank(module: torch.nn.Module) -> int:
    """The largest rank a weight update of ``module`` (Linear or Conv2d, or peft's wrapper of one) can have."""
    layer = getattr(module, "base_layer", module)
    if isinstance(layer, torch.nn.Conv2d):
        return min(layer.out_channels, layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1])
    return min(layer.in_features, layer.out_features)


class LoraSwitchMixin:
    """Attaching the training LoRA and the contexts that select θ*, θ0 or the reference model, for
    :class:`~trace_erase.engines.trajectory.TrajectoryEngine`."""

    adapter: Any
    config: Any
    stage_a: Any
    targets: list[str]

    def attach(self) -> None:
        from peft import LoraConfig

        den = self.adapter.denoiser
        if ADAPTER_NAME in getattr(den, "peft_config", {}):
            raise TraceEraseError("the denoiser already carries a training adapter; use a fresh pipeline")
        den.requires_grad_(False)
        torch.manual_seed(self.config.seed)
        rank, ranks = self.config.rank, {}
        if rank == 0:  # each layer at its full rank, α = r: the LoRA reaches every ΔW full-weight training reaches
            ranks = {name: full_rank(den.get_submodule(name)) for name in self.targets}
            rank = max(ranks.values())
        den.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=self.targets,
                       rank_pattern=ranks, alpha_pattern=ranks),
            adapter_name=ADAPTER_NAME,
        )
        den.set_adapter(ADAPTER_NAME)
        # trainable LoRA weights (and so AdamW's state) in fp32 over a half-precision frozen base, as diffusers'
        # training scripts do: bf16 parameters drop updates smaller than 2⁻⁸ of their value, fp16 ones underflow
        for p in self.lora_parameters():
            p.data = p.data.float()
        if self.config.gradient_checkpointing and hasattr(den, "enable_gradient_checkpointing"):
            den.enable_gradient_checkpointing()

    def detach(self) -> None:
        den = self.adapter.denoiser
        if self.config.gradient_checkpointing and hasattr(den, "disable_gradient_checkpointing"):
            den.disable_gradient_checkpointing()
        den.delete_adapters(ADAPTER_NAME)
        if not getattr(den, "peft_config", None):  # nothing else loaded: remove the now-empty LoRA wrappers too
            den.unload_lora()
        den.requires_grad_(False)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.adapter.denoiser.named_parameters() if ADAPTER_NAME in n]

    def stage_a_model(self) -> Any:
        """Context in which the denoiser is θ* (adapter disabled)."""
        engine = self

        attached = ADAPTER_NAME in getattr(self.adapter.denoiser, "peft_config", {})

        class _Frozen:  # before attach() the denoiser is θ* already
            def __enter__(self) -> None:
                if attached:
                    engine.adapter.denoiser.disable_adapters()

            def __exit__(self, *exc: Any) -> None:
                if attached:
                    engine.adapter.denoiser.enable_adapters()

        return _Frozen()

    @contextlib.contextmanager
    def original(self) -> Iterator[None]:
        """Context in which the denoiser is θ0: adapter disabled and stage A's ΔW taken out."""
        with self.stage_a_model():
            if self.stage_a is None:
                yield
                return
            self.stage_a.set(False)
            try:
                yield
            finally:
                self.stage_a.set(True)

    def reference(self) -> Any:
        """The reference model's context: θ0 (``reference="original"``) or θ*."""
        return self.original() if self.config.reference == "original" else self.stage_a_model()

