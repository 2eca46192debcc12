"""Sequence tagging in the IOB2 scheme: word labels on word pieces for training, entities from
tags, entity-level scores as `seqeval` computes them (default mode), and token predictions
grouped into entities the way transformers' `token-classification` pipeline does.

IOB2: `O` outside any entity, `B-T` begins an entity of type T, `I-T` continues one; an `I-T`
that follows anything but `B-T`/`I-T` starts a new entity (seqeval's default reading).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ticketserve.core.errors import InvalidArgument

IGNORED = -100  # a word piece's label the loss and the metrics skip (special tokens, a word's later pieces)
AGGREGATIONS = ("none", "simple", "first", "average", "max")


def entity_type(label: str) -> str | None:
    return None if label == "O" else label[2:]


def spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last + 1) of each entity in a tag sequence (seqeval's default mode: a
    stray I- begins an entity; an entity ends where the type changes or a B- or O comes)."""
    found, current = [], None
    for i, tag in enumerate([*tags, "O"]):
        prefix, kind = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        if current is not None and (prefix != "I" or kind != current[0]):
            found.append((current[0], current[1], i))
            current = None
        if prefix == "B" or (prefix == "I" and current is None):
            current = (kind, i)
    return found


def entity_scores(true: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entities (exact type and boundaries), and accuracy over tags."""
    gold = {(n, *s) for n, tags in enumerate(true) for s in spans(tags)}
    guess = {(n, *s) for n, tags in enumerate(predicted) for s in spans(tags)}
    hits = len(gold & guess)
    precision = hits / len(guess) if guess else 0.0
    recall = hits / len(gold) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    tags = [(t, p) for a, b in zip(true, predicted) for t, p in zip(a, b)]
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1,
            "token_accuracy": sum(t == p for t, p in tags) / len(tags) if tags else 0.0}


def joined(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Pre-split words as one text (joined by spaces: what a request would send) and each word's
    character span in it — so training tokenizes exactly as serving does, with every tokenizer."""
    text, found, position = [], [], 0
    for word in words:
        found.append((position, position + len(word)))
        text.append(word)
        position += len(word) + 1
    return " ".join(text), found


def word_ids(offsets: Sequence[tuple[int, int]], words: Sequence[tuple[int, int]]) -> list[int | None]:
    """Each word piece's word (None for special tokens): the word whose span holds its start."""
    found, w = [], 0
    for start, end in offsets:
        if start == end:
            found.append(None)
            continue
        while w + 1 < len(words) and words[w + 1][0] <= start:
            w += 1
        found.append(w if words and words[w][0] <= start < max(words[w][1], words[w][0] + 1) else None)
    return found


def piece_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Each word piece's label: its word's on the word's first piece, IGNORED on later pieces and
    on special tokens (the Hugging Face convention)."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORED if word is None or word == previous else word_labels[word])
        previous = word
    return labels


def check_aggregation(aggregation: str | None) -> str:
    """A request's aggregation (default `simple`), refused before any work when unknown."""
    if aggregation is None:
        return "simple"
    if aggregation not in AGGREGATIONS:
        raise InvalidArgument(f"aggregation {aggregation!r}: one of {', '.join(AGGREGATIONS)}")
    return aggregation


@dataclass(frozen=True)
class Token:
    """One word piece's prediction, with its character span in the text."""

    label: str
    score: float  # probability of `label`
    probabilities: dict[str, float]
    start: int
    end: int
    word: int  # which word of the text (pieces of one word share it)


@dataclass(frozen=True)
class Entity:
    entity_group: str  # an entity type (aggregated), or a piece's own label (aggregation none)
    score: float
    word: str  # the text's characters start…end
    start: int
    end: int


def entities(text: str, tokens: Sequence[Token], aggregation: str | None = "simple") -> list[Entity]:
    """Entities of one text from its pieces' predictions, as transformers' pipeline groups them:
    `none` every piece not labelled O; `simple` adjacent pieces of one type, B- starting a new
    entity (score: the pieces' mean); `first`/`average`/`max` first give each word one label —
    its first piece's, the average of its pieces' probabilities, or its most confident piece's —
    then group words like `simple`."""
    aggregation = check_aggregation(aggregation)
    if aggregation == "none":
        return [Entity(t.label, t.score, text[t.start:t.end], t.start, t.end) for t in tokens if t.label != "O"]
    units = list(tokens) if aggregation == "simple" else _words(tokens, aggregation)
    found: list[Entity] = []
    group: list[Token] = []

    def close() -> None:
        if group:
            start, end = group[0].start, group[-1].end
            found.append(Entity(group[0].label[2:], sum(t.score for t in group) / len(group), text[start:end], start, end))
            group.clear()

    for unit in units:
        kind = entity_type(unit.label)
        if kind is None:
            close()
        elif group and unit.label.startswith("I-") and entity_type(group[-1].label) == kind:
            group.append(unit)
        else:
            close()
            group.append(unit)
    close()
    return found


def _words(tokens: Sequence[Token], aggregation: str) -> list[Token]:
    """One Token per word: its span, and the label `aggregation` gives it."""
    words: list[list[Token]] = []
    for token in tokens:
        if words and words[-1][0].word == token.word:
            words[-1].append(token)
        else:
            words.append([token])
    merged = []
    for pieces in words:
        if aggregation == "first":
            chosen = pieces[0]
            label, score, probabilities = chosen.label, chosen.score, chosen.probabilities
        elif aggregation == "max":
            chosen = max(pieces, key=lambda t: t.score)
            label, score, probabilities = chosen.label, chosen.score, chosen.probabilities
        else:  # average: the pieces' mean probabilities, then the best label
            probabilities = {k: sum(t.probabilities[k] for t in pieces) / len(pieces) for k in pieces[0].probabilities}
            label = max(probabilities, key=probabilities.__getitem__)
            score = probabilities[label]
        merged.append(Token(label, score, probabilities, pieces[0].start, pieces[-1].end, pieces[0].word))
    return merged
