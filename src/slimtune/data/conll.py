"""Tagged word sequences (token classification): CoNLL-style files, tables of word / tag lists, tag schemes.

Every source becomes one table with the columns `tokens` and `tags` (lists of strings, one tag per word),
`record` (1-based, in the file) and `line` (a CoNLL file's line of the sentence's first word; 0 for tables),
so that every later check names where its word is.

CoNLL: one word per line, its columns separated by tabs (when the line holds one) or by whitespace, the token
in one column and the tag in another (by default the first and the last, so CoNLL-2003's `EU NNP B-NP B-ORG`
reads as ('EU', 'B-ORG')); a blank line ends a sentence; `-DOCSTART-` lines are document marks, skipped.

Tag schemes: BIO (IOB2: B- begins an entity, I- continues it), BIOES (also E- ends one, S- is a one-word
entity) and IOB1 (CoNLL-2003's original files: I- begins an entity unless it follows one of its type; read
and converted to BIO). "O" is outside any entity.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

from datasets import Dataset

from ..errors import DataError

CONLL_SUFFIXES = (".conll", ".iob", ".bio")
SCHEMES = {"BIO": "BI", "BIOES": "BIES", "IOB1": "BI"}  # the prefixes each scheme allows, beside "O"
_TAG = re.compile(r"([A-Z])-(.+)")


def parse_conll(text: str, path: object, token_column: int = 0, tag_column: int = -1) -> Dataset:
    """The sentences of a CoNLL file's text; `path` names the file in errors."""
    need = max(i + 1 if i >= 0 else -i for i in (token_column, tag_column))
    tokens, tags, lines = [], [], []
    words: list[str] = []
    labels: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines() + [""], 1):
        line = raw.strip()
        if not line or line.split()[0] == "-DOCSTART-":
            if words:
                tokens.append(words)
                tags.append(labels)
                lines.append(start)
                words, labels = [], []
            continue
        cols = [c.strip() for c in line.split("\t")] if "\t" in line else line.split()
        if len(cols) < max(need, 2) or (token_column - tag_column) % len(cols) == 0:
            raise DataError(
                f"{path}: line {n} has {len(cols)} column(s) ({line[:60]!r}); expected a token and a tag "
                f"(data.conll_token_column={token_column}, data.conll_tag_column={tag_column}), separated by "
                "tabs or spaces, one word per line and a blank line between sentences")
        if not words:
            start = n
        words.append(cols[token_column])
        labels.append(cols[tag_column])
    if not tokens:
        raise DataError(f"{path}: no sentences (a CoNLL file has one 'token ... tag' line per word and a blank "
                        "line between sentences)")
    return Dataset.from_dict({"tokens": tokens, "tags": tags, "record": list(range(1, len(tokens) + 1)),
                              "line": lines})


def from_table(ds: Dataset, source: str, tokens_column: str, tags_column: str,
               label_names: list[str] | None = None) -> Dataset:
    """A table (JSONL, Parquet, a datasets folder, the Hub) with a list of words and a list of tags per record,
    in the common shape. Integer tags are named by the column's ClassLabel names (Hub datasets) or
    data.label_names."""
    for col, key in ((tokens_column, "data.tokens_column"), (tags_column, "data.tags_column")):
        if col not in ds.column_names:
            raise DataError(f"{source}: column {col!r} not found (set by {key}); the file has columns: "
                            f"{', '.join(ds.column_names) or '(none)'}")
    names = _class_names(ds, tags_column) or label_names
    tokens, tags = [], []
    for r, (words, labels) in enumerate(zip(ds[tokens_column], ds[tags_column]), 1):
        for value, col, what in ((words, tokens_column, "words"), (labels, tags_column, "tags")):
            if not isinstance(value, list):
                hint = " (a string: split it into a list of words)" if isinstance(value, str) else ""
                raise DataError(f"{source}: record {r}, column {col!r}: expected a list of {what}, got "
                                f"{str(value)[:60]!r}{hint}")
        if len(words) != len(labels):
            raise DataError(f"{source}: record {r}: {len(words)} words in column {tokens_column!r} but {len(labels)} "
                            f"tags in column {tags_column!r}; each word needs exactly one tag")
        tokens.append(["" if w is None else str(w) for w in words])
        tags.append([_tag_name(t, names, source, r, i) for i, t in enumerate(labels)])
    return Dataset.from_dict({"tokens": tokens, "tags": tags, "record": list(range(1, len(tokens) + 1)),
                              "line": [0] * len(tokens)})


def _class_names(ds: Dataset, column: str) -> list[str] | None:
    feature = ds.features.get(column)
    inner = getattr(feature, "feature", None)
    return list(inner.names) if inner is not None and hasattr(inner, "names") else None


def _tag_name(tag: object, names: list[str] | None, source: str, record: int, i: int) -> str:
    if isinstance(tag, int) and not isinstance(tag, bool):
        if names and 0 <= tag < len(names):
            return names[tag]
        raise DataError(f"{source}: record {record}, word {i + 1}: tag {tag} is an integer with no name; give tag "
                        "names ('B-PER') or their names in order as data.label_names")
    if tag is None or not str(tag).strip():
        raise DataError(f"{source}: record {record}, word {i + 1}: empty or missing tag; every word needs one "
                        "('O' outside entities)")
    return str(tag).strip()


def locator(ds: Dataset, source: str) -> Callable[[int, int], str]:
    """(row, word) -> where that word is: a CoNLL file's line, or a table's record and word."""
    lines, records = ds["line"], ds["record"]

    def where(row: int, word: int) -> str:
        if lines[row]:
            return f"{source}: line {lines[row] + word}"
        return f"{source}: record {records[row]}, word {word + 1}"

    return where


def empty_sentences(ds: Dataset) -> tuple[Dataset, int]:
    """The table without records of no words (a table can hold them; they train on nothing), and their count."""
    keep = [i for i, words in enumerate(ds["tokens"]) if words]
    return (ds if len(keep) == len(ds) else ds.select(keep)), len(ds) - len(keep)


def tag_order(tags: Iterable[str]) -> list[str]:
    """The label list: "O" first (when present), then the other tags sorted."""
    present = set(tags)
    return (["O"] if "O" in present else []) + sorted(present - {"O"})


# -- schemes -------------------------------------------------------------------------------------------------

def split_tag(tag: str) -> tuple[str, str] | None:
    """('O', '') or (prefix, entity type); None for a tag of neither form."""
    if tag == "O":
        return "O", ""
    m = _TAG.fullmatch(tag)
    return (m.group(1), m.group(2)) if m else None


def detect_scheme(tags: Iterable[str]) -> str:
    """BIOES when any E- or S- tag is present, else BIO."""
    prefixes = {tag[:2] for tag in tags}
    return "BIOES" if prefixes & {"E-", "S-"} else "BIO"


def check_scheme(ds: Dataset, source: str, scheme: str, how: str) -> None:
    """Every tag is 'O' or <prefix>-<type> with a prefix the scheme has; `how` says where the scheme comes from."""
    allowed = SCHEMES[scheme]
    where = locator(ds, source)
    for row, tags in enumerate(ds["tags"]):
        for i, tag in enumerate(tags):
            parts = split_tag(tag)
            if parts is None or (parts[0] != "O" and parts[0] not in allowed):
                raise DataError(
                    f"{where(row, i)}: tag {tag!r} does not fit the {scheme} tag scheme ({how}): a tag is 'O' or "
                    f"<prefix>-<type> with prefix {', '.join(allowed)} (e.g. 'B-PER'); fix the tag or set "
                    "data.tag_scheme (BIO, BIOES, IOB1)")


def iob1_to_bio(ds: Dataset) -> Dataset:
    """IOB1 tags rewritten as BIO: an I- that does not continue an entity of its type begins one (B-)."""
    def convert(tags: list[str]) -> list[str]:
        out, prev = [], "O"
        for tag in tags:
            if tag.startswith("I-") and prev[2:] != tag[2:]:
                tag = "B-" + tag[2:]
            out.append(tag)
            prev = tag
        return out

    return ds.map(lambda row: {"tags": convert(row["tags"])})


def orphan_tags(ds: Dataset, source: str, scheme: str) -> tuple[int, str | None]:
    """(count, first one) of the I- (BIOES: I- and E-) tags that follow no B- / I- of their type."""
    where = locator(ds, source)
    inside = ("I-", "E-") if scheme == "BIOES" else ("I-",)
    count, first = 0, None
    for row, tags in enumerate(ds["tags"]):
        prev = "O"
        for i, tag in enumerate(tags):
            if tag[:2] in inside and not (prev[:2] in ("B-", "I-") and prev[2:] == tag[2:]):
                count += 1
                if first is None:
                    first = f"{where(row, i)}, {tag!r} after {prev!r}"
            prev = tag
    return count, first


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word) of each entity, as conlleval (and seqeval's default mode) reads tags: an
    I- / E- that follows no entity of its type begins one."""
    from seqeval.metrics.sequence_labeling import get_entities

    return [(kind, start, end) for kind, start, end in get_entities(list(tags))]


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, dict]:
    """Per entity type and 'micro avg': precision, recall, f1 and support (gold entities); an entity counts
    when its type, first and last word all match."""
    def spans(seqs: list[list[str]]) -> set[tuple]:
        return {(s, kind, a, b) for s, tags in enumerate(seqs) for kind, a, b in entity_spans(tags)}

    g, p = spans(gold), spans(pred)
    out = {}
    for kind in sorted({x[1] for x in g | p}) + ["micro avg"]:
        gk = g if kind == "micro avg" else {x for x in g if x[1] == kind}
        pk = p if kind == "micro avg" else {x for x in p if x[1] == kind}
        tp = len(gk & pk)
        prec = tp / len(pk) if pk else 0.0
        rec = tp / len(gk) if gk else 0.0
        out[kind] = {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if tp else 0.0,
                     "support": len(gk)}
    return out
