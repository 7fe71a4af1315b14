"""Max |logit difference| against transformers 4.46.3 for the demo-shaped tiny Mllama it saved
(tests/fixtures/mllama_446): vlm_jax's import, each export read back by transformers 5.23 and by vlm_jax, and the
4.46.3 directory read by 5.23 as it is (the mismatch the export's translation removes).

    python benchmarks/mllama_layer_convention.py [--tf446 /tmp/tf446/bin/python]

--tf446 names a python with transformers 4.46.3 (tests/fixtures/make_mllama_446_reference.py says how to make
one): the `--vision-layer-convention input` export is then also run there.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import numpy as np
import torch
import transformers
from transformers import MllamaForConditionalGeneration

from vlm_jax.convert import from_hf, to_hf

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                       "mllama_446")
RUN_446 = """
import sys, numpy as np, torch, transformers
from transformers import MllamaForConditionalGeneration
assert transformers.__version__ == "4.46.3", transformers.__version__
ref = np.load(sys.argv[2])
batch = {k: torch.from_numpy(ref[k]) for k in ref.files if k != "logits"}
with torch.no_grad():
    np.save(sys.argv[3], MllamaForConditionalGeneration.from_pretrained(sys.argv[1]).eval()(**batch).logits.numpy())
"""


def _torch(path, batch):
    with torch.no_grad():
        model = MllamaForConditionalGeneration.from_pretrained(path).eval()
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tf446", default="", help="a python with transformers 4.46.3")
    args = p.parse_args()
    ref_file = os.path.join(FIXTURE, "reference.npz")
    ref = np.load(ref_file)
    batch = {k: ref[k] for k in ref.files if k != "logits"}
    expected = ref["logits"]
    model, params = from_hf(FIXTURE, dtype="float32")
    ours = np.asarray(model.apply({"params": params}, **batch))
    rows = [("vlm_jax import (Meta's convention, the default)", ours)]
    as_outputs, _ = from_hf(FIXTURE, dtype="float32", vision={"intermediate_layers_convention": "output"})
    rows.append(("vlm_jax import read as layer outputs (--set ...=output)",
                 np.asarray(as_outputs.apply({"params": params}, **batch))))
    with tempfile.TemporaryDirectory() as tmp:
        for_5x, for_4x = os.path.join(tmp, "5x"), os.path.join(tmp, "4x")
        to_hf(model, params, for_5x)
        to_hf(model, params, for_4x, vision_layer_convention="input")
        rows.append((f"export (default, for 5.x) -> transformers {transformers.__version__}", _torch(for_5x, batch)))
        again, again_params = from_hf(for_4x, dtype="float32")
        rows.append(("export --vision-layer-convention input -> vlm_jax import",
                     np.asarray(again.apply({"params": again_params}, **batch))))
        if args.tf446:
            out = os.path.join(tmp, "446.npy")
            subprocess.run([args.tf446, "-c", RUN_446, for_4x, ref_file, out], check=True, capture_output=True)
            rows.append(("export --vision-layer-convention input -> transformers 4.46.3", np.load(out)))
        rows.append((f"the 4.46.3 directory as it is -> transformers {transformers.__version__}",
                     _torch(FIXTURE, batch)))
    print(f"logits {expected.shape}, max |logit| {np.abs(expected).max():.3f}; max |difference| from transformers "
          "4.46.3's logits:")
    width = max(len(name) for name, _ in rows)
    for name, logits in rows:
        print(f"  {name:<{width}}  {np.abs(logits - expected).max():.2e}")


if __name__ == "__main__":
    main()
