"""No route to the Hugging Face Hub: cached files still load, anything else fails in seconds with one line.

The commands run in a fresh process whose HF_ENDPOINT is a closed local port (nothing leaves the machine)
and whose Hub cache is a temporary folder holding one model's weights.
"""

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import huggingface_hub
import pytest
import timm
from safetensors.torch import save_file

from retrofit.network import hub_or_cache

from .helpers import SIZE, tiny_model_dir, write_images

# Each call is timed inside the process, so the interpreter's start-up does not count.
SCRIPT = """
import json, sys, time
from retrofit import load_backbone
from retrofit.cli import main

seconds = {}
start = time.perf_counter()
load_backbone("test_vit")  # cached
seconds["cached"] = time.perf_counter() - start
for name, args in (("model", sys.argv[1:5]), ("dataset", sys.argv[5:])):
    start = time.perf_counter()
    assert main(args) == 1
    seconds[name] = time.perf_counter() - start
print(json.dumps(seconds))
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed: connection refused


def cache_weights(hub_cache: Path, repo: str, model: str) -> None:
    """What a download leaves in the Hub cache: a snapshot of the weights and the ref that names it."""
    commit = "0" * 40
    folder = hub_cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(timm.create_model(model, pretrained=False).state_dict(), snapshot / "model.safetensors")


def test_without_a_route_to_the_hub_the_cache_serves_and_the_rest_fails_in_seconds(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    cache_weights(tmp_path / "hf" / "hub", "timm/test_vit.r160_in1k", "test_vit")
    images = write_images(tmp_path / "images", 2)
    model = tiny_model_dir(tmp_path / "tiny")
    args = ["diagnose", "test_vit2", "--images", str(images),
            "fit", "--model.backbone", str(model), "--data.source", "hf:user/photos", "--data.img_size", str(SIZE),
            "--trainer.default_root_dir", str(tmp_path / "runs")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seconds = json.loads(done.stdout.strip().splitlines()[-1])
    assert max(seconds.values()) < 10, seconds  # huggingface_hub's retries took 25 s per file
    unreachable = f"cannot reach the Hugging Face Hub at {endpoint} ([Errno 111] Connection refused)"
    assert done.stderr.splitlines() == [  # one line each: no retry messages, nothing from Lightning first
        f"retrofit: error: could not fetch pretrained weights for 'test_vit2' ({unreachable}, and they are not in "
        "the local cache): pass a local weights file (checkpoint=PATH in Python, --model.checkpoint PATH in "
        "retrofit fit, --checkpoint PATH elsewhere).",
        f"retrofit: error: cannot open dataset 'user/photos' split 'train' ({unreachable}, and it is not in the "
        "local cache): pass an image folder, a save_to_disk folder or a Hugging Face dataset name and one of its "
        "splits.",
    ]


class NotFound(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_hub_that_answers_is_a_route_and_offline_mode_holds_only_inside_the_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hub = huggingface_hub.constants
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    try:
        monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        with hub_or_cache() as unreachable:  # even an error status is an answer
            assert unreachable is None and hub.HF_HUB_OFFLINE is False
    finally:
        server.shutdown()
        server.server_close()
    closed = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(hub, "ENDPOINT", closed)
    with hub_or_cache() as unreachable:
        assert unreachable == f"cannot reach the Hugging Face Hub at {closed} ([Errno 111] Connection refused)"
        assert hub.HF_HUB_OFFLINE is True
    assert hub.HF_HUB_OFFLINE is False
