"""The champion gate as a pure function: no MLflow store, just candidate and champion BLEU."""

from __future__ import annotations

from pipeline.tracking.gate import ChampionScore, decide


def test_first_version_is_promoted() -> None:
    decision = decide("1", 30.0, None, min_improvement=0.0)
    assert decision.promote and "no champion" in decision.reason and decision.champion_version is None


def test_a_better_candidate_takes_the_alias_and_the_reason_says_by_how_much() -> None:
    decision = decide("2", 31.5, ChampionScore("1", 30.0, rescored=False), min_improvement=0.0)
    assert decision.promote
    assert (decision.champion_version, decision.champion_bleu) == ("1", 30.0)
    assert "beats champion version 1's 30.00" in decision.reason and "gain +1.50" in decision.reason


def test_a_tie_keeps_the_incumbent() -> None:
    assert not decide("2", 30.0, ChampionScore("1", 30.0, rescored=False), 0.0).promote


def test_a_gain_below_min_improvement_is_rejected() -> None:
    decision = decide("2", 30.4, ChampionScore("1", 30.0, rescored=False), min_improvement=0.5)
    assert not decision.promote and "does not beat" in decision.reason and "required 0.5" in decision.reason
    assert decide("3", 30.5, ChampionScore("1", 30.0, rescored=False), min_improvement=0.5).promote


def test_a_worse_candidate_is_rejected() -> None:
    assert not decide("2", 20.0, ChampionScore("1", 30.0, rescored=False), 0.0).promote


def test_a_rescored_champion_is_named_in_the_reason() -> None:
    decision = decide("2", 31.0, ChampionScore("1", 30.0, rescored=True), 0.0)
    assert decision.rescored and "re-scored on the current test split" in decision.reason


def test_the_champion_itself_stays_champion() -> None:
    decision = decide("3", 25.0, ChampionScore("3", 25.0, rescored=False), 0.0)
    assert decision.promote and decision.reason == "already the champion"


def test_the_gate_compares_lowercase_bleu_when_either_model_writes_lowercase() -> None:
    from pipeline.tracking.gate import gate_metric

    assert gate_metric(candidate_lowercases=False, champion_lowercases=False) == "bleu"
    assert gate_metric(candidate_lowercases=True, champion_lowercases=False) == "bleu_lc"
    assert gate_metric(candidate_lowercases=False, champion_lowercases=True) == "bleu_lc"
    decision = decide("2", 31.0, ChampionScore("1", 30.0, rescored=False, metric="bleu_lc"), 0.0)
    assert decision.metric == "bleu_lc" and decision.reason.startswith("test lowercase BLEU 31.00 beats")
