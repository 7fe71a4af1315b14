"""Model soups: the average is the float32 mean, max and greedy choose by the score, ingredients of different
architectures are refused in one line, and the soup is a checkpoint (params and config) as `vlm-jax import` writes."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from vlm_jax.cli import main as cli_main
from vlm_jax.config import Config
from vlm_jax.infer.soup import Score, make_soup
from vlm_jax.train import checkpoint

OFFSETS = (0.0, 1.0, 3.0)  # added to every parameter of ingredient i


def _leaves(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.fixture(scope="module")
def ingredients(trained_like, tmp_path_factory):
    """(base params, checkpoint path -> its params): the base plus OFFSETS[i] plus random noise, saved as imports
    are."""
    cfg, _, params, _, _ = trained_like
    root, rng = tmp_path_factory.mktemp("soup"), np.random.default_rng(0)
    saved = {}
    for i, offset in enumerate(OFFSETS):
        path = str(root / f"ingredient{i}")
        saved[path] = jax.tree.map(lambda x: (x + offset + 0.01 * rng.standard_normal(x.shape)).astype(x.dtype),
                                   params)
        checkpoint.save_params(path, saved[path], Config(model=cfg.model, data=cfg.data))
    return params, saved


def test_average_is_the_float32_mean_and_a_checkpoint(ingredients, tmp_path, capsys):
    _, saved = ingredients
    paths = list(saved)
    out = str(tmp_path / "soup")
    assert cli_main(["soup", "--checkpoints", *paths, "--method", "average", "--out", out]) == 0
    table = capsys.readouterr().out
    assert "average soup" in table and "3 of 3" in table
    stored = [_leaves(p) for p in saved.values()]
    soup = _leaves(checkpoint.restore_params(out))
    for i, leaf in enumerate(soup):
        assert leaf.dtype == stored[0][i].dtype == np.float32
        np.testing.assert_array_equal(leaf, np.mean([s[i] for s in stored], axis=0, dtype=np.float32))
    # The soup keeps the first ingredient's config, so it reads like any import.
    assert checkpoint.read_meta(out)[0] == checkpoint.read_meta(paths[0])[0]


def _offset(params, base) -> float:
    return float(np.mean([np.mean(p - b) for p, b in zip(_leaves(params), _leaves(base))]))


def _distance_score(base, target: float):
    """A score highest for params whose mean offset from `base` is `target`."""
    def score(params) -> Score:
        return Score(accuracy=-(_offset(params, base) - target) ** 2, perplexity=1.0)
    return score


def test_max_and_greedy_choose_by_the_score(ingredients):
    base, saved = ingredients
    paths = list(saved)

    def soup(method, score):  # the ingredients from memory: the reading is the other tests' part
        return make_soup(paths, method, score, restore=saved.__getitem__)

    def offset(soup):
        return _offset(soup.params, base)

    # Alone, offset 1 is closest to 0.7; with offset 0 kept the mean (0.5) is closer still, with 3 too (1.33) not.
    score = _distance_score(base, target=0.7)
    best = soup("max", score)
    assert best.kept == [False, True, False] and best.source == 1 and offset(best) == pytest.approx(1.0, abs=1e-3)
    greedy = soup("greedy", score)
    assert greedy.kept == [True, True, False] and greedy.source == 1
    assert offset(greedy) == pytest.approx(0.5, abs=1e-3) and greedy.score.beats(greedy.scores[1])
    # Aiming at 3, the best alone is offset 3 and every mean with another one scores lower.
    greedy = soup("greedy", _distance_score(base, target=3.0))
    assert greedy.kept == [False, False, True] and offset(greedy) == pytest.approx(3.0, abs=1e-3)
    average = soup("average", score)
    assert average.kept == [True] * 3 and average.score.accuracy == pytest.approx(-(4 / 3 - 0.7) ** 2, abs=1e-3)
    # Equal accuracy: the lower perplexity wins.
    assert Score(0.5, 2.0).beats(Score(0.5, 3.0)) and not Score(0.5, 3.0).beats(Score(0.5, 2.0))


@pytest.mark.slow  # 55 s measured on a loaded 2-core machine: three held-out evaluations
def test_greedy_soup_command_scores_on_held_out_data(trained_like, ingredients, tmp_path, capsys):
    cfg, _, _, _, _ = trained_like
    paths = list(ingredients[1])[:2]
    config = tmp_path / "eval.yaml"
    config.write_text("data:\n  eval_sources: [{kind: embedded, name: digits_qa, split: test}]\n"
                      "  shapes: {batch_size: 4, seq_len: 32, max_images: 1}\n")
    out, report = tmp_path / "soup", tmp_path / "soup.json"
    rc = cli_main(["soup", "--checkpoints", *paths, "--method", "greedy", "--eval-config", str(config),
                   "--out", str(out), "--limit", "4", "--batch-size", "4", "--max-new-tokens", "2",
                   "--json", str(report), f"data.tokenizer={cfg.data.tokenizer}"])
    assert rc == 0, capsys.readouterr().err
    table = capsys.readouterr().out.splitlines()
    rows = json.loads(report.read_text())
    assert [r["checkpoint"] for r in rows["ingredients"]] == paths and rows["method"] == "greedy"
    assert all(r["sources"][0]["examples"] == 4 and r["perplexity"] > 1 for r in rows["ingredients"])
    kept = [r["kept"] for r in rows["ingredients"]]
    assert any(kept) and table[-2].startswith("greedy soup") and f"{sum(kept)} of 2" in table[-2]
    # Greedy starts from the best ingredient: no kept set scores below it.
    scores = [(r["accuracy"], -r["perplexity"]) for r in rows["ingredients"]]
    assert (rows["soup"]["accuracy"], -rows["soup"]["perplexity"]) >= max(scores)
    assert checkpoint.read_meta(str(out))[0] == checkpoint.read_meta(paths[0])[0]


@pytest.fixture(scope="module")
def other_models(trained_like, tmp_path_factory):
    """Checkpoints that differ from the ingredients in a field that changes the computation (same shapes), and in
    a parameter's shape."""
    cfg, _, params, _, _ = trained_like
    root = tmp_path_factory.mktemp("other")
    theta = dataclasses.replace(cfg.model, text=dataclasses.replace(cfg.model.text, rope_theta=500000.0))
    checkpoint.save_params(str(root / "theta"), params, Config(model=theta, data=cfg.data))
    flat = jax.tree_util.tree_flatten_with_path(params)
    leaves = [x[:-1] if i == 0 else x for i, (_, x) in enumerate(flat[0])]
    checkpoint.save_params(str(root / "shape"), jax.tree.unflatten(flat[1], leaves),
                           Config(model=cfg.model, data=cfg.data))
    return str(root / "theta"), str(root / "shape"), "/".join(str(k.key) for k in flat[0][0][0])


def test_mistakes_are_one_line(ingredients, other_models, tmp_path, capsys):
    paths = list(ingredients[1])
    theta, shape, first_leaf = other_models
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        (["--checkpoints", paths[0], theta, "--method", "average"], [theta, paths[0], "model.text.rope_theta"]),
        (["--checkpoints", paths[0], shape, "--method", "average"], [shape, paths[0], f"params/{first_leaf}"]),
        (["--checkpoints", paths[0], "--method", "average"], ["at least 2"]),
        (["--checkpoints", *paths, "--method", "mean"], ["--method", "mean"]),
        (["--checkpoints", *paths, "--method", "greedy"], ["--eval-config"]),
    ]
    for argv, expected in cases:
        rc = cli_main(["soup", *argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert all(e in err for e in expected), (argv, err)
        assert not (tmp_path / "out").exists()
    rc = cli_main(["soup", "--checkpoints", *paths, "--method", "average", "--out", str(tmp_path / "full")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not empty" in err and [p.name for p in (tmp_path / "full").iterdir()] == ["x"]
