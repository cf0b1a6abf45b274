"""Hyperparameters that rebuild a model from its checkpoint alone.

Lightning's ``LightningCLI`` already stores, for a model it builds, the parsed config as the model's
hyperparameters: the model's class as ``_class_path``, networks and losses as ``class_path`` /
``init_args`` dicts, and ``_instantiator`` (``lightning.pytorch.cli.instantiate_module``), which
``load_from_checkpoint`` then uses to rebuild everything through jsonargparse. A model built in plain
Python (``SMML(network=partial(MMFormer, base_width=4))``) gets the same form here, so the two kinds
of checkpoint load alike, with no config:

- a class, a ``functools.partial`` of a class (jsonargparse's callables from ``class_path`` are such
  partials too) and an object whose constructor arguments are all attributes of the same name become
  ``{"class_path": ..., "init_args": {...}}``, recursively;
- plain values (numbers, strings, lists, dicts of them) stay as they are.

A value that fits none of these cannot be rebuilt; it is left out with a warning that says to pass it
to ``load_from_checkpoint`` by name.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning.pytorch.utilities import rank_zero_warn

INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
T = TypeVar("T")
_PLAIN = (bool, int, float, str, type(None))


class NotRecordable(TypeError):
    """A constructor argument that has no ``class_path`` / ``init_args`` form."""


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _init_parameters(cls: type) -> list[inspect.Parameter]:
    params = list(inspect.signature(cls).parameters.values())
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def spec(value: Any) -> Any:
    """``value`` in the form jsonargparse parses back into the same object (see the module docstring)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [spec(v) for v in value]
    if isinstance(value, dict):
        return {str(k): spec(v) for k, v in value.items()}
    if isinstance(value, type):
        return {"class_path": class_path(value), "init_args": {}}
    if isinstance(value, functools.partial):
        # jsonargparse wraps a class as partial(call_without_instantiate_context, instantiator, cls, **init).
        target = (
            value.func
            if isinstance(value.func, type) and not value.args
            else (
                value.args[-1]
                if value.func.__module__.startswith("jsonargparse")
                and value.args
                and isinstance(value.args[-1], type)
                else None
            )
        )
        if target is None:
            raise NotRecordable(f"{value!r} is a partial of something other than a class")
        return {
            "class_path": class_path(target),
            "init_args": {k: spec(v) for k, v in value.keywords.items()},
        }
    if callable(value) and not isinstance(value, torch.nn.Module) and inspect.isfunction(value):
        raise NotRecordable(f"{value!r} is a function, not a class")
    cls = type(value)
    missing = [p.name for p in _init_parameters(cls) if not hasattr(value, p.name)]
    if missing:
        raise NotRecordable(
            f"{cls.__name__} does not keep its constructor argument(s) {missing} as attributes"
        )
    return {
        "class_path": class_path(cls),
        "init_args": {p.name: spec(getattr(value, p.name)) for p in _init_parameters(cls)},
    }


def record_hyperparameters(module: Any) -> None:
    """Put ``module.hparams`` (just saved by ``save_hyperparameters``) into the round-tripping form.

    Hyperparameters the CLI gave (they carry ``_instantiator``) are already in it; otherwise each value
    goes through :func:`spec`, and the module's class and the instantiator are added.
    """
    hparams = module._hparams
    if "_instantiator" in hparams:
        return
    for key in list(hparams):
        try:
            hparams[key] = spec(hparams[key])
        except NotRecordable as err:
            del hparams[key]
            rank_zero_warn(
                f"{type(module).__name__}: hyperparameter {key!r} is not stored in checkpoints ({err}); "
                f"pass it again when loading: load_from_checkpoint(path, {key}=...)"
            )
    hparams["_class_path"] = class_path(type(module))
    hparams["_instantiator"] = INSTANTIATOR
    module._hparams_initial = copy.deepcopy(hparams)


def checkpoint_class(checkpoint_path: str | Path, base: type[T], package: str) -> type[T] | None:
    """The subclass of ``base`` a checkpoint's hyperparameters name (``_class_path``), or ``None``.

    Lightning rebuilds a subclass from a checkpoint only once the subclass is imported (it never
    imports code a checkpoint names, so that a checkpoint cannot run code), and only through the
    subclass itself; loading through the base class uses this to find, and for this package's own
    methods import, the method's class first.
    """
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError):
        return None  # not a zip checkpoint or unreadable: Lightning's own loading reports it
    name = checkpoint.get("hyper_parameters", {}).get("_class_path")
    if not isinstance(name, str) or "." not in name:
        return None
    module_name, attr = name.rsplit(".", 1)
    if module_name.startswith(package + ".") and module_name not in sys.modules:
        importlib.import_module(module_name)
    found = getattr(sys.modules.get(module_name), attr, None)
    return found if isinstance(found, type) and issubclass(found, base) else None


# Data options that describe the fit's own run, not the data: never carried over from a checkpoint.
_RUN_DATA_KEYS = ("output_dir", "predict_root", "predict_dir")


def init_parameter_names(cls: type) -> set[str]:
    """Constructor arguments ``cls`` accepts, its base classes' (reached through ``**kwargs``) included."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass.__module__.split(".")[0] not in (
            "lightning",
            "torch",
            "builtins",
        ):
            names.update(p.name for p in _init_parameters(klass))
    return names


def _arg(key: str, value: Any) -> str:
    return f"--{key}={value if isinstance(value, str) else json.dumps(value)}"


def checkpoint_cli_args(
    args: Sequence[str], package: str, subcommands: Sequence[str] = ("validate", "test", "predict")
) -> list[str]:
    """``args`` of ``smml validate|test|predict --ckpt_path X ...`` with the checkpoint's model and data
    options put first, as defaults that every later option and config overrides.

    The Lightning CLI restores a model's hyperparameters from ``--ckpt_path``, but over the command line
    (a value given there is silently replaced; Lightning PR #21455), and it still asks for the model's
    class and every data option. The checkpoint holds all of them (the datamodule's hyperparameters are
    saved with it), so here they come first and the fit's model, split and patch size need not be
    repeated. The fit's run folders (``data.output_dir``) and prediction inputs are not carried over,
    nor are model options the class no longer accepts. The sliding-window size follows the patch size
    (a link), so a checkpoint without data options gives its model's window as the patch size.
    """
    args = list(args)
    where = next((i for i, a in enumerate(args) if a in subcommands), None)
    if where is None:
        return args
    path = None
    for i, arg in enumerate(args[where + 1 :], start=where + 1):
        if arg.startswith("--ckpt_path="):
            path = arg.split("=", 1)[1]
        elif arg == "--ckpt_path" and i + 1 < len(args):
            path = args[i + 1]
    if not path or not Path(path).is_file():
        return args
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError):
        return args  # Lightning's own loading reports it
    extra = []
    hparams = dict(checkpoint.get("hyper_parameters", {}))
    data = {
        k: v
        for k, v in checkpoint.get("datamodule_hyper_parameters", {}).items()
        if not k.startswith("_") and k not in _RUN_DATA_KEYS
    }
    model = hparams.get("_class_path")
    if isinstance(model, str):
        cls = None
        if model.startswith(package + "."):
            module_name, attr = model.rsplit(".", 1)
            cls = getattr(importlib.import_module(module_name), attr, None)
        known = init_parameter_names(cls) if isinstance(cls, type) else None
        init = {
            k: v
            for k, v in hparams.items()
            if not k.startswith("_") and k != "roi_size" and (known is None or k in known)
        }
        extra.append(_arg("model", {"class_path": model, "init_args": init}))
        if "patch_size" not in data and "roi_size" in hparams:
            data["patch_size"] = hparams["roi_size"]
    extra += [_arg(f"data.{k}", v) for k, v in data.items()]
    return args[: where + 1] + extra + args[where + 1 :]
