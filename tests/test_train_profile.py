"""train.profile_steps: a jax.profiler trace of steps a..b lands in <workdir>/profile; a bad range is one line."""
import pytest

from vlm_jax.config import load_config
from vlm_jax.errors import ConfigError
from vlm_jax.train.loop import Trainer
from train_helpers import TINY, tiny_config


def test_profile_steps_write_a_trace(tmp_path):
    lines = []
    Trainer(tiny_config(tmp_path, "train.steps=4", "train.profile_steps=[2, 3]", "train.log.tensorboard=false"),
            echo=lines.append).run()
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert f"profiled steps 2..3 into {tmp_path / 'profile'}" in lines


@pytest.mark.parametrize("steps", ["[3]", "[3, 3]", "[0, 2]", "[1, 2, 3]"])
def test_profile_steps_must_be_a_range(steps):
    with pytest.raises(ConfigError, match=r"train.profile_steps must be \[\] or two steps \[a, b\] with 0 < a < b"):
        load_config(TINY, [f"train.profile_steps={steps}"])
