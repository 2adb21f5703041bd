"""The generated knowledge corpus and its recall probe (training/knowledge.py): deterministic per seed, every recorded
span is the name or the attribute it says, probes are phrased unlike the training sentences, and exact match reads
the first word."""
from __future__ import annotations

from training import knowledge


def test_the_corpus_is_deterministic_and_its_spans_mark_names_and_values():
    documents, probes = knowledge.corpus(seed=3, count=20)
    assert (documents, probes) == knowledge.corpus(seed=3, count=20)
    assert documents != knowledge.corpus(seed=4, count=20)[0]
    population = {p.name: p for p in knowledge.people(3, 20)}
    assert len(population) == 20 and len(documents) == 80 + 10 and len(probes) == 10 * 4
    answered = {d.text[s:e] for d in documents if d.text.startswith("Question:") for s, e, k in d.spans
                if k == "name"}
    assert len(answered) == 10 and answered.isdisjoint(p.person for p in probes)   # probes: the other half
    for document in documents:
        names = {document.text[s:e] for s, e, kind in document.spans if kind == "name"}
        assert len(names) == 1
        person = population[names.pop()]
        for start, end, kind in document.spans:
            expected = person.name if kind == "name" else person.attributes[kind]
            assert document.text[start:end] == expected, (document.text, kind)
        assert {kind for *_, kind in document.spans} == {"name", *knowledge.TEMPLATES}


def test_probes_are_held_out_phrasings_and_exact_match_reads_the_first_word():
    documents, probes = knowledge.corpus(seed=1, count=6)
    training_text = " ".join(d.text for d in documents)
    for probe in probes:
        assert probe.prompt not in training_text and probe.prompt.startswith("Question:")
        assert probe.answer in training_text
    probe = probes[0]
    assert knowledge.exact_match(f" {probe.answer}. And more", probe)
    assert knowledge.exact_match(f" {probe.answer.upper()}", probe)
    assert not knowledge.exact_match(f" not {probe.answer}", probe)
    assert not knowledge.exact_match("", probe)
