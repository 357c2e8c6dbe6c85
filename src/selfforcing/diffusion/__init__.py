"""Flow-matching noise schedule, timestep warping and samplers."""

from .flow_matching import (
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    sample_training_sigmas,
    sampling_sigmas,
    shift_sigma,
    velocity_from_x0,
    velocity_target,
    warp_timesteps,
    x0_from_velocity,
)
from .samplers import sample_euler, sample_few_step

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "add_noise",
    "sample_euler",
    "sample_few_step",
    "sample_training_sigmas",
    "sampling_sigmas",
    "shift_sigma",
    "velocity_from_x0",
    "velocity_target",
    "warp_timesteps",
    "x0_from_velocity",
]
