"""Model soups (Wortsman et al. 2022): one checkpoint from the parameters of several fine-tuned from the same model.

`average` is the uniform mean of every ingredient; `max` the best single ingredient by the held-out score;
`greedy` (as in POINTS) goes through the ingredients best first and keeps each one only if the mean of the kept
set then scores higher. The score is what `vlm-jax eval` measures: exact-match accuracy averaged over the eval
sources, ties broken by the lower answer perplexity.

Ingredients are restored one at a time, sharded over every device like `vlm-jax eval`'s, and summed in float32
on the devices; no host or device holds more than a running sum, the current soup candidate and one ingredient.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.config import DataConfig, SourceConfig
from vlm_jax.convert.processor import keep_processor_files, kept_processor_dir
from vlm_jax.data.tokenizer import TOKENIZER_FILE
from vlm_jax.errors import UserError
from vlm_jax.infer.answer import Answerer, load_answerer, restore_sharded, tokenizer_path
from vlm_jax.infer.evaluate import SourceResult, evaluate_read, read_sources, text_table
from vlm_jax.paths import user_path, write_atomic
from vlm_jax.train import checkpoint
from vlm_jax.train.init_from import differing_model_field

METHODS = ("average", "greedy", "max")


class SoupError(UserError):
    pass


@dataclasses.dataclass(frozen=True)
class Score:
    accuracy: float  # mean exact-match accuracy over the eval sources
    perplexity: float  # mean answer perplexity over them; the lower one wins a tie
    results: tuple[SourceResult, ...] = ()

    def key(self) -> tuple[float, float]:
        return self.accuracy, -self.perplexity

    def beats(self, other: Score) -> bool:
        return self.key() > other.key()

    def row(self) -> dict:
        return {"accuracy": self.accuracy, "perplexity": self.perplexity, "sources": [r.row() for r in self.results]}


def answer_scorer(answerer: Answerer, sources: tuple[SourceConfig, ...], limit: int = 0) -> Callable[..., Score]:
    """params -> their Score on `sources` (the first `limit` records of each, read once for every candidate)."""
    read = read_sources(answerer, sources, limit)

    def score(params) -> Score:
        results = evaluate_read(answerer.with_params(params), sources, read)
        return Score(float(np.mean([r.accuracy for r in results])), float(np.mean([r.perplexity for r in results])),
                     tuple(results))
    return score


def check_method(method: str, scored: bool):
    """Stops with one line unless `method` is known and, when it ranks the checkpoints, they are `scored`."""
    if method not in METHODS:
        raise SoupError(f"--method {method}: unknown; choose one of {', '.join(METHODS)}")
    if method != "average" and not scored:
        raise SoupError(f"--method {method} ranks the checkpoints by their held-out score; pass --eval-config (a "
                        "config whose data.eval_sources are evaluated)")


def check_ingredients(paths: Sequence[str]):
    """Stops with one line unless every checkpoint has the first one's architecture: the model config fields that
    change what it computes, and the parameter tree's paths, shapes and dtypes (read from metadata only)."""
    if len(paths) < 2:
        raise SoupError(f"--checkpoints: {len(paths)} given; a soup needs at least 2 checkpoints")
    first = paths[0]
    model, saved = checkpoint.read_meta(first)[0].model, checkpoint.params_metadata(first)
    for path in paths[1:]:
        field = differing_model_field(checkpoint.read_meta(path)[0].model, model)
        if field:
            key, there, here = field
            raise SoupError(f"{path} and {first} are different models: model.{key} is {there!r} in the one and "
                            f"{here!r} in the other; soup only checkpoints fine-tuned from the same model")
        mismatch = checkpoint.first_mismatch(checkpoint.params_metadata(path), saved)
        if mismatch:
            leaf, there, here = mismatch
            raise SoupError(f"{path} and {first} are different models: params/{leaf} is {there} in the one and "
                            f"{here} in the other; soup only checkpoints fine-tuned from the same model")


def _plus(total, params):
    """The float32 running sum with one more ingredient; leaves stay placed (sharded) as they are."""
    return jax.tree.map(lambda t, x: t + x.astype(jnp.float32), total, params)


def _divide(total, count: int):
    """total / count correctly rounded: XLA turns a division by a broadcast scalar into a multiplication by its
    reciprocal (an ulp off), so the divisor is a whole array like `total` (placed alike), divided eagerly."""
    return total / jnp.full_like(total, count)


def _mean(total, count: int, dtypes, plus=None):
    """The mean of the sum (with `plus`, one more ingredient counted in `count`) in each leaf's stored dtype, leaf by
    leaf, so no second whole sum is made."""
    if plus is None:
        return jax.tree.map(lambda t, dtype: _divide(t, count).astype(dtype), total, dtypes)
    return jax.tree.map(lambda t, x, dtype: _divide(t + x.astype(jnp.float32), count).astype(dtype),
                        total, plus, dtypes)


@dataclasses.dataclass
class Soup:
    params: object
    source: int  # the ingredient whose config, tokenizer and processor files the soup keeps
    kept: list[bool]  # which ingredients it averages
    scores: list[Score | None]  # each ingredient's, when a scorer was given
    score: Score | None  # the soup's


def make_soup(paths: Sequence[str], method: str, score: Callable[..., Score] | None = None,
              restore: Callable = restore_sharded) -> Soup:
    """The `method` soup of the checkpoints at `paths` (checked by `check_ingredients`); `score(params)` is needed
    by greedy and max, and scores average's ingredients and result when given. `restore(path)` reads one
    ingredient's params."""
    check_method(method, score is not None)
    # Each ingredient's score, one restored at a time; greedy and max read the ones they keep again.
    scores = [score(restore(path)) for path in paths] if score else [None] * len(paths)
    order = sorted(range(len(paths)), key=lambda i: scores[i].key(), reverse=True) if score else list(range(len(paths)))
    if method == "max":
        best = order[0]
        return Soup(restore(paths[best]), best, [i == best for i in range(len(paths))], scores, scores[best])
    first = restore(paths[order[0]])
    dtypes = jax.tree.map(lambda x: x.dtype, first)
    total, kept = jax.tree.map(lambda x: x.astype(jnp.float32), first), [order[0]]
    del first
    best_score = scores[order[0]]
    for i in order[1:]:
        ingredient = restore(paths[i])
        if method == "average":
            total = _plus(total, ingredient)
            kept.append(i)
            continue
        candidate = _mean(total, len(kept) + 1, dtypes, plus=ingredient)
        candidate_score = score(candidate)
        del candidate
        if candidate_score.beats(best_score):
            total, best_score = _plus(total, ingredient), candidate_score
            kept.append(i)
    params = _mean(total, len(kept), dtypes)
    if method == "average" and score:
        best_score = score(params)
    return Soup(params, order[0], [i in kept for i in range(len(paths))], scores, best_score)


def soup_checkpoints(paths: Sequence[str], method: str, eval_data: DataConfig | None, limit: int = 0,
                     tokenizer: str = "", **answer_settings) -> Soup:
    """The `method` soup of the checkpoints at `paths`, ranked (when `eval_data` is given) by the held-out
    accuracy on the first `limit` records of each of its eval_sources; `answer_settings` go to the Answerer."""
    check_method(method, eval_data is not None)
    check_ingredients(paths)
    score = None
    if eval_data is not None:
        answerer = load_answerer(paths[0], tokenizer or eval_data.tokenizer, eval_data, restore=False,
                                 **answer_settings)
        score = answer_scorer(answerer, eval_data.eval_sources, limit)
    return make_soup(paths, method, score)


def write_soup(out, params, source: str):
    """A params-only checkpoint at `out` (as `vlm-jax import` writes) with the config, original HF config,
    processor files and tokenizer of the checkpoint at `source`, so eval, generate, export and train.init_from
    read it as they read `source`."""
    config, hf_config, _ = checkpoint.read_meta(source)
    checkpoint.save_params(str(out), params, config, hf_config)
    kept = kept_processor_dir(source)
    if kept:
        keep_processor_files(kept, out)
    tokenizer, _ = tokenizer_path(config, source)
    if tokenizer and not config.data.tokenizer:  # the run's own, kept in its workdir: keep it with the soup too
        write_atomic(user_path(out, "--out") / TOKENIZER_FILE, user_path(tokenizer, "tokenizer").read_bytes())


def soup_table(paths: Sequence[str], method: str, soup: Soup) -> str:
    names = [*paths, f"{method} soup"]
    kept = [*("yes" if k else "no" for k in soup.kept), f"{sum(soup.kept)} of {len(paths)}"]
    return text_table(["checkpoint", "accuracy", "perplexity", "in soup"],
                      [[name, *((f"{s.accuracy:.1%}", f"{s.perplexity:.3f}") if s else ("-", "-")), k]
                       for name, s, k in zip(names, [*soup.scores, soup.score], kept)])


def soup_row(paths: Sequence[str], method: str, soup: Soup) -> dict:
    return {"method": method,
            "ingredients": [{"checkpoint": p, "kept": k, **(s.row() if s else {})}
                            for p, k, s in zip(paths, soup.kept, soup.scores)],
            "soup": soup.score.row() if soup.score else None}
