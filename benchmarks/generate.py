"""Prefill and decode throughput: vlm_jax (jitted, KV cache) vs transformers' PyTorch generate, on the same
Hugging Face directory and the same prompts, side by side in one run.

    JAX_PLATFORMS=cpu python benchmarks/generate.py                      # the demo's export (make demo first)
    JAX_PLATFORMS=cpu python benchmarks/generate.py --hf DIR --tokenizer DIR/tokenizer.model --batch 8
    JAX_PLATFORMS=cpu python benchmarks/generate.py --model configs/models/mllama_100m.yaml --repeats 3

With --model, the model is that config with random weights, exported to a temporary directory, and the prompts
are tokenized by a sentencepiece tokenizer trained on the embedded tasks (as training does without one): at
~100M parameters decode speed measures arithmetic rather than per-token overhead.

Prefill time is the time to the first new token (max_new_tokens=1); decode tokens/s is measured as
batch * (N - 1) / (time(N new tokens) - time(1 new token)), so both sides pay the same prompt work once.
Stop tokens are disabled so every row decodes all N tokens. Best of --repeats interleaved runs after a
warm-up (a shared machine only ever slows a run down).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vlm_jax.config import load_config  # noqa: E402
from vlm_jax.convert import from_hf, to_hf  # noqa: E402
from vlm_jax.data import EmbeddedSource, load_tokenizer, task_texts, train_sentencepiece  # noqa: E402
from vlm_jax.families import build_model, init_params  # noqa: E402
from vlm_jax.infer.answer import Answerer  # noqa: E402
from vlm_jax.infer.generate import generate  # noqa: E402
from vlm_jax.infer.hf_reference import load_hf_mllama, torch_batch  # noqa: E402


def best_seconds(first_token, all_tokens, repeats: int) -> tuple[float, float]:
    """Fastest of `repeats` interleaved runs of each (the machine is shared: the minimum is the least
    disturbed run); one warm-up each first (it compiles on the JAX side)."""
    first_token(), all_tokens()
    times = {first_token: [], all_tokens: []}
    for _ in range(repeats):
        for fn in times:
            start = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - start)
    return min(times[first_token]), min(times[all_tokens])


def random_export(model_config: str, out_dir: str):
    """(HF directory of `model_config` with random weights, a tokenizer of at most its vocabulary)."""
    cfg = load_config(model_config).model
    model = build_model(cfg)
    to_hf(model, nn.meta.unbox(init_params(model, jax.random.PRNGKey(0))), out_dir)
    return out_dir, train_sentencepiece(task_texts(), vocab_size=cfg.text.vocab_size)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    demo = os.path.join(ROOT, "workdirs", "demo")
    p.add_argument("--hf", default=os.path.join(demo, "hf"))
    p.add_argument("--tokenizer", default=os.path.join(demo, "hf", "tokenizer.model"))
    p.add_argument("--model", help="a model config to run with random weights instead of --hf and --tokenizer")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "demo.yaml"), help="for data settings")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            args.hf, tokenizer = random_export(args.model, tmp)
        else:
            for path in (args.hf, args.tokenizer):
                if not os.path.exists(path):
                    sys.exit(f"{path} not found: run `make demo` first, or pass --hf and --tokenizer (or --model)")
            tokenizer = load_tokenizer(args.tokenizer)
        compare(args, tokenizer)
    return 0


def compare(args, tokenizer):
    import torch
    model, params = from_hf(args.hf, dtype="float32")
    data = load_config(args.config).data
    answerer = Answerer(model, params, tokenizer, data, batch_size=args.batch)
    source = EmbeddedSource("digits_qa", "test")
    prompts, _ = answerer.prompts([source[i] for i in range(args.batch)])
    hf_model = load_hf_mllama(args.hf)
    jax_inputs, torch_inputs = prompts, torch_batch(prompts)
    prompt_tokens = int(np.sum(prompts["prompt_mask"]))

    def run_jax(n):
        sampling = dataclasses.replace(answerer.sampling, max_new_tokens=n, stop_tokens=())
        return lambda: jax.block_until_ready(generate(model, params, jax_inputs, sampling))

    def run_torch(n):
        def go():
            with torch.no_grad():
                hf_model.generate(**torch_inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  eos_token_id=None, pad_token_id=answerer.sampling.pad_token)
        return go

    rows = {}
    for name, runner in (("JAX (vlm_jax)", run_jax), ("PyTorch (transformers)", run_torch)):
        first, full = best_seconds(runner(1), runner(args.new_tokens), args.repeats)
        rows[name] = (prompt_tokens / first, args.batch * (args.new_tokens - 1) / max(full - first, 1e-9), first)
    (j_pre, j_dec, _), (t_pre, t_dec, _) = rows.values()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"{args.model or args.hf} ({n_params / 1e6:.1f}M parameters): batch {args.batch}, {prompt_tokens} prompt "
          f"tokens, {args.new_tokens} new tokens per row, {jax.devices()[0].platform} / torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads")
    print(f"{'':<24}{'prefill tok/s':>14}{'decode tok/s':>14}{'time to first token':>22}")
    for name, (pre, dec, first) in rows.items():
        print(f"{name:<24}{pre:>14,.0f}{dec:>14,.0f}{first * 1e3:>19.1f} ms")
    print(f"{'JAX / PyTorch':<24}{j_pre / t_pre:>13.2f}x{j_dec / t_dec:>13.2f}x")


if __name__ == "__main__":
    sys.exit(main())
