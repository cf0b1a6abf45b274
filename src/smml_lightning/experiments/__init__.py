"""The experiment configs shipped with the package, resolved by name or by path.

A config is named by its path under this folder without ``.yaml``: ``brats2018``, ``synthetic_maml``,
``ablations/no_prior``, ``variants/public_seg_loss``. ``smml fit --config NAME`` finds it from any working
directory; a path to any YAML file works as well (old ``experiments/<name>.yaml`` paths resolve here too).

Configs share a base through one comment line of their own: a line ``# base: NAME`` among the comments at
the top of a file makes the CLI load that config (and its own base, recursively) before the file, exactly
as if ``--config NAME`` had been given first. jsonargparse has no include, and a plain comment keeps every
file a valid LightningCLI config on its own. ``_base/`` holds the shared blocks (trainer, checkpoint,
logger, data) and is not an experiment of its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

EXPERIMENTS_DIR = Path(__file__).resolve().parent
BASE_LINE = re.compile(r"^#\s*base:\s*(\S+)\s*$")


def available() -> list[str]:
    """Names of the shipped experiment configs and overlays (``_base/`` and sweep files excluded)."""
    names = (
        p.relative_to(EXPERIMENTS_DIR).with_suffix("").as_posix() for p in EXPERIMENTS_DIR.rglob("*.yaml")
    )
    return sorted(n for n in names if not n.startswith(("_base/", "sweeps/")))


def _shipped(name: str) -> Path | None:
    name = name.removeprefix("./").removeprefix("experiments/").removesuffix(".yaml")
    path = EXPERIMENTS_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def resolve(config: str | Path) -> Path:
    """The file of a config given by path (absolute or from the working directory) or by shipped name."""
    path = Path(config)
    if path.is_file():
        return path.resolve()
    shipped = _shipped(str(config))
    if shipped is not None:
        return shipped
    raise FileNotFoundError(
        f"experiment config {str(config)!r} is neither a file nor a shipped config; "
        f"shipped: {', '.join(available())}"
    )


def base_of(path: Path) -> str | None:
    """The ``# base: NAME`` of a config file: read from its leading comment block only."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("#"):
                return None
            match = BASE_LINE.match(line.strip())
            if match:
                return match.group(1)
    return None


def chain(config: str | Path) -> list[Path]:
    """``config``'s file preceded by its bases, outermost first (the order the CLI loads them in)."""
    files: list[Path] = []
    current: Path | None = resolve(config)
    while current is not None:
        if current in files:
            raise ValueError(f"{current}: its '# base:' lines form a cycle")
        files.insert(0, current)
        base = base_of(current)
        if base is None:
            current = None
        else:
            found = _shipped(base) or (current.parent / base if (current.parent / base).is_file() else None)
            if found is None:
                raise FileNotFoundError(
                    f"{current}: '# base: {base}' names no shipped config or file beside it"
                )
            current = found
    return files


def load(*configs: str | Path) -> dict[str, Any]:
    """The merged raw YAML of ``configs`` and their bases, later files winning key by key (as the CLI
    merges them; no defaults or links), for scripts that read a few keys without building the model."""
    merged: dict[str, Any] = {}

    def merge(into: dict[str, Any], new: dict[str, Any]) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    for config in configs:
        for path in chain(config):
            merge(merged, yaml.safe_load(path.read_text()) or {})
    return merged


def expand_config_args(args: list[str]) -> list[str]:
    """Command-line arguments with every ``--config X`` replaced by ``--config <file>`` for each file of
    X's chain (bases first). Values that are not config files or names (inline YAML) pass unchanged."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        value: str | None = None
        if arg in ("--config", "-c") and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if _inline_yaml(value):
            out += ["--config", value]
        else:
            for path in chain(value):
                out += ["--config", str(path)]
    return out


def experiment_name(args: list[str]) -> str | None:
    """The experiment a command line runs: its configs' names joined by ``+`` (``brats2018``,
    ``brats2018+no_prior``), so that two experiments never share a run folder. None without a config."""
    names: list[str] = []
    for i, arg in enumerate(args):
        value = (
            args[i + 1]
            if arg in ("--config", "-c") and i + 1 < len(args)
            else (arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        )
        if value is not None and not _inline_yaml(value):
            stem = Path(value).stem
            if stem in ("config",) and Path(value).parent.name:  # a run's saved config: name it by its run
                stem = Path(value).parent.parent.name or stem
            names.append(stem)
    return "+".join(names) or None


def _inline_yaml(value: str) -> bool:
    return not Path(value).is_file() and _shipped(value) is None and any(c in value for c in "{}:\n")
