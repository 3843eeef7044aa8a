"""The deterministic text: words from a fixed vocabulary chosen by a PRNG seeded from strings, and the helpers that
cut a token list at a character offset (continuation) or a text into fixed-size pieces (JSON, tool arguments)."""

from __future__ import annotations

import hashlib
import random

DEFAULT_LENGTH = 64

# A fixed vocabulary: the text only has to read like prose and be reproducible, not to mean anything.
VOCAB: tuple[str, ...] = (
    "the", "a", "river", "stream", "router", "answer", "token", "quiet", "bright", "model", "server", "request",
    "morning", "evening", "window", "garden", "stone", "light", "shadow", "signal", "packet", "journey", "bridge",
    "harbor", "mountain", "valley", "forest", "cloud", "rain", "wind", "engine", "lantern", "paper", "story",
    "voice", "number", "letter", "market", "village", "city", "road", "path", "field", "ocean", "island", "north",
    "south", "east", "west", "always", "never", "often", "slowly", "quickly", "gently", "carefully", "again",
    "together", "between", "through", "under", "over", "before", "after", "during", "without", "within", "across",
    "and", "but", "or", "so", "because", "while", "when", "where", "if", "then", "is", "was", "will", "can", "may",
    "keeps", "brings", "finds", "holds", "builds", "carries", "follows", "writes", "reads", "sends", "returns",
    "waits", "listens", "remembers", "opens", "closes", "turns", "moves", "grows", "shines", "falls", "rises",
    "old", "new", "small", "large", "warm", "cold", "clear", "distant", "simple", "careful", "steady", "patient",
    "silver", "golden", "green", "blue", "red", "open", "hidden", "early", "late", "every", "each", "some", "many",
    "few", "its", "their", "our", "your", "this", "that", "these", "those", "one", "two", "three", "first", "last",
    "of", "to", "in", "on", "at", "with", "from", "by", "for", "about", "into", "near", "far", "here", "there",
)


def seeded_rng(*parts: str) -> random.Random:
    """A PRNG seeded from strings through sha256: reproducible across processes (unlike `hash`)."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def simulated_tokens(seed: str, input_key: str, length: int = DEFAULT_LENGTH) -> list[str]:
    """`length` words chosen by a PRNG seeded from (seed, input_key). Every token but the first has one leading
    space and no other whitespace, so `"".join(tokens)` is the full text and token boundaries are unambiguous."""
    rng = seeded_rng("text", seed, input_key)
    tokens: list[str] = []
    left_in_sentence = 0
    for i in range(max(0, length)):
        word = rng.choice(VOCAB)
        if left_in_sentence == 0:
            word = word.capitalize()
            left_in_sentence = rng.randint(5, 14)
        left_in_sentence -= 1
        if i == length - 1 or left_in_sentence == 0:
            word += "?" if rng.random() < 0.1 else "."
            left_in_sentence = 0
        elif left_in_sentence > 1 and rng.random() < 0.08:
            word += ","
        tokens.append(word if i == 0 else " " + word)
    return tokens


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(count))


def chunks_of(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def tokens_from(tokens: list[str], offset: int) -> list[str]:
    """The tokens that make up text[offset:], the first one cut at `offset` if it falls inside a token."""
    pos = 0
    for i, tok in enumerate(tokens):
        end = pos + len(tok)
        if end > offset:
            return [tok[offset - pos :] if offset > pos else tok, *tokens[i + 1 :]]
        pos = end
    return []


def overlap_start(tokens: list[str], partial_len: int, overlap: int = 3) -> int:
    """Offset of the first of the last `overlap` whole tokens inside text[:partial_len] (0 if there are none)."""
    starts: list[int] = []
    pos = 0
    for tok in tokens:
        if pos + len(tok) > partial_len:
            break
        starts.append(pos)
        pos += len(tok)
    if not starts:
        return 0
    return starts[max(0, len(starts) - overlap)]
