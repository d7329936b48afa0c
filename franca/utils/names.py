"""Parameter names without the module components that wrappers insert (``torch.compile``, FSDP1, activation
checkpointing, DDP / DataParallel), as ``torch.distributed.checkpoint`` names parameters in its state dicts."""

WRAPPER_MODULE_NAMES = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "module"})


def unwrapped_name(name: str) -> str:
    """``name`` without wrapper components: ``blocks.0._checkpoint_wrapped_module.attn.qkv.weight`` →
    ``blocks.0.attn.qkv.weight``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_MODULE_NAMES)
