"""Greedy and beam search: agreement with each other, batch independence, stopping, length limits."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.network.batching import source_tensor
from pipeline.network.decoding import beam_search, decode_batch, greedy_decode, max_lengths
from pipeline.network.model import Seq2Seq
from pipeline.network.tokenization import BOS_ID, EOS_ID, PAD_ID
from tests.seq2seq_toys import random_model, trained_reverser

ARCHS = ["gru", "gru_attention", "transformer"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SOURCES = [[4, 5, 6, 7, 8, 9, 10], [11, 12], [13, 4, 5, 6], [7], [8, 9, 10, 11, 12, 13, 4, 5, 6, 7]]


def _model(kind: str, arch: str) -> Seq2Seq:
    return trained_reverser(arch).model if kind == "trained" else random_model(arch, n_layers=2, seed=5)


def _sources(kind: str, arch: str) -> list[list[int]]:
    return trained_reverser(arch).sources if kind == "trained" else SOURCES


@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("arch", ARCHS)
def test_beam_size_one_is_exactly_greedy(arch: str, kind: str) -> None:
    model, sources = _model(kind, arch), _sources(kind, arch)
    src, lengths = source_tensor(sources)
    greedy = greedy_decode(model, src, lengths, max_len_ratio=1.5)
    for length_penalty in (0.0, 1.0):
        beam = beam_search(model, src, lengths, beam_size=1, length_penalty=length_penalty, max_len_ratio=1.5)
        assert beam == greedy


@pytest.mark.parametrize("kind", ["random", "trained"])
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_decoding_equals_one_sentence_at_a_time(arch: str, kind: str) -> None:
    model, sources = _model(kind, arch), _sources(kind, arch)
    src, lengths = source_tensor(sources)
    batched_greedy = greedy_decode(model, src, lengths)
    batched_beam = beam_search(model, src, lengths, beam_size=3, length_penalty=0.6)
    for i, source in enumerate(sources):
        one_src, one_length = source_tensor([source])
        assert greedy_decode(model, one_src, one_length) == [batched_greedy[i]]
        assert beam_search(model, one_src, one_length, beam_size=3, length_penalty=0.6) == [batched_beam[i]]


@pytest.mark.parametrize("beam_size", [1, 2, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_each_sentence_stops_at_its_own_end_of_sentence(arch: str, beam_size: int) -> None:
    """The toy model emits </s> at once for two sources and after 5-8 symbols for the others."""
    toy = trained_reverser(arch)
    src, lengths = source_tensor(toy.sources)
    hypotheses = decode_batch(
        toy.model, src, lengths, beam_size=beam_size, length_penalty=1.0, max_len_ratio=4.0
    )
    assert hypotheses == toy.targets
    assert [] in hypotheses and max(map(len, hypotheses)) >= 5  # short ones stopped while long ones went on
    assert all(EOS_ID not in h for h in hypotheses)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_respects_the_length_limits(arch: str) -> None:
    """A limit counts the generated tokens with </s>: a model that would never end a sentence yields exactly
    limit - 1 tokens before the </s> forced at the limit, by greedy and beam search alike."""
    model = random_model(arch, seed=2)
    with torch.no_grad():
        model.decoder.W_o.bias[EOS_ID] -= 1e4  # </s> never chosen unless forced
    src, lengths = source_tensor(SOURCES)
    limits = max_lengths(lengths, 0.5)
    assert limits == [int(0.5 * (len(s) + 1)) + 5 for s in SOURCES]
    for hypotheses in (
        greedy_decode(model, src, lengths, max_len_ratio=0.5),
        beam_search(model, src, lengths, beam_size=3, max_len_ratio=0.5),
    ):
        assert [len(h) for h in hypotheses] == [limit - 1 for limit in limits]
    for hypotheses in (
        greedy_decode(model, src, lengths, max_len_ratio=None, max_len=2),
        beam_search(model, src, lengths, beam_size=2, max_len=2),
    ):
        assert [len(h) for h in hypotheses] == [1] * len(SOURCES)


def _exhaustive_best(model: Seq2Seq, source: list[int], vocab: int, limit: int, alpha: float) -> list[int]:
    """Score every possible output by brute force: any tokens but <pad> and <s>, ending in </s> within the
    limit (a hypothesis at the limit must end there)."""
    others = [t for t in range(vocab) if t not in (EOS_ID, PAD_ID, BOS_ID)]
    outputs = [
        list(output)
        for n in range(1, limit + 1)
        for output in itertools.product(*[others] * (n - 1), [EOS_ID])
    ]
    # One batch; positions after an output's end hold padding, which a left-to-right decoder never reads.
    tgt_out = torch.tensor([output + [0] * (limit - len(output)) for output in outputs])
    tgt_in = torch.cat([torch.full((len(outputs), 1), BOS_ID), tgt_out[:, :-1]], dim=1)
    src, lengths = source_tensor([source] * len(outputs))
    with torch.inference_mode():
        log_probs = torch.log_softmax(model(src, lengths, tgt_in), dim=-1).gather(2, tgt_out.unsqueeze(-1))
    scores = [
        float(log_probs[i, : len(output)].sum()) / ((5 + len(output)) / 6) ** alpha
        for i, output in enumerate(outputs)
    ]
    best = outputs[max(range(len(outputs)), key=scores.__getitem__)]
    return [t for t in best if t != EOS_ID]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_beam_that_keeps_every_hypothesis_finds_the_exhaustive_optimum(arch: str, alpha: float) -> None:
    """Checks the scoring (length penalty, </s>, length limit) by brute force over a 6-token vocabulary."""
    vocab, limit = 6, 3
    model = random_model(arch, seed=11, vocab_size=vocab)
    with torch.no_grad():  # a likelier symbol 5, a rarer </s>: for the GRU archs the optimum is then []
        model.decoder.W_o.bias[5] += 1.0  # for alpha 0 but a longer output for alpha 1
        model.decoder.W_o.bias[EOS_ID] -= 1.0
    for source in ([4, 5, 4], [5]):
        src, lengths = source_tensor([source])
        found = beam_search(
            model, src, lengths, beam_size=200, length_penalty=alpha, max_len_ratio=None, max_len=limit
        )
        assert found == [_exhaustive_best(model, source, vocab, limit, alpha)]


def test_decoding_restores_the_callers_training_mode() -> None:
    model = random_model("gru_attention").train()
    src, lengths = source_tensor(SOURCES)
    greedy_decode(model, src, lengths)
    beam_search(model, src, lengths, beam_size=2)
    assert model.training


def test_corpus_scores_add_lowercase_bleu_beside_cased_bleu_and_chrf():
    from pipeline.network.scoring import corpus_scores

    references = ["Two dogs play in the snow .", "A man rides a red bike ."]
    hypotheses = ["two Dogs play in the Snow .", "a man rides a red bike ."]
    scores = corpus_scores(hypotheses, references)
    assert set(scores) == {"bleu", "bleu_lc", "chrf"}
    assert scores["bleu_lc"] == 100.0 and scores["bleu"] < 100.0


def test_each_corpus_score_comes_with_the_sacrebleu_signature_it_was_computed_with():
    import sacrebleu

    from pipeline.network.scoring import corpus_scores, score_corpus

    references = ["Two dogs play in the snow .", "A man rides a red bike ."]
    hypotheses = ["two Dogs play in the Snow .", "a man rides a bike ."]
    scored = score_corpus(hypotheses, references)

    assert scored.scores == corpus_scores(hypotheses, references)
    # The same numbers as sacreBLEU's own one-call functions with their defaults.
    bleu = sacrebleu.corpus_bleu(hypotheses, [references], force=True).score
    assert scored.scores["bleu"] == round(bleu, 2) < 100.0
    assert scored.scores["chrf"] == round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2)
    version = sacrebleu.__version__
    assert scored.signatures == {
        "bleu_signature": f"BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{version}",
        "bleu_lc_signature": f"BLEU|nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:{version}",
        "chrf_signature": f"chrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:{version}",
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_pad_and_bos_are_never_generated(arch: str) -> None:
    model = random_model(arch, seed=3)
    with torch.no_grad():  # the likeliest tokens by far: a search that may emit them would
        model.decoder.W_o.bias[PAD_ID] += 20.0
        model.decoder.W_o.bias[BOS_ID] += 20.0
    src, lengths = source_tensor(SOURCES)
    for beam_size in (1, 3):
        for hypothesis in decode_batch(model, src, lengths, beam_size=beam_size, max_len_ratio=1.0):
            assert PAD_ID not in hypothesis and BOS_ID not in hypothesis, hypothesis


@pytest.mark.parametrize("arch", ("gru", "gru_attention"))
def test_a_hypothesis_cut_at_the_length_limit_ends_with_its_eos_scored(arch: str) -> None:
    """A likely symbol and a rare </s>: the best hypotheses run to the limit, where </s> is forced; the one
    returned is the best complete sentence, its closing </s>'s probability included (brute force agrees),
    and beam 1 is still greedy decoding."""
    vocab, limit = 6, 3
    model = random_model(arch, seed=5, vocab_size=vocab)
    with torch.no_grad():
        model.decoder.W_o.bias[5] += 6.0
        model.decoder.W_o.bias[EOS_ID] -= 6.0
    for source in ([4, 5, 4], [5]):
        src, lengths = source_tensor([source])
        found = beam_search(
            model, src, lengths, beam_size=200, length_penalty=1.0, max_len_ratio=None, max_len=limit
        )
        assert found == [_exhaustive_best(model, source, vocab, limit, 1.0)]
        assert len(found[0]) == limit - 1, found  # two symbols, then the </s> the limit forced
        greedy = greedy_decode(model, src, lengths, max_len_ratio=None, max_len=limit)
        assert greedy == beam_search(model, src, lengths, beam_size=1, max_len_ratio=None, max_len=limit)


def test_val_bleu_scores_greedy_output_against_the_cleaned_references() -> None:
    """Per-epoch BLEU is sacreBLEU of the greedy hypotheses against the cleaned reference text, as the
    evaluate stage scores, not against references rebuilt from token ids."""
    import sacrebleu
    from tokenizers import Tokenizer, models

    from pipeline.network.encoded import EncodedSplit
    from pipeline.network.scoring import greedy_bleu
    from pipeline.network.tokenization import SPECIAL_TOKENS, decode_ids
    from tests.seq2seq_toys import VOCAB_SIZE

    toy = trained_reverser("gru_attention")
    words = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(4, VOCAB_SIZE))]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    rebuilt = decode_ids(tokenizer, toy.targets)
    # The cleaned text keeps what ids lose: case, and a word the vocabulary does not have.
    references = [text.upper() + " Zebra" if i % 2 else text for i, text in enumerate(rebuilt)]
    split = EncodedSplit.from_lists(toy.sources, toy.targets)
    src, lengths = source_tensor(toy.sources)
    hypotheses = decode_ids(
        tokenizer, greedy_decode(toy.model, src, lengths, max_len=int(src.size(1) * 2 + 5))
    )

    bleu = greedy_bleu(toy.model, split, tokenizer, torch.device("cpu"), references)

    assert bleu == round(sacrebleu.corpus_bleu(hypotheses, [references], force=True).score, 2)
    assert bleu < round(sacrebleu.corpus_bleu(hypotheses, [rebuilt], force=True).score, 2)


def test_the_decoding_benchmarks_earlier_rules_differ_from_the_shipped_one_only_where_named() -> None:
    """benchmarks/decoding.py re-creates the rules without masking and without forcing </s>: each must
    change the scores in its own place and nowhere else, or its row measures something else."""
    from benchmarks.decoding import SHIPPED, limit_without_eos, without_special_mask

    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    at_limit = torch.tensor([False, True, False])
    shipped = SHIPPED(logits, at_limit)
    plain = torch.log_softmax(logits, dim=-1)

    unmasked = without_special_mask(logits, at_limit)
    assert torch.equal(unmasked[:, [PAD_ID, BOS_ID]], plain[:, [PAD_ID, BOS_ID]])
    others = [i for i in range(12) if i not in (PAD_ID, BOS_ID)]
    assert torch.equal(unmasked[:, others], shipped[:, others])

    free_end = limit_without_eos(logits, at_limit)
    assert free_end[1, EOS_ID] == 0.0 and shipped[1, EOS_ID] == plain[1, EOS_ID]
    free_end[1, EOS_ID] = shipped[1, EOS_ID]
    assert torch.equal(free_end, shipped)
