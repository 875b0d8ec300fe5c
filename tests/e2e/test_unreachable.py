"""Things a machine cannot read fail in seconds, one line each with the fix, in every entry point: a Hub id with
HF_HUB_OFFLINE=1, with the Hub unreachable (a closed local port as HF_ENDPOINT, and this machine's own lack of a
network), or unknown to the Hub (a local server answering as the Hub does), and a local path that does not exist.

Every command runs as a user runs it (a subprocess), through huggingface_hub's real client; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import PYTHON, run

NOISE = ("Traceback", "Retrying in", "thrown while requesting", "Failed to load CPU")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: connections are refused


ENVS = ("offline", "closed port")
REASON = {"offline": "HF_HUB_OFFLINE=1 and not in the Hub cache", "closed port": "cannot be reached"}


def env_for(how: str) -> dict:
    return {"HF_HUB_OFFLINE": "1"} if how == "offline" else {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}


def fails_fast(argv: list[str], env: dict, lines: int = 1) -> list[str]:
    """Run argv; it must fail within 30 s with exactly `lines` lines of output and no traceback or retry."""
    start = time.monotonic()
    proc = run([PYTHON, *argv], env={"HF_HUB_DISABLE_TELEMETRY": "1", **env}, timeout=120, check=False)
    took = time.monotonic() - start
    out = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
    assert proc.returncode != 0, out
    assert took < 30, f"{took:.0f} s: {argv}"
    assert not [x for x in out if any(n in x for n in NOISE)], out
    assert len(out) == lines, out
    return out


# ------------------------------------------------------------------------------- every entry point, two ways


@pytest.mark.parametrize("how", ENVS)
def test_train_dpo_names_each_unreadable_thing_once(how):
    out = fails_fast(["train_dpo.py", "--dataset_name", "fastdpo-test/no-such-pairs", "--model_name_or_path",
                      "models/my-sft"], env_for(how), lines=2)
    assert out[0].startswith("command line (--model_name_or_path): model_name_or_path: models/my-sft is neither a "
                             "folder here nor a Hub model this machine can read (")
    assert out[1].startswith("command line (--dataset_name): dataset_name: fastdpo-test/no-such-pairs is neither a "
                             "file or folder here nor a Hub dataset")
    assert all(REASON[how] in x and "fix: give a" in x for x in out), out


@pytest.mark.slow
@pytest.mark.parametrize("how", ENVS)
def test_train_sft_the_analyzer_evaluate_demo_and_the_command(how, tmp_path):
    env = env_for(how)
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("model_name_or_path: fastdpo-test/no-such-model\neval_dataset_name: fastdpo-test/no-such-sft\n"
                      "use_cpu: true\nbf16: false\n")
    sft = fails_fast(["train_sft.py", "--config", str(recipe)], env, lines=2)
    assert sft[0].startswith(f"{recipe}:1: model_name_or_path: fastdpo-test/no-such-model is neither")
    assert sft[1].startswith(f"{recipe}:2: eval_dataset_name: fastdpo-test/no-such-sft is neither")

    analyzer = fails_fast(["scripts/analyze_dataset.py", "--recipe", "recipes/olmo3_instruct.yaml"], env, lines=2)
    assert analyzer[0].startswith("error: recipes/olmo3_instruct.yaml:14: dataset_name: allenai/Dolci-Instruct-DPO "
                                  "is neither")
    assert "with --tokenizer, or --recipe recipes/tiny.yaml for the embedded tiny tokenizer" in analyzer[1]

    ev = fails_fast(["scripts/evaluate.py", "models/my-sft", "--ref", "fastdpo-test/no-such-sft", "--dataset_name",
                     "data/mine.jsonl"], env, lines=3)
    assert ev[0].startswith("command line: model: models/my-sft is neither a folder here nor a Hub model")
    assert ev[1].startswith("command line (--ref): ref: fastdpo-test/no-such-sft is neither")
    assert ev[2] == ("command line (--dataset_name): dataset_name: data/mine.jsonl: no such file or folder; a local "
                     "dataset is a .jsonl/.json/.parquet/.csv file (optionally .gz) or a folder of them, a Hub "
                     "dataset an id like org/name")

    demo = fails_fast(["scripts/demo.py", "--out", str(tmp_path / "demo"), "--dpo_args",
                       "--dataset_name fastdpo-test/no-such-pairs"], env)
    assert demo[0].startswith("--dpo_args: dataset_name: fastdpo-test/no-such-pairs is neither")

    command = fails_fast(["-m", "fastdpo.cli", "train", "--model_name_or_path", "models/my-sft"], env)
    assert command[0].startswith("command line (--model_name_or_path): model_name_or_path: models/my-sft is neither")


@pytest.mark.slow
def test_without_a_network_too():
    """This machine's own network, as it is: no Hub (DNS fails, or a firewall), or, where there is one, a Hub that has
    no such ids. Either way one line per name, in seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE")}
    out = fails_fast(["train_dpo.py", "--dataset_name", "fastdpo-test/no-such-pairs"], env)
    assert "is neither a file or folder here nor a Hub dataset this machine can read" in out[0]
    out = fails_fast(["scripts/evaluate.py", "fastdpo-test/no-such-model"], env)
    assert "is neither a folder here nor a Hub model this machine can read" in out[0]


# ------------------------------------------------------------------------------ the Hub asked once, no retries


class _Hub(BaseHTTPRequestHandler):
    """Answers every API call as the Hub does for an id it does not have; counts the calls."""

    calls: list[str] = []

    def do_GET(self):
        self.calls.append(self.path)
        body = json.dumps({"error": "Repository not found"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    _Hub.calls = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_id_the_hub_does_not_have_is_asked_once(hub_server):
    out = fails_fast(["train_dpo.py", "--dataset_name", "fastdpo-test/no-such-pairs", "--model_name_or_path",
                      "models/my-sft"], {"HF_ENDPOINT": hub_server}, lines=2)
    # one call per id (the model at its revision, model_revision: main), none repeated
    assert sorted(_Hub.calls) == ["/api/datasets/fastdpo-test/no-such-pairs", "/api/models/models/my-sft/revision/main"]
    assert f"(the Hub at {hub_server} has none by that name; a private one needs HF_TOKEN in .env); fix: give a " \
           "model folder (config.json inside: an earlier stage's output_dir), or a Hub id that exists (org/name)" \
           in out[0]


def test_an_unreachable_hub_is_found_out_once(tmp_path):
    """A server that accepts connections and closes them unanswered: three Hub ids, one connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        out = fails_fast(["scripts/evaluate.py", "fastdpo-test/a", "--ref", "fastdpo-test/b", "--dataset_name",
                          "fastdpo-test/c"], {"HF_ENDPOINT": f"http://127.0.0.1:{listener.getsockname()[1]}"},
                         lines=3)
    finally:
        listener.close()
    assert len(accepted) == 1, accepted
    assert all("cannot be reached" in x for x in out), out


# ---------------------------------------------------------------------------------------- the Hub cache


def _cache_with_tiny_model(root, tiny_model_path) -> str:
    """The Hub cache's layout (refs/main -> snapshots/<commit>/files) holding the embedded model as acme/tiny."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in Path(tiny_model_path).iterdir():
        shutil.copy(f, snapshot / f.name)
    return str(root)


def test_a_cached_id_loads_offline_and_says_how_when_the_hub_is_unreachable(tmp_path, tiny_model_path):
    hf_home = _cache_with_tiny_model(tmp_path, tiny_model_path)
    (tmp_path / "datasets" / "acme___my_pairs" / "default" / "0.0.0").mkdir(parents=True)  # load_dataset's own cache
    probe = ("from fastdpo import hub; from transformers import AutoTokenizer; "
             "print(hub.problems([hub.Need('model_name_or_path', 'acme/tiny'), "
             "hub.Need('tokenizer', 'acme/tiny', hub.TOKENIZER), hub.Need('dataset_name', 'acme/MyPairs', hub.DATASET)"
             "]))")
    proc = run([PYTHON, "-c", probe + "; AutoTokenizer.from_pretrained('acme/tiny')"],
               env={"HF_HOME": hf_home, "HF_HUB_OFFLINE": "1"})
    assert proc.stdout.strip() == "[]"  # the libraries read the same cache: the tokenizer loaded
    port = closed_port()
    proc = run([PYTHON, "-c", probe], env={"HF_HOME": hf_home, "HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert (f"model_name_or_path: acme/tiny: the Hub at http://127.0.0.1:{port} cannot be reached (ConnectError: "
            "[Errno 111] Connection refused), but a copy is in the Hub cache: set HF_HUB_OFFLINE=1 to use it") \
        in proc.stdout


# ------------------------------------------------------------------------------- the analyzer with no recipe


def test_the_analyzer_on_a_file_with_no_recipe_answers_in_seconds_and_says_whose_lengths(tmp_path):
    from fastdpo import tiny

    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny.preference_rows("train")[:30]))
    start = time.monotonic()
    proc = run([PYTHON, "scripts/analyze_dataset.py", str(data), "--json", str(tmp_path / "out.json")],
               env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert time.monotonic() - start < 30
    note = ("no --recipe: token lengths counted with the embedded tiny tokenizer (recipes/tiny.yaml, train_dpo.py's "
            "default), not your model's; for your model's lengths pass --recipe <the recipe you train with> or "
            "--tokenizer <its folder or Hub id>")
    assert proc.stdout.startswith(f"> {note}\n") and note in proc.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["tokenizer"] == "embedded:tiny-llama" and result["num_samples"] == 30
    assert result["tokenizer_note"] == note and result["recipe"].endswith("recipes/tiny.yaml")
    named = run([PYTHON, "scripts/analyze_dataset.py", str(data), "--recipe", "recipes/tiny.yaml", "--json",
                 str(tmp_path / "named.json")], env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert "no --recipe" not in named.stdout + named.stderr
    assert json.loads((tmp_path / "named.json").read_text())["tokenizer_note"] is None
