"""A synthetic English-like ("en") -> artificial ("art") parallel corpus that needs no download.

The corpus exists so the whole pipeline can be trained and evaluated offline, so it has to be a real
translation problem rather than a word-for-word substitution cipher, while staying small and regular
enough for a ~1-3M parameter GRU with attention to reach BLEU >= 90 from 20,000 pairs.

Source grammar (English-like, present tense; 4..30 whitespace tokens including the final "."):

    sentence  := clause [conj clause] "."
    clause    := subject verb [object] [adjuncts]      (adjuncts only when the object has no relative clause)
    subject   := pronoun | np [relative]
    object    := np [relative]
    np        := [det] [numeral] [adj [adj]] noun      (numerals "2".."99" only in plural noun phrases)
    relative  := "that" verb [object-np] [adjuncts]    (subject relatives, never nested)
    adjuncts  := (preposition np)* [adverb]

Each feature of the target language is there for a reason:

* Reordering, so the decoder cannot emit target words in source order: clauses are verb-final (SOV),
  noun phrases are fully mirrored (noun, adjectives in reverse order, numeral, determiner), prepositions
  become postpositions, and a subordinate clause ("because", "while", "although") moves in front of its
  main clause. Long sentences therefore need attention; a fixed-size encoder state does clearly worse.
* Agreement and inflection, so the model must relate distant words: the target verb agrees with its
  subject in person and number (5 suffixes, while the English verb only shows 3rd singular "-s", so
  "i/you/we/they see" must look back at the subject), nouns take a plural suffix and an accusative suffix
  when they are objects (the source has no case: the role comes from word order), and adjectives agree
  in number with their noun.
* Token rendering: numerals are digits in the source ("27") and number words in the target
  ("du dek sep", literally "two ten seven"), so one source token can become up to three target tokens.

The target vocabulary is disjoint from the source vocabulary (apart from "."), so copying the source
scores close to zero BLEU. Translation is a deterministic function of the source sentence: every source
word belongs to exactly one word class and the grammar is unambiguous (adjuncts attach to the nearest
clause, which is why a clause whose object has a relative clause takes no adjuncts of its own), so each
source string has exactly one derivation and one target. Randomness is only used to sample sources.

Size: counting derivations by length (each string has one) gives about 5.7e45 distinct source sentences
of 4..30 tokens; even the single pattern "det adj noun verb det adj noun ." has over 19 million. So
MAX_PAIRS = 5,000,000 (the largest request accepted, to bound time) is always reachable, with
few duplicate draws. Vocabulary: 243 source and 289 target word types (98 of the source types are numerals).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence

__all__ = [
    "MAX_PAIRS",
    "MAX_SOURCE_TOKENS",
    "MIN_SOURCE_TOKENS",
    "generate_corpus",
    "iter_corpus",
    "source_verb_forms",
    "source_vocabulary",
    "target_adjective_form",
    "target_noun_form",
    "target_number_words",
    "target_verb_form",
    "target_verb_forms",
    "target_vocabulary",
]

MAX_PAIRS = 5_000_000
MIN_SOURCE_TOKENS = 4
MAX_SOURCE_TOKENS = 30

Tokens = list[str]
Phrase = tuple[Tokens, Tokens]  # (source tokens, target tokens)

# --- Lexicon -----------------------------------------------------------------------------------------
# Regular English plurals only, and no word that is also a verb ("paints", "visits"), so that every
# source token has exactly one word class and one translation.

# (english singular, english plural, target stem)
NOUNS: tuple[tuple[str, str, str], ...] = (
    ("dog", "dogs", "doru"),
    ("cat", "cats", "mesi"),
    ("bird", "birds", "piko"),
    ("horse", "horses", "valu"),
    ("farmer", "farmers", "gatu"),
    ("teacher", "teachers", "sensa"),
    ("doctor", "doctors", "temo"),
    ("girl", "girls", "nena"),
    ("boy", "boys", "bako"),
    ("king", "kings", "reto"),
    ("student", "students", "gaku"),
    ("friend", "friends", "tomo"),
    ("baker", "bakers", "pani"),
    ("sailor", "sailors", "nalu"),
    ("apple", "apples", "zema"),
    ("book", "books", "libo"),
    ("letter", "letters", "fumi"),
    ("river", "rivers", "kawa"),
    ("house", "houses", "domo"),
    ("garden", "gardens", "sono"),
    ("ship", "ships", "fune"),
    ("tree", "trees", "kiru"),
    ("stone", "stones", "ishu"),
    ("flower", "flowers", "hana"),
    ("village", "villages", "mura"),
    ("window", "windows", "mado"),
    ("market", "markets", "suku"),
    ("bridge", "bridges", "hashu"),
)
NOUN_PLURAL_SUFFIX = "ki"
NOUN_ACCUSATIVE_SUFFIX = "m"

# (english, target stem); the target adjective takes ADJECTIVE_PLURAL_SUFFIX after a plural noun.
ADJECTIVES: tuple[tuple[str, str], ...] = (
    ("big", "gol"),
    ("small", "mik"),
    ("old", "vet"),
    ("young", "jov"),
    ("red", "rud"),
    ("green", "verd"),
    ("happy", "fel"),
    ("quiet", "sil"),
    ("tall", "alt"),
    ("dark", "nox"),
    ("bright", "lum"),
    ("brave", "fort"),
    ("cold", "frig"),
    ("strange", "xen"),
)
ADJECTIVE_PLURAL_SUFFIX = "ai"

# (english base form, english 3rd person singular, target stem)
TRANSITIVE_VERBS: tuple[tuple[str, str, str], ...] = (
    ("see", "sees", "vid"),
    ("like", "likes", "sat"),
    ("find", "finds", "trov"),
    ("help", "helps", "ajut"),
    ("follow", "follows", "seg"),
    ("call", "calls", "vok"),
    ("carry", "carries", "port"),
    ("push", "pushes", "puls"),
    ("feed", "feeds", "nutr"),
    ("visit", "visits", "vizit"),
    ("hold", "holds", "ten"),
    ("watch", "watches", "mir"),
    ("draw", "draws", "pikt"),
    ("want", "wants", "vol"),
)
INTRANSITIVE_VERBS: tuple[tuple[str, str, str], ...] = (
    ("sleep", "sleeps", "dorm"),
    ("run", "runs", "kur"),
    ("sing", "sings", "kant"),
    ("wait", "waits", "atend"),
    ("laugh", "laughs", "rid"),
    ("dance", "dances", "bal"),
    ("swim", "swims", "nag"),
    ("rest", "rests", "ripoz"),
)
# The target distinguishes five person/number combinations where English only marks 3rd singular.
# English "you" is always read as 2nd singular so that the translation stays a function of the source.
VERB_SUFFIXES: dict[str, str] = {"1sg": "o", "2sg": "is", "3sg": "at", "1pl": "amu", "3pl": "ont"}

# (english, target, person/number)
PRONOUNS: tuple[tuple[str, str, str], ...] = (
    ("i", "mo", "1sg"),
    ("you", "tu", "2sg"),
    ("he", "lo", "3sg"),
    ("she", "la", "3sg"),
    ("we", "nos", "1pl"),
    ("they", "ili", "3pl"),
)

# English determiner -> target determiner (placed after the noun phrase). "these" is the plural of "this";
# "an" is the spelling of "a" before a vowel, so both pairs share one target word.
DETERMINERS: dict[str, str] = {"the": "ze", "a": "ena", "an": "ena", "this": "si", "these": "si"}
_SINGULAR_DETERMINERS: tuple[str, ...] = ("the", "a", "this")
_SINGULAR_DETERMINER_WEIGHTS: tuple[float, ...] = (0.5, 0.3, 0.2)
_PLURAL_DETERMINERS: tuple[str | None, ...] = ("the", "these", None)  # None: bare plural, "dogs sleep"
_PLURAL_DETERMINER_WEIGHTS: tuple[float, ...] = (0.4, 0.2, 0.4)

# English preposition -> target postposition.
ADPOSITIONS: dict[str, str] = {
    "in": "ine",
    "on": "supa",
    "near": "apud",
    "behind": "post",
    "under": "suba",
    "with": "kun",
    "without": "sine",
    "beside": "flan",
}
ADVERBS: dict[str, str] = {
    "often": "ofte",
    "today": "hodie",
    "again": "denove",
    "slowly": "lante",
    "quietly": "kviete",
}
# Coordinated clauses keep their order; a subordinate clause moves in front of the main clause and its
# conjunction follows it, as in head-final languages.
COORDINATORS: dict[str, str] = {"and": "kaj", "but": "sed"}
SUBORDINATORS: dict[str, str] = {"because": "kar", "while": "dum", "although": "kvankam"}
RELATIVIZER: tuple[str, str] = ("that", "kiu")

MIN_NUMERAL, MAX_NUMERAL = 2, 99
# Index = digit. Numbers are spelled tens-digit word, "dek" (ten), units-digit word; a digit 1 in the
# tens place and zeros are left out, so 10 -> "dek", 14 -> "dek kvar", 27 -> "du dek sep", 30 -> "tri dek".
_DIGIT_WORDS: tuple[str, ...] = ("", "unu", "du", "tri", "kvar", "kvin", "ses", "sep", "oko", "nau")
_TEN_WORD = "dek"
END = "."

# --- Sampling probabilities --------------------------------------------------------------------------
# Tuned for a mean source length of about 13 tokens spread over 4..30.
_P_PLURAL = 0.4
_P_NUMERAL = 0.45  # given plural
_P_ADJECTIVE = 0.45
_P_SECOND_ADJECTIVE = 0.15  # given one adjective
_P_PRONOUN_SUBJECT = 0.2
_P_TRANSITIVE = 0.65
_P_SUBJECT_RELATIVE = 0.15
_P_OBJECT_RELATIVE = 0.2
_PP_COUNT_WEIGHTS: tuple[float, ...] = (0.45, 0.35, 0.2)  # 0, 1 or 2 prepositional phrases
_P_ADVERB = 0.2
_P_RELATIVE_ADJUNCTS = 0.3
_P_SECOND_CLAUSE = 0.35
_P_SUBORDINATE = 0.5  # given a second clause
# Rejection sampling only discards duplicates and out-of-range lengths, both rare, so a request that
# needs this many draws per pair means something is broken rather than unlucky.
_MAX_DRAWS_PER_PAIR = 50

_VOWELS = frozenset("aeiou")
_ADPOSITION_KEYS = tuple(ADPOSITIONS)
_ADVERB_KEYS = tuple(ADVERBS)
_COORDINATOR_KEYS = tuple(COORDINATORS)
_SUBORDINATOR_KEYS = tuple(SUBORDINATORS)


def target_number_words(number: int) -> Tokens:
    """Target rendering of a source numeral, e.g. 27 -> ["du", "dek", "sep"]."""
    if not MIN_NUMERAL <= number <= MAX_NUMERAL:
        raise ValueError(f"numerals run from {MIN_NUMERAL} to {MAX_NUMERAL}, got {number}")
    tens, units = divmod(number, 10)
    words: Tokens = []
    if tens:
        if tens > 1:
            words.append(_DIGIT_WORDS[tens])
        words.append(_TEN_WORD)
    if units:
        words.append(_DIGIT_WORDS[units])
    return words


def target_noun_form(stem: str, plural: bool, accusative: bool) -> str:
    """Inflected target noun: stem + plural suffix + accusative suffix (objects only)."""
    return stem + (NOUN_PLURAL_SUFFIX if plural else "") + (NOUN_ACCUSATIVE_SUFFIX if accusative else "")


def target_adjective_form(stem: str, plural: bool) -> str:
    """Target adjective agreeing in number with its noun."""
    return stem + (ADJECTIVE_PLURAL_SUFFIX if plural else "")


def target_verb_form(stem: str, person: str) -> str:
    """Target verb agreeing with its subject; person is one of VERB_SUFFIXES ("1sg", ..., "3pl")."""
    return stem + VERB_SUFFIXES[person]


def source_vocabulary() -> frozenset[str]:
    """Every token a source sentence can contain."""
    words = {END, RELATIVIZER[0], *DETERMINERS, *ADPOSITIONS, *ADVERBS, *COORDINATORS, *SUBORDINATORS}
    words.update(w for sg, pl, _ in NOUNS for w in (sg, pl))
    words.update(en for en, _ in ADJECTIVES)
    words.update(w for base, third, _ in TRANSITIVE_VERBS + INTRANSITIVE_VERBS for w in (base, third))
    words.update(en for en, _, _ in PRONOUNS)
    words.update(str(n) for n in range(MIN_NUMERAL, MAX_NUMERAL + 1))
    return frozenset(words)


def target_vocabulary() -> frozenset[str]:
    """Every token a target sentence can contain."""
    words = {END, RELATIVIZER[1], *DETERMINERS.values(), *ADPOSITIONS.values(), *ADVERBS.values()}
    words.update(COORDINATORS.values())
    words.update(SUBORDINATORS.values())
    words.update(
        target_noun_form(stem, plural, acc)
        for _, _, stem in NOUNS
        for plural in (False, True)
        for acc in (False, True)
    )
    words.update(target_adjective_form(stem, plural) for _, stem in ADJECTIVES for plural in (False, True))
    words.update(target_verb_forms())
    words.update(art for _, art, _ in PRONOUNS)
    words.update(w for n in range(MIN_NUMERAL, MAX_NUMERAL + 1) for w in target_number_words(n))
    return frozenset(words)


def target_verb_forms() -> frozenset[str]:
    """Every inflected target verb (the tokens that end a target clause)."""
    return frozenset(
        target_verb_form(stem, person)
        for _, _, stem in TRANSITIVE_VERBS + INTRANSITIVE_VERBS
        for person in VERB_SUFFIXES
    )


def source_verb_forms() -> frozenset[str]:
    """Every source verb form."""
    return frozenset(w for base, third, _ in TRANSITIVE_VERBS + INTRANSITIVE_VERBS for w in (base, third))


# --- Grammar -----------------------------------------------------------------------------------------


def _noun_phrase(rng: random.Random, accusative: bool) -> tuple[Tokens, Tokens, str]:
    """A determiner/numeral/adjective/noun phrase; returns (source, target, person)."""
    plural = rng.random() < _P_PLURAL
    noun_sg, noun_pl, noun_stem = rng.choice(NOUNS)
    adjectives: Sequence[tuple[str, str]] = ()
    if rng.random() < _P_ADJECTIVE:
        count = 2 if rng.random() < _P_SECOND_ADJECTIVE else 1
        adjectives = rng.sample(ADJECTIVES, count)
    numeral = rng.randint(MIN_NUMERAL, MAX_NUMERAL) if plural and rng.random() < _P_NUMERAL else None
    if plural:
        determiner = rng.choices(_PLURAL_DETERMINERS, _PLURAL_DETERMINER_WEIGHTS)[0]
    else:
        determiner = rng.choices(_SINGULAR_DETERMINERS, _SINGULAR_DETERMINER_WEIGHTS)[0]

    source: Tokens = [] if numeral is None else [str(numeral)]
    source += [en for en, _ in adjectives]
    source.append(noun_pl if plural else noun_sg)
    if determiner is not None:
        if determiner == "a" and source[0][0] in _VOWELS:
            determiner = "an"
        source.insert(0, determiner)

    # The target mirrors the whole phrase: noun first, determiner last.
    target: Tokens = [target_noun_form(noun_stem, plural, accusative)]
    target += [target_adjective_form(stem, plural) for _, stem in reversed(adjectives)]
    if numeral is not None:
        target += target_number_words(numeral)
    if determiner is not None:
        target.append(DETERMINERS[determiner])
    return source, target, "3pl" if plural else "3sg"


def _adjuncts(rng: random.Random, max_phrases: int) -> Phrase:
    """Prepositional phrases and an optional adverb; same order in both languages, postpositions in art."""
    count = rng.choices(range(len(_PP_COUNT_WEIGHTS)), _PP_COUNT_WEIGHTS)[0]
    source: Tokens = []
    target: Tokens = []
    for _ in range(min(count, max_phrases)):
        preposition = rng.choice(_ADPOSITION_KEYS)
        np_source, np_target, _ = _noun_phrase(rng, accusative=False)
        source += [preposition, *np_source]
        target += [*np_target, ADPOSITIONS[preposition]]
    if rng.random() < _P_ADVERB:
        adverb = rng.choice(_ADVERB_KEYS)
        source.append(adverb)
        target.append(ADVERBS[adverb])
    return source, target


def _verb_phrase(rng: random.Random, person: str, main_clause: bool) -> tuple[Tokens, Tokens, Tokens]:
    """Verb, object and adjuncts; returns (source, target without the verb, target verb).

    Only a main clause's object may take a relative clause (no nesting), and relative clauses take
    adjuncts less often and at most one prepositional phrase, which keeps sentences within 30 tokens.
    """
    transitive = rng.random() < _P_TRANSITIVE
    base, third, stem = rng.choice(TRANSITIVE_VERBS if transitive else INTRANSITIVE_VERBS)
    source: Tokens = [third if person == "3sg" else base]
    target: Tokens = []
    object_has_relative = False
    if transitive:
        object_source, object_target, object_person = _noun_phrase(rng, accusative=True)
        source += object_source
        target += object_target
        if main_clause and rng.random() < _P_OBJECT_RELATIVE:
            relative_source, relative_target = _relative_clause(rng, object_person)
            source += relative_source
            target += relative_target
            object_has_relative = True
    # Trailing adjuncts always belong to the nearest clause; a main clause whose object has a relative
    # clause gets none, otherwise "... the cat that sleeps in the house" would have two readings.
    if not object_has_relative and (main_clause or rng.random() < _P_RELATIVE_ADJUNCTS):
        adjunct_source, adjunct_target = _adjuncts(
            rng, max_phrases=len(_PP_COUNT_WEIGHTS) if main_clause else 1
        )
        source += adjunct_source
        target += adjunct_target
    return source, target, [target_verb_form(stem, person)]


def _relative_clause(rng: random.Random, head_person: str) -> Phrase:
    """A subject relative clause; verb-final in the target and agreeing with its head noun."""
    source, target, verb = _verb_phrase(rng, head_person, main_clause=False)
    return [RELATIVIZER[0], *source], [RELATIVIZER[1], *target, *verb]


def _clause(rng: random.Random) -> Phrase:
    """Subject, verb, object, adjuncts in the source; subject, object, adjuncts, verb in the target."""
    if rng.random() < _P_PRONOUN_SUBJECT:
        english, art, person = rng.choice(PRONOUNS)
        source, target = [english], [art]
    else:
        source, target, person = _noun_phrase(rng, accusative=False)
        if rng.random() < _P_SUBJECT_RELATIVE:
            relative_source, relative_target = _relative_clause(rng, person)
            source += relative_source
            target += relative_target
    vp_source, vp_target, verb = _verb_phrase(rng, person, main_clause=True)
    return source + vp_source, target + vp_target + verb


def _sentence(rng: random.Random) -> Phrase:
    source, target = _clause(rng)
    if rng.random() < _P_SECOND_CLAUSE:
        second_source, second_target = _clause(rng)
        if rng.random() < _P_SUBORDINATE:
            conjunction = rng.choice(_SUBORDINATOR_KEYS)
            source = [*source, conjunction, *second_source]
            target = [*second_target, SUBORDINATORS[conjunction], *target]
        else:
            conjunction = rng.choice(_COORDINATOR_KEYS)
            source = [*source, conjunction, *second_source]
            target = [*target, COORDINATORS[conjunction], *second_target]
    return [*source, END], [*target, END]


def generate_corpus(n_pairs: int, seed: int, sentences_per_pair: int = 1) -> list[tuple[str, str]]:
    """`iter_corpus` as a list (small corpora and tests)."""
    return list(iter_corpus(n_pairs, seed, sentences_per_pair))


def iter_corpus(n_pairs: int, seed: int, sentences_per_pair: int = 1) -> Iterator[tuple[str, str]]:
    """Deterministic stream of exactly n_pairs unique (source, target) pairs, generated as they are read.

    Sources are English-like ("en"), targets the artificial language ("art"); tokens are separated by
    single spaces and every sentence ends with " .". A pair is `sentences_per_pair` consecutive sentences
    of MIN_SOURCE_TOKENS..MAX_SOURCE_TOKENS tokens each (3 gives lengths like news text: WMT's mean is
    about 25 tokens, with a long tail). The same arguments always give the same pairs, a smaller n_pairs
    gives a prefix, and no source occurs twice. Memory: an 8-byte digest per source seen, not the text.

    Raises ValueError if n_pairs is negative or larger than MAX_PAIRS (the grammar has far more distinct
    sentences than that; the cap bounds time, and matches the config's limit).
    """
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs}")
    if n_pairs > MAX_PAIRS:
        raise ValueError(f"the built-in corpus supports at most {MAX_PAIRS:,} pairs, got n_pairs={n_pairs:,}")
    if sentences_per_pair < 1:
        raise ValueError(f"sentences_per_pair must be >= 1, got {sentences_per_pair}")
    rng = random.Random(seed)
    seen: set[int] = set()
    max_draws = _MAX_DRAWS_PER_PAIR * n_pairs + 1000
    draws = 0
    while len(seen) < n_pairs:
        draws += 1
        if draws > max_draws:
            raise RuntimeError(f"built-in corpus: {draws - 1} draws gave only {len(seen)} unique pairs")
        sources, targets = [], []
        while len(sources) < sentences_per_pair:
            source_tokens, target_tokens = _sentence(rng)
            if MIN_SOURCE_TOKENS <= len(source_tokens) <= MAX_SOURCE_TOKENS:
                sources.append(" ".join(source_tokens))
                targets.append(" ".join(target_tokens))
        source = " ".join(sources)
        digest = int.from_bytes(hashlib.blake2b(source.encode(), digest_size=8).digest(), "little")
        if digest in seen:
            continue
        seen.add(digest)
        yield source, " ".join(targets)
