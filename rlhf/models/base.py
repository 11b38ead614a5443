"""Building the bundled default model: tokenizer → pre-training → supervised fine-tuning.

Everything comes from the shipped corpus (``rlhf.models.corpus``); nothing is downloaded. The
result is a plain Hugging Face Llama folder (safetensors + tokenizer with a chat template),
loadable by ``AutoModelForCausalLM`` / ``AutoTokenizer``. The package ships the folder this
builds, so the demo does not pay for the build; ``rlhf base build`` remakes it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass


from rlhf.config import config_to_dict, opt
from rlhf.models.architecture import ModelShape, new_causal_lm
from rlhf.utils.io import atomic_write_json, publish_dir, staging_dir
from rlhf.utils.metrics import peak_rss_mb
from rlhf.utils.seed import seed_everything


@dataclass
class BaseBuildConfig:
    """Build the bundled tiny instruction model from the shipped corpus."""

    out: str = opt(help="Folder to write the model to (replaced atomically when the build finishes).")
    vocab_size: int = opt(2048, help="BPE vocabulary size.")
    hidden_size: int = opt(192, help="Model width.")
    num_layers: int = opt(4, help="Transformer blocks.")
    num_heads: int = opt(4, help="Attention heads.")
    intermediate_size: int = opt(512, help="MLP width.")
    pretrain_documents: int = opt(6000, help="Plain-text documents for the language-modelling stage.")
    pretrain_epochs: float = opt(1.0, help="Passes over the pre-training documents.")
    sft_examples: int = opt(9000, help="Prompt/reply examples for the instruction stage.")
    sft_epochs: float = opt(2.0, help="Passes over the instruction examples.")
    batch_size: int = opt(32, help="Sequences per optimizer step.")
    lr: float = opt(2e-3, help="Peak learning rate for both stages.")
    seed: int = opt(0, help="Seed for the corpus sample, initialisation and data order.")
    device: str = opt("auto", help="cpu, cuda, or auto.")


def build_base_model(cfg: BaseBuildConfig) -> dict:
    from rlhf.models.corpus import pretraining_documents, sft_examples
    from rlhf.models.loading import disable_dropout, format_prompt, pick_device
    from rlhf.models.tokenizer import train_tokenizer
    from rlhf.train.sft import SFTConfig, encode_example, train_causal_lm

    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    docs = pretraining_documents(cfg.pretrain_documents, seed=cfg.seed + 1)
    examples = sft_examples(cfg.sft_examples, seed=cfg.seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    chat_texts = [f"{e.prompt}\n{e.reply}" for e in examples[:3000]]
    tok = train_tokenizer(docs + chat_texts, vocab_size=cfg.vocab_size)
    timings["tokenizer_s"] = time.perf_counter() - t

    shape = ModelShape(cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, max_positions=256)
    model = new_causal_lm(tok, shape, seed=cfg.seed).to(pick_device(cfg.device))
    disable_dropout(model)
    work = staging_dir(cfg.out)
    try:
        stage_cfg = dict(data="<corpus>", out="", batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=30, save_every=0,
                         seed=cfg.seed, resume=False, max_length=128)
        t = time.perf_counter()
        pre = [encode_example(tok, "", d, 128, chat_template=False) for d in docs]
        pre_summary = train_causal_lm(model, tok, pre, SFTConfig(**{**stage_cfg, "out": str(work / "pretrain"), "epochs": cfg.pretrain_epochs,
                                                                      "chat_template": False}), work / "pretrain", desc="pre-training")
        timings["pretrain_s"] = time.perf_counter() - t

        t = time.perf_counter()
        sft = [encode_example(tok, e.prompt, e.reply, 128) for e in examples]
        sft_summary = train_causal_lm(model, tok, sft, SFTConfig(**{**stage_cfg, "out": str(work / "sft"), "epochs": cfg.sft_epochs,
                                                                     "lr": cfg.lr / 2}), work / "sft", desc="instruction tuning")
        timings["sft_s"] = time.perf_counter() - t

        shutil.rmtree(work / "pretrain")
        shutil.rmtree(work / "sft")
        model.eval()
        model.save_pretrained(str(work), safe_serialization=True)
        tok.padding_side = "left"
        tok.save_pretrained(str(work))
        n_params = sum(p.numel() for p in model.parameters())
        summary = {
            "parameters": n_params, "pretrain": pre_summary, "sft": sft_summary,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "total_s": round(time.perf_counter() - t_start, 1), "peak_rss_mb": round(peak_rss_mb()),
            "example_prompt": format_prompt(tok, examples[0].prompt), "config": config_to_dict(cfg),
        }
        atomic_write_json(work / "build.json", summary)
        publish_dir(work, cfg.out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


def describe(summary: dict) -> str:
    return json.dumps({k: summary[k] for k in ("parameters", "timings_s", "total_s", "peak_rss_mb")})


__all__ = ["BaseBuildConfig", "build_base_model", "describe"]
