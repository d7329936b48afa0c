"""The optional libraries of the interop commands and loaders, imported on first use.

``import franca`` and ``franca.hub`` never import transformers or timm; code that needs one calls :func:`require`,
which names the extra to install when the library is missing.
"""

import importlib
from types import ModuleType

# module -> the franca extra that installs it (pyproject.toml)
EXTRAS = {"transformers": "hf", "huggingface_hub": "hf", "timm": "timm"}


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or an ImportError saying that ``purpose`` needs it and how to install it."""
    if module not in EXTRAS:
        raise ValueError(f"{module!r} is not an optional dependency of franca; known: {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs the '{module}' package, which is not installed: pip install 'franca[{EXTRAS[module]}]'"
        ) from err
