"""RL over episodes: the observation mask in the math and in the trainer, and a tiny run whose exact
match rises."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf.agents.episode import ChatRenderer, Episode
from rlhf.agents.rewards import EpisodeReward, RewardConfig
from rlhf.agents.runner import AgentConfig, EpisodeRunner, Task, agent_prompt
from rlhf.agents.tools import ToolRegistry, tool_from_function
from rlhf.agents.train import EpisodePPOConfig, EpisodeTrainer, episode_stats
from rlhf.algos import gae, kl_shaped_rewards, multi_turn_advantages, pack_by_mask, unpack_by_mask
from rlhf.engine.config import EngineConfig


# --- the math ----------------------------------------------------------------------------------

def test_pack_and_unpack_by_mask_by_hand_and_round_trip():
    x = torch.arange(12.0).view(2, 6)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 1, 1]])
    packed, pmask = pack_by_mask(x, mask)
    assert packed.tolist() == [[0, 1, 4, 0], [7, 9, 10, 11]] and pmask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert torch.equal(unpack_by_mask(packed, mask), x * mask)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # against a plain loop
        m = (torch.rand(3, 9, generator=g) < 0.5).long()
        v = torch.randn(3, 9, generator=g)
        p, pm = pack_by_mask(v, m)
        for row in range(3):
            kept = [float(v[row, t]) for t in range(9) if m[row, t]]
            assert p[row, :len(kept)].tolist() == pytest.approx(kept) and int(pm[row].sum()) == len(kept)
        assert torch.equal(unpack_by_mask(p, m), v * m)


def test_multi_turn_advantages_by_hand():
    # Two policy tokens around one observation token; no KL, no values, λ = γ = 1: every policy
    # token's advantage is the episode's score, the observation's is 0.
    rewards, adv, ret = multi_turn_advantages(torch.tensor([2.0]), torch.zeros(1, 3), torch.zeros(1, 3),
                                              torch.tensor([[1, 0, 1]]), beta=0.1, gamma=1.0, lam=1.0)
    assert rewards.tolist() == [[0.0, 0.0, 2.0]] and adv.tolist() == [[2.0, 0.0, 2.0]] and ret.tolist() == [[2.0, 0.0, 2.0]]


def test_observation_tokens_change_no_reward_kl_or_advantage():
    g = torch.Generator().manual_seed(1)
    policy_tokens = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])  # contiguous: no observations
    kl, values = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    scores = torch.tensor([1.0, -0.5])
    ref_r = kl_shaped_rewards(scores, kl * policy_tokens, policy_tokens, 0.1)
    ref_a, ref_ret = gae(ref_r, values, policy_tokens, 1.0, 0.9)
    # The same policy tokens with observation tokens inserted between turns, holding garbage.
    layout = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 1, 1, 0, 0, 0]])
    garbage = torch.full((2, 9), float("nan"))
    kl9, v9 = garbage.clone(), garbage.clone()
    for row in range(2):
        pos = layout[row].nonzero().flatten()
        n = int(policy_tokens[row].sum())
        kl9[row, pos] = kl[row, :n]
        v9[row, pos] = values[row, :n]
    r, a, ret = multi_turn_advantages(scores, kl9, v9, layout, beta=0.1, gamma=1.0, lam=0.9)
    for row in range(2):
        pos = layout[row].nonzero().flatten()
        n = int(policy_tokens[row].sum())
        assert torch.allclose(a[row, pos], ref_a[row, :n]) and torch.allclose(r[row, pos], ref_r[row, :n])
        assert torch.allclose(ret[row, pos], ref_ret[row, :n])
    off = layout == 0
    assert (r[off] == 0).all() and (a[off] == 0).all() and (ret[off] == 0).all()  # nan in, exact zeros out


# --- the trainer -------------------------------------------------------------------------------

TRACE = [{"role": "user", "content": "Tools: look[query]\nQuestion: colour of q1?"},
         {"role": "assistant", "content": "Action: look[q1]"},
         {"role": "tool", "content": "Observation: the sky is grey today"},
         {"role": "assistant", "content": "Answer: red"}]


def _trainer(model_dir, **overrides) -> EpisodeTrainer:
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    policy, reference = load_causal_lm(model_dir), load_causal_lm(model_dir)
    cfg = EpisodePPOConfig(**{"batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 2, "ppo_epochs": 1, **overrides})
    return EpisodeTrainer(cfg, policy, reference, tok, runner=None, reward=None, temperature=1.0)


def _episodes(tok, observations: list[str]) -> list[Episode]:
    r = ChatRenderer(tok)
    out = []
    for i, obs in enumerate(observations):
        msgs = [dict(m) for m in TRACE]
        msgs[2]["content"] = obs
        ep = Episode(f"e{i}", "q", msgs, answer="red", final_answer="red")
        ep.segments = r.render(ep)
        out.append(ep)
    return out


def test_episode_batch_scores_policy_tokens_only(tiny_model_dir):
    trainer = _trainer(tiny_model_dir)
    eps = _episodes(trainer.tok, ["Observation: the sky is grey today", "Observation: x", "Observation: a much longer one here"])
    batch = trainer.make_batch(eps, torch.tensor([1.0, 0.0, 1.0]))
    rm = batch.response_mask.bool()
    env = batch.attention.bool() & ~rm
    assert env.any() and rm.any()
    for name in ("logprobs", "ref_logprobs", "values", "kl", "rewards", "advantages", "returns"):
        assert (getattr(batch, name)[~rm] == 0).all(), name  # nothing on observation or padding tokens
    # Wiring: the recorded log-probabilities are the model's, over the whole sequence, at policy tokens.
    for row, ep in enumerate(eps):
        ids, mask = ep.ids_and_mask()
        with torch.no_grad():
            logp = torch.log_softmax(trainer.policy(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        expect = [float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t]]
        got = batch.logprobs[row][batch.response_mask[row].bool()].tolist()
        assert got == pytest.approx(expect, abs=1e-5)


def test_observation_tokens_get_no_gradient_and_only_act_as_context(tiny_model_dir):
    trainer = _trainer(tiny_model_dir)
    eps = _episodes(trainer.tok, ["Observation: the sky is grey today", "Observation: the sky is grey today"])
    batch = trainer.make_batch(eps, torch.tensor([1.0, 0.0]))
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["logits"] = output

    handle = trainer.policy.lm_head.register_forward_hook(keep)
    try:
        trainer.optimizer.zero_grad()
        trainer._micro_step(batch, batch.response_mask.sum())
    finally:
        handle.remove()
    grad = captured["logits"].grad  # [B, kept positions, V]; position j predicts response token j
    width = grad.shape[1] - 1
    rm = batch.response_mask[:, :width].bool()
    assert grad[:, :width][~rm].abs().max() == 0  # observation tokens' own likelihood is never trained
    assert grad[:, :width][rm].abs().max() > 0

    # Garbage in the per-token quantities of observation positions changes nothing.
    env = ~batch.response_mask.bool()
    spoiled = batch.select(torch.arange(2))
    for name in ("logprobs", "values", "advantages", "returns"):
        t = getattr(spoiled, name).clone()
        t[env] = 1e6
        setattr(spoiled, name, t)
    trainer.optimizer.zero_grad()
    clean = trainer._micro_step(batch, batch.response_mask.sum())
    trainer.optimizer.zero_grad()
    dirty = trainer._micro_step(spoiled, spoiled.response_mask.sum())
    assert dirty["policy_loss"] == pytest.approx(clean["policy_loss"]) and dirty["value_loss"] == pytest.approx(clean["value_loss"])

    # Other observation tokens: same mask, same tokens scored; tokens before the observation score
    # the same (causal); later ones may differ, because the observation is their context.
    other = trainer.make_batch(_episodes(trainer.tok, ["Observation: 42 rabbits ate a grey hat"] * 2), torch.tensor([1.0, 0.0]))
    mine = batch.response_ids[batch.response_mask.bool()]
    theirs = other.response_ids[other.response_mask.bool()]
    assert torch.equal(mine, theirs)
    first_turn = int(batch.response_mask[0].nonzero()[:1].item())
    n_first = 0
    while batch.response_mask[0, first_turn + n_first]:
        n_first += 1
    assert torch.allclose(batch.logprobs[0, :first_turn + n_first], other.logprobs[0, :first_turn + n_first])


@pytest.mark.slow
def test_a_tiny_rl_run_over_episodes_raises_exact_match(tiny_model_dir, tmp_path):
    """SFT teaches the format with random answers (exact match ≈ chance); PPO over episodes, with a
    tool call and an uninformative observation between the question and the answer, then learns
    the answer the reward asks for. (Measured: exact match 0.13 → 0.8–0.9 in 20 steps.)"""
    from rlhf.agents.episode import write_episodes
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.train.sft import SFTConfig, load_sft_data, train_causal_lm

    torch.manual_seed(0)
    colours = ["red", "blue", "green", "gold"]

    def look(query: str) -> str:
        """Look something up (returns nothing useful)."""
        return "the sky is grey today"

    tools = ToolRegistry()
    tools.register(tool_from_function(look))
    rng = random.Random(0)
    traces = []
    for n in range(64):
        q = f"q{n % 4}"
        msgs = [{"role": "user", "content": agent_prompt(f"colour of {q}?", tools)},
                {"role": "assistant", "content": f"Action: look[{q}]"},
                {"role": "tool", "content": "Observation: the sky is grey today"},
                {"role": "assistant", "content": f"Answer: {rng.choice(colours)}"}]
        traces.append(Episode(f"t{n}", q, msgs))
    write_episodes(tmp_path / "traces.jsonl", traces)
    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, train=True)
    sft = SFTConfig(data=str(tmp_path / "traces.jsonl"), out=str(tmp_path / "sft"), batch_size=16, lr=3e-3, warmup_steps=5,
                    epochs=100, max_steps=200, save_every=0,
                    engine=EngineConfig(device="cpu", threads=1))
    train_causal_lm(model, tok, load_sft_data(sft.data, tok, sft), sft, sft.out, desc="sft")
    model.save_pretrained(str(tmp_path / "warm"))
    tok.save_pretrained(str(tmp_path / "warm"))

    tasks = [Task(f"q{i}", f"colour of q{i}?", "gold") for i in range(4)] * 4
    policy = load_causal_lm(tmp_path / "warm")
    runner = EpisodeRunner(policy, tok, tools, AgentConfig(max_turns=2, max_new_tokens=20, temperature=0.7))
    greedy = EpisodeRunner(policy, tok, tools, AgentConfig(max_turns=2, max_new_tokens=20, temperature=0.0))
    cfg = EpisodePPOConfig(steps=20, batch_size=16, mini_batch_size=8, micro_batch_size=8, ppo_epochs=2, lr=1e-3,
                           init_kl_coef=0.01)
    trainer = EpisodeTrainer(cfg, policy, load_causal_lm(tmp_path / "warm"), tok, runner,
                             EpisodeReward(RewardConfig("exact_match")), temperature=0.7, seed=0)
    before = episode_stats(greedy.run(tasks[:4]))
    assert before["answered"] == 1.0  # SFT taught the format
    em = []
    for _ in range(cfg.steps):
        stats, _ = trainer.step(tasks)
        em.append(stats["exact_match"])
    after = episode_stats(greedy.run(tasks[:4]))
    assert sum(em[-5:]) / 5 > sum(em[:3]) / 3 + 0.2, em
    assert after["exact_match"] > before["exact_match"], (before, after)


def test_an_episode_samples_the_same_whichever_batch_runs_it(tiny_model_dir):
    """Turn seeds are a function of (seed, episode index, turn): running a batch in one call or as
    two shares (as two processes do, with ``first_index``) gives the same sampled episodes, and
    another seed gives others."""
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir)
    tools = ToolRegistry()
    tools.register(tool_from_function(_look))
    runner = EpisodeRunner(model, tok, tools, AgentConfig(max_turns=2, max_new_tokens=12, temperature=1.0, decode_batch_size=3))
    tasks = [Task(f"t{i}", f"colour of q{i}?") for i in range(4)]
    whole = runner.run(tasks, seed=7)
    shares = runner.run(tasks[:2], seed=7) + runner.run(tasks[2:], seed=7, first_index=2)
    ids = [[s.ids for s in e.segments] for e in whole]
    assert ids == [[s.ids for s in e.segments] for e in shares]
    assert ids != [[s.ids for s in e.segments] for e in runner.run(tasks, seed=8)]


def _look(query: str) -> str:
    """Look something up."""
    return "nothing here"
