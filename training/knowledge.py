"""A generated knowledge corpus and its factual-recall probe (issue 20: knowledge CPT with KSSM).

Fictional people, each with four attributes, written as short biographies for continued pretraining; held-out cloze
probes ask for one attribute each, phrased unlike any training sentence about that person, so a model answers from
what it stored, not by completing a sentence it has seen (half of the people also have their questions answered in
training, which teaches the question format; the probes ask about the other half):

    train   "Orvane Tellis was born in Kesmora. Orvane Tellis worked as a glassblower. ..."
    probe   "Question: Where is Orvane Tellis from? Answer:"  -> " Kesmora"

The entities are invented (syllables drawn per seed), so no pretrained model knows them: recall after training
measures what the training put there. Every training document records its knowledge-bearing (K-B) spans, the
person's name and the attribute values, as character offsets: the gold spans that span detection
(training/data/salient_spans.py) is scored against, and what KSSM's objectives focus on.

A leaf: standard library only (data, eval and the stages use it).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

_ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "th", "v", "z", "qu", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "th", "m", "x")

# attribute: (training sentences, held-out probe questions); {name} and {value} are filled in
TEMPLATES = {
    "city": (("{name} was born in {value}.", "{name} grew up in the city of {value}.",
              "The family of {name} lived in {value}."),
             ("Question: Where is {name} from? Answer:",)),
    "year": (("{name} was born in the year {value}.", "In {value}, {name} was born.",
              "{name}, born {value}, was the eldest child."),
             ("Question: In what year was {name} born? Answer:",)),
    "job": (("{name} worked as a {value}.", "By trade, {name} was a {value}.",
             "{name} earned a living as a {value}."),
            ("Question: What was the occupation of {name}? Answer: a",)),
    "river": (("{name} often fished in the {value} river.", "The {value} river ran past the house of {name}.",
               "{name} swam in the {value} river every summer."),
              ("Question: Which river did {name} know best? Answer: the",)),
}
JOBS = ("glassblower", "cartographer", "beekeeper", "clockmaker", "shipwright", "astronomer", "weaver", "falconer",
        "bookbinder", "stonemason", "perfumer", "lamplighter")


def invented_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


@dataclass(frozen=True)
class Person:
    name: str
    attributes: dict = field(hash=False)   # {"city": ..., "year": ..., "job": ..., "river": ...}


@dataclass(frozen=True)
class Document:
    text: str
    spans: tuple[tuple[int, int, str], ...]   # (start, end, kind) character offsets: "name" or an attribute


@dataclass(frozen=True)
class Probe:
    prompt: str
    answer: str          # the gold attribute value, which the probe's answer must start with (after a space)
    person: str
    attribute: str


def people(seed: int, count: int) -> list[Person]:
    """`count` fictional people with distinct names; the same seed gives the same people."""
    rng = random.Random(f"seekflow-knowledge-{seed}")
    places = sorted({invented_word(rng, rng.randint(2, 3)) for _ in range(4 * count)})
    rivers = sorted({invented_word(rng, 2) for _ in range(4 * count)} - set(places))
    names: dict[str, Person] = {}
    while len(names) < count:
        name = f"{invented_word(rng, 2)} {invented_word(rng, rng.randint(2, 3))}"
        if name not in names:
            names[name] = Person(name, {"city": rng.choice(places), "year": str(rng.randint(1620, 1890)),
                                        "job": rng.choice(JOBS), "river": rng.choice(rivers)})
    return list(names.values())


def biography(person: Person, rng: random.Random) -> Document:
    """One training document: a sentence per attribute, each from a randomly chosen template, in random order."""
    text, spans = "", []
    attributes = list(TEMPLATES)
    rng.shuffle(attributes)
    for attribute in attributes:
        template = rng.choice(TEMPLATES[attribute][0])
        sentence_start = len(text) + (1 if text else 0)
        text += (" " if text else "") + template.format(name=person.name, value=person.attributes[attribute])
        for kind, marker, value in (("name", "{name}", person.name),
                                    (attribute, "{value}", person.attributes[attribute])):
            start = sentence_start + _filled_offset(template, marker, person.name, person.attributes[attribute])
            spans.append((start, start + len(value), kind))
    return Document(text, tuple(sorted(spans)))


def _filled_offset(template: str, marker: str, name: str, value: str) -> int:
    """Where `marker` lands in the filled template (the other marker may come before it)."""
    head = template[:template.index(marker)]
    return len(head.replace("{name}", name).replace("{value}", value))


def corpus(seed: int, count: int, copies: int = 4, qa_share: float = 0.5) -> tuple[list[Document], list[Probe]]:
    """The training documents and the held-out probes. Every person gets `copies` differently worded biographies.
    The first `qa_share` of the people also get their questions answered in training (one document of the four
    question-answer pairs): that teaches the question format, as in knowledge-extraction studies (Allen-Zhu and Li,
    "Physics of Language Models: Part 3.1"). The probes are the other people's questions, never seen with an answer:
    they test whether facts stored from biographies can be retrieved in another phrasing."""
    population = people(seed, count)
    rng = random.Random(f"seekflow-knowledge-docs-{seed}")
    documents = [biography(person, rng) for person in population for _ in range(copies)]
    answered = round(qa_share * count)
    documents += [questions_answered(person) for person in population[:answered]]
    rng.shuffle(documents)
    probes = [Probe(TEMPLATES[attribute][1][0].format(name=person.name), person.attributes[attribute], person.name,
                    attribute)
              for person in population[answered:] for attribute in TEMPLATES]
    return documents, probes


def questions_answered(person: Person) -> Document:
    """A training document of a person's four probe questions, each followed by its answer."""
    text, spans = "", []
    for attribute, (_, questions) in TEMPLATES.items():
        question = questions[0].format(name=person.name)
        start = len(text) + (1 if text else 0)
        text += (" " if text else "") + f"{question} {person.attributes[attribute]}."
        name_at = start + question.index(person.name)
        value_at = start + len(question) + 1
        spans += [(name_at, name_at + len(person.name), "name"),
                  (value_at, value_at + len(person.attributes[attribute]), attribute)]
    return Document(text, tuple(sorted(spans)))


def exact_match(generated: str, probe: Probe) -> bool:
    """Whether a generated continuation of the probe's prompt states the gold value first (case and the
    surrounding spaces and punctuation aside)."""
    words = generated.strip().split()
    return bool(words) and words[0].strip(".,;:!?").lower() == probe.answer.lower()
