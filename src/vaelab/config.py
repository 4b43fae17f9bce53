"""A run's configuration: :class:`TrainConfig` (saved with every checkpoint), the presets, and the model it builds."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vaelab.estimators import ELBO_FORMS
from vaelab.likelihoods import LIKELIHOODS
from vaelab.models import MODELS
from vaelab.nets import ARCHITECTURES
from vaelab.objectives import OBJECTIVES, check_objective_arguments
from vaelab.optimizers import OPTIMIZERS, make_optimizer
from vaelab.posteriors import POSTERIORS
from vaelab.priors import PRIORS
from vaelab.schedules import SCHEDULES, make_schedule


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved as JSON in the run directory and inside every checkpoint."""

    # data (read by the command line and load_run; the Trainer itself is handed tensors)
    dataset: str = "auto"  # a name in vaelab.data.DATASETS, a path (.npz/.npy/image folder), or "auto":
    # MNIST wherever a copy is found, else Fashion-MNIST (which Debian's dataset-fashion-mnist provides offline)
    data_dir: str | None = None  # where to look first (else VAELAB_DATA_DIR, the cache, system copies)
    validation_size: int = 10000  # examples carved from train (fixed seed) for validation
    max_examples: int | None = None  # truncate every split (quick runs)
    labels: int | None = None  # semi-supervised: keep the labels of this many training examples (balanced over the
    # classes, drawn with the seed: vaelab.data.label_subset) and hide the rest (y = -1); only for a model that
    # trains on partly labelled data (one with a labelled_share, e.g. "m2"). None: every label the data hold
    # model: a family of vaelab.models.MODELS, and its parts as {name, options} (each name a key of its registry,
    # each options dict keyword arguments of what the name builds; see REGISTRIES and OPTIONS below)
    model: str = "vae"  # key of vaelab.models.MODELS
    model_options: dict[str, Any] = field(default_factory=dict)  # keyword options of the family's from_config, e.g.
    # {"classes": 10} for "m2"; the families that take none refuse any
    architecture: str = "mlp"  # key of vaelab.nets.ARCHITECTURES
    architecture_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"hidden": [512, 256]}
    latent_dim: int = 32
    prior: str = "standard-normal"  # key of vaelab.priors.PRIORS
    prior_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"components": 10}
    posterior: str = "diagonal-gaussian"  # key of vaelab.posteriors.POSTERIORS
    posterior_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"min_scale": 1e-4}
    likelihood: str = "bernoulli"  # key of vaelab.likelihoods.LIKELIHOODS
    likelihood_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"scale": 0.1}
    init_decoder_bias: bool = True  # start the decoder's output bias at the training-set pixel means
    classes: int = 10  # labels 0..classes-1, for the models that read or predict them (classifier, cvae)
    # objective
    objective: str = "elbo"  # key of vaelab.objectives.OBJECTIVES
    k: int = 1  # samples per example in the objective
    form: str = "kl"  # ELBO form, for the objectives that take one
    objective_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"free_nats": 0.5}
    schedule: str = "constant"  # key of vaelab.schedules.SCHEDULES (beta or capacity)
    schedule_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"steps": 10000, "start": 4.0}
    # optimization
    batch_size: int = 100
    epochs: int = 10
    max_steps: int | None = None  # stop after this many steps (overrides epochs when smaller)
    lr: float = 1e-3
    optimizer: str = "adam"  # key of vaelab.optimizers.OPTIMIZERS: "adam", "adamw", "sgd"
    optimizer_options: dict[str, Any] = field(default_factory=dict)  # passed to it, e.g. {"weight_decay": 0.01}
    lr_decay: str = "none"  # "none" or "cosine" (to 0 at the last step)
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    binarize: bool | None = None  # dynamic binarization (a fresh Bernoulli draw of every batch); None: iff the
    # likelihood's data are binary (its class's ``binary``, e.g. Bernoulli)
    # evaluation and bookkeeping
    seed: int = 0
    log_every: int = 50  # steps between train metric lines
    eval_every: int | None = None  # steps between validation passes; None: once per epoch
    eval_k: int = 100  # importance samples for the validation IWAE bound
    eval_examples: int | None = 1000  # validation examples evaluated each time, spread over the split (None: all)
    checkpoint_every: int | None = None  # steps between checkpoints; None: once per epoch
    keep_last: int = 3  # step checkpoints kept (plus 'best')
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    bf16: bool = False  # bfloat16 autocast of the training steps (CUDA, or CPUs with AVX-512 BF16 / AMX); evaluation
    # and the validation passes stay in float32
    compile: bool | None = None  # torch.compile the whole step (gradients and Adam update in one graph; under
    # torchrun the objective): 1.3-1.6x the steps/s of a hand-written loop on this project's CPUs for a one-off
    # compilation of 5-60 s; bf16 on top: 0.9-1.5x more, by CPU and batch size (docs/performance.md). None: compile
    # when the run trains on >= AUTO_COMPILE_SAMPLES examples (e.g. 100 MNIST epochs), where it repays itself
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is wrong: a value not of the field's type (one check for
        every field, from its annotation: :func:`check_field_types`), a name not in its registry, options its target
        does not take, a value out of range, a device torch cannot parse, or a setting the model family refuses (its
        ``check_config``)."""
        check_field_types(self)
        for name, registry in REGISTRIES.items():
            if getattr(self, name) not in registry:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(registry)}")
        # the types are checked above: what remains are the ranges
        for name in ("latent_dim", "k", "batch_size", "log_every", "eval_k", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs!r}")
        if self.validation_size < 0:
            raise ValueError(f"validation_size must be an integer >= 0, got {self.validation_size!r}")
        if not 0 <= self.seed < 2**32:  # the range every seeded library takes (numpy's legacy seed, torch, Python)
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        for name in ("max_steps", "eval_every", "checkpoint_every", "eval_examples", "max_examples", "labels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_device(self.device)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        check_model_options(self)
        if self.labels is not None and getattr(MODELS[self.model], "labelled_share", None) is None:
            raise ValueError(
                f"the {self.model!r} model does not train on partly labelled data: labels={self.labels!r} is for a "
                "semi-supervised model such as 'm2'; leave labels at None"
            )
        check_config = getattr(MODELS[self.model], "check_config", None)
        if check_config is not None:
            check_config(self)
        for name in OPTIONS:  # after the model's own check, which may say it does not use them at all
            check_options(self, name)
        check_objective_options(self)
        if not isinstance(self.optimizer_options, dict):
            raise ValueError(f"optimizer_options must be a dict, got {self.optimizer_options!r}")
        make_optimizer(self.optimizer, [torch.zeros(1, requires_grad=True)], self.lr, self.optimizer_options)

    @property
    def binarizes(self) -> bool:
        """Whether batches are binarized: as set, or by default exactly when the likelihood's data are binary."""
        return LIKELIHOODS[self.likelihood].binary if self.binarize is None else self.binarize

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The config of ``data`` (a JSON object or TOML table of fields; those not given keep their defaults).

        Raises ``ValueError`` for unknown keys and for every value :meth:`validate` refuses."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a config must be a mapping of field names to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
        if data.get("architecture") == "iwae-2layer":  # saved before the two-layer model became a model family
            data = {**data, "model": "iwae-2layer", "architecture": "mlp", "latent_dim": 150}
        return cls(**data)

    @classmethod
    def from_saved(cls, data: Any, source: str | Path) -> TrainConfig:
        """The config a run saved (its ``config.json``, or a checkpoint's ``state.json``), read from ``source``.

        Unlike :meth:`from_dict`, a field of :data:`ALWAYS_SAVED` may not be missing: every vaelab has written those,
        so a saved config without one is damaged, and a default (say the mlp architecture) would only build a model
        the weights do not fit. Fields added since default to what runs did before them. Raises ``ValueError`` in one
        line naming ``source`` and the field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: the saved config is not a JSON object of fields, got {type(data).__name__}")
        missing = [name for name in ALWAYS_SAVED if name not in data]
        if missing:
            raise ValueError(f"{source}: the saved config has no {', '.join(missing)} (a damaged or hand-edited file)")
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


# The fields every version of vaelab has saved with a run (TrainConfig as first written, commit 0f8a7fe): required in
# a saved config (TrainConfig.from_saved); those added later (model, posterior, optimizer, data fields, ...) are not.
ALWAYS_SAVED = (
    "architecture", "architecture_options", "latent_dim", "prior", "likelihood", "likelihood_options",
    "init_decoder_bias", "objective", "k", "form", "objective_options", "schedule", "schedule_options", "batch_size",
    "epochs", "max_steps", "lr", "lr_decay", "grad_clip", "binarize", "seed", "log_every", "eval_every", "eval_k",
    "eval_examples", "checkpoint_every", "keep_last", "device", "progress",
)  # fmt: skip


# --- the type check every field gets, from its annotation ------------------------------------------------------------
_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a finite number", str: "a string"}


@functools.cache
def _field_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _expected(hint: Any) -> str:
    """How a message names what a field of type ``hint`` takes, e.g. "an integer or None"."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [_expected(a) for a in args if a is not type(None)]
        return " or ".join(kinds + (["None"] if type(None) in args else []))
    if hint is dict or typing.get_origin(hint) is dict:
        return "a dict (a JSON object / TOML table) with string keys"
    return _TYPE_NAMES[hint]


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint``: bool, int (not bool), float (a finite int or float, not bool), str,
    dict[str, ...], or a union of those (``X | None``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is dict or typing.get_origin(hint) is dict:
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int in Python, never a number here
        return False
    if hint is float:
        return isinstance(value, int | float) and math.isfinite(value)
    if hint in (int, str):
        return isinstance(value, hint)
    raise TypeError(f"no type check for a config field of type {hint!r}")  # a new kind of field: add it above


def check_field_types(config: TrainConfig) -> None:
    """Raise ``ValueError`` for the first field whose value is not of its annotated type, in one line naming the
    field, the type expected and the value given (``lr = "abc"``, ``epochs = "5"``, ``binarize = "yes"``,
    ``lr = inf``, ``architecture_options = "mlp"``)."""
    for f in dataclasses.fields(config):
        hint, value = _field_hints()[f.name], getattr(config, f.name)
        if not _has_type(value, hint):
            raise ValueError(f"{f.name} must be {_expected(hint)}, got {value!r} ({type(value).__name__})")


def check_device(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is "auto" or a device string torch parses ("cpu", "cuda", "cuda:1",
    "mps"). Whether that device is present is not checked here: a config may be written on one machine and run on
    another (:func:`resolve_device` checks, when the run starts)."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f'device must be "auto" or a torch device such as "cpu", "cuda" or "cuda:1", got {name!r}'
        ) from err


# compile=None compiles runs on at least this many training examples (steps x batch size): a compilation costs ~5-20 s
# here and saves ~13 us per example at batch 100 (30k -> 50k examples/s), so it repays itself from ~1.5M examples;
# at 5M (100 epochs of MNIST's 50k) it saves a minute or more (docs/performance.md)
AUTO_COMPILE_SAMPLES = 5_000_000

LR_DECAYS = {
    "none": lambda step, total: 1.0,
    "cosine": lambda step, total: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1))),
}


# --- the registries a config names, and what each *_options dict is passed to ------------------------------------
# ONE map for TrainConfig.validate and the command line's choices: field -> the registry its value must be a key of.
REGISTRIES: dict[str, Mapping[str, Any]] = {
    "model": MODELS,
    "architecture": ARCHITECTURES,
    "prior": PRIORS,
    "posterior": POSTERIORS,
    "likelihood": LIKELIHOODS,
    "objective": OBJECTIVES,
    "schedule": SCHEDULES,
    "lr_decay": LR_DECAYS,
    "form": dict.fromkeys(ELBO_FORMS),
    "optimizer": OPTIMIZERS,
}

# field -> (the field naming what the options go to, the arguments the builder passes itself): the options must be
# keyword parameters of that class or function, other than those.
OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "architecture_options": ("architecture", ("data_shape", "latent_dim", "context_features", "params_shape")),
    "prior_options": ("prior", ("latent_dim",)),
    "posterior_options": ("posterior", ()),
    "likelihood_options": ("likelihood", ("data_shape",)),
    "schedule_options": ("schedule", ()),
}


def option_names(target: Any, supplied: Sequence[str] = ()) -> list[str] | None:
    """The keyword parameters a class or function takes, less ``supplied``; None if it takes any (``**kwargs``)."""
    parameters = inspect.signature(target).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in keyword and p.name not in supplied]


def check_options(config: TrainConfig, field_name: str) -> None:
    """Raise ``ValueError`` if ``config.<field_name>`` is not a dict of keyword arguments its target takes."""
    options = getattr(config, field_name)
    if not isinstance(options, dict):
        raise ValueError(f"{field_name} must be a dict (a JSON object / TOML table), got {options!r}")
    owner, supplied = OPTIONS[field_name]
    name = getattr(config, owner)
    valid = option_names(REGISTRIES[owner][name], supplied)
    unknown = [] if valid is None else sorted(set(options) - set(valid))
    if unknown:
        takes = f"it takes {', '.join(valid)}" if valid else "it takes none"
        raise ValueError(f"unknown {field_name} {', '.join(map(repr, unknown))} for {owner} {name!r}; {takes}")


def check_model_options(config: TrainConfig) -> None:
    """Refuse ``model_options`` that the family's ``from_config`` does not take as keyword arguments (beyond
    ``config`` and ``data_shape``), naming those it takes."""
    options = config.model_options
    family: Any = MODELS[config.model]  # a registered class: register_model checked it has from_config
    valid = option_names(family.from_config, ("config", "data_shape"))
    unknown = [] if valid is None else sorted(set(options) - set(valid))
    if unknown:
        takes = f"it takes {', '.join(valid)}" if valid else "it takes none"
        raise ValueError(f"unknown model_options {', '.join(map(repr, unknown))} for model {config.model!r}; {takes}")


def check_objective_options(config: TrainConfig) -> None:
    """Refuse, when the config is built, keyword arguments the objective would refuse at its first step: missing,
    unknown, or set both by ``objective_options`` and by the schedule (which also checks ``schedule_options``)."""
    objective = OBJECTIVES[config.objective]
    parameters = inspect.signature(objective).parameters
    options = dict(config.objective_options)
    if "form" in parameters:  # the config's form goes to the objectives that take one (as the Trainer passes it)
        options.setdefault("form", config.form)
    from_schedule = make_schedule(config.schedule, **config.schedule_options).objective_kwargs(0)
    check_objective_arguments(config.objective, config.schedule, options, from_schedule)


def build_model(config: TrainConfig, data_shape: Sequence[int]) -> nn.Module:
    """The model a config describes, for data of shape ``data_shape`` (weights freshly initialised): the family
    ``config.model`` of :data:`vaelab.models.MODELS` builds itself (with ``config.model_options``)."""
    family: Any = MODELS[config.model]  # a registered class: register_model checked it has from_config
    return family.from_config(config, tuple(data_shape), **config.model_options)


def resolve_device(name: str) -> torch.device:
    """The device a config's ``device`` names: ``"auto"`` is this process's CUDA device (``$LOCAL_RANK``) if CUDA is
    available, else the CPU. Raises ValueError for a CUDA device on a machine without CUDA."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


# Named starting points for a config (the command line's --preset); fields not named keep their defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "mlp": {"architecture": "mlp", "latent_dim": 32, "binarize": True},
    "iwae-1layer": {
        "architecture": "iwae-1layer",
        "latent_dim": 50,
        "likelihood": "bernoulli",
        "binarize": True,
        "validation_size": 0,
        "batch_size": 100,
    },
    "iwae-2layer": {
        "model": "iwae-2layer",
        "latent_dim": 150,  # z1: 100 and z2: 50 units
        "likelihood": "bernoulli",
        "binarize": True,
        "validation_size": 0,
        "batch_size": 100,
    },
    "conv": {"architecture": "conv", "latent_dim": 32, "binarize": True, "architecture_options": {"base_channels": 32}},
}
