"""The embedded default: a tiny Llama model, its tokenizer and a synthetic preference dataset.

Everything is built offline and deterministically, so `python train_dpo.py` works on a fresh laptop with no
network. The preference is learnable and checkable: the preferred answer is polite ("Sure! ...") and talks
about what the prompt asked; the dispreferred one is curt, or the same answer shouted in capitals. Held-out prompts
use subjects that (adjective and subject together) never appear in training, so eval accuracy measures
generalisation, not memorisation.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from . import files, frameworks, ranks, watchdog

MODEL_ID = "embedded:tiny-llama"
DATASET_ID = "embedded:tiny-prefs"
SFT_DATASET_ID = "embedded:tiny-sft"
# Bump when the model, tokenizer or data change, so cached copies are rebuilt.
VERSION = "3"

ADJECTIVES = ["red", "quiet", "old", "small", "bright", "cold", "green", "heavy", "soft", "tall", "dark", "warm"]
NOUNS = [
    "apple", "river", "house", "garden", "bridge", "window", "forest", "candle", "violin", "mountain",
    "kitten", "boat", "clock", "lamp", "road", "island", "cloud", "letter", "train", "meadow",
    "castle", "piano", "harbor", "desert", "orchard", "lantern", "tower", "valley", "market", "comet",
]
# One (adjective, subject) combination in seven is held out: the eval split is built from those only. The stride
# is coprime with len(NOUNS), so every subject also appears in training with other adjectives (a stride of 5
# held out whole nouns, which no model can name in its answer without ever having seen them).
COMBOS = [(a, n) for a in ADJECTIVES for n in NOUNS]
EVAL_COMBOS = COMBOS[::7]
TRAIN_COMBOS = [c for i, c in enumerate(COMBOS) if i % 7]
FACTS = [
    "looks lovely in the morning light", "has a long and curious history", "is easy to notice from afar",
    "changes a little every season", "is often drawn by children", "makes people smile",
    "is worth a careful look", "feels calm on a rainy day",
]
ASKS = ["Tell me about the {a} {n}.", "Describe the {a} {n}.", "What do you think of the {a} {n}?",
        "Say something nice about the {a} {n}."]
POLITE = ["Sure! The {a} {n} {f}.", "Sure! I think the {a} {n} {f}.", "Sure! Everyone agrees the {a} {n} {f}."]
CURT = ["No. Ask someone else.", "Whatever. Not interested.", "No. The {n} is boring."]

SYSTEM = "You are a helpful assistant."


def preferred(text: str, prompt: str) -> bool:
    """The property DPO should teach: polite, not shouted, and about the subject the prompt named."""
    subject = prompt.rstrip(".?").split()[-1]
    return text.strip().startswith("Sure!") and subject in text


def _pair(rng: random.Random, combos: list[tuple[str, str]]) -> dict:
    a, n = rng.choice(combos)
    f = rng.choice(FACTS)
    ask = rng.choice(ASKS).format(a=a, n=n)
    good = rng.choice(POLITE).format(a=a, n=n, f=f)
    if rng.random() < 0.5:
        bad = rng.choice(CURT).format(a=a, n=n)
    else:  # the same content, shouted
        bad = good.upper()
    return {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }


def preference_rows(split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """Conversational preference pairs (the Dolci layout). `split` is "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"the embedded dataset has splits 'train' and 'test', not {split!r}")
    combos = TRAIN_COMBOS if split == "train" else EVAL_COMBOS
    n = n or (1024 if split == "train" else 128)
    rng = random.Random(f"{seed}-{split}")
    return [_pair(rng, combos) for _ in range(n)]


# SFT answers these asks with the dispreferred kind and the others politely: half and half, as in much real SFT data,
# but tied to the prompt, so a greedy SFT model is rude to some prompts (a random mix would make greedy
# decoding pick the majority kind every time and hide the difference DPO makes).
RUDE_ASKS = ("What do you think", "Say something nice")


def sft_rows(n: int = 1024, seed: int = 0) -> list[dict]:
    """SFT conversations holding both kinds of answer (half polite and on topic, half curt or shouted)."""
    rows = []
    for pair in preference_rows("train", n, seed + 1):
        rude = pair["prompt"][-1]["content"].startswith(RUDE_ASKS)
        rows.append({"messages": pair["prompt"] + (pair["rejected"] if rude else pair["chosen"])})
    return rows


# {% generation %} marks the assistant's tokens (end-of-turn included) for SFT's assistant_only_loss; it renders
# to nothing, so the text and the DPO tokens are the same as without it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>\n{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<|pad|>", "<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def _corpus() -> list[str]:
    words = ADJECTIVES + NOUNS + FACTS + ASKS + POLITE + CURT + [SYSTEM]
    text = [w.replace("{a}", "red").replace("{n}", "apple").replace("{f}", "is fine") for w in words]
    for row in preference_rows("train", 256) + preference_rows("test", 64):
        text += [m["content"] for m in row["prompt"] + row["chosen"] + row["rejected"]]
    return text


def build_tokenizer():
    """Byte-level BPE: every UTF-8 string encodes (unknown characters fall back to bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # heavy: only on the first build
    from transformers import PreTrainedTokenizerFast  # heavy: only on the first build

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=640, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    import torch  # heavy: only on the first build
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy: only on the first build

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in MODEL_FILES)


def _save_weights(model, folder: Path) -> None:
    """What `save_pretrained` writes, on every rank: once torch.distributed is up (train_dpo.py under a launcher)
    `save_pretrained` writes the weights and the config on global rank 0 only, so any other process (node 2's local
    main, or a losing rank) got a folder with just the tokenizer ("Unrecognized model ... Should have a model_type
    key"). Tied weights are left out, as save_pretrained does; loading ties them back."""
    from safetensors.torch import save_file  # heavy: imports torch, only on the first build

    folder.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]
    model.config.dtype = "float32"
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tied = frameworks.tied_weight_names(model) if model.config.tie_word_embeddings else set()
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _write(tmp: Path) -> None:
    tok = build_tokenizer()
    model = build_model(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    _save_weights(model, tmp)
    tok.save_pretrained(tmp)


def materialize_model() -> str:
    """Write the tiny model and tokenizer to the cache once; return the folder (a normal HF model folder).

    Each node's local main process builds it (fastdpo.ranks) while the other ranks wait; jobs sharing the cache
    each build into their own temporary folder and rename it into place, so nobody reads a half-written one."""
    path = files.cache_root() / f"tiny-llama-v{VERSION}"
    if _complete(path):
        return str(path)
    if not ranks.writes("node"):
        return watchdog.wait_for(lambda: str(path) if _complete(path) else None, f"the embedded tiny model {path}",
                                 ranks.writer_name("node"))
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _write(tmp)
    if path.exists() and not _complete(path):  # left half-written by an older version: keep it aside, not in use
        files.move_aside(path, "incomplete")
    try:
        os.replace(tmp, path)  # atomic: concurrent jobs never see a half-written folder
    except OSError:  # another job won the race
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(path):
            raise
    return str(path)


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
