"""The Transformer's own contract: padding changes nothing, the decoding cache is exact, weights tie."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.network.batching import source_tensor
from pipeline.network.model import Seq2Seq, build_model, count_parameters, select_rows, select_state
from pipeline.network.tokenization import BOS_ID, PAD_ID
from pipeline.network.transformer import CACHE_GROWTH, DecoderCache, TransformerMemory
from tests.seq2seq_toys import TINY, VOCAB_SIZE, random_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOURCES = [[4, 5, 6, 7, 3], [8, 9, 3], [10, 11, 12, 13, 4, 5, 3]]
TARGETS = [[4, 5, 6], [7, 8, 9, 10, 11, 12], [13]]


def _transformer(n_layers: int = 2, seed: int = 0, **sizes: object) -> Seq2Seq:
    torch.manual_seed(seed)
    config = ModelConfig(**{**TINY, "arch": "transformer", "n_layers": n_layers, **sizes})
    return build_model(config, VOCAB_SIZE, VOCAB_SIZE).eval()


def _padded(rows: list[list[int]], width: int, filler: int) -> torch.Tensor:
    padded = torch.full((len(rows), width), filler, dtype=torch.long)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = torch.tensor(row)
    return padded


def _target_in(targets: list[list[int]], width: int) -> torch.Tensor:
    """<s> y_1 .. y_n, then padding."""
    return _padded([[BOS_ID, *target] for target in targets], width, PAD_ID)


def test_encode_gives_the_cross_attention_memory_and_an_empty_cache_that_grows_in_place() -> None:
    model = _transformer(n_layers=2)
    src, lengths = source_tensor([[4, 5, 6], [7, 8, 9, 10, 11]])
    with torch.inference_mode():
        memory, cache = model.encode(src, lengths)
        assert isinstance(memory, TransformerMemory) and isinstance(cache, DecoderCache)
        assert memory.keys.shape == memory.values.shape == (2, 2, 4, 6, 8)  # [B,L,h,S,d_k]
        assert memory.mask.shape == (2, 1, 1, 6) and memory.mask.sum().item() == 4 + 6
        assert cache.keys.shape == cache.values.shape == (2, 2, 4, 0, 8)  # [L,B,h,t,d_k]
        logits, cache = model.decode_step(torch.full((2,), BOS_ID), cache, memory)
        logits, cache = model.decode_step(logits.argmax(-1), cache, memory)
        assert cache.length == 2 and cache.keys.shape == (2, 2, 4, 2 + CACHE_GROWTH, 8)
        buffers = cache.keys.data_ptr(), cache.values.data_ptr()
        for _ in range(CACHE_GROWTH):  # the room made at step 2: each step writes into it, no new buffers
            logits, cache = model.decode_step(logits.argmax(-1), cache, memory)
            assert (cache.keys.data_ptr(), cache.values.data_ptr()) == buffers
        logits, cache = model.decode_step(logits.argmax(-1), cache, memory)  # full: larger buffers
    assert logits.shape == (2, VOCAB_SIZE)
    assert cache.length == 3 + CACHE_GROWTH and cache.keys.size(3) > cache.length


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_a_padded_batch_equals_one_sentence_at_a_time(activation: str) -> None:
    """Source padding of any length and content, and target padding, change no encoder output or logit."""
    model = _transformer(n_layers=2, ff_activation=activation)
    lengths = torch.tensor([len(s) for s in SOURCES])
    tgt_in = _target_in(TARGETS, 7)
    with torch.inference_mode():
        batched = {}
        for name, src in (("tight", _padded(SOURCES, 7, PAD_ID)), ("wide", _padded(SOURCES, 12, 9))):
            outputs, _ = model.encoder(src, lengths)
            batched[name] = (outputs, model(src, lengths, tgt_in))
        for row, (source, target) in enumerate(zip(SOURCES, TARGETS, strict=True)):
            alone_src, alone_lengths = torch.tensor([source]), torch.tensor([len(source)])
            alone_outputs, _ = model.encoder(alone_src, alone_lengths)
            alone_logits = model(alone_src, alone_lengths, _target_in([target], len(target) + 1))
            for outputs, logits in batched.values():
                n, m = len(source), len(target) + 1
                torch.testing.assert_close(outputs[row, :n], alone_outputs[0], atol=1e-5, rtol=0)
                assert torch.all(outputs[row, n:] == 0)  # padded positions carry nothing
                torch.testing.assert_close(logits[row, :m], alone_logits[0], atol=1e-5, rtol=0)


def test_each_cached_step_equals_rerunning_the_whole_prefix() -> None:
    model = _transformer(n_layers=2)
    src, lengths = source_tensor(SOURCES)
    tgt_in = _target_in([[4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 4, 5], [6, 7, 8, 9, 10, 11]], 7)
    with torch.inference_mode():
        memory, cache = model.encode(src, lengths)
        for t in range(tgt_in.size(1)):
            step_logits, cache = model.decode_step(tgt_in[:, t], cache, memory)
            rerun_logits = model(src, lengths, tgt_in[:, : t + 1])[:, -1]  # no cache: the prefix from scratch
            torch.testing.assert_close(step_logits, rerun_logits, atol=1e-5, rtol=1e-5)


def _stepwise_and_whole(model: Seq2Seq, tgt_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of tgt_in decoded one cached step at a time, and of the whole target in one pass."""
    src, lengths = source_tensor(SOURCES)
    memory, cache = model.encode(src, lengths)
    steps = []
    for t in range(tgt_in.size(1)):
        logits, cache = model.decode_step(tgt_in[:, t], cache, memory)
        steps.append(logits)
    assert cache.length == tgt_in.size(1)
    return torch.stack(steps, dim=1), model(src, lengths, tgt_in)


@pytest.mark.parametrize("gradients", [False, True], ids=["no_grad", "grad"])
def test_cached_steps_across_buffer_growths_equal_the_whole_pass(gradients: bool) -> None:
    """Values, not buffers: past two growths of the cache (CACHE_GROWTH positions each), each step's logits
    equal the parallel pass's; with gradients on, so do the gradients (scheduled sampling's backward)."""
    model = _transformer(n_layers=2)
    generator = torch.Generator().manual_seed(0)
    tgt_in = torch.randint(4, VOCAB_SIZE, (len(SOURCES), 2 * CACHE_GROWTH + 3), generator=generator)
    tgt_in[:, 0] = BOS_ID
    with torch.set_grad_enabled(gradients):
        stepwise, whole = _stepwise_and_whole(model, tgt_in)
    torch.testing.assert_close(stepwise, whole, atol=1e-5, rtol=1e-5)
    if not gradients:
        return
    weights = torch.randn(whole.shape, generator=generator)  # a loss that weighs every logit differently
    gradient_sets = []
    for logits in (stepwise, whole):
        model.zero_grad()
        (logits * weights).sum().backward(retain_graph=True)
        gradient_sets.append([parameter.grad.clone() for parameter in model.parameters()])
    for step_gradient, whole_gradient in zip(*gradient_sets, strict=True):
        torch.testing.assert_close(step_gradient, whole_gradient, atol=1e-4, rtol=1e-4)


def test_scheduled_sampling_trains_the_transformer() -> None:
    """`train.teacher_forcing` < 1: forward step by step through the cache, then backward to every weight."""
    model = _transformer(n_layers=2).train()
    src, lengths = source_tensor(SOURCES)
    tgt_in = _target_in(TARGETS, 7)
    logits = model(src, lengths, tgt_in, teacher_forcing=0.5, generator=torch.Generator().manual_seed(0))
    logits.logsumexp(-1).sum().backward()
    gradients = [parameter.grad for parameter in model.parameters()]
    assert all(gradient is not None and torch.isfinite(gradient).all() for gradient in gradients)
    assert all(gradient.any() for gradient in gradients)


def test_several_positions_after_cached_steps_equal_the_whole_pass() -> None:
    """The causal mask of new positions behind cached ones (neither a single step nor a fresh start)."""
    model = _transformer(n_layers=2)
    src, lengths = source_tensor(SOURCES)
    tgt_in = _target_in([[4, 5, 6, 7, 8], [9, 10, 11, 12, 13], [4, 6, 8, 10, 12]], 6)
    with torch.inference_mode():
        whole = model(src, lengths, tgt_in)
        memory, cache = model.encode(src, lengths)
        first, cache = model.decoder(tgt_in[:, :2], cache, memory)
        rest, cache = model.decoder(tgt_in[:, 2:], cache, memory)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), whole, atol=1e-5, rtol=1e-5)
    assert cache.length == 6


def test_a_reordered_cache_continues_like_decoding_the_reordered_batch() -> None:
    """What beam search does to the state (`select_state`) and the memory (`select_rows`) mid-decoding."""
    model = _transformer(n_layers=2)
    order = torch.tensor([2, 0, 0, 1])
    prefix = _target_in([[4, 5], [6, 7], [8, 9]], 3)
    with torch.inference_mode():
        memory, cache = model.encode(*source_tensor(SOURCES))
        for t in range(prefix.size(1)):
            _, cache = model.decode_step(prefix[:, t], cache, memory)
        memory, cache = select_rows(memory, order), select_state(cache, order)
        next_tokens = torch.tensor([10, 11, 12, 13])
        reordered, _ = model.decode_step(next_tokens, cache, memory)
        fresh_src, fresh_lengths = source_tensor([SOURCES[i] for i in order.tolist()])
        tgt_in = torch.cat([prefix[order], next_tokens.unsqueeze(1)], dim=1)
        fresh = model(fresh_src, fresh_lengths, tgt_in)[:, -1]
    torch.testing.assert_close(reordered, fresh, atol=1e-5, rtol=1e-5)


def test_tied_and_shared_embeddings_are_one_parameter() -> None:
    untied = _transformer(tie_embeddings=False)
    tied = _transformer(tie_embeddings=True)
    shared = _transformer(tie_embeddings=True, share_embeddings=True)
    assert tied.decoder.W_o.weight is tied.decoder.embedding.weight
    assert untied.decoder.W_o.weight is not untied.decoder.embedding.weight
    assert shared.encoder.embedding is shared.decoder.embedding
    matrix = VOCAB_SIZE * TINY["emb_dim"]
    assert count_parameters(untied) - count_parameters(tied) == matrix
    assert count_parameters(tied) - count_parameters(shared) == matrix


def test_shared_embeddings_need_equal_vocabularies() -> None:
    config = ModelConfig(**{**TINY, "arch": "transformer", "share_embeddings": True})
    with pytest.raises(PipelineError, match=r"model\.share_embeddings .* 20 tokens and the target 30"):
        build_model(config, 20, 30)


def test_parameter_count_grows_with_feed_forward_width_and_depth() -> None:
    counts = [
        count_parameters(_transformer(n_layers=n_layers, ff_dim=ff_dim))
        for n_layers, ff_dim in ((1, 32), (1, 64), (2, 64))
    ]
    assert counts[0] < counts[1] < counts[2]


def test_bf16_autocast_keeps_the_cache_in_the_projections_dtype() -> None:
    """Training autocasts to bf16 (on GPU): appending a step to the cache must not mix dtypes."""
    model = random_model("transformer")
    src, lengths = source_tensor(SOURCES)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        memory, cache = model.encode(src, lengths)
        logits, cache = model.decode_step(torch.full((3,), BOS_ID), cache, memory)
        logits, cache = model.decode_step(logits.argmax(-1), cache, memory)
        teacher_forced = model(src, lengths, _target_in(TARGETS, 7))
    assert cache.keys.dtype == memory.keys.dtype == torch.bfloat16
    assert teacher_forced.shape == (3, 7, VOCAB_SIZE)
