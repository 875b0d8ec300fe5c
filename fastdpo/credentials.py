"""Secrets: HF_TOKEN, WANDB_API_KEY and the like read from .env, never printed, masked in every log record, and
refused in any argument (arguments are saved in training_args.bin, TensorBoard, tracker configs and model cards)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import fields
from pathlib import Path

from dotenv import dotenv_values, load_dotenv

from .recipes import REPO

SECRET_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
# .env keys whose values are treated as secrets too (a .env also holds harmless settings like WANDB_PROJECT)
SECRET_PATTERN = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.I)

_env_files: list[Path] = []  # the .env files load_env read, for the log


def load_env(dirs: list[Path] | None = None) -> list[Path]:
    """Read HF_TOKEN, WANDB_API_KEY, ... from .env (never printed); the shell's own values win.

    `.env` is looked for in the current directory, then in the repo root (a run started from elsewhere, e.g.
    `python ~/fastdpo/train_dpo.py`, still finds it); for a key in both, the current directory's wins.
    """
    found = []
    for d in dirs if dirs is not None else [Path.cwd(), REPO]:
        path = (Path(d) / ".env").resolve()
        if path.is_file() and path not in found:
            load_dotenv(path, override=False)
            found.append(path)
    _env_files[:] = found
    return found


def secret_values() -> dict[str, str]:
    """name -> value of every secret in the environment: the known token names, plus .env keys that look like
    secrets (TOKEN, KEY, SECRET, PASSWORD in the name). Values under 8 characters are too common to match."""
    names = set(SECRET_NAMES)
    for path in _env_files:
        names |= {k for k in dotenv_values(path) if SECRET_PATTERN.search(k)}
    return {n: os.environ[n] for n in sorted(names) if len(os.environ.get(n) or "") >= 8}


class _Redact(logging.Filter):
    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(s in msg for s in self.secrets):
            for s in self.secrets:
                msg = msg.replace(s, "***")
            record.msg, record.args = msg, None
        return True


def redact_logs() -> None:
    """Mask secret values in every log record, whichever library emits it; say which .env files were read."""
    found = secret_values()
    if _env_files:
        logging.getLogger("fastdpo").info("secrets: read %s (%s set)", ", ".join(map(str, _env_files)),
                                          ", ".join(found) or "no secret")
    secrets = list(found.values())
    if not secrets:
        return
    flt = _Redact(secrets)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
    logging.getLogger().addFilter(flt)


def _strings(value, key: str):
    """(key, string) for every string inside a field's value (lists and dicts included)."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v, key)


def check_secrets(where, *configs) -> list[str]:
    """Refuse any string argument holding a secret: arguments are written to training_args.bin, TensorBoard,
    wandb/trackio configs and the model card, which a Hub push uploads; a log filter cannot reach those."""
    secrets = secret_values()
    bad = []
    for conf in configs:
        for f in fields(conf):
            if f.name == "hub_token":  # refused on its own, with the fix
                continue
            for key, text in _strings(getattr(conf, f.name), f.name):
                names = [name for name, value in secrets.items() if value in text]
                if names:
                    bad.append(f"{where(f.name)}: {key} contains the value of {' and '.join(names)}; remove it: "
                               "arguments are saved in training_args.bin, TensorBoard and tracker configs (secrets "
                               "belong in .env only)")
    return bad
