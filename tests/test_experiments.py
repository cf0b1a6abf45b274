"""Every experiment file builds through the Lightning CLI (no training), with the method and the key
values it promises; ablation overlays change exactly their knobs when stacked on an SMML config."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from smml_lightning.cli import lightning_main
from smml_lightning.experiments import EXPERIMENTS_DIR
from smml_lightning.lit.baselines import MAMLModule, SingleBranch
from smml_lightning.lit.cmc import CMC
from smml_lightning.lit.smml import SMML
from smml_lightning.models.backbone import MMFormer
from smml_lightning.models.baselines import UNetBaseline
from smml_lightning.models.cmc import CMCNet
from smml_lightning.models.maml import MAML

EXPERIMENTS = EXPERIMENTS_DIR
FULL_CONFIGS = sorted(EXPERIMENTS.glob("*.yaml"))
OVERLAYS = sorted((EXPERIMENTS / "ablations").glob("*.yaml"))
SMML_BASES = ("synthetic", "brats2018")

# What each companion config must build: module class, network class, data.n_masks.
COMPANIONS = {
    "single": (SingleBranch, MMFormer, 1),
    "unet": (SingleBranch, UNetBaseline, 1),
    "maml": (MAMLModule, MAML, 1),
    "cmc": (CMC, CMCNet, 1),
}
# Config keys each overlay may change, and the values it sets.
OVERLAY_CHANGES = {
    "no_pixel_hcc": {"model.init_args.w_pixel": 0.0},
    "no_feature_hcc": {"model.init_args.w_sample": 0.0, "model.init_args.w_class": 0.0},
    "no_prior": {
        "model.init_args.use_prior": False,
        "model.init_args.refiner": None,
        "data.use_prior": False,
    },
    "shared_mask": {"model.init_args.share_mask": True},
    "independent_peers": {
        "model.init_args.w_pixel": 0.0,
        "model.init_args.w_sample": 0.0,
        "model.init_args.w_class": 0.0,
        "model.init_args.use_prior": False,
        "model.init_args.refiner": None,
        "data.use_prior": False,
    },
}


@cache
def build(*configs: Path) -> tuple[Any, dict[str, Any]]:
    """The CLI's model, datamodule and flattened config for ``configs`` given in order (no run)."""
    args: list[str] = []
    for path in configs:
        args += ["--config", str(path)]
    # Logger off: the configs' W&B logger would create its save_dir in the working directory.
    cli = lightning_main([*args, "--trainer.logger=false"], run=False)
    values = cli.config.as_dict()
    values.pop("config")  # the config file paths themselves
    return cli, flatten(values)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def raw(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())


def test_file_sets_are_complete() -> None:
    names = {p.stem for p in FULL_CONFIGS}
    for base in SMML_BASES:
        assert {f"{base}_{m}" for m in COMPANIONS} <= names
    assert {p.stem for p in OVERLAYS} == set(OVERLAY_CHANGES)


@pytest.mark.parametrize("path", FULL_CONFIGS, ids=lambda p: p.stem)
def test_full_config_builds_consistently(path: Path) -> None:
    cli, cfg = build(path)
    model, data = cli.model, cli.datamodule
    assert data.hparams.n_masks >= model.n_masks, f"{path.name}: data.n_masks below what the method needs"
    needs_prior = isinstance(model, SMML) and model.refiners is not None
    assert data.hparams.use_prior == needs_prior, f"{path.name}: data.use_prior disagrees with the method"
    assert model.roi_size == (data.hparams.patch_size,) * 3  # linked by the CLI


@pytest.mark.parametrize("base", SMML_BASES)
@pytest.mark.parametrize("method", sorted(COMPANIONS))
def test_companion_config(base: str, method: str) -> None:
    module_cls, net_cls, n_masks = COMPANIONS[method]
    cli, cfg = build(EXPERIMENTS / f"{base}_{method}.yaml")
    assert type(cli.model) is module_cls
    assert all(type(net) is net_cls for net in cli.model.inference_models())
    assert cli.datamodule.hparams.n_masks == n_masks and cli.datamodule.hparams.use_prior is False
    _, smml = build(EXPERIMENTS / f"{base}.yaml")
    # Same budget as SMML: schedule, patches and (on synthetic data) the optimizer, lr and data sizes.
    shared = [
        k
        for k in smml
        if k.startswith(("trainer.", "data."))
        and k not in ("data.n_masks", "data.use_prior", "data.use_unlabeled", "trainer.default_root_dir")
    ]
    if base == "synthetic" or method != "maml":
        shared += ["model.init_args.optimizer", "model.init_args.lr", "model.init_args.weight_decay"]
    differing = {k: (cfg.get(k), smml[k]) for k in shared if cfg.get(k) != smml[k]}
    assert not differing, f"{base}_{method}.yaml differs from {base}.yaml: {differing}"


def test_every_experiment_has_its_own_run_and_checkpoint_folders() -> None:
    folders = {}
    for path in FULL_CONFIGS:
        _, cfg = build(path)
        run = Path(cfg["trainer.default_root_dir"])
        assert run.parent == Path("runs") / path.stem, f"{path.name}: run folder {run}"
        assert Path(cfg["checkpoint.dirpath"]) == run / "checkpoints"
        folders[path.stem] = run.parent
    assert len(set(folders.values())) == len(folders)
    _, overlaid = build(EXPERIMENTS / "brats2018.yaml", EXPERIMENTS / "ablations" / "no_prior.yaml")
    assert Path(overlaid["trainer.default_root_dir"]).parent == Path("runs") / "brats2018+no_prior"


def test_configs_share_their_base() -> None:
    """brats2020 is brats2018 with other paths; the synthetic configs take trainer and data from one base."""
    from smml_lightning.experiments import chain, load

    assert [p.stem for p in chain("brats2020")] == ["brats", "brats2018", "brats2020"]
    differ = {
        k
        for k in set(flatten(load("brats2018"))) | set(flatten(load("brats2020")))
        if flatten(load("brats2018")).get(k) != flatten(load("brats2020")).get(k)
    }
    assert differ == {"data.cache_dir"}
    for path in FULL_CONFIGS:
        own = yaml.safe_load(path.read_text())
        assert "trainer" not in own and "checkpoint" not in own, f"{path.name} repeats its base's blocks"
        assert (
            f"# base: {chain(path)[-2].relative_to(EXPERIMENTS).with_suffix('').as_posix()}"
            in path.read_text()
        )


def test_brats2018_maml_uses_nnunet_optimisation() -> None:
    model = build(EXPERIMENTS / "brats2018_maml.yaml")[0].model
    assert (model.optimizer_name, model.lr) == ("sgd", 1e-2)
    # The public MAML trainer builds its modality models with nnU-Net's base features halved (32 // 2).
    assert model.net.width == 16
    assert raw("synthetic_maml")["model"]["init_args"]["lr"] == raw("synthetic")["model"]["init_args"]["lr"]


@pytest.mark.parametrize("base", SMML_BASES)
@pytest.mark.parametrize("overlay", sorted(OVERLAY_CHANGES))
def test_ablation_overlay_changes_only_its_knobs(base: str, overlay: str) -> None:
    path = EXPERIMENTS / "ablations" / f"{overlay}.yaml"
    assert f"--config ablations/{overlay}" in path.read_text(), "usage missing from header"
    cli, cfg = build(EXPERIMENTS / f"{base}.yaml", path)
    _, reference = build(EXPERIMENTS / f"{base}.yaml")
    wanted = OVERLAY_CHANGES[overlay]
    missing = object()
    changed = {k for k in set(cfg) | set(reference) if cfg.get(k, missing) != reference.get(k, missing)}
    # Nulling the refiner drops its nested init_args keys too; the run folder is the experiment's own.
    changed = {
        k
        for k in changed
        if not k.startswith("model.init_args.refiner.")
        and k not in ("trainer.default_root_dir", "checkpoint.dirpath", "experiment")
    }
    assert changed == set(wanted), f"{overlay} on {base}: changed {sorted(changed)}"
    assert all(cfg[k] == v for k, v in wanted.items())
    model = cli.model
    assert isinstance(model, SMML)
    expected = {
        "no_pixel_hcc": lambda: model.w["pixel"] == 0 and model.w["sample"] == 1,
        "no_feature_hcc": lambda: model.w["sample"] == 0 and model.w["cls"] == 0 and model.w["pixel"] == 1,
        "no_prior": lambda: model.refiners is None and not cli.datamodule.hparams.use_prior,
        "shared_mask": lambda: model.share_mask and model.refiners is not None,
        "independent_peers": lambda: (
            model.refiners is None
            and not model.share_mask
            and not any(model.w[k] for k in ("pixel", "sample", "cls"))
        ),
    }[overlay]
    assert expected()


@pytest.mark.parametrize("config", ["synthetic", "synthetic_single", "synthetic_maml", "brats2018_unet"])
def test_public_seg_loss_variant_sets_the_loss_of_any_method(config: str) -> None:
    path = EXPERIMENTS / "variants" / "public_seg_loss.yaml"
    assert "--config variants/public_seg_loss" in path.read_text(), "usage missing from header"
    model = build(EXPERIMENTS / f"{config}.yaml", path)[0].model
    loss = model.seg_loss
    assert loss.class_weighted_ce is True and loss.dice.include_background is True
    default = build(EXPERIMENTS / f"{config}.yaml")[0].model.seg_loss
    assert default.class_weighted_ce is False and default.dice.include_background is False


@pytest.mark.parametrize(
    ("overlay", "resized", "reference"),
    [
        ("maml_at_smml_parameters", "synthetic_maml", "synthetic"),
        ("smml_at_maml_parameters", "synthetic", "synthetic_maml"),
    ],
)
def test_equal_parameter_variants_match_the_other_methods_size(
    overlay: str, resized: str, reference: str
) -> None:
    path = EXPERIMENTS / "variants" / f"{overlay}.yaml"
    assert f"--config variants/{path.stem}" in path.read_text(), "usage missing from header"

    def inference_parameters(*configs: Path) -> int:
        model = build(*configs)[0].model
        return sum(p.numel() for net in model.inference_models() for p in net.parameters())

    default = inference_parameters(EXPERIMENTS / f"{resized}.yaml")
    target = inference_parameters(EXPERIMENTS / f"{reference}.yaml")
    ratio = inference_parameters(EXPERIMENTS / f"{resized}.yaml", path) / target
    assert abs(ratio - 1) < 0.1, f"{overlay}: {ratio:.2f}x the parameters of {reference}"
    assert abs(default / target - 1) > 0.3  # without the overlay the two sizes differ (about 2x)


def transformer_shapes(*networks: MMFormer) -> set[tuple[int, int, int, float]]:
    """(width, heads, MLP width, dropout) of every bottleneck transformer layer of ``networks``."""
    layers = [layer for net in networks for t in [*net.intra, net.inter] for layer in t.layers]
    return {
        (t.self_attn.embed_dim, t.self_attn.num_heads, t.linear1.out_features, t.dropout.p) for t in layers
    }


PUBLIC_TRANSFORMER = {(512, 8, 4096, 0.1)}  # mmFormer's and SMML's public code


def test_mmformer_defaults_are_the_public_codes_transformer() -> None:
    assert transformer_shapes(MMFormer(base_width=4, patch_size=32)) == PUBLIC_TRANSFORMER


@pytest.mark.parametrize("config", ["brats2018", "brats2020", "brats2018_single"])
def test_paper_configs_build_the_public_codes_transformer(config: str) -> None:
    model = build(EXPERIMENTS / f"{config}.yaml")[0].model
    assert transformer_shapes(*model.inference_models()) == PUBLIC_TRANSFORMER


@pytest.mark.parametrize("config", ["synthetic", "synthetic_single"])
def test_paper_transformer_variant_gives_synthetic_configs_the_papers_transformer(config: str) -> None:
    path = EXPERIMENTS / "variants" / "paper_transformer.yaml"
    assert f"--config variants/{path.stem}" in path.read_text(), "usage missing from header"
    nets = build(EXPERIMENTS / f"{config}.yaml")[0].model.inference_models()
    assert transformer_shapes(*nets) == {(64, 4, 256, 0.0)}
    overlaid = build(EXPERIMENTS / f"{config}.yaml", path)[0].model.inference_models()
    assert transformer_shapes(*overlaid) == PUBLIC_TRANSFORMER
    convs = lambda n: sum(p.numel() for m in (n.encoder, n.decoder) for p in m.parameters())  # noqa: E731
    assert [convs(net) for net in overlaid] == [convs(net) for net in nets]  # convolutions untouched


@pytest.mark.parametrize("fraction", [10, 20])
@pytest.mark.parametrize("config", ["synthetic_cmc", "synthetic_maml", "brats2018_cmc"])
def test_labeled_fraction_overlay_sets_only_the_fraction(config: str, fraction: int) -> None:
    path = EXPERIMENTS / "labeled" / f"labeled_{fraction}.yaml"
    assert f"--config labeled/{path.stem}" in path.read_text(), "usage missing from header"
    cli, cfg = build(EXPERIMENTS / f"{config}.yaml", path)
    _, reference = build(EXPERIMENTS / f"{config}.yaml")
    run_folder = ("trainer.default_root_dir", "checkpoint.dirpath", "experiment")  # the experiment's own
    assert {k for k in cfg if cfg[k] != reference.get(k) and k not in run_folder} == {"data.labeled_fraction"}
    assert cli.datamodule.hparams.labeled_fraction == fraction / 100
    # semi-supervised methods train on the unlabeled rest, supervised ones do not
    assert cli.datamodule.hparams.use_unlabeled is getattr(cli.model, "uses_unlabeled", False)
