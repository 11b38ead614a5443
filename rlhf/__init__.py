"""rlhf: Reinforcement Learning from Human Feedback, from human rankings to an aligned model."""

__version__ = "0.1.0"
