"""The champion gate: whether a new version takes the `champion` alias. A pure function of the candidate's
and the champion's test BLEU (no MLflow), so the rule is read and tested on its own.

The rule: the first version becomes champion; after that a candidate takes the alias only when its test
BLEU beats the champion's, on the same test sentences, by at least `register.min_improvement` BLEU
points. A tie keeps the incumbent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChampionScore:
    version: str
    bleu: float  # on the candidate's test split
    rescored: bool  # scored again here because it was first scored on other test sentences


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    champion_version: str | None = None  # the incumbent the candidate was compared with
    champion_bleu: float | None = None
    rescored: bool = False


def decide(
    candidate_version: str, candidate_bleu: float, champion: ChampionScore | None, min_improvement: float
) -> Decision:
    if champion is None:
        return Decision(True, "first version: there was no champion")
    if champion.version == str(candidate_version):
        return Decision(True, "already the champion", champion.version, candidate_bleu)
    gain = round(candidate_bleu - champion.bleu, 2)
    promote = gain > 0 and gain >= min_improvement
    where = "re-scored on the current test split" if champion.rescored else "on the same test split"
    verdict = "beats" if promote else "does not beat"
    reason = (
        f"test BLEU {candidate_bleu:.2f} {verdict} champion version {champion.version}'s {champion.bleu:.2f} "
        f"({where}) by the required {min_improvement:g} (gain {gain:+.2f})"
    )
    return Decision(promote, reason, champion.version, champion.bleu, champion.rescored)
