"""Training objectives, registered by name (a family names its own; see vlm_jax/families/)."""
from vlm_jax.objectives.base import LossSums
from vlm_jax.objectives import contrastive, next_token  # noqa: F401  (they register the built-in objectives)

__all__ = ["LossSums"]
