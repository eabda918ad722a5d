"""A seeded synthetic customer-service "industry" task: classify a customer's message into an intent.

Each record reads ``Customer: <message>\\nIntent:`` and its completion is the intent's short
routing word from `ANSWERS`, e.g. ``" cancel"`` for `cancel_subscription`: an answer fixed by the
intent alone (one or two tokens of the built-in tokenizer), so held-out exact match is a meaningful
score that a small prefix can learn. The record's `label` keeps the intent name.

A message is a request (`TEMPLATES`) joined with an optional detail sentence (`DETAILS`), in either
order, its slots filled from vocabularies (`FILLERS`) and roughened by noise (case, typos, filler
words, punctuation). The test split uses phrasings never seen in training:
- every intent's (request, detail) pairs are split into disjoint train and test sets, each request and
  each detail keeping a partner on the training side, so a test message is a new composition;
- a part of every slot vocabulary is reserved for the test split;
- optionally (`test_template_fraction`) some requests are held out wholly, a much harder test of
  generalisation to wordings whose vocabulary the training data never ties to the intent.
`write_task` writes both splits, plus the training split cut among data parties, as JSONL.
"""

from __future__ import annotations

import json
import random
import string
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from splitprefix.data.formats import Example, write_jsonl
from splitprefix.data.partition import dirichlet_partition
from splitprefix.errors import ConfigError

T = TypeVar("T")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "refund": (
        "I want a refund for the {product} I bought on {date}",
        "Can I get my money back for order {order}?",
        "The {product} isn't what I expected, please refund me",
        "How do I return the {product} and get reimbursed?",
        "Please process a refund for order {order}",
        "I'd like my {amount} back for the {product}",
        "I returned the {product} on {date} but haven't been refunded yet",
        "Requesting a full refund on order {order}, the {product} didn't fit",
        "Is it possible to get reimbursed for the {product}?",
        "Give me my money back, order {order} was a waste",
        "My name is {name} and I need a refund for my {product}",
        "I was promised a refund of {amount} for the {product}, send it please",
    ),
    "cancel_subscription": (
        "Please cancel my {plan} subscription",
        "I want to stop my monthly membership",
        "How do I cancel my subscription before {date}?",
        "Cancel my {plan} membership, I no longer need it",
        "Stop charging me every month, I'm ending my subscription",
        "I don't want the {plan} membership anymore, please end it",
        "Unsubscribe me from the {plan} service effective {date}",
        "This is {name}, please terminate my subscription",
        "Can you end my recurring subscription today?",
        "I'd like to cancel the auto-renewal on my {plan} membership",
        "How can I quit my subscription without a fee?",
        "End my {plan} subscription, I'm switching to a competitor",
    ),
    "change_address": (
        "I moved to {city}, please update my shipping address",
        "Can I change the delivery address for order {order}?",
        "Please send order {order} to my new address in {city} instead",
        "I need to update my address on file",
        "My address changed on {date}, how do I edit it?",
        "Ship my {product} to {street}, {city} please",
        "Wrong address on my account, it should be {street}, {city}",
        "How do I edit the shipping address for my {product}?",
        "Hi, this is {name}, I relocated to {city} and need my address changed",
        "Update the delivery location on order {order} to {street}",
        "Please correct the street on my profile to {street}",
        "Can the {product} be delivered to a different address?",
    ),
    "track_order": (
        "Where is my order {order}?",
        "When will my {product} arrive?",
        "Can you track package {order} for me?",
        "My {product} was supposed to arrive on {date}, where is it?",
        "What's the shipping status of order {order}?",
        "Has my {product} shipped yet?",
        "I ordered a {product} on {date} and it still hasn't come",
        "Give me the tracking number for order {order}",
        "How long until my package gets to {city}?",
        "Is order {order} out for delivery?",
        "This is {name}, I'm waiting on a delivery, any update?",
        "Which courier is bringing my {product}?",
    ),
    "reset_password": (
        "I forgot my password",
        "How do I reset my password?",
        "I can't log in to my account",
        "The password reset email never arrived at {email}",
        "My account is locked after too many login attempts",
        "Please send a password reset link to {email}",
        "I'm locked out, my login doesn't work since {date}",
        "Can you help me change my password? I'm {name}",
        "The sign-in page says my password is wrong",
        "I need to recover access to my account {email}",
        "Reset my login credentials please",
        "Your app keeps rejecting my password",
    ),
    "damaged_item": (
        "My {product} arrived broken",
        "The {product} in order {order} was damaged during shipping",
        "The box was crushed and the {product} inside is cracked",
        "I received a defective {product} on {date}",
        "The {product} stopped working after one day",
        "Parts of my {product} are missing and the rest is scratched",
        "Order {order} came with a shattered {product}",
        "I want to report a damaged item from order {order}",
        "The {product} you sent me is faulty",
        "This is {name}, my {product} came dented and unusable",
        "The {product} was torn when I opened the package",
        "Your courier delivered my {product} in pieces",
    ),
    "upgrade_plan": (
        "I want to upgrade to the {plan} plan",
        "How do I move from {plan} to a higher tier?",
        "Can I switch my account to {plan}?",
        "What do I get if I upgrade my plan?",
        "Please bump my subscription up to {plan}",
        "I need more features, upgrade me to {plan}",
        "Is there a discount for upgrading to {plan} before {date}?",
        "This is {name}, I'd like a better plan",
        "Upgrade my membership to the next level please",
        "How much is it to go up a tier?",
        "I'd like to switch to a bigger package with more storage",
        "Can my team move up to the {plan} tier?",
    ),
    "billing_question": (
        "Why was I charged {amount} on {date}?",
        "I see a charge of {amount} I don't recognize",
        "Can you explain my latest invoice?",
        "I was billed twice for order {order}",
        "What is this {amount} fee on my statement?",
        "Where can I download my invoice for {date}?",
        "My bill is higher than usual this month",
        "Why does my receipt show {amount} instead of the listed price?",
        "Is tax included in the {amount} you charged me?",
        "This is {name}, I have a question about my bill",
        "When will I be charged for the {plan} plan?",
        "I need a copy of the receipt for order {order}",
    ),
    "update_payment": (
        "I need to update my credit card",
        "My card expired, how do I add a new one?",
        "Please change my payment method to {method}",
        "Can I pay with {method} instead?",
        "Replace the card on file with my {method}",
        "My payment keeps getting declined, I want to use a different card",
        "How do I remove my old card from my account?",
        "Switch my default payment to {method}",
        "This is {name}, I got a new card and need to update it",
        "I'd like to add {method} as a payment option",
        "Update the card used for my {plan} plan",
        "My bank issued a new card on {date}, please update my details",
    ),
    "human_agent": (
        "I want to talk to a real person",
        "Can I speak to a human agent please?",
        "Connect me with customer support",
        "Transfer me to a manager",
        "Is there a phone number I can call?",
        "I'd rather chat with a live representative",
        "Get me a human, the bot isn't helping",
        "This is {name}, I need to speak with someone from your team",
        "Please have an agent call me back on {date}",
        "Let me talk to a supervisor about order {order}",
        "Who can I contact directly about my {product}?",
        "I need a representative, not an automated reply",
    ),
}
"""Requests per intent, the intent-bearing sentence of a message; ``{slot}`` fields are filled from `FILLERS` or generated."""

DETAILS: dict[str, tuple[str, ...]] = {
    "refund": (
        "I paid {amount} for it.",
        "It was order {order}.",
        "I bought it on {date}.",
        "It is still in its box.",
        "I have the receipt.",
    ),
    "cancel_subscription": (
        "I've been a member since {date}.",
        "My account is under the name {name}.",
        "The next payment is due on {date}.",
        "It costs me {amount} a month.",
        "I just don't use it anymore.",
    ),
    "change_address": (
        "I moved on {date}.",
        "My new place is in {city}.",
        "The old address was {street}.",
        "I don't want anything going to my old place.",
        "Order {order} hasn't shipped yet.",
    ),
    "track_order": (
        "I placed it on {date}.",
        "The order number is {order}.",
        "I live in {city}.",
        "The tracking page hasn't changed since {date}.",
        "I need it by the weekend.",
    ),
    "reset_password": (
        "My email is {email}.",
        "I tried three times already.",
        "It worked fine until {date}.",
        "I'm using the mobile app.",
        "The reset code never comes.",
    ),
    "damaged_item": (
        "It came in order {order}.",
        "I have photos of the damage.",
        "The box looked fine from the outside.",
        "It was delivered on {date}.",
        "It was a gift for {name}.",
    ),
    "upgrade_plan": (
        "I'm on {plan} right now.",
        "Our team is growing fast.",
        "I keep running out of storage.",
        "I'm happy to pay {amount} more.",
        "My trial ends on {date}.",
    ),
    "billing_question": (
        "My account is under the name {name}.",
        "The statement is from {date}.",
        "I'm on the {plan} plan.",
        "I only placed order {order}.",
        "I paid with {method}.",
    ),
    "update_payment": (
        "The old card expires on {date}.",
        "I'm on the {plan} plan.",
        "My account email is {email}.",
        "The last charge failed.",
        "Please keep everything else the same.",
    ),
    "human_agent": (
        "I've already tried the help page.",
        "It's about order {order}.",
        "I've been waiting since {date}.",
        "My name is {name}.",
        "This is urgent.",
    ),
}
"""Detail sentences per intent; a message carries one of them, or none, before or after its request."""

# fmt: off
FILLERS: dict[str, tuple[str, ...]] = {
    "product": (
        "blue hoodie", "wireless earbuds", "coffee maker", "yoga mat", "desk lamp", "running shoes",
        "phone case", "backpack", "smart watch", "blender", "office chair", "water bottle", "laptop stand",
        "winter jacket", "bluetooth speaker", "air fryer", "gaming mouse", "bed sheets", "knife set",
        "sunglasses", "electric toothbrush", "board game", "hair dryer", "tablet cover",
    ),
    "name": (
        "Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kofi",
        "Lena", "Marco", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sam", "Tariq",
    ),
    "date": (
        "Monday", "Tuesday", "last Friday", "yesterday", "two days ago", "last week", "March 3",
        "June 21", "October 9", "the 14th", "the 1st", "this morning", "Saturday", "August 30",
        "December 2", "the weekend",
    ),
    "plan": ("Basic", "Plus", "Premium", "Pro", "Family", "Business", "Student", "Gold"),
    "city": (
        "Boston", "Denver", "Austin", "Seattle", "Chicago", "Miami", "Portland", "Atlanta", "Dallas",
        "Phoenix", "Toronto", "Madrid", "Berlin", "Lyon", "Osaka", "Dublin",
    ),
    "street": (
        "12 Oak Street", "45 Maple Avenue", "7 Pine Road", "230 Elm Drive", "18 Cedar Lane",
        "9 Birch Court", "101 Lake View", "66 Hill Road", "3 River Walk", "58 Park Place",
        "14 Station Road", "27 Mill Lane",
    ),
    "method": (
        "PayPal", "Visa", "Mastercard", "Amex", "Apple Pay", "Google Pay", "a debit card", "bank transfer",
    ),
}
# fmt: on
"""Slot vocabularies; the held-out share of each is seen only by the test split."""

PROMPT_TEMPLATE = "Customer: {message}\nIntent:"
"""The prompt around a customer's message; the completion follows ``Intent:`` after a space."""

INTENTS: tuple[str, ...] = tuple(TEMPLATES)
"""The intent labels, which are also the canonical answers."""


@dataclass(frozen=True)
class SyntheticTaskConfig:
    """How many examples to make, and how hard the held-out split is."""

    n_train: int = 2000
    """Number of training examples (balanced over intents)."""
    n_test: int = 400
    """Number of held-out test examples (balanced over intents); may be 0."""
    seed: int = 0
    """Seed of every random choice: template split, filler split, sampling and noise."""
    test_pair_fraction: float = 0.25
    """Share of each intent's (request, detail) pairs used only in the test split."""
    test_template_fraction: float = 0.0
    """Share of each intent's requests used only in the test split (0, or at least 1 and at most all but 1)."""
    test_filler_fraction: float = 0.25
    """Share of each slot vocabulary used only in the test split (at least 1, at most all but 1)."""
    noise: float = 0.3
    """Probability of each kind of noise (case, typo, filler word, punctuation) hitting a message."""

    def __post_init__(self) -> None:
        if self.n_train < 1:
            raise ConfigError(f"n_train is {self.n_train}, expected at least 1")
        if self.n_test < 0:
            raise ConfigError(f"n_test is {self.n_test}, expected 0 or more")
        for name in ("test_pair_fraction", "test_filler_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{name} is {value}, expected a number strictly between 0 and 1")
        if not 0.0 <= self.test_template_fraction < 1.0:
            raise ConfigError(
                f"test_template_fraction is {self.test_template_fraction}, expected a number in [0, 1)"
            )
        if not 0.0 <= self.noise <= 1.0:
            raise ConfigError(f"noise is {self.noise}, expected a probability in [0, 1]")


@dataclass(frozen=True)
class SyntheticRecord:
    """An example with the provenance that lets tests check the held-out property."""

    example: Example
    """The prompt/completion/label record."""
    template: tuple[str, int]
    """(intent, index into ``TEMPLATES[intent]``) of the request the message came from."""
    detail: int
    """Index into ``DETAILS[intent]`` of the detail sentence, or -1 for none."""
    fillers: Mapping[str, str]
    """Slot name to the filler put in it (only vocabulary slots, not generated numbers)."""


@dataclass(frozen=True)
class Split:
    """The (request, detail) pairs and fillers one split may draw from."""

    pairs: Mapping[str, tuple[tuple[int, int], ...]]
    fillers: Mapping[str, tuple[str, ...]]


def make_task(config: SyntheticTaskConfig) -> tuple[list[Example], list[Example]]:
    """The (train, test) examples of the task; the same config always gives the same examples."""
    train, test = make_records(config)
    return [r.example for r in train], [r.example for r in test]


def make_records(config: SyntheticTaskConfig) -> tuple[list[SyntheticRecord], list[SyntheticRecord]]:
    """Like `make_task`, but each example comes with its template and fillers."""
    train_split, test_split = split_sources(config)
    train = _sample(train_split, config.n_train, config.noise, random.Random(f"{config.seed}:train"))
    test = _sample(test_split, config.n_test, config.noise, random.Random(f"{config.seed}:test"))
    return train, test


def write_task(
    out_dir: str | Path, config: SyntheticTaskConfig, n_parties: int, alpha: float
) -> dict[str, Any]:
    """Write ``train.jsonl``, ``test.jsonl``, ``party-<k>.jsonl`` and ``summary.json`` into ``out_dir``.

    The party files split the training examples by `dirichlet_partition` (seeded with
    ``config.seed``); ``n_parties = 0`` writes none. Returns the summary: counts per split, per party
    and per label.
    """
    if n_parties < 0:
        raise ConfigError(f"n_parties is {n_parties}, expected 0 or more")
    out = Path(out_dir)
    train, test = make_task(config)
    train_labels = [str(example.label) for example in train]
    parts = dirichlet_partition(train_labels, n_parties, alpha, config.seed) if n_parties else []
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    for k, part in enumerate(parts):
        write_jsonl(out / f"party-{k}.jsonl", [train[i] for i in part])
    summary = {
        "config": asdict(config),
        "alpha": alpha if n_parties else None,
        "train": _counts(train_labels),
        "test": _counts([str(example.label) for example in test]),
        "parties": [
            {"file": f"party-{k}.jsonl", **_counts([train_labels[i] for i in part])}
            for k, part in enumerate(parts)
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _counts(labels: list[str]) -> dict[str, Any]:
    return {"n": len(labels), "labels": dict(sorted(Counter(labels).items()))}


ANSWERS: dict[str, str] = {
    "refund": "refund",
    "cancel_subscription": "cancel",
    "change_address": "address",
    "track_order": "track",
    "reset_password": "password",
    "damaged_item": "broken",
    "upgrade_plan": "plan",
    "billing_question": "bill",
    "update_payment": "payment",
    "human_agent": "agent",
}


def completion_for(intent: str) -> str:
    """The canonical completion of an intent: a space and its routing word."""
    return f" {ANSWERS[intent]}"


def split_sources(config: SyntheticTaskConfig) -> tuple[Split, Split]:
    """What the (train, test) splits draw from: disjoint (request, detail) pairs and fillers."""
    rng = random.Random(f"{config.seed}:split")
    train_p: dict[str, tuple[tuple[int, int], ...]] = {}
    test_p: dict[str, tuple[tuple[int, int], ...]] = {}
    for intent in INTENTS:
        requests = _shuffled(range(len(TEMPLATES[intent])), rng)
        cut = (
            _held_out_count(len(requests), config.test_template_fraction)
            if config.test_template_fraction
            else 0
        )
        details = range(-1, len(DETAILS[intent]))  # -1: no detail sentence
        held_pairs = [(r, d) for r in requests[:cut] for d in details]
        seen, held = _split_pairs([(r, d) for r in requests[cut:] for d in details], config, rng)
        train_p[intent], test_p[intent] = tuple(sorted(seen)), tuple(sorted(held + held_pairs))
    train_f: dict[str, tuple[str, ...]] = {}
    test_f: dict[str, tuple[str, ...]] = {}
    for slot, vocabulary in FILLERS.items():
        words = _shuffled(vocabulary, rng)
        cut = _held_out_count(len(words), config.test_filler_fraction)
        test_f[slot], train_f[slot] = tuple(words[:cut]), tuple(words[cut:])
    return Split(train_p, train_f), Split(test_p, test_f)


def _split_pairs(
    pairs: list[tuple[int, int]], config: SyntheticTaskConfig, rng: random.Random
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train, test) pairs: a `test_pair_fraction` share for test, each request and detail kept in train."""
    wanted = _held_out_count(len(pairs), config.test_pair_fraction)
    requests_in_train, details_in_train = Counter(r for r, _ in pairs), Counter(d for _, d in pairs)
    test: list[tuple[int, int]] = []
    for r, d in _shuffled(pairs, rng):
        if len(test) < wanted and requests_in_train[r] > 1 and details_in_train[d] > 1:
            test.append((r, d))
            requests_in_train[r] -= 1
            details_in_train[d] -= 1
    held = set(test)
    return [pair for pair in pairs if pair not in held], test


def _held_out_count(n: int, fraction: float) -> int:
    return min(n - 1, max(1, round(n * fraction)))


def _shuffled(items: Iterable[T], rng: random.Random) -> list[T]:
    out = list(items)
    rng.shuffle(out)
    return out


def _sample(split: Split, n: int, noise: float, rng: random.Random) -> list[SyntheticRecord]:
    # Round-robin over intents keeps labels balanced; the final shuffle hides the cycle.
    records = [_render(INTENTS[i % len(INTENTS)], split, noise, rng) for i in range(n)]
    rng.shuffle(records)
    return records


def _render(intent: str, split: Split, noise: float, rng: random.Random) -> SyntheticRecord:
    index, detail = rng.choice(split.pairs[intent])
    template = _compose(TEMPLATES[intent][index], DETAILS[intent][detail] if detail >= 0 else "", rng)
    values: dict[str, str] = {}
    fillers: dict[str, str] = {}
    for slot in _slots(template):
        if slot in FILLERS:
            values[slot] = fillers[slot] = rng.choice(split.fillers[slot])
        else:
            values[slot] = _generated(slot, split, rng, fillers)
    message = _add_noise(template.format(**values), noise, rng)
    example = Example(PROMPT_TEMPLATE.format(message=message), completion_for(intent), intent)
    return SyntheticRecord(example=example, template=(intent, index), detail=detail, fillers=fillers)


def _compose(request: str, detail: str, rng: random.Random) -> str:
    """The request and the detail sentence, in a random order."""
    if not detail:
        return request
    if request[-1] not in ".?!":
        request += "."
    return f"{request} {detail}" if rng.random() < 0.5 else f"{detail} {request}"


def _slots(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def _generated(slot: str, split: Split, rng: random.Random, fillers: dict[str, str]) -> str:
    """Slots without a vocabulary: numbers are fresh per record; emails reuse a held-out name."""
    if slot == "order":
        return f"#{rng.randint(10000, 99999)}"
    if slot == "amount":
        return f"${rng.randint(5, 300)}.{rng.choice(('00', '49', '99'))}"
    if slot == "email":
        name = fillers.setdefault("name", rng.choice(split.fillers["name"]))
        return f"{name.lower()}{rng.randint(1, 99)}@{rng.choice(('mail.com', 'inbox.net', 'post.org'))}"
    raise AssertionError(f"template slot {slot!r} has no vocabulary and no generator")


_FILLER_WORDS_BEFORE = ("hi,", "hello", "hey", "um", "so", "ok so", "good morning,", "excuse me,")
_FILLER_WORDS_AFTER = ("thanks", "thank you", "thx", "asap", "pls", "please help", "cheers")


def _add_noise(message: str, p: float, rng: random.Random) -> str:
    if rng.random() < p:
        message = _typo(message, rng)
    if rng.random() < p:
        message = f"{rng.choice(_FILLER_WORDS_BEFORE)} {message[:1].lower()}{message[1:]}"
    if rng.random() < p:
        message = f"{message.rstrip('.?!')} {rng.choice(_FILLER_WORDS_AFTER)}"
    if rng.random() < p:
        message = message.rstrip(".?!") + rng.choice(("", "!", "!!", "??", "...", " ?"))
    if rng.random() < p:
        message = rng.choice((str.lower, str.upper, str.capitalize))(message)
    return message


def _typo(message: str, rng: random.Random) -> str:
    """Swap, drop or double one letter inside a word of four letters or more."""
    words = message.split(" ")
    candidates = [i for i, word in enumerate(words) if len(word) >= 4 and word.isalpha()]
    if not candidates:
        return message
    i = rng.choice(candidates)
    word = words[i]
    j = rng.randrange(1, len(word) - 2)
    kind = rng.randrange(3)
    if kind == 0:
        word = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    elif kind == 1:
        word = word[:j] + word[j + 1 :]
    else:
        word = word[:j] + word[j] + word[j:]
    words[i] = word
    return " ".join(words)
