"""tdm-fast: Trajectory Distribution Matching, distilling diffusion models into 1-4 step students."""
from .config import TDMConfig
from .denoiser import Denoiser
from .sampling import ddim_sample, nfe_matched_baselines, sample_student, stage_times
from .schedule import NoiseSchedule, ScheduleConfig
from .scheduler import TDMScheduler
from .trainer import ClassConditions, EmbeddingConditions, TDMTrainer

__version__ = "0.1.0"

__all__ = [
    "ClassConditions",
    "Denoiser",
    "EmbeddingConditions",
    "NoiseSchedule",
    "ScheduleConfig",
    "TDMConfig",
    "TDMScheduler",
    "TDMTrainer",
    "ddim_sample",
    "nfe_matched_baselines",
    "sample_student",
    "stage_times",
]
