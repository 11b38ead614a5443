"""The ``rlhf`` command: one verb per pipeline stage.

Verbs are imported only when run, so ``rlhf --help`` stays fast and a verb's heavy imports (torch,
transformers, FastAPI) load only for that verb. Each verb lives beside its stage; this file only
lists them.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from rlhf.errors import RLHFError

# verb -> (module, attribute, one-line help). A verb is offered only once its module exists.
VERBS: dict[str, tuple[str, str, str]] = {
    "data": ("rlhf.data.commands", "data", "Data contracts: validate files, turn rankings into pairs."),
    "base": ("rlhf.models.commands", "base", "The bundled tiny instruction model: build it from the shipped corpus."),
    "model": ("rlhf.models.commands", "model", "Named models (bundled, smollm2): list them, write them as HF folders."),
    "sft": ("rlhf.train.sft", "sft_command", "Supervised fine-tuning on prompt/completion data (loss on replies)."),
    "generate": ("rlhf.rollout.commands", "generate", "Sample K completions per prompt into a completions file."),
    "reward": ("rlhf.train.reward_commands", "reward", "Reward models: train from pairs, evaluate, score."),
    "ppo": ("rlhf.train.ppo_commands", "ppo", "PPO with a per-token KL penalty against the frozen reference."),
    "dpo": ("rlhf.train.dpo", "dpo_command", "DPO or IPO: train a policy straight from preference pairs."),
    "grpo": ("rlhf.train.grpo", "grpo_command", "GRPO or RLOO: critic-free online RL, G replies per prompt."),
    "label": ("rlhf.feedback.commands", "label", "The labeling web app: campaigns, labelers, export, simulate."),
    "eval": ("rlhf.eval.commands", "eval_command", "Judge models with independent scorers; before/after tables."),
    "demo": ("rlhf.demo", "demo", "The whole loop on the bundled defaults, in one command."),
    "index": ("rlhf.retrieval.commands", "index", "Document indexes: build, add, search (BM25 + dense MiniLM, hybrid)."),
    "agent": ("rlhf.agents.commands", "agent", "ReAct agents with tools: run episodes, train them with RL, evaluate."),
    "personal": ("rlhf.personal.commands", "personal", "Personalization: chat feedback, per-user rewards, reranking, adapters, the loop."),
    "cai": ("rlhf.cai.commands", "cai", "Constitutional AI: critique and revise, AI feedback under a constitution, calibration."),
    "serve": ("rlhf.serve.server", "serve_command", "Serve a model over an OpenAI-compatible HTTP API (/v1/completions, chat)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [v for v, (mod, _, _) in VERBS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in VERBS or name not in self.list_commands(ctx):
            return None
        mod, attr, _ = VERBS[name]
        cmd = getattr(importlib.import_module(mod), attr)
        cmd.name = name
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(v, VERBS[v][2]) for v in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="rlhf")
def app() -> None:
    """rlhf: Reinforcement Learning from Human Feedback, the whole loop.

    prompts → K completions → human (or scripted) rankings → pairs → reward model → PPO with KL →
    independent judges and a report.
    """


def main(argv: list[str] | None = None) -> None:
    try:
        app.main(args=argv, prog_name="rlhf", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except RLHFError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
