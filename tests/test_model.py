"""The model's contract: shapes, padding invariance, teacher forcing, and that it can learn at all."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.network.batching import source_tensor
from pipeline.network.model import AttentionMemory, ContextMemory, build_model, count_parameters
from pipeline.network.tokenization import BOS_ID, PAD_ID
from tests.seq2seq_toys import VOCAB_SIZE, greedy_accuracy, random_model, trained_reverser

pytestmark = pytest.mark.usefixtures("one_torch_thread")


GRU_ARCHS = ["gru", "gru_attention"]
ARCHS = [*GRU_ARCHS, "transformer"]


def _target_batch(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    tgt_in = torch.randint(4, VOCAB_SIZE, (batch, length), generator=generator)
    tgt_in[:, 0] = BOS_ID
    return tgt_in


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("arch", GRU_ARCHS)
def test_forward_gives_logits_per_target_position(arch: str, n_layers: int) -> None:
    model = random_model(arch, n_layers=n_layers).train()
    src, lengths = source_tensor([[4, 5, 6], [7, 8, 9, 10, 11, 12], [13]])
    tgt_in = _target_batch(3, 5)
    assert model(src, lengths, tgt_in).shape == (3, 5, VOCAB_SIZE)
    assert model(src, lengths, tgt_in, teacher_forcing=0.5).shape == (3, 5, VOCAB_SIZE)
    memory, state = model.encode(src, lengths)
    assert state.shape == (n_layers, 3, 64)
    assert isinstance(memory, AttentionMemory if arch == "gru_attention" else ContextMemory)
    step_logits, next_state = model.decode_step(tgt_in[:, 0], state, memory)
    assert step_logits.shape == (3, VOCAB_SIZE) and next_state.shape == state.shape


@pytest.mark.parametrize("arch", GRU_ARCHS)
def test_parameter_count_grows_with_hidden_dim(arch: str) -> None:
    counts = [
        count_parameters(build_model(ModelConfig(arch=arch, emb_dim=16, hidden_dim=h), 50, 60))
        for h in (8, 16, 32)
    ]
    assert counts[0] < counts[1] < counts[2]


def test_attention_model_is_bigger_than_the_context_model_of_the_same_sizes() -> None:
    sizes = {"emb_dim": 16, "hidden_dim": 32}
    plain = count_parameters(build_model(ModelConfig(arch="gru", **sizes), 50, 60))
    attention = count_parameters(build_model(ModelConfig(arch="gru_attention", **sizes), 50, 60))
    assert attention > plain


def _padded(sources: list[list[int]], width: int, filler: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.full((len(sources), width), filler, dtype=torch.long)
    for row, source in enumerate(sources):
        src[row, : len(source)] = torch.tensor(source)
    return src, torch.tensor([len(s) for s in sources])


@pytest.mark.parametrize("n_layers", [1, 2])
def test_padding_content_and_length_do_not_change_encoder_attention_or_logits(n_layers: int) -> None:
    model = random_model("gru_attention", n_layers=n_layers)
    sources = [[4, 5, 6, 7, 3], [8, 9, 3], [10, 11, 12, 13, 4, 5, 3]]
    tight = _padded(sources, 7, PAD_ID)
    wide = _padded(sources, 12, 9)  # longer padding, filled with a real token id
    tgt_in = _target_batch(3, 6)
    with torch.inference_mode():
        results = []
        for src, lengths in (tight, wide):
            outputs, _ = model.encoder(src, lengths)
            memory, state = model.encode(src, lengths)
            _, weights = model.decoder.attention(state[-1], memory.keys, memory.values, memory.mask)
            results.append((outputs, weights, model(src, lengths, tgt_in)))
    (out_a, weights_a, logits_a), (out_b, weights_b, logits_b) = results
    for row, source in enumerate(sources):
        n = len(source)
        torch.testing.assert_close(out_a[row, :n], out_b[row, :n], atol=1e-6, rtol=0)
        torch.testing.assert_close(weights_a[row, :n], weights_b[row, :n], atol=1e-6, rtol=0)
        assert torch.all(weights_a[row, n:] == 0) and torch.all(weights_b[row, n:] == 0)
        assert torch.all(out_b[row, n:] == 0)  # padded positions carry nothing
    torch.testing.assert_close(weights_a.sum(-1), torch.ones(3))
    torch.testing.assert_close(logits_a, logits_b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_context_is_the_state_after_the_last_real_token_not_after_padding(arch: str) -> None:
    model = random_model(arch, n_layers=2)
    source = [4, 5, 6, 3]
    alone = torch.tensor([source]), torch.tensor([4])
    padded = _padded([source], 9, 11)
    tgt_in = _target_batch(1, 4)
    with torch.inference_mode():
        torch.testing.assert_close(model(*alone, tgt_in), model(*padded, tgt_in), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forced_pass_equals_step_by_step_decoding(arch: str) -> None:
    """The one-call fast path is the same computation as feeding the reference one step at a time."""
    model = random_model(arch, n_layers=2)
    src, lengths = source_tensor([[4, 5, 6], [7, 8, 9, 10, 11]])
    tgt_in = _target_batch(2, 6)
    with torch.inference_mode():
        whole = model(src, lengths, tgt_in)
        memory, state = model.encode(src, lengths)
        steps = []
        for t in range(tgt_in.size(1)):
            logits, state = model.decode_step(tgt_in[:, t], state, memory)
            steps.append(logits)
    torch.testing.assert_close(whole, torch.stack(steps, dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_teacher_forcing_feeds_back_the_models_own_argmax(arch: str) -> None:
    model = random_model(arch)
    src, lengths = source_tensor([[4, 5, 6], [7, 8, 9, 10, 11]])
    tgt_in = _target_batch(2, 5)
    with torch.inference_mode():
        free_running = model(src, lengths, tgt_in, teacher_forcing=0.0)
        memory, state = model.encode(src, lengths)
        tokens, steps = tgt_in[:, 0], []
        for _ in range(tgt_in.size(1)):
            logits, state = model.decode_step(tokens, state, memory)
            steps.append(logits)
            tokens = logits.argmax(-1)
    torch.testing.assert_close(free_running, torch.stack(steps, dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gru_attention", "transformer"])
def test_scheduled_sampling_is_repeatable_with_a_generator(arch: str) -> None:
    model = random_model(arch)
    src, lengths = source_tensor([[4, 5, 6], [7, 8, 9, 10, 11]] * 4)
    tgt_in = _target_batch(8, 7)
    with torch.inference_mode():
        first = model(src, lengths, tgt_in, 0.5, torch.Generator().manual_seed(3))
        again = model(src, lengths, tgt_in, 0.5, torch.Generator().manual_seed(3))
        forced = model(src, lengths, tgt_in)
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first[:, 0], forced[:, 0])  # step 1 always reads <s>
    assert not torch.allclose(first, forced)  # later steps saw some of the model's own tokens


@pytest.mark.parametrize("arch", ["gru_attention", "transformer"])
def test_dropout_acts_in_training_mode_only(arch: str) -> None:
    model = build_model(ModelConfig(arch=arch, emb_dim=16, hidden_dim=16, n_layers=2, dropout=0.5), 20, 20)
    src, lengths = source_tensor([[4, 5, 6, 7]])
    tgt_in = _target_batch(1, 4)
    model.train()
    assert not torch.equal(model(src, lengths, tgt_in), model(src, lengths, tgt_in))
    model.eval()
    assert torch.equal(model(src, lengths, tgt_in), model(src, lengths, tgt_in))


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_memorises_toy_reversal_pairs_quickly(arch: str) -> None:
    toy = trained_reverser(arch)
    assert greedy_accuracy(toy.model, toy.sources, toy.targets) == 1.0
    assert toy.steps <= 600
    assert toy.seconds < 20, f"{arch}: {toy.steps} steps took {toy.seconds:.1f} s"


# A value for each setting that differs from ModelConfig's default and keeps every arch buildable.
OTHER_SETTINGS = {
    "emb_dim": 24,
    "hidden_dim": 40,
    "n_layers": 2,
    "dropout": 0.3,
    "n_heads": 2,
    "ff_dim": 48,
    "ff_activation": "gelu",
    "tie_embeddings": False,
    "share_embeddings": True,
}


def _training_logits(config: ModelConfig) -> torch.Tensor:
    """The network's output in training mode (dropout on) from fixed seeds: equal iff the config built the
    same network that computes the same thing."""
    torch.manual_seed(0)
    model = build_model(config, VOCAB_SIZE, VOCAB_SIZE).train()
    src, lengths = source_tensor([[4, 5, 6], [7, 8, 9, 10, 11]])
    torch.manual_seed(1)
    return model(src, lengths, _target_batch(2, 4))


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_settings_name_exactly_what_build_model_reads(arch: str) -> None:
    """The table the registry's tags are filtered with: a setting outside it leaves the network as it was,
    and each one in it changes what the network computes."""
    from pipeline.network.model import ARCH_SETTINGS, settings_in_use

    base = ModelConfig(arch=arch, emb_dim=16, hidden_dim=32, n_heads=4, ff_dim=32)
    reference = _training_logits(base)
    for key, value in OTHER_SETTINGS.items():
        changed = _training_logits(base.model_copy(update={key: value}))
        assert torch.equal(changed, reference) == (key not in ARCH_SETTINGS[arch]), (arch, key)
    assert set(ModelConfig.model_fields) == set().union(*ARCH_SETTINGS.values())
    assert set(settings_in_use(base.model_dump())) == set(ARCH_SETTINGS[arch])
    assert settings_in_use({"arch": "future", "width": 3}) == {"arch": "future", "width": 3}
