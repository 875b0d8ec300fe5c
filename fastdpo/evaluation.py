"""What DPO changed: implicit-reward accuracy and margin, drift from the reference, and the generations.

Pairs are read and tokenised by the data pipeline in memory (`fastdpo.data`), through training's own stages, so a
pair scores here on the same tokens it trained on. Rewards are DPO's implicit rewards,
beta * (log pi(y|x) - log pi_ref(y|x)) summed over the answer tokens, the quantity behind TRL's
`rewards/accuracies` and `rewards/margins`.

`scripts/evaluate.py` is the command-line front; `scripts/demo.py` uses the same functions.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from . import data, layouts, models
from .dataspec import DataSpec, SourceSpec


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    base: str | None  # the base model of a LoRA adapter; None for a full model


def is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load(path: str, device: str = "cpu", dtype: str | None = "auto") -> Loaded:
    """A model folder, a LoRA adapter folder (base loaded from its adapter_config.json) or `embedded:tiny-llama`."""
    base = None
    if is_adapter(path):
        from peft import PeftModel  # only for an adapter: peft imports bitsandbytes, seconds

        base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(models.resolve(base), dtype=models.torch_dtype(dtype))
        model = PeftModel.from_pretrained(model, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(models.resolve(path), dtype=models.torch_dtype(dtype))
    # the adapter folder holds the tokenizer the run trained with (TRL saves it beside the adapter)
    has_tok = (Path(path) / "tokenizer_config.json").is_file() or not Path(path).exists()
    tokenizer = models.load_tokenizer(path if has_tok else base)
    return Loaded(model.to(device).eval(), tokenizer, base)


@contextlib.contextmanager
def as_reference(policy: Loaded, ref: Loaded | None):
    """The reference model: a separate one, or the policy's own base with its adapter switched off (no copy)."""
    if ref is not None:
        yield ref.model
    elif policy.base is not None:
        with policy.model.disable_adapter():
            yield policy.model
    else:
        raise ValueError("a full model needs --ref (the model DPO started from); only a LoRA adapter has its "
                         "reference built in (its base)")


# ------------------------------------------------------------------------------------------------ scoring


def _pad(prompts: list[list[int]], answers: list[list[int]], pad_id: int, device):
    """Right-padded prompt+answer ids, attention mask, and a mask of the answer positions."""
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        answer[i, len(p): len(s)] = True
    return ids.to(device), attn.to(device), answer.to(device)


def _token_logps(model, ids, attn):
    """Log-softmax over the vocabulary at each position, aligned with the token it predicts (shifted by one)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return F.log_softmax(logits, dim=-1)


# Per-pair losses of TRL 1.16's DPOTrainer._compute_loss (reverse KL, no weighting), from beta, the difference of the
# summed log-ratios (d) and of the per-token ones (dn); "sft" is a token mean, computed apart.
PER_PAIR = {
    "sigmoid": lambda b, d, dn: -F.logsigmoid(b * d),
    "sigmoid_norm": lambda b, d, dn: -F.logsigmoid(b * dn),
    "hinge": lambda b, d, dn: torch.relu(1 - b * d),
    "ipo": lambda b, d, dn: (dn - 1 / (2 * b)) ** 2,
}


@dataclass(frozen=True)
class Objective:
    """The run's DPO loss, for the `loss` metric: TRL's loss types with their weights."""

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None

    @classmethod
    def of(cls, settings: dict) -> tuple[Objective | None, str | None]:
        """(the objective, None), or (None, why the loss is not recomputed here) from a run's settings."""
        kinds = settings.get("loss_type") or ["sigmoid"]
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        other = [k for k in kinds if k not in PER_PAIR and k != "sft"]
        if other:
            return None, f"loss_type {', '.join(other)} is not recomputed here"
        for key, plain in (("f_divergence_type", "reverse_kl"), ("use_weighting", False), ("ld_alpha", None)):
            if settings.get(key, plain) != plain:
                return None, f"{key}: {settings[key]} is not recomputed here"
        weights = settings.get("loss_weights")
        return cls(tuple(kinds), tuple(weights) if weights else None), None

    def loss(self, beta: float, per_pair: dict) -> float:
        """The loss over the scored set; "sft" is the mean NLL over all chosen tokens (TRL takes it per eval batch:
        the same when the set is one batch)."""
        chosen, rejected = per_pair["pc"] - per_pair["rc"], per_pair["pr"] - per_pair["rr"]  # summed log-ratios
        delta, delta_norm = chosen - rejected, chosen / per_pair["nc"] - rejected / per_pair["nr"]
        total = 0.0
        for kind, weight in zip(self.loss_type, self.loss_weights or [1.0] * len(self.loss_type), strict=True):
            if kind == "sft":
                part = -per_pair["pc"].sum() / per_pair["nc"].sum()
            else:
                part = PER_PAIR[kind](beta, delta, delta_norm).mean()
            total += weight * part.item()
        return total


@torch.no_grad()
def answer_logps(policy: Loaded, ref: Loaded | None, tokenized, batch_size: int = 16) -> dict:
    """Per pair: summed answer log-probs of policy and reference (pc, rc for chosen; pr, rr for rejected), answer
    lengths (nc, nr), policy means (mc, mr); and the exact KL(policy || reference) summed over the chosen tokens."""
    device = next(policy.model.parameters()).device
    pad = policy.tokenizer.pad_token_id
    out = {k: [] for k in ("pc", "rc", "nc", "mc", "pr", "rr", "nr", "mr")}
    kl_sum, kl_tokens = 0.0, 0
    for start in range(0, len(tokenized), batch_size):
        rows = tokenized[start: start + batch_size]
        for kind in ("chosen", "rejected"):
            ids, attn, answer = _pad(rows["prompt_ids"], rows[f"{kind}_ids"], pad, device)
            target, mask = ids[:, 1:], answer[:, 1:]
            pol = _token_logps(policy.model, ids, attn)
            with as_reference(policy, ref) as ref_model:
                ref_lp = _token_logps(ref_model, ids, attn)
            pol_tok = pol.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask
            ref_tok = ref_lp.gather(-1, target.unsqueeze(-1)).squeeze(-1) * mask
            n = mask.sum(-1).clamp(min=1)
            k = kind[0]
            out[f"p{k}"].append(pol_tok.sum(-1).double().cpu())
            out[f"r{k}"].append(ref_tok.sum(-1).double().cpu())
            out[f"n{k}"].append(n.double().cpu())
            out[f"m{k}"].append((pol_tok.sum(-1) / n).double().cpu())
            if kind == "chosen":  # exact KL over the whole vocabulary at each answer position
                kl = (pol.exp() * (pol - ref_lp)).sum(-1)
                kl_sum += (kl * mask).sum().item()
                kl_tokens += mask.sum().item()
    return {**{k: torch.cat(v) for k, v in out.items()}, "kl_sum": kl_sum, "kl_tokens": kl_tokens}


def score(policy: Loaded, ref: Loaded | None, tokenized, beta: float = 0.1, batch_size: int = 16,
          objective: Objective | None = None) -> dict:
    """Implicit rewards, per-token KL(policy || reference) on the chosen answers, length-fair likelihoods, and
    with `objective` the run's loss.

    `tokenized` holds prompt_ids, chosen_ids, rejected_ids (`data.tokenize_dataset`, or training's token cache).
    """
    per_pair = answer_logps(policy, ref, tokenized, batch_size)
    rewards_c = beta * (per_pair["pc"] - per_pair["rc"])
    rewards_r = beta * (per_pair["pr"] - per_pair["rr"])
    out = {
        "num_pairs": len(rewards_c),
        # strict >, as TRL counts it: a policy equal to its reference scores 0, not 0.5
        "preference_accuracy": (rewards_c > rewards_r).double().mean().item(),
        "reward_margin": (rewards_c - rewards_r).mean().item(),
        "reward_chosen": rewards_c.mean().item(),
        "reward_rejected": rewards_r.mean().item(),
        "kl": per_pair["kl_sum"] / max(per_pair["kl_tokens"], 1),
        # reference-free: does the model itself find the chosen answer likelier per token than the rejected one
        "likelihood_accuracy": (per_pair["mc"] > per_pair["mr"]).double().mean().item(),
        "beta": beta,
    }
    if objective is not None:
        out["loss"] = objective.loss(beta, per_pair)
    return out


@torch.no_grad()
def likelihood_accuracy(loaded: Loaded, tokenized, batch_size: int = 16) -> float:
    """Share of pairs whose chosen answer has the higher mean per-token log-prob; needs no reference."""
    device = next(loaded.model.parameters()).device
    wins = 0
    for start in range(0, len(tokenized), batch_size):
        rows = tokenized[start: start + batch_size]
        means = []
        for kind in ("chosen", "rejected"):
            ids, attn, answer = _pad(rows["prompt_ids"], rows[f"{kind}_ids"], loaded.tokenizer.pad_token_id, device)
            lp = _token_logps(loaded.model, ids, attn).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            mask = answer[:, 1:]
            means.append((lp * mask).sum(-1) / mask.sum(-1).clamp(min=1))
        wins += (means[0] > means[1]).sum().item()
    return wins / len(tokenized)


# --------------------------------------------------------------------------------------------- generating


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int = 48, batch_size: int = 32):
    """Greedy answers to already-tokenised prompts: (texts, lengths in tokens, end-of-turn token included)."""
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    texts, lengths = [], []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start: start + batch_size]
        width = max(map(len, chunk))
        # left padding: every prompt ends at the same column, where generation starts
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        outputs = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=eos)
        for row in outputs[:, width:].tolist():
            n = row.index(eos) + 1 if eos in row else len(row)
            lengths.append(n)
            texts.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    return texts, lengths


def prompt_text(prompt) -> str:
    """The last user turn of a conversational prompt, or the prompt string itself (for tables and judges)."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m["role"] == "user"]
        return users[-1] if users else prompt[-1]["content"]
    return prompt


def decoded_prompt(tokenizer, ids: list[int]) -> str:
    """A tokenised prompt as text to show: its last paragraph without special tokens (the last user turn, for most
    chat templates), for token rows that no longer carry their text."""
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return text.split("\n\n")[-1].strip() or text


def side_by_side(policy: Loaded, ref: Loaded | None, pairs, tokenized, n: int, max_new_tokens: int = 48) -> dict:
    """Greedy generations of policy and reference on the first n prompts, and their mean lengths; `pairs` gives the
    prompts' text (None: decoded from the token ids)."""
    prompt_ids = tokenized["prompt_ids"][:n]
    pol_texts, pol_len = generate(policy.model, policy.tokenizer, prompt_ids, max_new_tokens)
    with as_reference(policy, ref) as ref_model:
        ref_texts, ref_len = generate(ref_model, policy.tokenizer, prompt_ids, max_new_tokens)
    prompts = ([prompt_text(p) for p in pairs["prompt"][:n]] if pairs is not None else
               [decoded_prompt(policy.tokenizer, ids) for ids in prompt_ids])
    return {
        "gen_length": sum(pol_len) / max(len(pol_len), 1),
        "ref_gen_length": sum(ref_len) / max(len(ref_len), 1),
        "samples": [{"prompt": p, "policy": a, "reference": b}
                    for p, a, b in zip(prompts, pol_texts, ref_texts, strict=True)],
    }


def load_eval_pairs(dataset_name: str, split: str = "test", column_map: str | dict | None = None,
                    max_pairs: int | None = None, dataset_config: str | None = None, tokenizer=None,
                    ranked_pairs: str | None = None, judged_pairs: bool = False):
    """Any preference source training accepts, one split, read by the data pipeline in memory (bad rows are
    errors). The tokenizer decides, as in training, whether implicit-prompt transcripts are read as messages (it
    has a chat template) or as raw text (it has none)."""
    options = layouts.Options(layouts.parse_column_map(column_map), ranked_pairs, bool(judged_pairs))
    spec = DataSpec(SourceSpec(dataset_name, dataset_config, split, options, limit=max_pairs))
    return data.load_pairs(spec, tokenizer).train


# ---------------------------------------------------------------------------------------------- reporting


def markdown(report: dict) -> str:
    lines = ["| metric | value |", "|---|---|"]
    for key in ("num_pairs", "loss", "preference_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "kl",
                "likelihood_accuracy", "gen_length", "ref_gen_length", "preferred_share", "ref_preferred_share"):
        if key in report:
            value = report[key]
            lines.append(f"| {key} | {value if isinstance(value, int) else f'{value:.4f}'} |")
    for i, s in enumerate(report.get("samples", []), start=1):
        lines += ["", f"**{i}. {s['prompt']}**", "", "| policy | reference |", "|---|---|",
                  f"| {_cell(s['policy'])} | {_cell(s['reference'])} |"]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"


CURVES = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
          ("learning_rate", "learning rate")]


def plot_training(trainer_state: str | Path, png: str | Path) -> Path:
    """Loss, reward accuracy, margin and learning rate per step from a run's trainer_state.json (eval as dots)."""
    import matplotlib  # only for --plot: seconds to import

    matplotlib.use("Agg")  # files only; no display on clusters
    import matplotlib.pyplot as plt  # after use("Agg"): the backend is chosen at this import

    history = json.loads(Path(trainer_state).read_text())["log_history"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, CURVES, strict=True):
        train = [(h["step"], h[key]) for h in history if key in h]
        evals = [(h["step"], h[f"eval_{key}"]) for h in history if f"eval_{key}" in h]
        if train:
            ax.plot(*zip(*train, strict=True), label="train")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o", label="eval")
        ax.set_title(title if train or evals else f"{title} (not logged)")
        ax.set_xlabel("step")
        if train and evals:
            ax.legend()
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
