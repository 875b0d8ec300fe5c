"""Where a name points, and whether this machine can read it: an embedded name, a local path, or a Hub id.

    hub.check([hub.Need("dataset_name", "data/mine.jsonl", hub.DATASET),
               hub.Need("model_name_or_path", "models/my-sft", hub.MODEL)])   # SystemExit: one line per problem

Every entry point calls `check` right after parsing its arguments, before any model or data loads. Without it, a
Hub id that cannot be read (HF_HUB_OFFLINE=1 and no cached copy, no network, a closed HF_ENDPOINT, a mistyped
id) surfaced after the Hub client's retries (30 s to a minute, each warning printed twice) as a traceback with no
fix; here it is one line with the fix, in seconds.

The Hub is asked through huggingface_hub's own client (HfApi.repo_info, which does not retry) with its metadata
timeout (HF_HUB_ETAG_TIMEOUT, 10 s by default). One failed connection settles it for the process: no other id is
tried, and each id is looked up once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets import config as datasets_config
from datasets.naming import camelcase_to_snakecase
from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

MODEL, TOKENIZER, DATASET = "model", "tokenizer", "dataset"
EMBEDDED = "embedded:"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".parquet.gz", ".csv.gz")
# Files whose cached copy means an id can be loaded without the Hub (a model may be a LoRA adapter).
# A dataset's card (README.md) is what `datasets` fetches first and keeps in the Hub cache.
CACHED_FILES = {MODEL: ("config.json", "adapter_config.json"), TOKENIZER: ("tokenizer_config.json", "tokenizer.json"),
                DATASET: ("README.md",)}
USE_LOCAL = {
    MODEL: "give a model folder (config.json inside: an earlier stage's output_dir)",
    TOKENIZER: "give a tokenizer folder (a model folder has one)",
    DATASET: "give a local .jsonl/.json/.parquet/.csv file (optionally .gz) or a folder of them",
}
LOCAL = {
    MODEL: "a local model is a folder with config.json (an earlier stage's output_dir), a Hub model an id like "
           "org/name",
    TOKENIZER: "a local tokenizer is a folder with tokenizer_config.json (a model folder has one), a Hub tokenizer "
               "an id like org/name",
    DATASET: f"a local dataset is a {'/'.join(x for x in DATA_SUFFIXES if not x.endswith('.gz'))} file (optionally "
             ".gz) or a folder of them, a Hub dataset an id like org/name",
}


def local_path(name: str | None) -> Path | None:
    """The local path a name must be, or None when it may be a Hub id (`org/name`) or an embedded name."""
    if not name or name.startswith(EMBEDDED):
        return None
    path = Path(name).expanduser()
    if (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.lower().endswith(DATA_SUFFIXES)
            or path.exists()):
        return path
    return None


def missing_local(name: str, kind: str) -> str:
    """The problem and fix for a local path that does not exist."""
    return f"{name}: no such {'file or folder' if kind == DATASET else 'folder'}; {LOCAL[kind]}"


@dataclass(frozen=True)
class Need:
    """A name an entry point is about to load, and what for."""

    key: str  # the flag or recipe key, for the message
    name: str | None
    kind: str = MODEL  # MODEL, TOKENIZER or DATASET
    revision: str | None = None
    place: str | None = None  # where it was given: "command line (--key)", "recipe.yaml:3"
    also: str | None = None  # said after the usual fix: "with --tokenizer, or --recipe recipes/tiny.yaml ..."


def check(needs) -> None:
    """Exit with one line per name that cannot be read (see `problems`)."""
    bad = problems(needs)
    if bad:
        raise SystemExit("\n".join(bad))


def problems(needs) -> list[str]:
    """`place: key: name: problem; fix` for each need whose name is neither an embedded name, an existing local
    path of its kind, nor a Hub id this machine can read now."""
    bad = []
    for need in needs:
        if not need.name or need.name.startswith(EMBEDDED):
            continue
        problem = _problem(need)
        if problem:
            where = f"{need.place}: {need.key}" if need.place else need.key
            bad.append(f"{where}: {problem}")
    return bad


def local_problem(name: str | None, kind: str) -> str | None:
    """The problem with a name that must be a local path (see `local_path`) and is not one of its kind; None for a
    good one and for a name that may be a Hub id or an embedded name (the checks made when a recipe is parsed,
    without the Hub)."""
    need = Need("", name, kind)
    path = local_path(name)
    if path is None:
        return None
    return missing_local(name, kind) if not path.exists() else _not_of_kind(need, path)


def _problem(need: Need) -> str | None:
    path = local_path(need.name)
    if path is not None:
        if not path.exists():
            return _also(need, missing_local(need.name, need.kind))
        return _not_of_kind(need, path)
    try:
        validate_repo_id(need.name)
    except HFValidationError:
        return f"{need.name}: neither a local path nor a Hub id; {_also(need, LOCAL[need.kind])}"
    return _hub_problem(need)


def _neither(need: Need, reason: str) -> str:
    here = "a file or folder here" if need.kind == DATASET else "a folder here"
    return f"{need.name} is neither {here} nor a Hub {need.kind} this machine can read ({reason}); {_fix(need)}"


def _not_of_kind(need: Need, path: Path) -> str | None:
    """A local model or tokenizer folder that lacks the files that make it one."""
    files = CACHED_FILES[need.kind] if need.kind != DATASET else None
    if files is None or not path.is_dir() or any((path / f).is_file() for f in files):
        return None
    if need.kind == MODEL and any(path.glob("checkpoint-*")):
        return (f"{need.name} has no config.json: a training run's output_dir before its final save; point it at a "
                "complete checkpoint-N folder inside it, or let the run finish")
    return f"{need.name} has no {' or '.join(files)}: not a saved {need.kind} folder; {_also(need, LOCAL[need.kind])}"


def _also(need: Need, fix: str) -> str:
    return f"{fix} {need.also}" if need.also else fix


def _fix(need: Need) -> str:
    local = _also(need, USE_LOCAL[need.kind])
    if offline(need.kind):
        return f"fix: {local}, or unset HF_HUB_OFFLINE to download the Hub id (once: it is cached after that)"
    if _state["unreachable"]:
        return f"fix: {local}, or check the network and HF_ENDPOINT (or download the Hub id where the Hub is reachable)"
    return f"fix: {local}, or a Hub id that exists (org/name)"


# ------------------------------------------------------------------------------------------------ the Hub

_state: dict = {"unreachable": None, "looked_up": {}}  # once per process: the connection failure, each id's answer


def offline(kind: str = MODEL) -> bool:
    """HF_HUB_OFFLINE=1 (datasets also reads HF_DATASETS_OFFLINE for itself)."""
    return bool(datasets_config.HF_HUB_OFFLINE if kind == DATASET else constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    return constants.ENDPOINT


def unreachable() -> str | None:
    """Why the Hub could not be reached in this process, if a lookup found that out."""
    return _state["unreachable"]


def _hub_problem(need: Need) -> str | None:
    """None when the id can be read: on the Hub, or from the cache with HF_HUB_OFFLINE=1."""
    if offline(need.kind):
        return None if cached(need.name, need.kind, need.revision) else _neither(
            need, "HF_HUB_OFFLINE=1 and not in the Hub cache")
    key = (need.name, need.kind, need.revision)
    if key not in _state["looked_up"]:
        _state["looked_up"][key] = _look_up(need)
    return _state["looked_up"][key]


def _look_up(need: Need) -> str | None:
    repo_type = DATASET if need.kind == DATASET else MODEL
    if _state["unreachable"] is None:
        api = HfApi()
        try:
            info = api.repo_info(need.name, repo_type=repo_type, revision=need.revision,
                                 timeout=constants.HF_HUB_ETAG_TIMEOUT)
            if getattr(info, "gated", False):
                api.auth_check(need.name, repo_type=repo_type)
            return None
        except RevisionNotFoundError:
            return (f"the Hub {need.kind} {need.name} has no revision {need.revision!r}; use a branch, tag or commit "
                    "it has")
        except GatedRepoError:
            return (f"the Hub {need.kind} {need.name} is gated: ask for access at {endpoint()}/"
                    f"{'datasets/' if repo_type == DATASET else ''}{need.name}, then put HF_TOKEN in .env")
        except RepositoryNotFoundError:
            return _neither(need, f"the Hub at {endpoint()} has none by that name; a private one needs HF_TOKEN in "
                                  ".env")
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            return f"{need.name}: the Hub at {endpoint()} answered HTTP {status}; try again later"
        except Exception as e:  # connection refused, DNS, TLS, timeout: the Hub is not reachable from here
            _state["unreachable"] = f"{type(e).__name__}: {e}".strip().rstrip(":")
    if cached(need.name, need.kind, need.revision):
        # Without HF_HUB_OFFLINE the libraries ask the Hub for every file, retrying each for about a minute, before
        # they fall back to the cache.
        return (f"{need.name}: the Hub at {endpoint()} cannot be reached ({_state['unreachable']}), but a copy is in "
                "the Hub cache: set HF_HUB_OFFLINE=1 to use it (without it each file is retried for minutes)")
    return _neither(need, f"the Hub at {endpoint()} cannot be reached, {_state['unreachable']}, and it is not in "
                          "the Hub cache")


def cached(name: str, kind: str, revision: str | None = None) -> bool:
    """A copy of the id in the Hub cache (datasets: or in datasets' own cache), loadable offline."""
    repo_type = DATASET if kind == DATASET else MODEL
    if any(isinstance(try_to_load_from_cache(name, f, revision=revision, repo_type=repo_type), str)
           for f in CACHED_FILES[kind]):
        return True
    if kind != DATASET:
        return False
    # load_dataset's own cache of a prepared Hub dataset, named as datasets' offline lookup names it
    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    return (Path(datasets_config.HF_DATASETS_CACHE) / "___".join(parts)).is_dir()


def check_push(repo_id: str) -> str:
    """The user a push to `repo_id` will act as; exits with the fix when the push at the end cannot work (checked
    before any data loads: a run should not learn this after hours of training)."""
    if constants.HF_HUB_OFFLINE:
        raise SystemExit("push_to_hub is set but HF_HUB_OFFLINE=1: unset it, or pass --push_to_hub false")
    if _state["unreachable"]:
        raise SystemExit(f"push_to_hub is set but the Hub ({endpoint()}) cannot be reached ({_state['unreachable']}): "
                         "check the network (or HF_ENDPOINT), or pass --push_to_hub false")
    try:
        return HfApi().whoami()["name"]
    except Exception as e:  # no token, a refused token, or no network: all mean the final push would fail
        raise SystemExit(f"push_to_hub is set but the Hub check failed ({type(e).__name__}): put a write token "
                         "in .env as HF_TOKEN=..., check the network, or pass --push_to_hub false") from None
