"""The trained LoRA switched on and off on the one network: θ (adapter on), θ* (off) and θ0 (off, stage A's ΔW
taken out). One network serves all three, so stage B never holds a second copy of the model. The LoRA sits on the
denoiser, or (AdvUnlearn) on the text encoders."""

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
    :class:`~trace_erase.engines.trajectory.TrajectoryEngine`. The LoRA lives on the denoiser, or on whatever
    :meth:`lora_hosts` names (the text encoders, for AdvUnlearn)."""

    adapter: Any
    config: Any
    stage_a: Any
    targets: list[str]

    def lora_hosts(self) -> dict[str, tuple[torch.nn.Module, list[str]]]:
        """Component name → (the module that carries the training LoRA, its target module paths on that module)."""
        return {self.adapter.denoiser_name: (self.adapter.denoiser, self.targets)}

    def attach(self) -> None:
        from peft import LoraConfig

        hosts = self.lora_hosts()
        for component, (host, _) in hosts.items():
            if ADAPTER_NAME in getattr(host, "peft_config", {}):
                raise TraceEraseError(f"the {component} already carries a training adapter; use a fresh pipeline")
        self.adapter.denoiser.requires_grad_(False)  # trained or not, the denoiser's own weights take no gradient
        torch.manual_seed(self.config.seed)
        for host, targets in hosts.values():
            host.requires_grad_(False)
            rank, ranks = self.config.rank, {}
            if rank == 0:  # each layer at its full rank, α = r: the LoRA reaches every ΔW full-weight training reaches
                ranks = {name: full_rank(host.get_submodule(name)) for name in targets}
                rank = max(ranks.values())
            add_adapter(host, LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=targets,
                                         rank_pattern=ranks, alpha_pattern=ranks))
        # trainable LoRA weights (and so AdamW's state) in fp32 over a half-precision frozen base, as diffusers'
        # training scripts do: bf16 parameters drop updates smaller than 2⁻⁸ of their value, fp16 ones underflow
        for p in self.lora_parameters():
            p.data = p.data.float()
        den = self.adapter.denoiser
        if self.config.gradient_checkpointing and hasattr(den, "enable_gradient_checkpointing"):
            den.enable_gradient_checkpointing()

    def detach(self) -> None:
        den = self.adapter.denoiser
        if self.config.gradient_checkpointing and hasattr(den, "disable_gradient_checkpointing"):
            den.disable_gradient_checkpointing()
        for host, _ in self.lora_hosts().values():
            remove_adapter(host, ADAPTER_NAME)
            host.requires_grad_(False)

    def named_lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The training LoRA's parameters by name (the denoiser's own names; ``component.name`` on other hosts)."""
        out = {}
        for component, (host, _) in self.lora_hosts().items():
            head = "" if host is self.adapter.denoiser else component + "."
            out.update({head + n: p for n, p in host.named_parameters() if ADAPTER_NAME in n})
        return out

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.named_lora_parameters().values())

    def trained_layer(self, name: str) -> torch.nn.Module:
        """The peft-wrapped layer of target ``name`` (its ``lora_A``/``lora_B``/``scaling`` while attached)."""
        return self.adapter.denoiser.get_submodule(name)

    def _set_adapters(self, enabled: bool) -> None:
        """Switch the training LoRA off (nested contexts: the outermost switches it back on)."""
        depth = getattr(self, "_frozen_depth", 0) + (-1 if enabled else 1)
        self._frozen_depth = depth
        if depth != (0 if enabled else 1):
            return
        from diffusers.utils.peft_utils import set_adapter_layers

        for host, _ in self.lora_hosts().values():
            if ADAPTER_NAME in getattr(host, "peft_config", {}):
                set_adapter_layers(host, enabled)

    def stage_a_model(self) -> Any:
        """Context in which the denoiser is θ* (adapter disabled)."""
        engine = self

        class _Frozen:  # before attach() the model is θ* already
            def __enter__(self) -> None:
                engine._set_adapters(False)

            def __exit__(self, *exc: Any) -> None:
                engine._set_adapters(True)

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


def _is_diffusers_model(host: torch.nn.Module) -> bool:
    from diffusers import ModelMixin

    return isinstance(host, ModelMixin)


def add_adapter(host: torch.nn.Module, config: Any) -> None:
    """Add the training adapter to ``host`` and make it the active one. A diffusers model does it itself; on a text
    encoder peft injects the layers directly, as diffusers' own LoRA loading does for text encoders (transformers'
    ``add_adapter`` wants a newer peft than the one pinned)."""
    if _is_diffusers_model(host):
        host.add_adapter(config, adapter_name=ADAPTER_NAME)
        host.set_adapter(ADAPTER_NAME)
        return
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    inject_adapter_in_model(config, host, adapter_name=ADAPTER_NAME)
    for module in host.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(ADAPTER_NAME)


def remove_adapter(host: torch.nn.Module, name: str) -> None:
    """Delete adapter ``name`` from ``host``; with no adapter left, also take off peft's now-empty LoRA wrappers
    (plain Linear layers again)."""
    from diffusers.utils.peft_utils import delete_adapter_layers, recurse_remove_peft_layers

    if _is_diffusers_model(host):
        host.delete_adapters(name)
        if not getattr(host, "peft_config", None):
            host.unload_lora()
        return
    delete_adapter_layers(host, name)
    config = getattr(host, "peft_config", None)
    if config is not None:
        config.pop(name, None)
    if not config:
        recurse_remove_peft_layers(host)
        if hasattr(host, "peft_config"):
            del host.peft_config
        if hasattr(host, "_hf_peft_config_loaded"):
            host._hf_peft_config_loaded = None
