"""The built-in corpus must be a real, learnable, deterministic translation problem."""

from __future__ import annotations

import re
import time
from collections import defaultdict
from itertools import combinations

import pytest
import sacrebleu

from pipeline.data import builtin_corpus as bc
from pipeline.data.builtin_corpus import generate_corpus

N_PAIRS = 20_000
SEED = 13

Pair = tuple[str, str]

_SOURCE_PLURAL_NOUN = {pl: stem for _, pl, stem in bc.NOUNS}
_SOURCE_SINGULAR_NOUN = {sg: stem for sg, _, stem in bc.NOUNS}
_CONJUNCTIONS = set(bc.COORDINATORS) | set(bc.SUBORDINATORS)


@pytest.fixture(scope="module")
def corpus() -> list[Pair]:
    return generate_corpus(N_PAIRS, SEED)


def _single_clause(pairs: list[Pair]) -> list[tuple[list[str], list[str]]]:
    """Token lists of the pairs without a second clause or a relative clause."""
    result = []
    for source, target in pairs:
        tokens = source.split()
        if _CONJUNCTIONS.isdisjoint(tokens) and bc.RELATIVIZER[0] not in tokens:
            result.append((tokens, target.split()))
    return result


def test_same_seed_gives_identical_corpus() -> None:
    assert generate_corpus(2_000, 7) == generate_corpus(2_000, 7)


def test_different_seeds_give_different_corpora() -> None:
    first, second = generate_corpus(2_000, 7), generate_corpus(2_000, 8)
    assert first != second
    # Different seeds must not just shuffle the same sentences.
    assert len(set(first) & set(second)) < 200


def test_smaller_request_is_a_prefix_of_a_larger_one() -> None:
    assert generate_corpus(500, 3) == generate_corpus(5_000, 3)[:500]


@pytest.mark.parametrize("n_pairs", [0, 1, 2, 10, 137, 5_000])
def test_returns_exactly_n_pairs_unique_pairs(n_pairs: int) -> None:
    pairs = generate_corpus(n_pairs, 1)
    assert len(pairs) == n_pairs
    assert len({source for source, _ in pairs}) == n_pairs


def test_full_corpus_has_unique_sources(corpus: list[Pair]) -> None:
    assert len(corpus) == N_PAIRS
    assert len({source for source, _ in corpus}) == N_PAIRS


@pytest.mark.parametrize("n_pairs", [-1, bc.MAX_PAIRS + 1])
def test_out_of_range_n_pairs_is_rejected_with_a_clear_message(n_pairs: int) -> None:
    with pytest.raises(ValueError, match="n_pairs"):
        generate_corpus(n_pairs, 1)


def test_generates_20k_pairs_in_under_two_seconds() -> None:
    # CPU time, so that a busy CI machine does not make the test flaky.
    start = time.process_time()
    generate_corpus(N_PAIRS, 99)
    assert time.process_time() - start < 2.0


def test_sentences_are_ascii_single_spaced_and_end_with_a_period(corpus: list[Pair]) -> None:
    pattern = re.compile(r"[a-z0-9]+( [a-z0-9]+)* \.")
    for source, target in corpus:
        assert pattern.fullmatch(source), source
        assert pattern.fullmatch(target), target


def test_source_lengths_span_4_to_30_tokens(corpus: list[Pair]) -> None:
    lengths = [len(source.split()) for source, _ in corpus]
    assert min(lengths) <= 5
    assert max(lengths) >= 25
    assert all(3 <= n <= 32 for n in lengths)
    assert 10 <= sum(lengths) / len(lengths) <= 14
    # Spread over the range, not bunched at the ends.
    assert sum(n >= 20 for n in lengths) > 0.1 * len(lengths)
    assert sum(n <= 8 for n in lengths) > 0.1 * len(lengths)


def test_source_word_classes_are_disjoint_so_each_sentence_has_one_reading() -> None:
    classes = {
        "noun": {w for sg, pl, _ in bc.NOUNS for w in (sg, pl)},
        "adjective": {en for en, _ in bc.ADJECTIVES},
        "verb": set(bc.source_verb_forms()),
        "pronoun": {en for en, _, _ in bc.PRONOUNS},
        "determiner": set(bc.DETERMINERS),
        "preposition": set(bc.ADPOSITIONS),
        "adverb": set(bc.ADVERBS),
        "conjunction": _CONJUNCTIONS,
        "relativizer": {bc.RELATIVIZER[0]},
    }
    for (name_a, words_a), (name_b, words_b) in combinations(classes.items(), 2):
        assert not words_a & words_b, (name_a, name_b, words_a & words_b)


def test_target_verb_is_sentence_final_while_source_verb_is_not(corpus: list[Pair]) -> None:
    target_verbs, source_verbs = bc.target_verb_forms(), bc.source_verb_forms()
    target_final = sum(target.split()[-2] in target_verbs for _, target in corpus)
    source_final = sum(source.split()[-2] in source_verbs for source, _ in corpus)
    assert target_final >= 0.99 * len(corpus)
    assert source_final <= 0.3 * len(corpus)


def test_target_verb_follows_its_object(corpus: list[Pair]) -> None:
    target_verbs = bc.target_verb_forms()
    accusative_nouns = {
        bc.target_noun_form(stem, plural, accusative=True)
        for _, _, stem in bc.NOUNS
        for plural in (False, True)
    }
    checked = 0
    for source_tokens, target_tokens in _single_clause(corpus):
        objects = [i for i, token in enumerate(target_tokens) if token in accusative_nouns]
        if not objects:
            continue
        checked += 1
        verb = next(i for i, token in enumerate(target_tokens) if token in target_verbs)
        assert all(i < verb for i in objects), (source_tokens, target_tokens)
    assert checked > 1_000


def test_adjectives_follow_their_noun_in_the_target(corpus: list[Pair]) -> None:
    source_adjectives = {en for en, _ in bc.ADJECTIVES}
    target_adjectives = {
        bc.target_adjective_form(stem, plural) for _, stem in bc.ADJECTIVES for plural in (False, True)
    }
    source_nouns = set(_SOURCE_SINGULAR_NOUN) | set(_SOURCE_PLURAL_NOUN)
    target_nouns = {
        bc.target_noun_form(stem, plural, acc)
        for _, _, stem in bc.NOUNS
        for plural in (False, True)
        for acc in (False, True)
    }
    for source, target in corpus[:5_000]:
        s, t = source.split(), target.split()
        # Source: an adjective is followed by an adjective or a noun; target: preceded by one.
        assert all(
            s[i + 1] in source_adjectives | source_nouns for i, w in enumerate(s) if w in source_adjectives
        )
        assert all(
            t[i - 1] in target_adjectives | target_nouns for i, w in enumerate(t) if w in target_adjectives
        )


def test_noun_and_adjective_take_a_plural_suffix_when_the_source_noun_is_plural(corpus: list[Pair]) -> None:
    # "the [adj] noun intransitive-verb ." -> "noun [adj] ze verb ." isolates one noun phrase.
    adjectives = dict(bc.ADJECTIVES)
    checked = {False: 0, True: 0}
    for source_tokens, target_tokens in _single_clause(corpus):
        if source_tokens[0] != "the" or len(source_tokens) not in (4, 5):
            continue
        noun = source_tokens[-3]
        plural = noun in _SOURCE_PLURAL_NOUN
        stem = _SOURCE_PLURAL_NOUN[noun] if plural else _SOURCE_SINGULAR_NOUN.get(noun)
        if stem is None:
            continue
        checked[plural] += 1
        assert target_tokens[0] == stem + (bc.NOUN_PLURAL_SUFFIX if plural else "")
        if len(source_tokens) == 5:
            if source_tokens[1] not in adjectives:
                continue
            adjective = adjectives[source_tokens[1]]
            assert target_tokens[1] == adjective + (bc.ADJECTIVE_PLURAL_SUFFIX if plural else "")
    assert checked[False] > 20 and checked[True] > 20


def test_same_noun_stem_appears_with_several_inflections(corpus: list[Pair]) -> None:
    forms_by_stem: dict[str, set[str]] = defaultdict(set)
    stems = {stem for _, _, stem in bc.NOUNS}
    plural, accusative = bc.NOUN_PLURAL_SUFFIX, bc.NOUN_ACCUSATIVE_SUFFIX
    suffixes = {"", plural, accusative, plural + accusative}
    for _, target in corpus:
        for token in target.split():
            for stem in stems:
                if token.startswith(stem) and token[len(stem) :] in suffixes:
                    forms_by_stem[stem].add(token)
    assert all(len(forms_by_stem[stem]) == 4 for stem in stems)


def test_verb_suffix_agrees_with_the_subject_person_and_number(corpus: list[Pair]) -> None:
    pronoun_person = {en: person for en, _, person in bc.PRONOUNS}
    base_forms = {base: stem for base, _, stem in bc.TRANSITIVE_VERBS + bc.INTRANSITIVE_VERBS}
    suffixes_for_english_base_form: set[str] = set()
    for source_tokens, target_tokens in _single_clause(corpus):
        person = pronoun_person.get(source_tokens[0])
        if person is None:
            continue
        verb = target_tokens[-2]
        assert verb.endswith(bc.VERB_SUFFIXES[person]), (source_tokens, target_tokens)
        if source_tokens[1] in base_forms:
            suffixes_for_english_base_form.add(verb[len(base_forms[source_tokens[1]]) :])
    # English "see" covers i/you/we/they; the target must tell them apart.
    assert suffixes_for_english_base_form == {bc.VERB_SUFFIXES[p] for p in ("1sg", "2sg", "1pl", "3pl")}


def test_source_digits_become_number_words_never_digits(corpus: list[Pair]) -> None:
    with_numeral = 0
    multi_word = 0
    for source, target in corpus:
        assert not any(ch.isdigit() for ch in target), target
        numerals = [int(token) for token in source.split() if token.isdigit()]
        with_numeral += bool(numerals)
        joined = f" {target} "
        for number in numerals:
            words = bc.target_number_words(number)
            multi_word += len(words) > 1
            assert f" {' '.join(words)} " in joined, (source, target)
    assert with_numeral > 0.1 * len(corpus)
    assert multi_word > 0


def test_number_words_spell_tens_and_units() -> None:
    assert bc.target_number_words(3) == ["tri"]
    assert bc.target_number_words(10) == ["dek"]
    assert bc.target_number_words(14) == ["dek", "kvar"]
    assert bc.target_number_words(27) == ["du", "dek", "sep"]
    assert bc.target_number_words(90) == ["nau", "dek"]


def test_copying_the_source_scores_near_zero_bleu(corpus: list[Pair]) -> None:
    sources = [source for source, _ in corpus[:2_000]]
    targets = [target for _, target in corpus[:2_000]]
    assert sacrebleu.corpus_bleu(sources, [targets]).score < 5
    assert sacrebleu.corpus_bleu(targets, [targets]).score == pytest.approx(100.0)


def test_translation_is_a_function_of_the_source() -> None:
    pooled: dict[str, str] = {}
    shared = 0
    for seed in (1, 2):
        for source, target in generate_corpus(60_000, seed):
            if source in pooled:
                shared += 1
                assert pooled[source] == target, source
            pooled[source] = target
    # Otherwise the check above would prove nothing.
    assert shared > 50


def test_source_and_target_vocabularies_are_disjoint_apart_from_punctuation(corpus: list[Pair]) -> None:
    assert bc.source_vocabulary() & bc.target_vocabulary() == {bc.END}
    observed_source = {w for source, _ in corpus for w in source.split()}
    observed_target = {w for _, target in corpus for w in target.split()}
    assert observed_source <= bc.source_vocabulary()
    assert observed_target <= bc.target_vocabulary()
    assert observed_source & observed_target == {bc.END}


def test_vocabularies_are_small_enough_to_learn(corpus: list[Pair]) -> None:
    observed_source = {w for source, _ in corpus for w in source.split()}
    observed_target = {w for _, target in corpus for w in target.split()}
    assert 100 <= len(observed_source) <= 300
    assert 100 <= len(observed_target) <= 300


def test_target_word_forms_of_different_classes_never_coincide() -> None:
    # Otherwise the verb-final and inflection checks above could mistake one class for another.
    forms = [
        bc.target_noun_form(stem, plural, acc)
        for _, _, stem in bc.NOUNS
        for plural in (False, True)
        for acc in (False, True)
    ]
    forms += [bc.target_adjective_form(stem, plural) for _, stem in bc.ADJECTIVES for plural in (False, True)]
    forms += sorted(bc.target_verb_forms())
    forms += [art for _, art, _ in bc.PRONOUNS]
    forms += sorted({w for n in range(bc.MIN_NUMERAL, bc.MAX_NUMERAL + 1) for w in bc.target_number_words(n)})
    forms += sorted(set(bc.DETERMINERS.values()))
    forms += [*bc.ADPOSITIONS.values(), *bc.ADVERBS.values(), *bc.COORDINATORS.values()]
    forms += [*bc.SUBORDINATORS.values(), bc.RELATIVIZER[1], bc.END]
    assert len(bc.target_verb_forms()) == len(bc.VERB_SUFFIXES) * (
        len(bc.TRANSITIVE_VERBS) + len(bc.INTRANSITIVE_VERBS)
    )
    assert len(set(forms)) == len(forms)
    assert set(forms) == bc.target_vocabulary()
