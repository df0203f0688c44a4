"""The distillation recipe a ``distill --preset`` run gets when it names no recipe flag.

One recipe, used by ``tdm-fast distill --preset`` and by ``tdm-fast demo --pipeline`` alike (the demo sets
only the run's size: batch and iterations). The values were chosen by measurement on the text-to-image
pipelines of :mod:`tdm_fast.demos.t2i` (docs/t2i_demo.md; the preset-path check is ``tdm-fast bench
presets``): they depend on how the student is parametrised (a LoRA or full weights) and on the teacher's
prediction type (ε/v-prediction, or a flow-matching velocity).

``TDMConfig``'s own defaults stay what they are for the saved-teacher path (``distill --teacher``: full
weights of the built-in teachers, checked by ``tdm-fast bench stability``).
"""
from __future__ import annotations

from pathlib import Path

from .config import TDMConfig

# A LoRA's low-rank update moves the network's function more slowly per step than full weights at the
# same rate: the LoRA students of the measured pipelines at fake lr 1e-3 lagged those at 3e-3 at every K
# (docs/t2i_demo.md, rows sd15_base vs sd15_lrB, sd15_wideA vs sd15_wideLR). Full weights keep
# TDMConfig's rates, which the stability suite checks on the built-in teachers.
LEARNING_RATES = {
    "lora": {"fake_lr": 3e-3, "generator_lr_ratio": 0.2},
    "full": {"fake_lr": 3e-4, "generator_lr_ratio": 0.1},
}
# What every preset run shares: the authors' normaliser on the generator loss, each stage matched in its
# own interval (tau_min_sigma 0, the paper), a short warm-up.
COMMON = {"normalize": True, "tau_min_sigma": 0.0, "warmup_steps": 50, "lr_decay_floor": 0.0}
# Per prediction type (docs/t2i_demo.md): flow-matching transformers (SD3's velocity) learnt best with the student
# at a tenth of the fake score's rate and a shorter EMA (sd3_wideG1 vs sd3_wideLR); ε/v-prediction UNets with a
# fifth and a longer EMA. After the warm-up the flow students' rates decay as a cosine to 0 at the run's end: at
# constant rates sd3's 4-step student walked past the teacher (K = 4 ratio 0.80 -> 1.53 from 1,000 to 2,000
# iterations; decaying 0.55 and 0.67), because the guided objective's own optimum is narrower than the teacher's
# guided sampler. The ε UNets learn more slowly and stay at constant rates: decaying ones left them further from
# the teacher at 1,000 iterations in the three runs measured (sd15 0.60 against 0.48 and 0.69 against 0.44 over two
# seeds, its unshipped twin 0.55 against 0.37 with 2.8 points of class accuracy lost), level at 2,000 ("A rate that
# decays to the run's end").
BY_PREDICTION = {
    "flow": {"ema_decay": 0.99, "lr_decay": "cosine", "lora": {"generator_lr_ratio": 0.1}},
    "epsilon": {"ema_decay": 0.995, "lr_decay": "constant"},
}


def steps_weights_for(steps) -> tuple[float, ...] | None:
    """Draw weights of a unify student's K: the largest K drawn K times as often as each smaller one (1 : 1 : 4
    for K in {1, 2, 4}). A unify student learns each K only in the iterations that draw it, and the largest K
    has the strongest baseline to beat (the teacher's own sampler at that many evaluations is the closest to
    the teacher): uniform draws left sd15's K = 4 at 0.79 of its baseline's FID, drawing it K times as often
    0.36-0.47 over three seeds with K = 1 and 2 at 0.11-0.17; draws in proportion to every K (1 : 2 : 4) gave
    0.53 (docs/t2i_demo.md, "Drawing K = 4 more often"). One K: None (nothing to draw)."""
    steps = tuple(int(k) for k in steps)
    return tuple(float(k) if k == max(steps) else 1.0 for k in steps) if len(steps) > 1 else None


def preset_recipe(prediction_type: str, full_finetune: bool, cfg_scale: float) -> dict:
    """The TDM settings of a preset run before its flags: ``prediction_type`` of the teacher ('epsilon',
    'v_prediction', 'sample' or 'flow'), ``full_finetune`` (full weights, else LoRA), ``cfg_scale`` the
    preset's guidance. The K draw weights follow the run's K set (:func:`steps_weights_for`)."""
    family = "flow" if prediction_type == "flow" else "epsilon"
    parametrisation = "full" if full_finetune else "lora"
    by_family = BY_PREDICTION[family]
    recipe = {**COMMON, **LEARNING_RATES[parametrisation], "cfg_scale": cfg_scale}
    recipe.update({key: value for key, value in by_family.items() if key not in LEARNING_RATES})  # per-parametrisation entries below
    recipe.update(by_family.get(parametrisation, {}))
    return recipe


def folder_recipe(preset: str, model: str | Path | None, full_finetune: bool = False) -> dict:
    """:func:`preset_recipe` of the pipeline folder ``model`` (its prediction type from ``scheduler/``); a
    folder that cannot be read gets the epsilon recipe here and is reported by the loader."""
    from .backbones.presets import get_preset, prediction_type_of, read_scheduler_config

    try:
        prediction_type = prediction_type_of(read_scheduler_config(model)) if model else "epsilon"
    except (OSError, ValueError, TypeError, AttributeError):
        prediction_type = "epsilon"
    return preset_recipe(prediction_type, full_finetune, get_preset(preset).cfg_scale)


def preset_config(preset: str, model: str | Path, full_finetune: bool = False, **settings) -> TDMConfig:
    """The ``TDMConfig`` that ``tdm-fast distill --preset PRESET --model MODEL`` runs with ``settings`` as its
    flags: the recipe first, ``settings`` over it, the recipe's K draw weights unless ``steps_weights`` is given."""
    data = {**folder_recipe(preset, model, full_finetune), **settings}
    if "steps_weights" not in data:
        data["steps_weights"] = steps_weights_for(data.get("steps", TDMConfig.steps))
    return TDMConfig(**data)


def recipe_help() -> dict[str, str]:
    """A sentence per recipe field for ``distill --help``: what ``--preset`` runs get instead of the default."""
    lora, full = LEARNING_RATES["lora"], LEARNING_RATES["full"]
    return {
        "fake_lr": f"with --preset: {lora['fake_lr']:g} for LoRA students, {full['fake_lr']:g} with --full-finetune "
                   "(a low-rank update needs the larger step to move the network as fast)",
        "generator_lr_ratio": f"with --preset: {lora['generator_lr_ratio']:g} for LoRA on epsilon/v teachers, "
                              f"{BY_PREDICTION['flow']['lora']['generator_lr_ratio']:g} on flow teachers and with "
                              f"--full-finetune",
        "ema_decay": f"with --preset: {BY_PREDICTION['epsilon']['ema_decay']:g} (epsilon/v teachers), "
                     f"{BY_PREDICTION['flow']['ema_decay']:g} (flow teachers)",
        "steps_weights": "with --preset and several K: the largest K drawn K times as often as each other K (1 1 4 for K = 1 2 4): "
                         "its baseline is the strongest to beat",
        "cfg_scale": "with --preset: the preset's guidance (sd15 4.5, sdxl 6, pixart 4.5, sd3 5, cogvideox 6)",
        "normalize": "with --preset: on",
        "tau_min_sigma": "with --preset: 0",
        "warmup_steps": "with --preset: 50",
        "lr_decay": "with --preset: constant for epsilon/v teachers, cosine to 0 at --iterations for flow teachers "
                    "(at constant rates their 4-step students walked past the teacher)",
        "lr_decay_floor": "with --preset: 0",
    }
