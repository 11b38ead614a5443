"""Agents that reason and act: the ReAct protocol, tools, multi-turn episodes, and RL over them.

protocol.py (what a turn says) · tools.py (search, calculator, user functions) · episode.py (the
record: every token with its author) · runner.py (running episodes) · rewards.py · kb.py (the
shipped knowledge base) · train.py (RL over episodes) · evaluate.py · commands.py (``rlhf agent``).
"""
