"""Training objectives, registered by name (a family names its own; see vlm_jax/families/; `train.objective`
or a stage's `objective` overrides it)."""
from vlm_jax.config import ModelConfig, TrainConfig
from vlm_jax.families import get_family
from vlm_jax.objectives.base import REFERENCE_LOGPS, LossSums, is_paired, needs_reference
from vlm_jax.objectives import contrastive, next_token, preference, reward  # noqa: F401  (they register the built-ins)
from vlm_jax.registry import OBJECTIVES


def get_objective(m: ModelConfig, train: TrainConfig):
    """The objective `train.objective` names, or the model family's own."""
    return OBJECTIVES.get(train.objective or get_family(m).objective, "train.objective")


__all__ = ["LossSums", "REFERENCE_LOGPS", "is_paired", "needs_reference", "get_objective"]
