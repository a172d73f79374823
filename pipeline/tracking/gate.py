"""The champion gate: whether a new version takes the `champion` alias. A pure function of the candidate's
and the champion's test BLEU (no MLflow), so the rule is read and tested on its own.

The rule: the first version becomes champion; after that a candidate takes the alias only when its test
BLEU beats the champion's, on the same test sentences, by at least `register.min_improvement` BLEU
points. A tie keeps the incumbent. The BLEU compared is the cased one, unless either model writes
lowercase only (`preprocess.lowercase`): then both are compared lowercased (`bleu_lc`), since a model
cannot be asked for case it never produces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


def gate_metric(candidate_lowercases: bool, champion_lowercases: bool) -> str:
    """`bleu_lc` when either model's output is lowercase, else `bleu`."""
    return "bleu_lc" if candidate_lowercases or champion_lowercases else "bleu"


@dataclass(frozen=True)
class ChampionScore:
    version: str
    bleu: float  # on the candidate's test split, in `metric`
    rescored: bool  # scored again here because it was first scored on other test sentences
    metric: str = "bleu"  # bleu | bleu_lc (see gate_metric)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    champion_version: str | None = None  # the incumbent the candidate was compared with
    champion_bleu: float | None = None
    rescored: bool = False
    metric: str = "bleu"  # what was compared: bleu, or bleu_lc (see gate_metric)


def decide(
    candidate_version: str, candidate_bleu: float, champion: ChampionScore | None, min_improvement: float
) -> Decision:
    if champion is None:
        return Decision(True, "first version: there was no champion")
    if champion.version == str(candidate_version):
        return Decision(
            True, "already the champion", champion.version, candidate_bleu, metric=champion.metric
        )
    if champion.rescored:
        # A grown corpus (continued training) changes the test split: the figures the champion was
        # registered with are then on other sentences, and only its re-score here compares.
        logger.warning(
            "the test split changed since champion version %s was scored: its earlier figures are not"
            " comparable with version %s's; the gate compares its re-score on the current split",
            champion.version,
            candidate_version,
        )
    gain = round(candidate_bleu - champion.bleu, 2)
    promote = gain > 0 and gain >= min_improvement
    where = "re-scored on the current test split" if champion.rescored else "on the same test split"
    verdict = "beats" if promote else "does not beat"
    measure = "lowercase BLEU" if champion.metric == "bleu_lc" else "BLEU"
    reason = (
        f"test {measure} {candidate_bleu:.2f} {verdict} champion version {champion.version}'s "
        f"{champion.bleu:.2f} "
        f"({where}) by the required {min_improvement:g} (gain {gain:+.2f})"
    )
    return Decision(promote, reason, champion.version, champion.bleu, champion.rescored, champion.metric)
