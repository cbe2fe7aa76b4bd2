"""LoRA adapters (``trainer.lora``), injected the same way on the trainer's model and the embedded
engine's (``peft.inject_adapter_in_model``, in place: the model keeps its class and submodule
paths, a targeted linear holding ``base_layer``, ``lora_A.default`` and ``lora_B.default``).

Invariants: parameter names are identical on trainer and engine, so the sync sends the adapter
under the engine's names; ``base_name`` maps a name back to the base model's weight (an adapter
has none); every name in ``target_modules`` matches at least one linear layer (``check_targets``),
except with the default list, whose MLP names a mixture-of-experts model lacks (transformers 5 fuses
its experts into parameters, not linear layers): there the names the model has (``targets``).
"""

from __future__ import annotations

from contextlib import contextmanager

from areal_like.settings.config_checks import ConfigError
from areal_like.settings.schema import LORA_DEFAULT_TARGETS, LoraConfig, RunConfig

ADAPTER = "default"  # PEFT's adapter name: one live adapter per model
BASE_LAYER = ".base_layer"


def peft_config(lora: LoraConfig, target_modules: list[str] | None = None):
    """PEFT's ``LoraConfig`` of ``trainer.lora`` (bias untouched: only A and B train), on
    ``target_modules`` (default: ``lora.target_modules``)."""
    from peft import LoraConfig as PeftLoraConfig

    targets = lora.target_modules if target_modules is None else target_modules
    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(targets), bias="none")


def served_name(version: int, plan_id: str) -> str:
    """The name an engine loading adapters by name (SGLang) gives the adapter of ``plan_id``."""
    return f"policy-v{version}-{plan_id}"


def linear_names(model) -> set[str]:
    """The last name component of every ``nn.Linear`` of ``model`` (``q_proj``, ``lm_head``)."""
    import torch

    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def targets(model, lora: LoraConfig) -> list[str]:
    """The names the adapters go on: ``lora.target_modules``; the default list only where the
    model has such linear layers (a mixture's fused experts are not)."""
    if sorted(lora.target_modules) == sorted(LORA_DEFAULT_TARGETS):
        linear = linear_names(model)
        return [t for t in lora.target_modules if t in linear]
    return list(lora.target_modules)


def check_targets(model, lora: LoraConfig) -> None:
    """ConfigError naming ``trainer.lora.target_modules`` when a name matches no linear layer."""
    linear = linear_names(model)
    chosen = targets(model, lora)
    missing = [t for t in chosen if t not in linear] if chosen else list(lora.target_modules)
    if missing:
        raise ConfigError(f"trainer.lora.target_modules: {missing} match no linear layer of the "
                          f"model ({type(model).__name__}; its linear layers: {sorted(linear)})")
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), "")
    if head_name.rsplit(".", 1)[-1] in lora.target_modules and model.config.tie_word_embeddings:
        raise ConfigError(f"trainer.lora.target_modules: {head_name!r} with tied input and output "
                          "embeddings (model.tie_word_embeddings): the adapter would change one "
                          "and not the other; leave it out")


def export_without_base(cfg: RunConfig) -> str | None:
    """Why ``cfg``'s LoRA exports could not be loaded (None: they can): with ``export.merged=false``
    an export is the adapter alone, and a model built from its config (no ``model.path``) has no
    base directory its ``adapter_config.json`` could name for PEFT to load it onto."""
    if not cfg.trainer.lora.enabled or cfg.model.path or cfg.export.merged:
        return None
    return ("export.merged=false: a LoRA export is then the adapter alone, and this model is "
            "built from its config (model.path is null): no base directory exists that its "
            "adapter_config.json could name; set export.merged=true (each export then also holds "
            "merged/, the adapted model)")


def add_adapters(model, lora: LoraConfig):
    """Inject ``lora``'s layers into ``model`` in place (any device, meta included); returns it."""
    from peft import inject_adapter_in_model

    check_targets(model, lora)
    return inject_adapter_in_model(peft_config(lora, targets(model, lora)), model,
                                   adapter_name=ADAPTER)


def is_adapter(name: str) -> bool:
    """True for a LoRA A or B parameter's name."""
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """The Hugging Face name of a base weight (``q_proj.base_layer.weight``: ``q_proj.weight``)."""
    return name.replace(BASE_LAYER + ".", ".")


def has_adapters(model) -> bool:
    return any(is_adapter(n) for n, _ in model.named_parameters())


def synced_parameters(model) -> list:
    """What a weight push sends, as (name, parameter): with adapters only their A and B."""
    named = list(model.named_parameters())
    adapters = [(n, p) for n, p in named if is_adapter(n)]
    return adapters or named


@contextmanager
def adapters_disabled(model):
    """Inside the block ``model`` computes as its base (every LoRA layer skips its adapter):
    the KL reference without a second copy of the weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for m in layers:
        m.enable_adapters(False)  # which also freezes the adapters: FSDP2 must not see that
    for p in trainable:  # (a first forward in here would set up its gradient dtypes for no adapter)
        p.requires_grad_(True)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
