"""Scorers behind one interface: learned reward models, classifier logits, lexicons, rules."""

from rlhf.judges.base import SCORER_KINDS, LengthScorer, RepetitionScorer, Scorer, load_scorer, score_checked

__all__ = ["SCORER_KINDS", "LengthScorer", "RepetitionScorer", "Scorer", "load_scorer", "score_checked"]
