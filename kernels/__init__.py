"""TDM training ops. Until the fused backends land, every op is the pure-torch reference."""
from .reference import ddim_jump, fake_score_loss, importance_weights, renoise, tdm_generator_loss

__all__ = ["ddim_jump", "fake_score_loss", "importance_weights", "renoise", "tdm_generator_loss"]
