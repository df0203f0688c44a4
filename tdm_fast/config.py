"""Every setting of a TDM run, with the defaults of the authors' public training code (spec §3)."""
from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .sampling import stage_times
from .solvers import SOLVERS

MATCHING = ("noisy", "clean")
OBJECTIVES = ("kl", "fisher")
TAU_INTERVALS = ("disjoint", "full")
KERNEL_CHOICES = ("fused", "reference")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_DECAYS = ("constant", "cosine")
COMPILE_SCOPES = ("regional", "full")


# One line per field for `tdm-fast distill --help` (the comments in TDMConfig say why a default is what it is).
HELP = {
    "steps": "K, the student's number of sampling steps; several K train one steps-aware (unify) student",
    "steps_weights": "relative probability of drawing each K of --steps per iteration (one number per K; default: "
                     "uniform). A unify student learns each K at the rate it is drawn: weight the K that lags",
    "steps_conditioning": "feed K to student and fake score through a zero-initialised embedding (default: on for several K)",
    "total_steps": "T', the span of the student's stage times: t_0 = T'-1, t_{i+1} = t_i - T'/K",
    "student_solver": "the solver of the student's trajectory in rollout and sampling: ddim or dpmsolver "
                      "(DPM-Solver++ 2M over the stage times; paper Table 6, see docs/student_solver.md)",
    "cfg_scale": "the teacher's classifier-free guidance scale w the student distils (negative values are accepted)",
    "guidance_min_sigma": "the generator loss applies cfg_scale only where the matching noise level sigma/alpha exceeds this; "
                          "below it the conditional teacher alone is the target (guidance in a limited interval; 0: "
                          "everywhere, the paper; docs/stability.md)",
    "guidance_max_sigma": "the generator loss applies cfg_scale only where the matching noise level sigma/alpha lies below "
                          "this, the conditional teacher alone above it (none: everywhere, the paper); on sd3 no "
                          "threshold kept the 4-step student from drifting (docs/t2i_demo.md)",
    "objective": "the divergence the student minimises: kl (reverse KL, the paper's default) or fisher (Fisher divergence, "
                 "paper Table 8; backpropagates through the teacher and fake score, see docs/fisher.md)",
    "huber_c": "pseudo-Huber constant c of the KL generator loss; none: plain MSE (the fisher objective has no Huber form)",
    "normalize": "divide each sample's generator loss by its mean |x0 - D_cfg| (the authors' normaliser)",
    "matching": "noisy: TDM's noisy-sample matching; clean: the DMD-style ablation",
    "importance_sampling": "weight the fake-score loss by the importance ratio of the noisy-sample transition",
    "tau_interval": "disjoint: each stage's matching times lie in its own interval; full: up to T (ablation)",
    "tau_min_sigma": "match every stage at noise levels sigma/alpha >= this (a stage lying wholly below it is matched just "
                     "above it, over T/20 time steps); 0: each stage's own interval (the paper). Keeps guided 4-step "
                     "students from drifting toward the unguided distribution, at a cost at K = 1, 2 (docs/stability.md)",
    "snr_cap": "cap of the SNR weight of the fake-score loss",
    "fake_lr": "learning rate of the fake score",
    "generator_lr_ratio": "student learning rate = fake_lr x this",
    "steps_embedding_lr_ratio": "the K embeddings learn at this multiple of their network's learning rate",
    "adam_beta1": "AdamW beta1 of both optimizers",
    "adam_beta2": "AdamW beta2 of both optimizers",
    "weight_decay": "AdamW weight decay of both optimizers",
    "max_grad_norm": "clip the student's gradient norm to this",
    "fake_updates": "fake-score updates per generator update",
    "warmup_steps": "linear learning-rate warm-up over this many updates (0: none)",
    "lr_decay": "after the warm-up: constant learning rates, or a cosine decay to lr_decay_floor x at `iterations`",
    "lr_decay_floor": "the cosine decay's final learning rate, as a fraction of the base rate",
    "ema_decay": "keep an EMA of the student's weights with this decay and save it (none: no EMA)",
    "batch_size": "samples per process and micro-batch",
    "gradient_accumulation_steps": "micro-batches per update (an update sees batch_size x this x processes samples)",
    "iterations": "total TDM iterations of the run (a resumed run continues up to this)",
    "seed": "seed of noise, conditions, K draws and LoRA initialisation",
    "mixed_precision": "no, fp16 or bf16 (default: accelerate's setting)",
    "kernels": "fused: the fused TDM ops; reference: their pure-torch definitions",
    "compile": "torch.compile the networks (diffusers' compile_repeated_blocks where the model has it, else the whole "
               "network): minutes of compilation at the first iterations, then faster ones (tdm_fast.trainer.compile_networks)",
    "compile_scope": "with compile: regional compiles the repeated blocks where the model declares them (minutes); full "
                     "compiles whole networks (several times longer to compile, faster iterations: `tdm-fast bench training`)",
    "checkpoint_every": "write a checkpoint every N iterations (0: only at the end)",
    "keep_last": "keep this many newest checkpoints (0: all)",
    "log_every": "write metrics.jsonl and the trackers every N iterations",
    "report_to": "accelerate trackers: tensorboard, wandb, comet_ml, mlflow, aim, clearml, dvclive or all",
    "validation_every": "sample fixed validation inputs at every K every N iterations into <out>/validation/ (0: never); "
                        "each validation and the end of a run of >= 100 iterations report each K's gap to the best teacher "
                        "sampler of <= K evaluations (validation/gap.json)",
    "max_nonfinite_skips": "stop the run after this many iterations in a row with a skipped (non-finite) update",
}
CHOICES = {"student_solver": SOLVERS, "objective": OBJECTIVES, "matching": MATCHING, "tau_interval": TAU_INTERVALS,
           "kernels": KERNEL_CHOICES, "mixed_precision": MIXED_PRECISION,
           "lr_decay": LR_DECAYS, "compile_scope": COMPILE_SCOPES}


# The authors' optimisation settings (spec §3) without the recipe's extras, for paper-faithful runs:
# TDMConfig(**PAPER_FAITHFUL, steps=..., ...). The stability suite (`tdm-fast bench stability`) runs both.
PAPER_FAITHFUL = {"fake_lr": 1e-4, "generator_lr_ratio": 0.2, "fake_updates": 1, "warmup_steps": 0, "lr_decay": "constant",
                  "ema_decay": None, "normalize": True, "tau_min_sigma": 0.0, "huber_c": 1e-3, "adam_beta1": 0.0, "adam_beta2": 0.95,
                  "weight_decay": 1e-2}


@dataclass
class TDMConfig:
    # the student
    steps: tuple[int, ...] = (4,)  # one K, or several for a steps-aware ("unify") student
    steps_weights: tuple[float, ...] | None = None  # draw probabilities of the K of ``steps``; None: uniform
    steps_conditioning: bool | None = None  # feed K to student and fake; default: on for several K
    total_steps: int = 900  # T' of spec §2
    student_solver: str = "ddim"  # "dpmsolver": DPM-Solver++(2M) trajectory (tdm_fast.solvers)
    # the objective
    cfg_scale: float = 4.5
    guidance_min_sigma: float = 0.0
    guidance_max_sigma: float | None = None
    objective: str = "kl"  # "fisher": seed Table 8, derived in docs/fisher.md
    huber_c: float | None = 1e-3  # None: plain MSE
    # The authors divide each sample's loss by its mean |x̂0 - D_cfg|, which weights the low-noise τ of the
    # last stages most; off, the 4-step students of all three built-in teachers drifted less (docs/stability.md).
    normalize: bool = False
    matching: str = "noisy"  # "clean" is the DMD-style ablation
    importance_sampling: bool = True
    tau_interval: str = "disjoint"  # "full": τ up to T (ablation)
    # No matching below σ_τ/α_τ = 1: there guided and unguided targets nearly agree and pulled the guided 4-step
    # students of all three built-in teachers back toward the unguided distribution (docs/stability.md).
    tau_min_sigma: float = 1.0
    snr_cap: float = 5.0
    # optimisation: the recipe of docs/stability.md for a new teacher; PAPER_FAITHFUL holds the authors' settings.
    # fake lr 3e-4 with ratio 0.1 sits between the two settings measured good on digits-scale teachers (generator lr
    # 1e-4 and 1e-5), so that the stability suite's lr × 0.3 and × 3 cover both.
    fake_lr: float = 3e-4
    generator_lr_ratio: float = 0.1
    # The zero-initialised K embeddings learn at this multiple of their network's lr: at the
    # network's own lr they stay ~1e-3 of the timestep embedding's size for hundreds of iterations
    # (measured on the digits student), i.e. K-conditioning would be off in all but name.
    steps_embedding_lr_ratio: float = 10.0
    adam_beta1: float = 0.0
    adam_beta2: float = 0.95
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    fake_updates: int = 1  # fake-score updates per generator update
    warmup_steps: int = 50
    lr_decay: str = "cosine"  # to lr_decay_floor x the base rate at `iterations`
    lr_decay_floor: float = 0.0
    ema_decay: float | None = 0.99
    batch_size: int = 64  # per process and micro-batch: an update sees batch_size x accumulation x processes samples
    gradient_accumulation_steps: int = 1
    iterations: int = 1000
    seed: int = 0
    mixed_precision: str | None = None  # None: accelerate's setting (`accelerate config`, ACCELERATE_MIXED_PRECISION)
    kernels: str = "fused"
    compile: bool = False  # torch.compile the networks (tdm_fast.trainer.compile_networks); results unchanged
    compile_scope: str = "regional"  # compilation in minutes on large models; "full" trades more of it for speed
    # bookkeeping
    checkpoint_every: int = 0  # 0: only at the end
    keep_last: int = 2
    log_every: int = 10
    report_to: str | None = None  # accelerate trackers: tensorboard, wandb, all, ... (files under output_dir)
    validation_every: int = 0  # sample the validation set at every K every N iterations (0: never)
    # reliability: updates with a non-finite loss or gradient norm are skipped; this many in a row stop the run
    max_nonfinite_skips: int = 3

    def __post_init__(self):
        self.steps = tuple(int(k) for k in (self.steps if isinstance(self.steps, (list, tuple)) else [self.steps]))
        if not self.steps or len(set(self.steps)) != len(self.steps):
            raise ValueError(f"steps must be a non-empty set of distinct K values, got {self.steps}")
        for k in self.steps:
            stage_times(k, self.total_steps)
        if self.steps_weights is not None:
            self.steps_weights = tuple(float(w) for w in self.steps_weights)
            if (len(self.steps_weights) != len(self.steps) or not all(math.isfinite(w) and w >= 0 for w in self.steps_weights)
                    or sum(self.steps_weights) <= 0):
                raise ValueError(f"steps_weights must give one finite weight >= 0 per K of steps {list(self.steps)}, "
                                 f"not all zero; got {list(self.steps_weights)}")
        if self.steps_conditioning is None:
            self.steps_conditioning = len(self.steps) > 1
        for name, value, allowed in (
            ("student_solver", self.student_solver, SOLVERS),
            ("objective", self.objective, OBJECTIVES),
            ("matching", self.matching, MATCHING),
            ("tau_interval", self.tau_interval, TAU_INTERVALS),
            ("kernels", self.kernels, KERNEL_CHOICES),
            ("mixed_precision", self.mixed_precision or "no", MIXED_PRECISION),
            ("lr_decay", self.lr_decay, LR_DECAYS),
            ("compile_scope", self.compile_scope, COMPILE_SCOPES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("batch_size", "iterations", "fake_updates", "log_every", "max_nonfinite_skips", "total_steps",
                     "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_last", "warmup_steps", "validation_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("fake_lr", "generator_lr_ratio", "steps_embedding_lr_ratio", "max_grad_norm", "snr_cap"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive finite number, got {getattr(self, name)}")
        if self.huber_c is not None and not (math.isfinite(self.huber_c) and self.huber_c > 0):
            raise ValueError(f"huber_c must be a positive finite number or none (MSE), got {self.huber_c}")
        if not 0.0 <= self.lr_decay_floor <= 1.0:
            raise ValueError(f"lr_decay_floor must lie in [0, 1], got {self.lr_decay_floor}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        for name in ("guidance_min_sigma", "tau_min_sigma"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.guidance_max_sigma is not None and not (math.isfinite(self.guidance_max_sigma)
                                                         and self.guidance_max_sigma > self.guidance_min_sigma):
            raise ValueError(f"guidance_max_sigma must be none or a finite number above guidance_min_sigma "
                             f"({self.guidance_min_sigma}), got {self.guidance_max_sigma}")
        for name in ("cfg_scale", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # numpy's generators, which accelerate's set_seed seeds too, take no other
            raise ValueError(f"seed must lie in 0..{2**32 - 1}, got {self.seed}")
        if self.report_to is not None:
            from accelerate.utils import LoggerType

            trackers = [t.value for t in LoggerType]
            if self.report_to not in trackers:
                raise ValueError(f"report_to must be one of {', '.join(trackers)}, got {self.report_to!r}")

    @property
    def effective_mixed_precision(self) -> str:
        """``mixed_precision``, or accelerate's own setting when it is None (what ``Accelerator`` will use)."""
        import os

        return self.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()

    @property
    def generator_lr(self) -> float:
        return self.fake_lr * self.generator_lr_ratio

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TDMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{key: _checked(key, value, hints[key]) for key, value in d.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> "TDMConfig":
        """A YAML (``.yaml``/``.yml``) or JSON file of settings; every problem is a ValueError naming the file."""
        return cls.from_dict(cls.file_settings(path))

    @classmethod
    def file_settings(cls, path: str | Path) -> dict:
        """Only the settings a YAML or JSON file names, checked (a layer over other defaults, not a whole
        config); every problem is a ValueError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} {'is a folder' if path.is_dir() else 'does not exist'}")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"config file {path} cannot be read: {_one_line(exc)}") from None
        except Exception as exc:  # yaml.YAMLError, without importing yaml for JSON configs
            raise ValueError(f"config file {path} is not valid YAML: {_one_line(exc)}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of TDMConfig fields, not a {type(data).__name__}")
        try:
            config = cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"config file {path}: {exc}") from None
        return {key: getattr(config, key) for key in data}


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _checked(key: str, value, hint):
    """``value`` as the field's type, or a ValueError naming the key (a config file's "1e-3" stays a float,
    a bool is not taken for a number, a list only where the field is ``steps``)."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError(f"config key {key} cannot be null")
    if key == "steps":
        values = value if isinstance(value, (list, tuple)) else [value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return tuple(values)
        raise ValueError(f"config key steps must be an integer or a list of integers, got {value!r}")
    if key == "steps_weights":
        values = value if isinstance(value, (list, tuple)) else [value]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return tuple(float(v) for v in values)
        raise ValueError(f"config key steps_weights must be a list of numbers, got {value!r}")
    if bool in allowed:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key} must be true or false, got {value!r}")
    if int in allowed:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config key {key} must be an integer, got {value!r}")
    if float in allowed:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"config key {key} must be a number, got {value!r}")
    if str in allowed and isinstance(value, str):
        return value
    raise ValueError(f"config key {key} must be a {' or '.join(t.__name__ for t in allowed)}, got {value!r}")
