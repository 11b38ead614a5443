"""Benchmark: decoding speed of ``sample_tokens`` (our static-cache loop) against transformers'
``model.generate`` with its KV cache, on the same prompts, same sampling settings, same lengths.

    .venv/bin/python benchmarks/bench_generate.py                        # bundled model, batch 16
    .venv/bin/python benchmarks/bench_generate.py --batch-sizes 1 16 64 --repeats 7
    .venv/bin/python benchmarks/bench_generate.py --build-30m            # a ~30M Llama built from a config
    .venv/bin/python benchmarks/bench_generate.py --model DIR --compile  # any local HF causal LM

Both sides go through ``rlhf.rollout.generate.sample_tokens`` (tokenising, masks included); the
"hf" variants force its ``model.generate`` fallback. EOS is made unreachable (an id past the
vocabulary) so every variant decodes exactly --new-tokens steps. Variants run alternately, round
after round, and the table shows medians: the machine is shared, so single runs are noise.
ms/step = wall time of one call / new tokens (prefill included); cpu ms/step uses process CPU time,
which is steadier when other jobs compete for the cores. The floor is the time to read every
weight once per step at the bandwidth a large read (a sum over 256 MiB) reaches here; the copy
bandwidth (read + write bytes counted) is printed beside it.
Writes benchmarks/results/bench_generate.json (one entry per model; a rerun replaces its entry).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

PROMPTS = ["my house is too hot", "how do I cook rice", "I feel tired all the time", "what should I read next",
           "my dog barks at night, what can I do", "help me plan a cheap holiday", "how do I fix a flat tyre",
           "I am bored"]


class FixedLengthTokenizer:
    """The real tokenizer with an unreachable EOS id, so nothing stops before --new-tokens (and no
    special tokens, so sampling finds no chat-template end of turn to stop at either)."""

    all_special_ids: list = []
    added_tokens_decoder: dict = {}

    def __init__(self, tok, eos_id: int):
        self._tok, self.eos_token_id = tok, eos_id

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def decode_bench_setup(model: str, threads: int):
    """What the decode benchmarks share: torch's thread count, ``--cpu-gemm auto`` (as every command runs),
    and (tokenizer, model in eval mode)."""
    import torch

    from rlhf.models import cpu_gemm
    from rlhf.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

    torch.set_num_threads(threads)
    cpu_gemm.configure("auto")
    path = resolve_model_path(model)
    return load_tokenizer(path), load_causal_lm(path).eval()


def encode_prompts(tok, batch: int):
    """``batch`` of ``PROMPTS`` (cycled) through the chat template, left-padded, as input_ids/attention_mask."""
    from rlhf.models.loading import format_prompt

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    return tok([format_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False,
               padding_side="left")


def measure_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """GB/s of a large fp32 copy (read + write counted), median of several."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def measure_read_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """GB/s of reading a large fp32 tensor once (a sum: one add per 4 bytes, so memory-bound), at
    torch's thread count, median of several. Reading is what a decode step does with its weights."""
    src = torch.randn(mib * 2**20 // 4)
    src.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t)
    return src.numel() * 4 / statistics.median(times) / 1e9


def measure_matmul_gflops(batch: int, width: int, threads: int = 1, repeats: int = 200) -> float:
    """fp32 GFLOP/s of one [batch, width] x [width, 4*width] product: the shape of a decode step's MLP."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x, w = torch.randn(batch, width), torch.randn(4 * width, width)
    for _ in range(20):
        torch.nn.functional.linear(x, w)
    t = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, w)
    dt = (time.perf_counter() - t) / repeats
    torch.set_num_threads(before)
    return 2 * batch * width * 4 * width / dt / 1e9


def build_30m(out: Path) -> Path:
    """A ~30M-parameter Llama (width 512, 9 layers) with the bundled tokenizer, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.models.loading import load_tokenizer

    tok = load_tokenizer("bundled")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, num_hidden_layers=9, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1408, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled", help="local HF causal LM folder, or 'bundled'")
    ap.add_argument("--build-30m", action="store_true", help="benchmark a ~30M Llama built in a temp folder")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each round runs every variant once")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--compile", action="store_true", help="also time our loop with the compiled step")
    ap.add_argument("--decode-threads", type=int, default=1, help="threads our loop uses (0 = by model size, as --rollout-threads 0)")
    ap.add_argument("--bandwidth", type=float, default=0.0,
                    help="GB/s for the weight-reading floor (0 = measure the read bandwidth at torch's thread count)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "bench_generate.json"))
    args = ap.parse_args()

    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.rollout.backends import FastDecode, HFGenerate
    from rlhf.rollout.decode import DecodeSettings, decode_threads
    from rlhf.rollout.generate import SamplingParams, sample_tokens

    tmp = tempfile.TemporaryDirectory() if args.build_30m else None
    model_name = str(build_30m(Path(tmp.name))) if tmp else args.model
    tok, model = load_tokenizer(model_name), load_causal_lm(model_name).eval()
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fixed = FixedLengthTokenizer(tok, model.config.vocab_size)  # never sampled: every row runs to the end
    params = SamplingParams(args.new_tokens, args.temperature, args.top_p, args.top_k)
    default_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    copy_bandwidth = measure_bandwidth()
    bandwidth = args.bandwidth or measure_read_bandwidth()
    width = model.config.hidden_size

    def run_hf(prompts, threads):
        torch.set_num_threads(threads)
        try:
            return sample_tokens(model, fixed, prompts, params, backend=HFGenerate())  # --rollout hf
        finally:
            torch.set_num_threads(default_threads)

    def run_ours(prompts, compiled):  # --rollout fast [--compile] --rollout-threads N
        backend = FastDecode(DecodeSettings(compile=compiled, threads=args.decode_threads))
        return sample_tokens(model, fixed, prompts, params, backend=backend)

    variants = {f"hf_generate ({default_threads} threads)": lambda p: run_hf(p, default_threads)}
    if default_threads != 1:
        variants["hf_generate (1 thread)"] = lambda p: run_hf(p, 1)
    ours_threads = decode_threads(model, DecodeSettings(threads=args.decode_threads))  # 0: by model size
    variants[f"sample_tokens ({ours_threads} thread{'s' if ours_threads > 1 else ''})"] = lambda p: run_ours(p, False)
    if args.compile:
        variants[f"sample_tokens compiled ({ours_threads} thread{'s' if ours_threads > 1 else ''})"] = \
            lambda p: run_ours(p, True)

    results = []
    for batch in args.batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        warmup = {}
        for name, fn in variants.items():  # first call: allocation, and for compiled variants compilation
            torch.manual_seed(0)
            t = time.perf_counter()
            out = fn(prompts)
            warmup[name] = time.perf_counter() - t
            assert out.response_ids.shape == (batch, args.new_tokens), out.response_ids.shape
        wall = {name: [] for name in variants}
        cpu = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                torch.manual_seed(1)
                t, c = time.perf_counter(), time.process_time()
                fn(prompts)
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        floor_ms = param_bytes / (bandwidth * 1e9) * 1e3
        gflops = measure_matmul_gflops(batch, width, threads=1)
        compute_ms = 2 * n_params * batch / (gflops * 1e9) * 1e3
        base = next(iter(variants))
        base_ms = statistics.median(wall[base]) / args.new_tokens * 1e3
        for name in variants:
            ms = statistics.median(wall[name]) / args.new_tokens * 1e3
            results.append({
                "variant": name, "batch": batch, "new_tokens": args.new_tokens,
                "ms_per_step": round(ms, 3),
                "cpu_ms_per_step": round(statistics.median(cpu[name]) / args.new_tokens * 1e3, 3),
                "tokens_per_s": round(batch * args.new_tokens / statistics.median(wall[name]), 1),
                "speedup_vs_hf": round(base_ms / ms, 2), "x_floor": round(ms / floor_ms, 2),
                "first_call_s": round(warmup[name], 2),
                "wall_s_runs": [round(x, 4) for x in wall[name]],
            })
        results.append({"variant": "floor: read weights once", "batch": batch, "ms_per_step": round(floor_ms, 3)})
        results.append({"variant": "floor: 1-thread matmul FLOPs", "batch": batch, "ms_per_step": round(compute_ms, 3),
                        "gflops_1thread": round(gflops, 1)})

    header = f"{'variant':<40} {'batch':>5} {'ms/step':>8} {'cpu ms':>7} {'tok/s':>8} {'vs hf':>6} {'x floor':>7} {'1st call s':>10}"
    label = "llama-30m (built from a config, random weights)" if tmp else model_name
    print(f"\nmodel {label}: {n_params / 1e6:.2f}M params, {param_bytes / 2**20:.1f} MiB fp32; "
          f"read bandwidth {bandwidth:.1f} GB/s (copy {copy_bandwidth:.1f}, read + write counted); {args.new_tokens} new tokens, medians of {args.repeats} alternating rounds; "
          f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(header)
    for r in results:
        if "tokens_per_s" in r:
            print(f"{r['variant']:<40} {r['batch']:>5} {r['ms_per_step']:>8.2f} {r['cpu_ms_per_step']:>7.2f} "
                  f"{r['tokens_per_s']:>8.0f} {r['speedup_vs_hf']:>5.2f}x {r['x_floor']:>7.2f} {r['first_call_s']:>10.2f}")
        else:
            print(f"{r['variant']:<40} {r['batch']:>5} {r['ms_per_step']:>8.3f}")

    out = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "processor": _cpu_name(), "torch": torch.__version__,
                    "torch_threads": default_threads, "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "model": label,
        "parameters": n_params, "param_bytes": param_bytes, "bandwidth_gb_s": round(bandwidth, 2),
        "bandwidth_measure": "given" if args.bandwidth else "read (sum of 256 MiB)",
        "copy_bandwidth_gb_s": round(copy_bandwidth, 2),
        "sampling": {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k},
        "results": results,
    }
    # One file for every model benchmarked: this run replaces the previous run of the same model.
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    runs[label] = out
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(f"wrote {path}")
    if tmp:
        tmp.cleanup()
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
