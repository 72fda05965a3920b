"""Benchmark: multi-turn rollout throughput (docs/benchmarks.md, the rollout row).

Generated tokens per second of three ways to produce the same number of tokens with the same model
and batch, in one run:

1. ``RolloutEngine`` with KV-cache reuse (observations appended to the running cache);
2. the same engine with ``kv_cache=False``: every turn re-encodes each rollout's whole context
   (prompt + earlier turns + observations) and then decodes the turn with a fresh cache;
3. plain single-turn ``model.generate`` of as many new tokens per row, no observations.

The model is a random-weight Llama of the chosen preset whose logits get a fixed bias toward a
token chain (``<think> w1 .. wk </think><search> q1 q2 q3 </search>``), so every turn is exactly
``--turn-tokens`` tokens and ends in a search; a real BM25 retriever answers with ``--topk``
documents cut to ``--obs-tokens`` tokens. ``--max-turns 3`` searching turns plus the forced final
turn make 4 turns. All three runs sample at temperature 1 with one seeded generator each; each
method is timed `--repeats` times, interleaved, and the median is reported.

    python benchmarks/rollout.py                 # CPU, "tiny" preset (~7M parameters)
    python benchmarks/rollout.py --device cuda --dtype bfloat16 --preset qwen2.5-0.5b-shape \\
        --batch 64 --turn-tokens 256 --obs-tokens 500 --out docs/bench/rollout-gpu
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from tspo.data.corpus import CorpusDoc
from tspo.data.qa import QAExample
from tspo.models.tiny import MODEL_PRESETS, build_tiny_model, count_parameters, train_tokenizer
from tspo.protocol import PROTOCOL_TAGS, build_prompt, wrap_information
from tspo.retrieval.bm25 import BM25Retriever
from tspo.rollout import RolloutConfig, RolloutEngine
from tspo.utils import atomic_write_text, machine_info, peak_memory_mb, write_json

TARGET_VS_REENCODE = 1.5
TARGET_VS_GENERATE = 0.8
WORDS = (
    "river mountain city empire novel painter composer island treaty battle war king queen "
    "capital language science planet comet ocean desert forest bridge tower castle church"
).split()


class ChainLlama(LlamaForCausalLM):
    """A Llama whose logits get ``strength`` added on ``next_token[current input token]``.

    A sparse bigram script: cheap at any vocabulary size, and the network still runs in full.
    """

    def __init__(self, config, next_token: torch.Tensor, strength: float = 50.0):
        super().__init__(config)
        self.register_buffer("next_token", next_token, persistent=False)
        self.strength = strength

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        targets = self.next_token[input_ids[:, -out.logits.shape[1] :]]
        out.logits = out.logits.scatter_add(
            -1, targets[..., None], torch.full_like(out.logits[..., :1], self.strength)
        )
        return out


def synthetic_corpus(count: int, seed: int) -> list[CorpusDoc]:
    generator = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(count):
        picks = torch.randint(len(WORDS), (80,), generator=generator).tolist()
        docs.append(CorpusDoc(str(i), f"Entity {i}", " ".join(WORDS[j] for j in picks) + "."))
    return docs


def build_model(args, tokenizer) -> ChainLlama:
    """The preset's random network plus a chain bias making each turn ``turn_tokens`` long."""
    vocab = max(args.vocab_size, len(tokenizer), MODEL_PRESETS[args.preset].get("vocab_size", 0))
    base = build_tiny_model(tokenizer, args.preset, seed=args.seed, vocab_size=vocab)
    word_ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in WORDS]
    word_ids = list(dict.fromkeys(ids[0] for ids in word_ids if len(ids) == 1))
    tag = {t: tokenizer.convert_tokens_to_ids(t) for t in PROTOCOL_TAGS}
    starts = {  # the last token of the prompt and of an observation both start a turn
        tokenizer.encode(build_prompt("q"), add_special_tokens=False)[-1],
        tokenizer.encode(wrap_information("x"), add_special_tokens=False)[-1],
    }
    thinking = args.turn_tokens - 7
    # Filler tokens: plain letters only, so no stop string can form by accident.
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    pool = [i for i, p in enumerate(pieces) if p.strip().isalpha() and p.strip().isascii()]
    pool = [i for i in pool if i not in starts and i not in tag.values() and i not in word_ids]
    if thinking < 1 or thinking > len(pool) or len(word_ids) < 3:
        raise SystemExit(f"--turn-tokens must be in [8, {len(pool) + 7}]")
    chain = [tag["<think>"], *pool[:thinking], tag["</think>"], tag["<search>"], *word_ids[:3]]
    chain.append(tag["</search>"])
    next_token = torch.full((base.config.vocab_size,), chain[0], dtype=torch.long)
    for current, following in zip(chain, chain[1:], strict=False):
        next_token[current] = following
    model = ChainLlama(base.config, next_token)
    model.load_state_dict(base.state_dict())
    return model


def tokens_read(batch, reencode: bool) -> int:
    """Tokens the model reads in a rollout: every prompt, observation and generated token once,
    plus, when re-encoding, each turn's whole context again (turns after the first)."""
    total = int(batch.attention_mask.sum())
    if reencode:
        prompt_lengths = batch.prompt_mask.sum(dim=1)
        for row in range(len(batch)):
            turn_ids = batch.turn_ids[row]
            for turn in range(1, int(turn_ids.max()) + 1):
                start = int((turn_ids == turn).nonzero()[0])
                total += int(prompt_lengths[row]) + start
    return total


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return result, seconds, cpu, peak


def run(args) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    docs = synthetic_corpus(200, args.seed)
    questions = [f"Which {WORDS[i % len(WORDS)]} is named after entity {i}?" for i in range(64)]
    tokenizer = train_tokenizer(
        [build_prompt(q) for q in questions] + [wrap_information(d.text) for d in docs],
        vocab_size=4096,
    )
    dtype = getattr(torch, args.dtype)
    model = build_model(args, tokenizer).to(device=args.device, dtype=dtype).eval()
    retriever = BM25Retriever.from_docs(docs)
    examples = [
        QAExample(str(i), questions[i % len(questions)], ["entity"])
        for i in range(args.batch // args.group_size)
    ]
    rows = len(examples) * args.group_size

    def engine(kv_cache: bool) -> RolloutEngine:
        config = RolloutConfig(
            max_turns=args.max_turns,
            max_turn_tokens=args.turn_tokens,
            max_obs_tokens=args.obs_tokens,
            topk=args.topk,
            kv_cache=kv_cache,
        )
        return RolloutEngine(model, tokenizer, retriever, config)

    def rollout(kv_cache: bool, examples=examples):
        generator = torch.Generator().manual_seed(args.seed)
        return engine(kv_cache).generate(examples, args.group_size, generator=generator)

    def precision():
        """bf16 autocast around every method with ``--autocast`` (as ``tspo train`` rolls out with
        ``train.bf16``), else nothing."""
        if args.autocast:
            return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    with precision():
        rollout(True, examples[:1])  # warm-up: kernels, allocator, stop-string table
        batch = rollout(True)
        reference = rollout(False)
    new_tokens = int(batch.loss_mask.sum()) // rows
    prompt = batch.prompt_ids.to(args.device)
    prompt_mask = batch.prompt_mask.to(args.device)

    def single_turn():
        torch.manual_seed(args.seed)
        with torch.no_grad():
            return model.generate(
                input_ids=prompt,
                attention_mask=prompt_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
            )

    methods = {
        "kv_reuse": (lambda: rollout(True), lambda out: int(out.loss_mask.sum())),
        "reencode": (lambda: rollout(False), lambda out: int(out.loss_mask.sum())),
        "single_turn_generate": (single_turn, lambda out: (out.shape[1] - prompt.shape[1]) * rows),
    }
    # Interleaved repeats, so a change in the shared machine's load hits every method alike.
    results = {
        name: {"seconds_each": [], "cpu_seconds_each": [], "peak_cuda_mb": None} for name in methods
    }
    for _ in range(args.repeats):
        for name, (fn, count) in methods.items():
            with precision():
                output, seconds, cpu, peak = timed(fn, args.device)
            entry = results[name]
            entry["seconds_each"].append(seconds)
            entry["cpu_seconds_each"].append(cpu)
            entry["tokens"] = count(output)
            entry["peak_cuda_mb"] = peak
    for entry in results.values():
        entry["seconds"] = statistics.median(entry["seconds_each"])
        entry["tokens_per_s"] = entry["tokens"] / entry["seconds"]
    same = torch.equal(reference.response_ids, batch.response_ids)
    results["reencode"]["same_tokens_as_kv_reuse"] = bool(same)
    results["kv_reuse"]["tokens_read"] = tokens_read(batch, reencode=False)
    results["reencode"]["tokens_read"] = tokens_read(batch, reencode=True)
    results["single_turn_generate"]["tokens_read"] = int(prompt_mask.sum()) + rows * new_tokens
    context = int(batch.attention_mask.sum(dim=1).float().mean())

    trajectories = batch.trajectories

    def paired_ratio(other: str, clock: str = "seconds_each") -> float:
        """Median over rounds of kv_reuse's throughput over ``other``'s in the same round."""
        kv, ref = results["kv_reuse"], results[other]
        return statistics.median(
            (kv["tokens"] / a) / (ref["tokens"] / b)
            for a, b in zip(kv[clock], ref[clock], strict=True)
        )

    return {
        "benchmark": "rollout",
        "setup": {
            "preset": args.preset,
            "parameters": count_parameters(model),
            "vocab_size": model.config.vocab_size,
            "device": args.device,
            "dtype": args.dtype,
            "bf16_autocast": args.autocast,
            "rows": rows,
            "group_size": args.group_size,
            "max_turns": args.max_turns,
            "turns_per_rollout": sum(t.num_turns for t in trajectories) / rows,
            "searches_per_rollout": sum(t.num_searches for t in trajectories) / rows,
            "turn_tokens": args.turn_tokens,
            "obs_tokens": args.obs_tokens,
            "topk": args.topk,
            "mean_prompt_plus_response_tokens": context,
            "sampling": "temperature 1, top_p 1",
            "repeats": args.repeats,
        },
        "results": results,
        "speedup_vs_reencode": paired_ratio("reencode"),
        "ratio_vs_single_turn_generate": paired_ratio("single_turn_generate"),
        "cpu_speedup_vs_reencode": paired_ratio("reencode", "cpu_seconds_each"),
        "cpu_ratio_vs_single_turn_generate": paired_ratio(
            "single_turn_generate", "cpu_seconds_each"
        ),
        "targets": {
            "vs_reencode": TARGET_VS_REENCODE,
            "vs_single_turn_generate": TARGET_VS_GENERATE,
        },
        "machine": machine_info(),
        "load_average_1min": os.getloadavg()[0],
        "peak_memory_mb": peak_memory_mb(),
    }


def describe_machine(info: dict) -> str:
    parts = [info["platform"], f"{info['cpu_count']} CPUs", f"Python {info['python']}"]
    parts.append(f"torch {info.get('torch')} ({info.get('torch_threads')} CPU threads)")
    if "gpu" in info:
        parts.append(f"GPU {info['gpu']}")
    return ", ".join(parts)


def markdown(report: dict, command: str) -> str:
    setup, results = report["setup"], report["results"]
    names = {
        "kv_reuse": "`RolloutEngine`, KV-cache reuse",
        "reencode": "`RolloutEngine`, re-encode the context every turn (reference)",
        "single_turn_generate": "`model.generate`, single turn, same token count",
    }
    lines = [
        "# Rollout throughput benchmark",
        "",
        f"{setup['rows']} rollouts (groups of {setup['group_size']}), {setup['max_turns']} "
        f"searching turns + 1 forced final turn = {setup['turns_per_rollout']:g} turns of "
        f"{setup['turn_tokens']} generated tokens, {setup['searches_per_rollout']:g} observations "
        f"of top-{setup['topk']} BM25 documents cut to {setup['obs_tokens']} tokens; mean "
        f"final sequence {setup['mean_prompt_plus_response_tokens']} tokens. Model: "
        f"`{setup['preset']}` preset, {setup['parameters'] / 1e6:.1f}M parameters (vocabulary "
        f"{setup['vocab_size']}), random weights, {setup['dtype']}"
        f"{' under bf16 autocast' if setup.get('bf16_autocast') else ''} on {setup['device']}; "
        f"{setup['sampling']}. Median of {setup['repeats']} interleaved timed runs per method, "
        "after one warm-up rollout.",
        "",
        "| method | generated tokens | tokens read | seconds (median) | runs (s) | "
        "generated tokens/s | peak CUDA MiB |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for key, entry in results.items():
        peak = f"{entry['peak_cuda_mb']:.0f}" if entry["peak_cuda_mb"] is not None else "n/a"
        lines.append(
            f"| {names[key]} | {entry['tokens']} | {entry['tokens_read']} | "
            f"{entry['seconds']:.2f} | "
            f"{', '.join(f'{s:.2f}' for s in entry['seconds_each'])} | "
            f"{entry['tokens_per_s']:.1f} | {peak} |"
        )
    vs_reencode = report["speedup_vs_reencode"]
    vs_generate = report["ratio_vs_single_turn_generate"]
    same = results["reencode"]["same_tokens_as_kv_reuse"]
    lines += [
        "",
        "Ratios below are medians over rounds of the ratio within a round (the methods of a "
        "round run back to back, so they share the machine's load).",
        "",
        "The reference re-encodes each rollout's whole context at the start of every turn and "
        "caches only within the turn (what Search-R1 does by calling its generator once per turn); "
        "both engine paths share the same decoding loop and preallocated cache. *Tokens read* "
        "counts every token the model processes (prompts, observations and generated tokens; "
        "for the reference, each turn's context again): single-turn generate reads no "
        "observations, so on a CPU, where reading them costs real compute, it is the upper bound.",
        "",
        f"- KV reuse vs re-encode: **{vs_reencode:.2f}x** (target >= {TARGET_VS_REENCODE}x: "
        f"**{'met' if vs_reencode >= TARGET_VS_REENCODE else 'missed'}**). Both produced "
        f"{'identical' if same else 'different'} tokens.",
        f"- KV reuse vs single-turn generate: **{vs_generate:.2f}x** (target >= "
        f"{TARGET_VS_GENERATE}x: **{'met' if vs_generate >= TARGET_VS_GENERATE else 'missed'}**).",
        f"- The same ratios in CPU seconds of this process (steadier when other jobs share the "
        f"cores): {report['cpu_speedup_vs_reencode']:.2f}x vs re-encode, "
        f"{report['cpu_ratio_vs_single_turn_generate']:.2f}x vs single-turn generate.",
        "",
        f"Machine: {describe_machine(report['machine'])}; 1-minute load average at the end "
        f"{report['load_average_1min']:.1f}. Peak memory: "
        + ", ".join(
            f"{k} {v:.0f} MiB" for k, v in report["peak_memory_mb"].items() if v is not None
        )
        + ".",
        "",
        f"Reproduce: `{command}`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="model preset (tspo.models.tiny)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="model vocabulary, at least the tokenizer's (real checkpoints pad theirs too)",
    )
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument(
        "--autocast", action="store_true", help="bf16 autocast around every method (weights stay)"
    )
    parser.add_argument("--batch", type=int, default=16, help="rollouts in the batch")
    parser.add_argument("--group-size", type=int, default=4, help="rollouts per question")
    parser.add_argument("--max-turns", type=int, default=3, help="searching turns")
    parser.add_argument("--turn-tokens", type=int, default=64, help="generated tokens per turn")
    parser.add_argument(
        "--obs-tokens",
        type=int,
        default=300,
        help="observation token budget (3 passages of ~100 words; Search-R1 allows 500)",
    )
    parser.add_argument("--topk", type=int, default=3, help="documents per search")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0: torch default)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument("--seed", type=int, default=0, help="weights, data and sampling seed")
    parser.add_argument("--out", default="docs/bench/rollout", help="output path without suffix")
    args = parser.parse_args()
    report = run(args)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    command = "python benchmarks/rollout.py " + " ".join(sys.argv[1:])
    atomic_write_text(out.with_suffix(".md"), markdown(report, command.strip()))
    print(markdown(report, command.strip()))


if __name__ == "__main__":
    main()
