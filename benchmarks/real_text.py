"""Real text nobody on the project wrote, as prompt/completion sets with a held-out split.

Two corpora that ship with a Debian machine and that the built-in model never saw (it was trained on
WordNet glosses and Python docstrings):

- ``man``: manual pages of sections 1 and 8 (less one generated family). The prompt names the page and its one-line summary; the
  completion is the first paragraph of its DESCRIPTION. The group is the page's first letter.
- ``info``: the GNU info manuals. The prompt names the manual and the node; the completion is one
  paragraph of prose from that node. The group is the manual.

Documents (a page, a node) are split between train and held-out by a seeded hash, so no document
lends paragraphs to both sides. Rendering manual pages takes a few minutes, so the records are cached
under ``--cache`` (JSONL, in the project's record format, with the group as ``label``).

    python benchmarks/real_text.py --corpus man --out /tmp/man   # writes train.jsonl and test.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

from splitprefix.data.formats import Example, load_jsonl, write_jsonl

MAN_DIR = Path("/usr/share/man")
INFO_DIR = Path("/usr/share/info")
CORPORA = ("man", "info")
MAX_WORDS = 60
"""A completion is cut at the last sentence end within this many words (or at the limit)."""
MIN_WORDS = 12
"""Shorter paragraphs (option lists, headings) are skipped."""
SKIPPED_PAGES = ("gcloud",)
"""Page families left out: the cloud CLI's 16,000 generated pages would drown the rest."""
_LICENCE = re.compile(r"licen[cs]e|gpl|fdl|copying", re.IGNORECASE)


def corpus(
    name: str, cache: Path, seed: int = 0, heldout: float = 0.2
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples of corpus `name`, in source order; cached records are reused."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    path = cache / f"{name}.jsonl"
    if not path.exists():
        records = list(_man_records() if name == "man" else _info_records())
        if not records:
            raise FileNotFoundError(f"no {name} documents found; install the manual pages or info manuals")
        write_jsonl(path, records)
    train: list[Example] = []
    test: list[Example] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        example = Example(record["prompt"], record["completion"], record["label"])
        (test if _held_out(record["document"], seed, heldout) else train).append(example)
    return train, test


def _held_out(document: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{document}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _man_records() -> Iterator[dict[str, str]]:
    for page in sorted(MAN_DIR.glob("man[18]/*.gz")):
        if page.name.startswith(SKIPPED_PAGES):
            continue
        section = page.parent.name.removeprefix("man")
        text = _render_man(page)
        summary, description = _man_parts(text)
        paragraph = _first_prose(description)
        if summary and paragraph:
            name = page.name.split(".")[0]
            yield {
                "prompt": f"Manual page {name}({section}): {summary}\nDescription:",
                "completion": " " + paragraph,
                "label": name[:1].lower() if name[:1].isalpha() else "#",
                "document": f"man{section}/{page.name}",
            }


def _render_man(page: Path) -> str:
    env = os.environ | {"MANWIDTH": "10000", "LC_ALL": "C.UTF-8"}
    done = subprocess.run(
        ["man", "-l", "-P", "cat", str(page)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    return done.stdout


def _man_parts(text: str) -> tuple[str, list[str]]:
    """The NAME line's summary and the DESCRIPTION section's paragraphs of a rendered page."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line and not line[0].isspace():
            current = line.strip()
            continue
        sections.setdefault(current, []).append(line.strip())
    name = " ".join(x for x in sections.get("NAME", []) if x)
    summary = name.split(" - ", 1)[1].strip() if " - " in name else ""
    return summary, _paragraphs(sections.get("DESCRIPTION", []))


def _info_records() -> Iterator[dict[str, str]]:
    for path in sorted(INFO_DIR.glob("*.info*.gz")):
        manual = path.name.split(".info")[0]
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        for node in text.split("\x1f")[1:]:
            header, _, body = node.lstrip("\n").partition("\n")
            match = re.search(r"Node: ([^,\n]+)", header)
            if not match or match.group(1) == "Top" or _LICENCE.search(match.group(1)):
                continue
            paragraphs = _paragraphs(body.splitlines())
            for index, paragraph in enumerate(paragraphs):
                prose = _first_prose([paragraph])
                if prose:
                    yield {
                        "prompt": f'From the {manual} manual, "{match.group(1)}":\n',
                        "completion": prose,
                        "label": manual,
                        "document": f"{manual}/{match.group(1)}",
                    }
                if index >= 3:
                    break


def _paragraphs(lines: list[str]) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            out.append(" ".join(current))
            current = []
    return out


def _first_prose(paragraphs: list[str]) -> str:
    """The first paragraph that reads as prose (starts with a capital, ends a sentence), cut to
    `MAX_WORDS` at a sentence end when one exists."""
    for paragraph in paragraphs:
        words = paragraph.split()
        if len(words) < MIN_WORDS or not paragraph[0].isupper() or paragraph.startswith(("*", "Copyright")):
            continue
        if set("=*-") >= set(paragraph.replace(" ", "")) or "::" in paragraph:
            continue
        cut = " ".join(words[:MAX_WORDS])
        end = max(cut.rfind(". "), cut.rfind(".\u2019"), cut.rfind(".") if cut.endswith(".") else -1)
        return cut[: end + 1] if end > 40 else cut
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", choices=CORPORA, required=True)
    parser.add_argument("--cache", type=Path, default=Path(".cache/real_text"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="Folder for train.jsonl and test.jsonl.")
    args = parser.parse_args()
    train, test = corpus(args.corpus, args.cache, args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    assert load_jsonl(args.out / "test.jsonl")
    print(json.dumps({"corpus": args.corpus, "train": len(train), "test": len(test)}))


if __name__ == "__main__":
    main()
