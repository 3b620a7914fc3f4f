"""The config schema: every key of an approxrun run, with its type, default and allowed range.

One dataclass per config section (OmegaConf structured configs). Hydra composes the YAML files of
``conf/`` on top of :class:`RunConfig`, so an unknown key or a value of the wrong type is refused
during composition, naming the key. Value ranges are declared beside each field (``checked``) and
enforced by :mod:`approxrun.config` after composition. A schedule's stages are a mapping here (OmegaConf
has no unions): a schedule file gives each entry its kind's settings class from the ConfigStore,
and every stage is checked again, complete, by merging it into its kind's class below.

To add a key: add a field to its section's class (with a comment); to add a section: a class and
a field of :class:`RunConfig`; to add a stage kind: a settings class, named in its ``register``.
This module imports neither torch nor Hydra: the command line reads it before anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


def checked(default: Any = MISSING, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, choices: tuple[str, ...] | str | None = None, default_factory=None):
    """A dataclass field with a range (``low`` .. ``high``; ``low_open``: strictly above ``low``) or
    ``choices`` (a tuple, or ``"module:NAME"`` of a tuple owned by the code that implements them)."""
    metadata = {"low": low, "high": high, "low_open": low_open, "choices": choices}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# training settings of a stage (model.train.<kind>, overridable per stage in the schedule)


@dataclass
class OptimizerConfig:
    name: str = checked("sgd", choices="approxrun.training:OPTIMIZERS")
    lr: float = checked(low=0.0, low_open=True)
    momentum: float = checked(0.9, low=0.0)  # sgd only
    weight_decay: float = checked(0.0, low=0.0)


@dataclass
class SchedulerConfig:
    name: str = checked("none", choices="approxrun.training:SCHEDULERS")
    step_size: int = checked(1, low=1)  # step: epochs per decay
    milestones: List[int] = field(default_factory=list)  # multistep: epochs at which the rate decays
    gamma: float = checked(0.1, low=0.0, low_open=True)  # step, multistep: decay factor


@dataclass
class TrainingConfig:
    epochs: int = checked(low=0)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


# ---------------------------------------------------------------------------------------------
# config groups


@dataclass
class ModelConfig:
    """A model: an own architecture (approxrun/models) or a torchvision classification model by name."""

    name: str = MISSING  # an own architecture (approxrun/models) or a torchvision classification model
    # trained weights to start from: a state_dict file, a stage checkpoint of an earlier run, or for a
    # torchvision model a weights name (DEFAULT, IMAGENET1K_V1); with weights the baseline is not trained
    weights: Optional[str] = None
    train: Dict[str, TrainingConfig] = field(default_factory=dict)  # stage kind -> training defaults


@dataclass
class FactoryModelConfig(ModelConfig):
    """A user's own network (``conf/model/custom.yaml``): any other key of the node is an argument of
    the factory (the node is open, see :data:`FACTORIES`)."""

    _target_: str = MISSING  # pkg.module.function (or class) returning a torch.nn.Module


@dataclass
class DatasetConfig:
    """What every dataset has: its name and how it is loaded."""

    name: str = MISSING
    batch_size: int = checked(128, low=1)  # the global batch (split across the ranks of a data-parallel job)
    eval_batch_size: int = checked(256, low=1)
    num_workers: int = checked(0, low=0)


@dataclass
class BuiltinDatasetConfig(DatasetConfig):
    """One class for every built-in dataset; each ``conf/dataset`` file sets the keys its dataset reads."""

    root: Optional[str] = None  # where the files are (null: the data dir)
    download: bool = True  # torchvision datasets: download when missing
    split_seed: int = 0
    val_size: int = checked(5000, low=0)  # torchvision datasets: validation images taken from train
    val_fraction: float = checked(0.1, low=0.0, high=1.0)  # digits, imagefolder
    test_fraction: float = checked(0.2, low=0.0, high=1.0)  # digits, imagefolder
    image_size: Optional[int] = checked(None, low=1)  # digits, imagefolder, synthetic
    channels: Optional[int] = checked(None, low=1)  # imagefolder, synthetic
    augment: bool = True  # cifar: random crops and flips in training
    num_classes: Optional[int] = checked(None, low=2)  # synthetic
    train_size: Optional[int] = checked(None, low=1)  # synthetic
    test_size: Optional[int] = checked(None, low=1)  # synthetic
    # imagefolder: auto (the transforms published with torchvision weights when model.weights names
    # them), plain (resize to image_size, normalise to [-1, 1]) or a torchvision weights name
    preprocess: str = "plain"


@dataclass
class FactoryDatasetConfig(DatasetConfig):
    """A user's own data (``conf/dataset/custom.yaml``): any other key of the node is an argument of
    the factory (the node is open, see :data:`FACTORIES`)."""

    _target_: str = MISSING  # pkg.module.function returning the train and test datasets


@dataclass
class CostConfig:
    value: float = checked(low=0.0)
    kind: str = checked(choices=("power", "proxy"))
    unit: str = MISSING
    source: str = MISSING
    area: Optional[float] = None
    delay: Optional[float] = None


@dataclass
class MultiplierConfig:
    """A multiplier: any design or EvoApproxLib name resolves by name alone; ``conf/multiplier``
    holds only entries with facts (published figures) and ``file`` (a LUT file)."""

    name: Optional[str] = "exact"  # null with a path: the file's name
    signed: bool = True  # built-in designs and LUT files (EvoApproxLib names say it)
    path: Optional[str] = None  # a LUT file
    format: Optional[str] = checked(None, choices="approxrun.multipliers.io:FORMATS")  # null: from the suffix
    cost: Optional[CostConfig] = None  # replaces the design's own cost (e.g. published power)
    published: Optional[Dict[str, float]] = None  # published error figures, checked against the LUT
    swap_operands: bool = False  # true: the activation takes operand B (the transposed LUT)


@dataclass
class LibraryConfig:
    name: str = MISSING
    exact: Optional[str] = None  # its exact multiplier: the run's multiplier under multiplier=auto before select
    multipliers: List[str] = field(default_factory=list)  # candidates of the select stage


@dataclass
class ScheduleConfig:
    name: str = MISSING
    order: List[str] = field(default_factory=list)  # stages in the order they run
    stages: Dict[str, Any] = field(default_factory=dict)  # name -> settings of its kind (classes below)


# ---------------------------------------------------------------------------------------------
# sections of the primary config


@dataclass
class QuantConfig:
    bits_a: Optional[int] = checked(None, low=2, high=8)  # activation bits (null: the multiplier's A bits)
    bits_b: Optional[int] = checked(None, low=2, high=8)  # weight bits (null: the multiplier's B bits)
    # affine (zero point; ReLU 0 -> lowest code) | symmetric (zero point 0, as agn-approx)
    activations: str = checked("affine", choices="approxrun.quant:ACTIVATION_SCHEMES")
    observer: str = checked("ema", choices="approxrun.quant:OBSERVERS")  # pact: learned clipping range
    per_channel: bool = False  # weights per output channel
    grad: str = checked("ste", choices="approxrun.ops:GRAD_MODES")  # ste | lut (LUT-derived gradients)
    skip: List[str] = field(default_factory=list)  # module names / glob patterns left in float


@dataclass
class LutConfig:
    """How LUT GEMMs run; every choice gives the same exact result, only the speed differs."""

    # auto (this machine's measured costs, then timed first calls) | gather | lowrank
    strategy: str = checked("auto", choices="approxrun.ops:STRATEGIES")
    # a factor on auto's measured gather time (null: 1); raise it to prefer low rank
    lookup_cost: Optional[float] = checked(None, low=0.0, low_open=True)


@dataclass
class EnergyConfig:
    # power (mW) that relative energy divides published power by; null: the exact EvoApproxLib circuit
    # of the multiplier's kind (mul8s_1KV8 0.425 mW signed, mul8u_1JFF unsigned; PDK45, published)
    exact_power_mw: Optional[float] = checked(None, low=0.0, low_open=True)


@dataclass
class CacheConfig:
    """The stage cache (approxrun/stage_cache.py)."""

    enabled: bool = True
    dir: str = "${oc.env:APPROXRUN_STAGE_CACHE,outputs/.stage_cache}"


@dataclass
class EvoapproxConfig:
    root: Optional[str] = "${oc.env:EVOAPPROX_ROOT,null}"  # your EvoApproxLib checkout


@dataclass
class RunConfig:
    """The primary config (``conf/config.yaml`` composes its groups on top of it)."""

    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    multiplier: MultiplierConfig = field(default_factory=MultiplierConfig)
    schedule: ScheduleConfig = MISSING
    library: LibraryConfig = MISSING  # candidate multipliers for the select stage
    stage: Optional[str] = None  # run the schedule up to and including this stage (null: all of it)
    seed: int = 0
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    # torch's CPU threads: auto (OMP_NUM_THREADS if set, else the CPUs this job may use: affinity mask,
    # SLURM_CPUS_PER_TASK, shared among a local sweep's concurrent jobs) or a whole number >= 1
    # (checked by approxrun.threads.thread_budget: OmegaConf has no union of str and int)
    threads: str = "auto"
    # weights-only state_dict of the converted model (a stage checkpoint), loaded after conversion;
    # model.weights is the network's own trained weights (schedule eval needs one of them)
    init_weights: Optional[str] = None
    checkpoint: Optional[str] = None  # deprecated name of init_weights
    resume: bool = True  # continue a run killed in the same run folder (its resume.pt)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lut: LutConfig = field(default_factory=LutConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    data_dir: str = "${oc.env:APPROXRUN_DATA_DIR,'~/.cache/approxrun/data'}"
    evoapprox: EvoapproxConfig = field(default_factory=EvoapproxConfig)
    lmbd: Optional[float] = None  # sweep variable of experiment=lenet5_fashion_sweep (the gradient stage's lmbd)


# ---------------------------------------------------------------------------------------------
# stage settings. A schedule entry holds a kind and that kind's own settings (``*Settings``, in the
# ConfigStore group ``stage_settings``: a schedule file pulls them in with
# ``- /stage_settings@stages.NAME: KIND``); a stage function receives its kind's complete settings
# (``*Stage``: the entry, its name and, for kinds that train, ``model.train.<kind>`` underneath).


@dataclass
class StageEntry:
    kind: str = MISSING


@dataclass
class GradientSettings(StageEntry):
    kind: str = "gradient"
    lmbd: float = checked(0.2, low=0.0)  # weight of the noise reward in the loss
    sigma_max: float = checked(0.5, low=0.0, low_open=True)  # the reward saturates at |sigma| = sigma_max
    initial_noise: float = checked(0.025, low=0.0)  # sigma of every layer at the start
    sample_size: int = checked(128, low=1)  # training images recorded for the fit report (non-exact multiplier)
    rows: int = checked(512, low=1)  # activation rows per layer for the prediction's row part


@dataclass
class SelectSettings(StageEntry):
    kind: str = "select"
    library: LibraryConfig = MISSING  # the candidates (${library}: part of the stage's cache key)
    multiplier: Optional[str] = "auto"  # ${multiplier.name}: auto chooses per layer; any other (a file: null) goes everywhere
    exact_power_mw: Optional[float] = checked(None, low=0.0, low_open=True)  # ${energy.exact_power_mw}
    sample_size: int = checked(128, low=1)  # training images whose layer operands are recorded
    rows: int = checked(512, low=1)


@dataclass
class EvalSettings(StageEntry):
    kind: str = "eval"
    mode: str = checked("approx", choices=("float", "quant", "approx"))
    # training batches that calibrate the activation ranges the weights do not carry (float weights)
    calibration_batches: int = checked(4, low=0)


STAGE_SETTINGS = (GradientSettings, SelectSettings, EvalSettings)  # the ConfigStore group stage_settings


@dataclass
class NamedStage(StageEntry):
    name: str = MISSING  # the entry's key in schedule.stages (the runner sets it)


@dataclass
class TrainingStage(NamedStage, TrainingConfig):
    """baseline, quant, approx: training settings only (defaults from ``model.train.<kind>``)."""


@dataclass
class GradientStage(GradientSettings, TrainingStage):
    pass


@dataclass
class SelectStage(SelectSettings, NamedStage):
    pass


@dataclass
class EvalStage(EvalSettings, NamedStage):
    pass


# ---------------------------------------------------------------------------------------------
# Hydra's ConfigStore

SCHEMA_NAME = "approxrun_schema"

# Config-group files pull in their schema with ``- /schema@_here_: NAME`` (ConfigStore group
# ``schema``) where it is not the field's own class: the built-in datasets' keys, and the factory
# nodes of a user's own model and data, which are open: their other keys are the factory's arguments.
SCHEMAS = {"dataset": BuiltinDatasetConfig, "model_factory": FactoryModelConfig,
           "dataset_factory": FactoryDatasetConfig}
FACTORIES = {"model": (ModelConfig, FactoryModelConfig), "dataset": (BuiltinDatasetConfig, FactoryDatasetConfig)}


def section_schema(section: str, node) -> type:
    """The class of a ``model`` or ``dataset`` node: its factory class when it has a ``_target_``."""
    builtin, factory = FACTORIES[section]
    return factory if "_target_" in node else builtin


def register_configs() -> None:
    """Put the schema (the base of ``conf/config.yaml``), the group schemas and the default multiplier
    into Hydra's ConfigStore; ``conf/__init__.py`` calls this, so every composition of the package's
    config has it."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=RunConfig)
    for settings in STAGE_SETTINGS:
        store.store(group="stage_settings", name=settings.kind, node=settings)
    for name, schema in SCHEMAS.items():
        node = OmegaConf.structured(schema)
        if schema in (FactoryModelConfig, FactoryDatasetConfig):
            OmegaConf.set_struct(node, False)  # the factory's arguments
        store.store(group="schema", name=name, node=node)
    register_multiplier_name("exact")
    register_multiplier_name("auto")


def register_multiplier_name(name: str) -> None:
    """Make ``multiplier=NAME`` a choice of the multiplier group: a design or EvoApproxLib circuit
    resolves by its name alone, so it needs no file in ``conf/multiplier``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="multiplier", name=name, node={"name": name})
