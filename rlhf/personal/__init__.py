"""Personalization: each user's preferences learned from continuous feedback, and a policy that follows them.

* ``records``  — the personal feedback contract (user, prompt, two replies, choice, optional edit,
  model version, time) and the preference pairs it implies;
* ``store``    — chat users, turns and choices in the labeling database (same transactions);
* ``api``      — the chat page ``/chat/<token>`` and its JSON API, a router mounted into the labeling app;
* ``model``    — the personal reward: a shared backbone and generic head plus a low-rank user part,
  versioned user tables and a cache of backbone features;
* ``train``    — joint training with exact resume, and fast per-user updates on cached features;
* ``policy``   — generation that follows a user: best-of-N reranking, or the user's LoRA adapter;
* ``loop``     — refitting user parts as feedback arrives, deploying only versions that are not worse;
* ``users``    — scripted users with conflicting tastes, for experiments over HTTP;
* ``scorer``   — ``personal:DIR:USER`` as a scorer spec, and the ``caution`` lexicon scorer.
"""
