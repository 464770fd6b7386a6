"""Everything that defines a training run, validated up front with errors that say how to fix them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..defaults import (
    CRITERION_NAMES, EVIDENCE_MARGIN, FINETUNE, FINETUNE_MODES, KL_REDUCTION, KL_REDUCTIONS, KL_WEIGHT, NOISE_LR_SCALE,
    RANKING_CRITERIA, THRESHOLD_CRITERIA,
)
from ..errors import ConfigError, DataError

__all__ = ["TrainConfig", "comparable_settings", "CRITERION_NAMES", "KL_REDUCTION", "KL_WEIGHT", "FINETUNE_MODES", "LEGACY_DEFAULTS"]

DEVICES = ("auto", "cpu", "cuda")
GRANULARITIES = ("structure", "element")
# What a run made before a setting existed did: a config read back from such a run takes these
# (not today's defaults) for the keys it lacks.
LEGACY_DEFAULTS = {"evidence_margin": 0.0, "noise_lr_scale": 1.0, "kl_reduction": "mean", "kl_weight": 1.0,
                   "finetune": "noisy"}
#: (smallest, largest) value of each integer setting: large enough for any real run, small enough that a typo
#: (--hidden 10000000000000000, --layers 1e20) is refused at once instead of overflowing, hanging or exhausting memory
LIMITS = {
    "epochs": (0, 100_000), "finetune_epochs": (0, 100_000), "prune_every": (1, 100_000),
    "batch_size": (1, 2**20), "hidden": (1, 2**16), "layers": (0, 1_000), "image_size": (1, 4_096),
    "train_subset": (1, 2**40), "threads": (1, 4_096), "levels": (2, 100_001), "workers": (1, 1_024),
}


def check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """``value`` if it is an integer in [low, high] (default: ``LIMITS[name]``), else a ConfigError naming ``name``
    (its ``field``).  The one range check of every integer option and every integer read back from a run.

    Examples:
        >>> check_int("hidden", 150)
        150
        >>> check_int("hidden", 10**16)
        Traceback (most recent call last):
        ...
        bmrs.errors.ConfigError: hidden must be an integer in [1, 65536], got 10000000000000000
    """
    if low is None or high is None:
        low, high = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}", field=name)
    return value


def check_float(name: str, value, low: float = 0.0, high: float = math.inf, *, low_open: bool = True) -> float:
    """``value`` if it is a finite number in (low, high] (``low_open=False``: [low, high]), else a ConfigError
    naming ``name``.

    Examples:
        >>> check_float("lr", 1e-3)
        0.001
        >>> check_float("lr", float("nan"))
        Traceback (most recent call last):
        ...
        bmrs.errors.ConfigError: lr must be a finite number > 0, got nan
    """
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high)
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise ConfigError(f"{name} must be a finite number {bounds}, got {value!r}", field=name)
    return value


def _positive_float(name: str, value) -> None:
    check_float(name, value)


def _option(default, group: str, help: str, **argparse_options):
    """A TrainConfig field that is also a ``bmrs train`` option in ``group`` of its help (``option``: its name when it is
    not --FIELD-NAME; ``choices``, ``metavar``: as for argparse)."""
    return field(default=default, metadata={"group": group, "help": help, **argparse_options})


@dataclass
class TrainConfig:
    """A run: data, network, criterion and schedule.  ``validate()`` is called on construction.

    Continuous pruning: after every ``prune_every`` of the first ``epochs`` epochs the criterion
    prunes; then ``finetune_epochs`` epochs train without pruning (``finetune="deterministic"``: with
    θ fixed at E[θ]·mask and no KL term).  ``shrink=True`` removes pruned structures physically after
    every pruning step (``bmrs.compaction.shrink``), so that later epochs cost less.  The checkpoint with the best
    validation accuracy after the last pruning step is the one tested.

    Examples:
        >>> from bmrs.training import TrainConfig
        >>> TrainConfig(model="mlp", criterion="bmrs-u", p1=4, epochs=2, finetune_epochs=1).total_epochs
        3
        >>> TrainConfig(batch_size=0)
        Traceback (most recent call last):
        ...
        bmrs.errors.ConfigError: batch_size must be an integer in [1, 1048576], got 0
    """

    # A field with a ``group`` in its metadata is also a ``bmrs train`` option (bmrs.training.options builds them:
    # --NAME, or ``option``; its type from the annotation, its help, choices and metavar from here).
    dataset: str = _option("fashion-mnist", "data", "mnist, fashion-mnist, cifar10 or tinyimagenet (default: %(default)s)")
    model: str = _option("lenet5", "network and pruning", "mlp, lenet5, resnet18, resnet50 or vit (default: %(default)s)")
    criterion: str = _option("bmrs-n", "network and pruning", "pruning criterion; 'none' trains without pruning "
                             "(default: %(default)s)", choices=CRITERION_NAMES)
    p1: float = _option(8.0, "network and pruning", "BMRS_U precision in bits, 0 < p1 < 23 (default: %(default)g)")
    threshold: float | None = _option(None, "network and pruning", "threshold of snr (1.0) or ev (0.1)")
    amount: float | None = _option(None, "network and pruning", "fraction of structures to prune (needed by l2 and "
                                   "grad; for snr, ev and bmrs it replaces their own rule by ranking)")
    amount_schedule: list[int] | None = _option(
        None, "network and pruning", "structure counts to prune at each pruning step, instead of --amount (e.g. l2 "
        "matching a BMRS_N run)", metavar="K1,K2,...")
    epochs: int = _option(5, "schedule", "epochs with pruning after every --prune-every (default: %(default)s)")
    finetune_epochs: int = _option(2, "schedule", "epochs without pruning afterwards (default: %(default)s)")
    prune_every: int = _option(1, "schedule", "prune every P epochs (default: %(default)s)")
    batch_size: int = _option(32, "schedule", "mini-batch size (default: %(default)s)")
    lr: float = _option(1.4e-3, "schedule", "Adam learning rate (default: %(default)g)")
    seed: int = _option(0, "schedule", "random seed (default: %(default)s)")
    kl_reduction: str = _option(KL_REDUCTION, "schedule", "KL weighting: the mean over all structures, the paper's "
                                "layer mean, or the evidence lower bound ΣKL/N (default: %(default)s)",
                                option="--kl", choices=KL_REDUCTIONS)
    kl_weight: float = _option(KL_WEIGHT, "schedule", "multiply the KL term by this (e.g. --kl elbo --kl-weight 100: "
                               "between the ELBO and the paper's weighting) (default: %(default)g)")
    evidence_margin: float = _option(
        EVIDENCE_MARGIN, "network and pruning", "bmrs-n and bmrs-u prune where ΔF >= -NATS (evidence for keeping a "
        "structure worth less than NATS is a tie, which goes to the smaller model; Kass-Raftery's 'not worth a bare "
        "mention' is 1) or where E[θ] < 2^-23; 0 is the exact rule ΔF >= 0 (default: %(default)g)", metavar="NATS")
    noise_lr_scale: float = _option(
        NOISE_LR_SCALE, "schedule", "the noise parameters (μ, log σ) train at X times --lr: they span tens where "
        "weights span ~1, and at X = 1 a posterior needs ~6,000 steps to become prior-like (default: %(default)g)",
        metavar="X")
    finetune: str = _option(FINETUNE, "schedule", "fine-tuning keeps the noise and KL (noisy, the paper's) or trains "
                            "the pruned network with θ fixed at E[θ]·mask and no KL (deterministic) "
                            "(default: %(default)s)", choices=FINETUNE_MODES)
    shrink: bool = _option(False, "schedule", "remove pruned structures after every pruning step, so later epochs "
                           "run faster (same results as masking them)")
    granularity: str = _option("structure", "network and pruning", "one noise sample per example and structure, or "
                               "per element (default: %(default)s)", choices=GRANULARITIES)
    low: float = _option(-20.0, "network and pruning", "lower bound of ln θ (default: %(default)g)")
    high: float = _option(0.0, "network and pruning", "upper bound of ln θ (default: %(default)g)")
    noise: bool = _option(True, "network and pruning", "train the plain network (criterion none only)",
                          option="--no-noise")
    hidden: int = _option(150, "network and pruning", "MLP hidden width (default: %(default)s)")
    layers: int = _option(1, "network and pruning", "extra MLP hidden blocks after the first (default: %(default)s, "
                          "i.e. in→150→150→10)")
    image_size: int = _option(32, "data", "images are resized to this side (default: %(default)s)")
    val_fraction: float = 0.2
    train_subset: int | None = _option(None, "data", "train on the first N examples of the training split only "
                                       "(quick runs)", metavar="N")
    data_dir: str | None = _option(None, "data", "folder holding the dataset (else $BMRS_DATA_DIR, then system "
                                   "locations)")
    download: bool = _option(False, "data", "download the dataset if it is not found")
    device: str = _option("auto", "running", "where to train (default: %(default)s)", choices=DEVICES)
    threads: int | None = _option(None, "running", "CPU threads for torch (default: torch's choice)")
    compile: bool = _option(False, "running", "torch.compile the noise kernels (~10-20 s once; pays off for long "
                            "runs)")
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.finetune_epochs

    @property
    def prunes(self) -> bool:
        return self.criterion != "none"

    def validate(self) -> None:
        from ..models import MODEL_NAMES

        from ..data.datasets import dataset_key
        try:
            dataset_key(self.dataset)
        except DataError as err:
            raise ConfigError(str(err), field="dataset") from None
        if self.model not in MODEL_NAMES:
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}", field="model")
        if self.criterion not in CRITERION_NAMES:
            raise ConfigError(f"unknown criterion {self.criterion!r}; choose one of {', '.join(CRITERION_NAMES)}", field="criterion")
        if isinstance(self.p1, bool) or not isinstance(self.p1, (int, float)) or not 0 < self.p1 < 23:
            raise ConfigError(f"p1 must be a number in (0, 23), got {self.p1!r}; the paper uses 8 or 4", field="p1")
        for name in ("epochs", "finetune_epochs", "prune_every", "batch_size", "hidden", "layers", "image_size"):
            check_int(name, getattr(self, name))
        if self.total_epochs < 1:
            raise ConfigError("epochs + finetune_epochs must be at least 1", field="epochs")
        if self.prunes and self.prune_every > self.epochs:
            raise ConfigError(f"criterion {self.criterion} would never prune: it runs after every prune_every-th "
                              f"({self.prune_every}) of the first epochs ({self.epochs}); lower --prune-every or raise "
                              "--epochs (or use --criterion none)", field="prune_every")
        _positive_float("lr", self.lr)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2^63), got {self.seed!r}", field="seed")
        _positive_float("kl_weight", self.kl_weight)
        from ..criteria import check_margin
        try:
            self.evidence_margin = check_margin(self.evidence_margin)
        except ConfigError as err:
            raise ConfigError(str(err), field="evidence_margin") from None
        _positive_float("noise_lr_scale", self.noise_lr_scale)
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {self.kl_reduction!r}", field="kl_reduction")
        for name in ("shrink", "noise", "download", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}", field=name)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ConfigError(f"data_dir must be a folder name or None, got {self.data_dir!r}", field="data_dir")
        if self.threshold is not None:
            check_float("threshold", self.threshold, high=1e300)
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a dict, got {self.extra!r}", field="extra")
        if not isinstance(self.shrink, bool):
            raise ConfigError(f"shrink must be True or False, got {self.shrink!r}", field="shrink")
        if self.shrink and not self.noise:
            raise ConfigError("shrink removes pruned structures: it needs the noise layers (drop --no-noise)", field="shrink")
        if self.finetune not in FINETUNE_MODES:
            raise ConfigError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}", field="finetune")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be 'structure' or 'element', got {self.granularity!r}", field="granularity")
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number (a bound of ln θ), got {value!r}", field=name)
        if not self.low < 0.0 <= self.high:
            raise ConfigError(f"the noise bounds must satisfy low < 0 <= high (θ starts at 1), got "
                              f"low={self.low}, high={self.high}; the paper uses -20 and 0", field="low")
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must lie in (0, 1), got {self.val_fraction!r}", field="val_fraction")
        if self.train_subset is not None:
            check_int("train_subset", self.train_subset)
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}", field="device")
        if self.threads is not None:
            check_int("threads", self.threads)
        if self.amount is not None:
            if isinstance(self.amount, bool) or not isinstance(self.amount, (int, float)) or not 0 <= self.amount <= 1:
                raise ConfigError(f"amount must be a fraction in [0, 1], got {self.amount!r}", field="amount")
        if self.amount_schedule is not None:
            if not isinstance(self.amount_schedule, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in self.amount_schedule):
                raise ConfigError("amount_schedule must be a list of non-negative structure counts", field="amount_schedule")
        if self.amount is not None and self.amount_schedule is not None:
            raise ConfigError("pass either amount (a fraction) or amount_schedule (counts per step), not both", field="amount")
        if self.criterion == "none" and (self.amount is not None or self.amount_schedule is not None):
            raise ConfigError("amount and amount_schedule set how much a criterion prunes: criterion 'none' "
                              "never prunes (choose a criterion, or drop them)", field="amount")
        if self.criterion in RANKING_CRITERIA and self.amount is None and self.amount_schedule is None:
            raise ConfigError(f"criterion {self.criterion!r} ranks but has no threshold: pass --amount "
                              "(fraction of structures to prune), e.g. --amount 0.8", field="amount")
        if self.threshold is not None and self.criterion not in THRESHOLD_CRITERIA:
            raise ConfigError(f"threshold applies only to the {' and '.join(THRESHOLD_CRITERIA)} criteria", field="threshold")
        if self.criterion == "bmrs-u":  # its reduced prior must meet the noise's interval (else: after an epoch)
            from ..evidence import precision_prior
            precision_prior(self.p1, self.low, self.high)
        if not self.noise and self.criterion != "none":
            raise ConfigError("pruning needs noise layers: use --criterion none with --no-noise", field="noise")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**data)


#: settings that may differ between a run and its resumption (where and how fast it runs, not what)
RESUME_IGNORES = ("device", "threads", "data_dir", "download", "compile")


def comparable_settings(config: dict) -> dict:
    """The settings a resumed or re-reported run must share (a config dict from a checkpoint or metrics.json);
    a key that an older run lacks takes what runs did before it existed (LEGACY_DEFAULTS), else its default.

    Examples:
        >>> comparable_settings({"lr": 0.1})["kl_weight"], "threads" in comparable_settings({})
        (1.0, False)
    """
    full = {**_DEFAULTS, **config}
    return {k: v for k, v in full.items() if k not in RESUME_IGNORES}


_DEFAULTS = {**{f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING},
             **LEGACY_DEFAULTS}
