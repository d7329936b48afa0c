"""The layer rule of docs/architecture.md: imports inside ``franca`` and ``rasa`` only point down (or within a layer),
and ``franca`` never imports ``rasa``."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("franca", "rasa")

# Longest matching prefix wins; keep in step with the table in docs/architecture.md.
LAYERS = {
    "franca.configs": 0,
    "franca.utils": 0,
    "franca.distributed": 0,
    "franca.models": 1,
    "franca.layers": 1,
    "franca.loss": 1,
    "franca.data": 2,
    "franca.checkpoint": 3,
    "franca.train": 4,
    "franca.hub": 5,
    "franca.export": 5,
    "franca.interop": 5,
    "franca.eval": 5,
    "franca.train.train": 6,
    "franca.train.pretrained": 6,
    "franca.train.__main__": 6,
    "franca.quickstart": 6,
    "franca.distill": 6,
    "franca.demo": 6,
    "franca.run": 6,
    "rasa": 6,
}


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name (longest prefix in :data:`LAYERS`; the bare ``franca`` package is L0);
    None for other packages and for a franca module missing from the table."""
    if module == "franca":
        return 0
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every ``import`` / ``from`` statement of a file, at any depth; relative imports are
    resolved against the file's package. ``from pkg import name`` counts ``pkg.name`` when that is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            submodules = (f"{base}.{alias.name}" for alias in node.names)
            found += [(node.lineno, name) for name in submodules if _is_module(name)]
    return found


def _is_module(dotted: str) -> bool:
    target = ROOT.joinpath(*dotted.split("."))
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def layer_violations() -> list[str]:
    violations = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            source = module_name(path)
            source_layer = layer_of(source)
            for line, target in imported_modules(path):
                target_layer = layer_of(target)
                if target_layer is None:
                    continue
                where = f"{path.relative_to(ROOT)}:{line} ({source}, L{source_layer}) imports {target}"
                if source.split(".")[0] == "franca" and target.split(".")[0] == "rasa":
                    violations.append(f"{where}: franca must never import rasa")
                elif target_layer > source_layer:
                    violations.append(f"{where} (L{target_layer}), a higher layer")
    return violations


def test_imports_point_down_only():
    violations = layer_violations()
    assert not violations, "imports against docs/architecture.md:\n" + "\n".join(violations)


def test_datasets_do_not_import_the_loader_side():
    """Inside ``franca.data``, datasets read files; loaders, the shard training stream and per-sample seeding build on
    them (docs/architecture.md), so ``franca.data.datasets`` never imports them (no import cycle)."""
    loader_side = ("franca.data.loaders", "franca.data.streams", "franca.data.seeded_transform")
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in sorted((ROOT / "franca" / "data" / "datasets").rglob("*.py"))
        for line, target in imported_modules(path)
        if target.startswith(loader_side)
    ]
    assert not found, "datasets importing the loader side:\n" + "\n".join(found)


def test_every_module_has_a_layer():
    paths = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    unmapped = [str(path.relative_to(ROOT)) for path in paths if layer_of(module_name(path)) is None]
    assert not unmapped, f"modules without a layer in LAYERS (add them here and to docs/architecture.md): {unmapped}"


def test_layer_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: an upward import and a franca → rasa import in a fake tree are both reported."""
    fake = tmp_path / "franca" / "models"
    fake.mkdir(parents=True)
    (tmp_path / "franca" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from franca.hub import load\n    import rasa.train\n")
    (tmp_path / "rasa").mkdir()
    (tmp_path / "rasa" / "__init__.py").write_text("from .train import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    violations = layer_violations()
    assert len(violations) == 2, violations
    assert "imports franca.hub (L5), a higher layer" in violations[0]
    assert "franca must never import rasa" in violations[1]


@pytest.mark.slow
def test_hub_import_loads_no_rasa_module():
    code = "import sys, franca.hub; print(sorted(m for m in sys.modules if m == 'rasa' or m.startswith('rasa.')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]", f"import franca.hub loaded rasa modules: {result.stdout.strip()}"


def test_eval_commands_and_their_library_are_apart():
    """``franca.eval``: each module of the package is a command (a ``main`` run by ``python -m``); what they share is
    in ``franca.eval.lib``, which imports no command, and no command imports another (docs/architecture.md)."""
    package = ROOT / "franca" / "eval"
    commands = {module_name(p) for p in package.glob("*.py") if p.name != "__init__.py"}
    not_commands = [
        name
        for name in sorted(commands)
        if "def main(" not in (ROOT.joinpath(*name.split(".")).with_suffix(".py")).read_text()
    ]
    assert not not_commands, f"modules of franca/eval/ without a main (helpers go to franca/eval/lib/): {not_commands}"
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in sorted(package.rglob("*.py"))
        for line, target in imported_modules(path)
        if target in commands and target != module_name(path)
    ]
    assert not found, "imports of an evaluation command (move the shared part to franca.eval.lib):\n" + "\n".join(found)
    helpers_with_main = [p.name for p in (package / "lib").glob("*.py") if "__main__" in p.read_text()]
    assert not helpers_with_main, f"franca/eval/lib/ holds helpers, not commands: {helpers_with_main}"
