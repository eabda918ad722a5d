"""The offline pretraining corpus: WordNet glosses plus Python's own documentation.

Both sources ship with the machine (Debian's `wordnet-base` and the Python standard library), so the
built-in model can be rebuilt anywhere without a download. Documents come in a fixed order and the
train/held-out split is drawn per document from a seeded generator, so a seed names one corpus.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splitprefix.errors import SplitPrefixError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
"""Where Debian's `wordnet-base` package puts the WordNet database."""

WORDNET_PARTS = ("noun", "verb", "adj", "adv")
"""The `data.<part>` files read, in this order."""

# A small fixed set keeps the docstring source stable and avoids importing modules with side effects
# (`antigravity` opens a browser, `this` prints).
STDLIB_DOC_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "collections", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "email.message", "enum", "fractions", "functools", "gzip", "hashlib", "heapq",
    "http.client", "inspect", "io", "itertools", "json", "logging", "math", "os", "pathlib", "random", "re",
    "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "textwrap",
    "threading", "typing", "unittest", "urllib.parse", "zipfile",
)  # fmt: skip

# Adjective lemmas may carry a syntactic marker such as `galore(ip)`.
_ADJ_MARKER = re.compile(r"\([a-z]+\)$")


logger = logging.getLogger(__name__)


class WordNetMissingError(SplitPrefixError, FileNotFoundError):
    """The WordNet database files are not installed."""


@dataclass(frozen=True)
class Corpus:
    """Documents split into a training part and a held-out part, each in source order."""

    train: list[str]
    """Documents the tokenizer and the model are trained on."""
    heldout: list[str]
    """Documents kept back for evaluation."""

    def sizes(self) -> dict[str, int]:
        """Document and character counts of both parts, for the recipe file."""
        return {
            "train_documents": len(self.train),
            "heldout_documents": len(self.heldout),
            "train_chars": sum(map(len, self.train)),
            "heldout_chars": sum(map(len, self.heldout)),
        }


def _wordnet_record(line: str) -> str | None:
    """`"word one, word two: gloss"` from one `data.*` line; None for header or gloss-less lines."""
    if line.startswith("  ") or " | " not in line:
        return None  # licence header
    fields, gloss = line.split(" | ", 1)
    parts = fields.split()
    # Layout: offset lex_filenum ss_type w_cnt(hex) [word lex_id]*w_cnt pointers...
    count = int(parts[3], 16)
    words = [_ADJ_MARKER.sub("", parts[4 + 2 * i]).replace("_", " ") for i in range(count)]
    return f"{', '.join(words)}: {gloss.strip()}"


def wordnet_documents(wordnet_dir: Path = DEFAULT_WORDNET_DIR) -> list[str]:
    """One document per WordNet synset, as `"words: gloss"`, nouns first then verbs, adjectives, adverbs."""
    paths = [Path(wordnet_dir) / f"data.{part}" for part in WORDNET_PARTS]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise WordNetMissingError(
            f"WordNet data files not found: {', '.join(missing)}. Install them with "
            "`sudo apt-get update && sudo apt-get install -y wordnet-base`, or point `wordnet_dir` at a "
            "folder holding data.noun, data.verb, data.adj and data.adv"
        )
    documents: list[str] = []
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as lines:
            documents.extend(doc for doc in map(_wordnet_record, lines) if doc is not None)
    return documents


def python_topic_documents() -> list[str]:
    """The help topics of `pydoc_data` (the language reference behind `help("if")`), sorted by topic."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def _public_docstrings(module_name: str) -> Iterator[str]:
    module = importlib.import_module(module_name)
    if module.__doc__:
        yield inspect.cleandoc(module.__doc__)
    for name in sorted(vars(module)):
        obj = getattr(module, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue  # private, or re-exported from elsewhere
        doc = inspect.getdoc(obj)
        if doc and len(doc) > 40:
            yield f"{module_name}.{name}: {doc}"


def stdlib_docstring_documents() -> list[str]:
    """Docstrings of public names in `STDLIB_DOC_MODULES`, one document per docstring."""
    return [doc for module_name in STDLIB_DOC_MODULES for doc in _public_docstrings(module_name)]


def build_corpus(
    wordnet_dir: Path = DEFAULT_WORDNET_DIR,
    *,
    heldout_fraction: float = 0.02,
    seed: int = 0,
    max_chars: int | None = None,
    python_docs: bool = True,
    stdlib_docstrings: bool = False,
) -> Corpus:
    """Read every source, optionally keep a seeded random subset of about `max_chars`, and split it.

    Each document lands in the held-out part with probability `heldout_fraction`, drawn from a
    generator seeded with `seed`; both parts keep the sources' order.
    """
    documents = wordnet_documents(wordnet_dir)
    if python_docs:
        documents += python_topic_documents()
    if stdlib_docstrings:
        documents += stdlib_docstring_documents()
    rng = random.Random(seed)
    if max_chars is not None:
        documents = _seeded_subset(documents, max_chars, rng)
    draws = [rng.random() for _ in documents]
    train = [doc for doc, draw in zip(documents, draws, strict=True) if draw >= heldout_fraction]
    heldout = [doc for doc, draw in zip(documents, draws, strict=True) if draw < heldout_fraction]
    return Corpus(train=train, heldout=heldout)


def _seeded_subset(documents: list[str], max_chars: int, rng: random.Random) -> list[str]:
    """A random subset of documents totalling at most `max_chars`, kept in source order."""
    order = list(range(len(documents)))
    rng.shuffle(order)
    chosen, total = [], 0
    for index in order:
        if total + len(documents[index]) <= max_chars:  # skip documents too long for what is left
            chosen.append(index)
            total += len(documents[index])
    return [documents[index] for index in sorted(chosen)]


def pretraining_blocks(tokenizer: PreTrainedTokenizerBase, max_chars: int | None) -> torch.Tensor:
    """The built-in model's pretraining corpus (WordNet glosses, Python's help topics and
    docstrings, as `splitprefix pretrain` builds it), a seeded subset of about `max_chars`, packed
    into 128-token blocks: the vendor's general text, never a data party's."""
    from splitprefix.data.blocks import pack_blocks
    from splitprefix.pretraining.recipe import PretrainConfig  # it imports this module

    recipe = PretrainConfig(out=Path("unused"))
    try:
        documents = build_corpus(
            recipe.wordnet_dir,
            seed=recipe.seed,
            max_chars=max_chars,
            python_docs=recipe.python_docs,
            stdlib_docstrings=recipe.stdlib_docstrings,
        ).train
    except WordNetMissingError:
        # Python's own documentation ships with every interpreter; WordNet is a system package
        logger.warning(
            "WordNet is not installed (%s): distilling on the Python documentation part of the built-in "
            "model's pretraining corpus only; install Debian's wordnet-base for the whole corpus",
            recipe.wordnet_dir,
        )
        documents = python_topic_documents()
        if recipe.stdlib_docstrings:
            documents += stdlib_docstring_documents()
        if max_chars is not None:
            documents = _seeded_subset(documents, max_chars, random.Random(recipe.seed))
    return pack_blocks(tokenizer, documents, recipe.block_size)  # type: ignore[arg-type]
