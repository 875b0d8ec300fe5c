"""Dataset mixtures: several sources in one recipe, each taken by an amount, seeded, held out and accounted for per
source (docs/mixtures.md is the user's guide).

    datasets:                                  # TRL's list form, with our keys beside TRL's
      - path: data/safety.jsonl                #   count: N rows; weight: w x the source's rows; TRL's fraction
        count: 5000
      - path: allenai/Dolci-Instruct-DPO
        weight: 0.5
    eval_datasets: [{path: data/safety_test.jsonl}]      # optional named eval sets (no amount)
    dataset_mixture: {datasets: [{id, config, split, columns, weight}], test_split_size, seed}   # alignment-handbook

`read_recipe(path)` reads those keys with their recipe lines (a mistake is one line: file:line, the key, the fix);
`Mixture` is the plan in its plain JSON form, the one run.json records and `DataSpec.of` reads back;
`plan_rows` decides, from each source's pair hashes and which pairs fit, the rows that train (copies included) and
the rows each eval set holds, with every pair accounted for; `changes` names what differs between two plans.

Every draw is seeded by dataset_seed and the source's name (`rng`), never by a global generator: every rank and
every requeue draws the same rows, and adding a source does not change the rows drawn from the others.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .errors import DataError
from .layouts import check_codes, check_column_map

TRL_KEYS = ("path", "name", "data_dir", "data_files", "split", "columns", "fraction")
HANDBOOK_KEYS = ("id", "config", "weight")
OPTION_KEYS = ("column_map", "ranked_pairs", "judged_pairs", "annotators", "judged_label", "judged_codes")
AMOUNTS = ("count", "weight", "fraction")
ENTRY_KEYS = tuple(dict.fromkeys(TRL_KEYS + HANDBOOK_KEYS + ("label", "count") + OPTION_KEYS))
RECIPE_KEYS = ("datasets", "dataset_mixture", "eval_datasets", "test_split_size")  # read here, not by TrlParser
HANDBOOK_MIXTURE_KEYS = ("datasets", "test_split_size", "seed")
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CHOICES = {"ranked_pairs": ("best_vs_worst", "best_vs_rest"), "annotators": ("majority",)}


# ------------------------------------------------------------------------------------------- recipe forms


@dataclass
class Node:
    """A YAML value with the line it starts on (1-based), and its children's lines for mappings and lists."""

    value: object
    line: int
    items: dict = field(default_factory=dict)  # mapping: key -> Node; list: index -> Node


def _node(node: yaml.Node) -> Node:
    value = yaml.SafeLoader("").construct_object(node, deep=True)  # the loader's stream is never read
    out = Node(value, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out.items = {k.value: _node(v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
    elif isinstance(node, yaml.SequenceNode):
        out.items = {i: _node(v) for i, v in enumerate(node.value)}
    return out


@dataclass
class RecipeMixture:
    """What a recipe's mixture keys say: the entries (plain dicts), the eval entries, and the handbook form's split
    and seed; `given` the keys found (for the combinations config refuses)."""

    sources: list[dict]
    evals: list[dict] | None
    test_split: str | None = None
    seed: int | None = None
    given: dict = field(default_factory=dict)  # recipe key -> its line
    top: dict = field(default_factory=dict)  # every top-level key of the recipe -> its line


def read_recipe(path: str | Path) -> tuple[RecipeMixture | None, list[str]]:
    """(the mixture a recipe gives, or None; one line per problem). Reads only RECIPE_KEYS."""
    try:
        root = yaml.compose(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None, []  # the training parser reports an unreadable recipe itself
    if not isinstance(root, yaml.MappingNode):
        return None, []
    top = _node(root).items
    given = {k: top[k].line for k in RECIPE_KEYS if k in top}
    if not given:
        return None, []
    bad: list[str] = []
    where = f"{path}:{{}}"
    test_split, seed = None, None
    if list(given) == ["test_split_size"]:  # TRL's key beside dataset_name: ours says it
        return None, [f"{where.format(given['test_split_size'])}: test_split_size: write dataset_test_split: "
                      f"{top['test_split_size'].value} (a fraction held out, seeded by dataset_seed)"]
    if "datasets" in top and "dataset_mixture" in top:
        bad.append(f"{where.format(top['dataset_mixture'].line)}: dataset_mixture: and datasets: both give the "
                   "sources; keep one (datasets: is TRL's form, dataset_mixture: alignment-handbook's)")
        return None, bad
    if "dataset_mixture" in top:
        mix = top["dataset_mixture"]
        if not isinstance(mix.value, dict):
            return None, [f"{where.format(mix.line)}: dataset_mixture: expected a mapping with datasets: [...] "
                          "(alignment-handbook's form)"]
        bad += _unknown(where, mix, HANDBOOK_MIXTURE_KEYS, "dataset_mixture")
        entries = mix.items.get("datasets")
        test = mix.items.get("test_split_size")
        seed_node = mix.items.get("seed")
        if seed_node is not None:
            seed = seed_node.value
            if not isinstance(seed, int) or isinstance(seed, bool):
                bad.append(f"{where.format(seed_node.line)}: dataset_mixture.seed: {seed!r}; expected a whole number")
        label = "dataset_mixture.datasets"
    else:
        entries, test, label = top.get("datasets"), top.get("test_split_size"), "datasets"
    if test is not None:
        test_split, problem = _test_size(test.value)
        if problem:
            bad.append(f"{where.format(test.line)}: test_split_size: {problem}")
    line = top["dataset_mixture" if "dataset_mixture" in top else "datasets"].line if entries is None else None
    sources = _entries(where, entries, label, bad, amounts=True) if entries is not None else []
    if entries is None and "eval_datasets" not in top:
        bad.append(f"{where.format(line or 1)}: {label}: missing; list the sources, e.g. datasets: [{{path: "
                   "data/my_pairs.jsonl}}]")
    evals = None
    if "eval_datasets" in top:
        evals = _entries(where, top["eval_datasets"], "eval_datasets", bad, amounts=False)
    if sources:
        bad += _fractions(where, sources, label)
        bad += _unique(where, sources, label)
    if evals:
        bad += _unique(where, evals, "eval_datasets")
    return RecipeMixture(sources, evals, test_split, seed, given, {k: n.line for k, n in top.items()}), bad


def _test_size(value) -> tuple[str | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        return None, (f"{value!r}; give a fraction between 0 and 1 (e.g. 0.05), held out of each source before "
                      "upsampling")
    return repr(float(value)), None


def _unknown(where: str, node: Node, valid, what: str) -> list[str]:
    out = []
    for key, child in node.items.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(valid)}"
            out.append(f"{where.format(child.line)}: {what}: unknown key {key!r}: {hint}")
    return out


def _entries(where: str, node: Node, label: str, bad: list[str], amounts: bool) -> list[dict]:
    """The entries of a list form, each checked (keys, values, one amount) and normalised to our plain keys."""
    if not isinstance(node.value, list) or not node.value:
        bad.append(f"{where.format(node.line)}: {label}: expected a list of sources, e.g. [{{path: "
                   "data/my_pairs.jsonl}}]")
        return []
    out = []
    for i, child in node.items.items():
        what = f"{label}[{i}]"
        if not isinstance(child.value, dict):
            bad.append(f"{where.format(child.line)}: {what}: expected a mapping with path: (a file, folder or Hub id)")
            continue
        problems = _unknown(where, child, ENTRY_KEYS, what)
        entry, more = _entry(child, amounts)
        problems += [f"{where.format(child.items[k].line if k in child.items else child.line)}: {what}.{k}: {p}"
                     if k else f"{where.format(child.line)}: {what}: {p}" for k, p in more]
        bad += problems
        if not problems:
            entry["line"] = child.line
            out.append(entry)
    return out


def _entry(node: Node, amounts: bool) -> tuple[dict, list[tuple[str | None, str]]]:
    """One entry's plain form (path, config, split, data_dir, data_files, columns, label, options, amount) and its
    problems as (key, problem)."""
    v, bad = node.value, []
    if ("path" in v) == ("id" in v):
        bad.append((None, "give the source as path: (TRL) or id: (alignment-handbook), once"))
    if "name" in v and "config" in v:
        bad.append(("config", "name: and config: both give the Hub configuration; keep one"))
    path = v.get("path", v.get("id"))
    for key in ("path", "id", "name", "config", "data_dir", "split", "label", "judged_label"):
        if key in v and (not isinstance(v[key], str) or not v[key]):
            bad.append((key, f"{v[key]!r}; expected a non-empty string"))
    if "label" in v and isinstance(v["label"], str) and not LABEL.match(v["label"]):
        bad.append(("label", f"{v['label']!r}; use letters, digits, _ . - (it names the eval metrics: "
                             "eval_<label>_loss)"))
    if "columns" in v and not (isinstance(v["columns"], list) and v["columns"]
                               and all(isinstance(c, str) for c in v["columns"])):
        bad.append(("columns", f"{v['columns']!r}; expected a list of column names"))
    files = v.get("data_files")
    if files is not None and not _files_ok(files):
        bad.append(("data_files", f"{files!r}; expected a file, a list of files or {{split: files}}"))
    options, more = _options(v)
    bad += more
    given = [k for k in AMOUNTS if k in v]
    if given and not amounts:
        bad.append((given[0], "eval sets take every row; drop it (max_eval_samples caps each eval set)"))
    elif len(given) > 1:
        bad.append((given[1], f"{' and '.join(given)} both set the amount; keep one (count: rows, weight: a multiple "
                              "of the source's rows, fraction: TRL's share)"))
    amount = None
    if given and amounts and len(given) == 1:
        amount, problem = _amount(given[0], v[given[0]])
        if problem:
            bad.append((given[0], problem))
    split = v.get("split", "train")
    entry = {"label": v.get("label") or (display_name(path, files, split) if isinstance(path, str) else None),
             "path": path, "config": v.get("name", v.get("config")), "split": split,
             "data_dir": v.get("data_dir"), "data_files": files, "columns": v.get("columns"), "options": options,
             "amount": amount}
    return entry, bad


def _files_ok(files) -> bool:
    if isinstance(files, str):
        return bool(files)
    if isinstance(files, list):
        return bool(files) and all(isinstance(f, str) for f in files)
    return isinstance(files, dict) and all(isinstance(k, str) and _files_ok(f) for k, f in files.items())


def _options(v: dict) -> tuple[dict, list]:
    """The entry's conversion options (its own column_map, ranked/judged options), checked as the flags are."""
    out, bad = {}, []
    for key in OPTION_KEYS:
        if key not in v or v[key] is None:
            continue
        value = v[key]
        if key in ("column_map", "judged_codes") and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                bad.append((key, f"not a JSON object ({e})"))
                continue
        problem = (check_column_map(value) if key == "column_map" else check_codes(value) if key == "judged_codes"
                   else None)
        if key in CHOICES and value not in CHOICES[key]:
            problem = f"{value!r}; expected one of {', '.join(CHOICES[key])}"
        if key == "judged_pairs" and not isinstance(value, bool):
            problem = f"{value!r}; expected true or false"
        if problem:
            bad.append((key, problem))
        elif value is not False:
            out[key] = value
    return out, bad


def _amount(key: str, value) -> tuple[dict | None, str | None]:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "count" and not (number and float(value).is_integer() and value >= 1):
        return None, (f"{value!r}; expected a whole number of rows, at least 1 (a share of the source is weight: "
                      "0.5, two copies weight: 2)")
    if key != "count" and not (number and value > 0 and math.isfinite(value)):
        return None, f"{value!r}; expected a positive number"
    return {key: int(value) if key == "count" else float(value)}, None


def _fractions(where: str, entries: list[dict], label: str) -> list[str]:
    """TRL's rule: fraction on every entry or none, and not beside count/weight (its shares are of one total)."""
    with_fraction = [e for e in entries if e["amount"] and "fraction" in e["amount"]]
    if not with_fraction or len(with_fraction) == len(entries):
        return []
    other = next(e for e in entries if not (e["amount"] and "fraction" in e["amount"]))
    return [f"{where.format(other['line'])}: {label}: fraction: is set on {len(with_fraction)} of {len(entries)} "
            "sources; TRL's fraction is a share of one total, so set it on every source, or use count:/weight: "
            "(each source on its own)"]


def _unique(where: str, entries: list[dict], label: str) -> list[str]:
    seen, bad = {}, []
    for e in entries:
        first = seen.setdefault(e["label"], e["line"])
        if first != e["line"]:
            bad.append(f"{where.format(e['line'])}: {label}: two sources named {e['label']!r} (the first on line "
                       f"{first}); give one a label: (it names its eval metrics and its accounting)")
    return bad


def display_name(path: str, data_files=None, split: str = "train") -> str:
    """The name a source shows in logs, accounting and metrics: a file's stem, a folder's name, a Hub id's last
    part; a builder name with data_files (`path: json`), the first file's stem."""
    if data_files is not None and Path(path).suffix == "" and not Path(path).expanduser().exists():
        first = data_files if isinstance(data_files, str) else (
            data_files[0] if isinstance(data_files, list) else next(iter(data_files.values())))
        path = first if isinstance(first, str) else first[0]
    if path.startswith("embedded:"):
        return path.split(":", 1)[1]
    name = Path(path.rstrip("/")).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "source"


# ------------------------------------------------------------------------------------------- the plan


def absolute(path: str) -> str:
    """A local path as its absolute form (the same source whatever folder a run starts in); Hub ids as given."""
    if not path.startswith("embedded:") and Path(path).expanduser().exists():
        return str(Path(path).expanduser().resolve())
    return path


@dataclass(frozen=True)
class Mixture:
    """A mixture's plan in plain form: entries with label, path, config, split, data_dir, data_files, columns,
    options and amount; `evals` the named eval sets (None: held out of each source, or no eval)."""

    sources: tuple
    evals: tuple | None = None

    @classmethod
    def of(cls, recipe: RecipeMixture) -> Mixture:
        def plain(e):
            return {**{k: v for k, v in e.items() if k != "line"}, "path": absolute(e["path"])}

        return cls(tuple(plain(e) for e in recipe.sources),
                   tuple(plain(e) for e in recipe.evals) if recipe.evals else None)

    @classmethod
    def from_plain(cls, plain: dict) -> Mixture:
        evals = plain.get("eval")
        return cls(tuple(plain["sources"]), tuple(evals) if evals else None)

    def plain(self) -> dict:
        return {"sources": [dict(e) for e in self.sources], "eval": [dict(e) for e in self.evals] if self.evals
                else None}


def describe_amount(amount: dict | None) -> str:
    if not amount:
        return "all rows once"
    (key, value), = amount.items()
    return f"{key} {value:g}" if isinstance(value, float) else f"{key} {value:,}"


def changes(old: dict | None, new: dict | None) -> list[str]:
    """What differs between two plans (run.json's `mixture`), one phrase each: a source added or removed, its
    amount or where it reads from, the order, the eval sets."""
    if not old or not new:
        return ["one source (dataset_name) -> a mixture" if new else "a mixture -> one source (dataset_name)"]
    out = []
    for part in ("sources", "eval"):
        a = {e["label"]: e for e in old.get(part) or []}
        b = {e["label"]: e for e in new.get(part) or []}
        what = "source" if part == "sources" else "eval set"
        out += [f"{what} {n!r} removed" for n in a if n not in b]
        out += [f"{what} {n!r} added" for n in b if n not in a]
        for n in a.keys() & b.keys():
            for key in sorted(set(a[n]) | set(b[n])):
                x, y = a[n].get(key), b[n].get(key)
                if x != y:
                    show = describe_amount if key == "amount" else json.dumps
                    out.append(f"{what} {n!r}: {key} {show(x)} -> {show(y)}")
        if not out and list(a) != list(b):
            out.append(f"order of {part}: {', '.join(a)} -> {', '.join(b)}")
    return out


def rng(seed: int, name: str, purpose: str) -> np.random.Generator:
    """The generator of one draw: dataset_seed, the source's name and what is drawn; never the global one."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def resolve_amounts(amounts: list[dict | None], sizes: list[int], names: list[str]) -> list[int]:
    """Rows each source gives the mixture, from its amount and its pairs left to train (after the eval hold-out,
    deduplication and pairs too long): count N as is; weight w: round(w x size); fraction: TRL's largest mixture in
    which no source gives more than it has, shared by the normalised fractions; none: every pair once."""
    fractions = [a["fraction"] for a in amounts if a and "fraction" in a]
    total = None
    if fractions:
        shares = [a["fraction"] / sum(fractions) for a in amounts]
        total = min(n / s for n, s in zip(sizes, shares, strict=True))
    out = []
    for i, (amount, n) in enumerate(zip(amounts, sizes, strict=True)):
        if not amount:
            want = n
        elif "count" in amount:
            want = amount["count"]
        elif "weight" in amount:
            want = math.floor(amount["weight"] * n + 0.5)
        else:
            want = min(n, math.floor(shares[i] * total + 0.5))
        if n == 0:
            raise DataError(f"source {names[i]!r}: no pair left to train on (after the eval hold-out, duplicates and "
                            "pairs longer than max_length); drop it from the mixture, or check its rows")
        if want < 1:
            raise DataError(f"source {names[i]!r}: {describe_amount(amount)} of its {n:,} pairs is no pair; raise it, "
                            "or drop the source")
        out.append(want)
    return out


def take(pool: np.ndarray, want: int, gen: np.random.Generator) -> tuple[np.ndarray, int]:
    """(rows, distinct rows): `want` rows of `pool`: whole copies while want covers it, then a seeded draw without
    replacement of the rest, in the pool's order."""
    copies, rest = divmod(want, len(pool))
    drawn = pool[np.sort(gen.choice(len(pool), rest, replace=False))] if rest else pool[:0]
    return np.concatenate([np.tile(pool, copies), drawn]), len(pool) if copies else rest


# ------------------------------------------------------------------------------------------- rows


@dataclass
class Rows:
    """One source's pairs as the plan sees them (its token-cache entry's rows.arrow, or pairs in memory)."""

    name: str
    hashes: list  # 16-byte pair hash per pair, in the source's order
    fits: np.ndarray  # per pair: fits max_length (a pair whose prompt leaves no room is dropped)
    where: object  # where[i] -> "file:line" of pair i
    amount: dict | None = None


@dataclass
class Part:
    """What one source (role "train") or named eval set (role "eval") gives: its train rows, copies included, and
    its eval rows (held out of it, or the eval set's own), with the counts that account for every pair."""

    name: str
    role: str
    train: np.ndarray
    eval: np.ndarray | None
    counts: dict
    removed: list = field(default_factory=list)  # (row, problem): duplicates removed
    dropped: list = field(default_factory=list)  # (row, split): pairs whose prompt leaves no room in max_length


def _counts(pairs: int) -> dict:
    return {"pairs": pairs, "taken": 0, "upsampled": 0, "not_taken": 0, "trained": 0, "eval": 0, "eval_unused": 0,
            "dropped": 0, "duplicates_removed": 0, "repeats": {"train": 0, "eval": 0, "eval_in_train": 0}}


def plan_rows(train: list[Rows], evals: list[Rows] | None, holdout: list[float | None], seed: int, dedup: str,
              max_eval: int | None) -> tuple[list[Part], list[str]]:
    """(parts: one per train source, then one per named eval set; warnings). In order: a seeded hold-out of each
    source's pairs (before any copy, so a copy of an eval pair never trains); repeats counted, and with dedup all
    removed, over the whole mixture (the first stays); eval pairs also in train removed unless dedup none; each eval
    set capped at max_eval_samples; pairs too long dropped; then each source's amount drawn from what is left."""
    parts = [Part(r.name, "train", np.arange(len(r.hashes)), None, _counts(len(r.hashes))) for r in train]
    warnings = []
    for r, p, fraction in zip(train, parts, holdout, strict=True):
        n = len(r.hashes)
        if fraction is None:
            continue
        h = max(1, math.floor(n * fraction))
        if n - h < 1:
            warnings.append(f"source {r.name!r}: {n} pair{'' if n == 1 else 's'} too few to hold out {fraction:g}: "
                            "no eval set from it")
            continue
        p.eval = np.sort(rng(seed, r.name, "eval").permutation(n)[:h])
        p.train = np.setdiff1d(p.train, p.eval)
    seen: dict = {}
    for r, p in zip(train, parts, strict=True):
        keep = []
        for j in p.train.tolist():
            first = seen.setdefault(r.hashes[j], (r, j))
            if first[1] != j or first[0] is not r:
                p.counts["repeats"]["train"] += 1
                if dedup == "all":
                    p.removed.append((j, f"repeats the pair at {first[0].where[first[1]]}"))
                    continue
            keep.append(j)
        p.train = np.asarray(keep, dtype=np.int64)
    named = [Part(r.name, "eval", np.zeros(0, np.int64), np.arange(len(r.hashes)), _counts(len(r.hashes)))
             for r in evals or []]
    for r, p in zip(list(train) + list(evals or []), parts + named, strict=True):
        if p.eval is not None:
            p.eval = _eval_rows(r, p, seen, dedup, max_eval)
    for r, p in zip(list(train) + list(evals or []), parts + named, strict=True):
        p.train = _fitting(r, p, p.train, "train")
        if p.eval is not None:
            p.eval = _fitting(r, p, p.eval, "eval")
    wants = resolve_amounts([r.amount for r in train], [len(p.train) for p in parts], [r.name for r in train])
    for r, p, want in zip(train, parts, wants, strict=True):
        pool = p.train
        p.train, distinct = take(pool, want, rng(seed, r.name, "take"))
        p.counts.update(taken=distinct, upsampled=want - distinct, not_taken=len(pool) - distinct, trained=want)
    return parts + named, warnings


def _eval_rows(r: Rows, p: Part, seen: dict, dedup: str, max_eval: int | None) -> np.ndarray:
    """An eval set's rows: repeats within it counted (removed with dedup all), pairs also in train removed unless
    dedup none, then capped at max_eval_samples."""
    first, keep = {}, []
    for j in p.eval.tolist():
        k = first.setdefault(r.hashes[j], j)
        if k != j:
            p.counts["repeats"]["eval"] += 1
            if dedup == "all":
                p.removed.append((j, f"repeats the pair at {r.where[k]}"))
                continue
        in_train = seen.get(r.hashes[j])
        if in_train is not None:
            p.counts["repeats"]["eval_in_train"] += 1
            if dedup != "none":
                p.removed.append((j, f"eval pair also in train at {in_train[0].where[in_train[1]]} (dedup: none "
                                     "keeps it)"))
                continue
        keep.append(j)
    if p.counts["repeats"]["eval_in_train"] and not keep:
        raise DataError(f"eval set {r.name!r}: every eval pair also occurs in train "
                        f"({p.counts['repeats']['eval_in_train']}), so none is left to evaluate on; use other eval "
                        "rows, or pass --dedup none to keep them")
    rows = np.asarray(keep, dtype=np.int64)
    if max_eval is not None and len(rows) > max_eval:
        p.counts["eval_unused"] = len(rows) - max_eval
        rows = rows[:max_eval]
    p.counts["eval"] = len(rows)
    return rows


def _fitting(r: Rows, p: Part, rows: np.ndarray, split: str) -> np.ndarray:
    ok = r.fits[rows] if len(rows) else np.zeros(0, bool)
    p.dropped += [(j, split) for j in rows[~ok].tolist()]
    p.counts["dropped"] += int((~ok).sum())
    if split == "eval":
        p.counts["eval"] -= int((~ok).sum())
    p.counts["duplicates_removed"] = len(p.removed)
    return rows[ok]


def check_counts(part: Part) -> None:
    """Every pair of a part is somewhere: a bug otherwise, said rather than reported."""
    c = part.counts
    made = sum(c[k] for k in ("taken", "not_taken", "eval", "eval_unused", "dropped", "duplicates_removed"))
    if made != c["pairs"] or c["trained"] != c["taken"] + c["upsampled"]:
        raise RuntimeError(f"mixture accounting of {part.name!r} does not add up: {c}")
