"""Train a tiny reward model for the reversal task, with no download (rollout_server/ROLLOUT.md,
"Reward models": the shipped demonstration).

Bradley-Terry on pairs of one prompt's right answer (the reversed string) and a wrong one (the
reversal corrupted one to four times: a letter replaced, two neighbours swapped, a letter dropped
or added; the string not reversed; a random string): loss ``-log sigmoid(r(right) - r(wrong))``.
The model is a Qwen2 sequence classifier with a scalar head (``num_labels=1``) on the char
tokenizer, started from the quickstart's warm-started policy (``--init warm_start``, trained now
or taken from its cache) or from random weights (``--init random``), and saved with its
tokenizer as a Hugging Face directory that ``task.reward_model.path`` names. Half of each batch's
wrong answers are a policy's own samples at the task's temperature (``--policy``: ``warm_start``,
the default, or a directory such as an RL job's export, repeatable; ``none``: synthetic only): the
negatives a practitioner collects from the policy being trained, and, with an RL job's export,
one round of iterated RLHF (``benchmarks/bench_reward_model_rl.py`` measures both rounds). The
RL job that the defaults were measured with (ROLLOUT.md) keeps a KL penalty to the warm start.
``--layers N`` (more than the warm start's 2) adds blocks that start as the identity. The JSON
line gives the held-out pair accuracy, the accuracy against the policies' own wrong samples, and
``substitution_accuracy``: per answer letter, how often the right answer outranks itself with
that one letter replaced (0.5: the letter is not read; ROLLOUT.md says what it found):

    python -m benchmarks.reward_model_demo --out runs/reversal_rm
    areal-like run experiment=quickstart task.reward_model.path=runs/reversal_rm \
        trainer.loss.kl_coef=1.0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

LETTERS = "abcdefghij"  # the reversal task's alphabet (areal_like/tasks/task.py)
OTHERS = "klmnopqrstuvwxyz0123456789+-=: "  # what a policy sampling at a high temperature adds
EVAL_SEED = 1_000_003  # held-out pairs come from another stream than training's
LAYERS = 2  # the reward model's decoder blocks by default (the warm start's own)


def _corrupt(rng: random.Random, r: str) -> str:
    """``r`` with one letter replaced (by one of the task's or, now and then, another character),
    two neighbours swapped, a letter added or a letter dropped."""
    kind, i = rng.randrange(4), rng.randrange(max(1, len(r)))
    if kind == 0 and r:
        alphabet = LETTERS if rng.random() < 0.8 else OTHERS
        return r[:i] + rng.choice(alphabet.replace(r[i], "")) + r[i + 1:]
    if kind == 1 and i + 1 < len(r) and r[i] != r[i + 1]:
        return r[:i] + r[i + 1] + r[i] + r[i + 2:]
    if kind == 2 or len(r) <= 1:
        return r[:i] + rng.choice(LETTERS) + r[i:]
    return r[:i] + r[i + 1:]


def wrong_answer(rng: random.Random, s: str) -> str:
    """A wrong answer to reversing ``s``: the string not reversed, a random one, or its reversal
    corrupted one to four times (``_corrupt``), so that the model sees near misses and far ones."""
    right, kind = s[::-1], rng.random()
    if kind < 0.1 and s != right:
        return s
    if kind < 0.2:
        wrong = "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 2 * len(s))))
    else:
        wrong = right
        for _ in range(rng.choice((1, 1, 2, 3, 4))):
            wrong = _corrupt(rng, wrong)
    return wrong if wrong != right else right[1:]


def pairs(n: int, seed: int, length: int = 6) -> list[tuple[str, str, str]]:
    """``n`` (prompt, right, wrong) triples, prompts laid out as the reversal task's."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = "".join(rng.choice(LETTERS) for _ in range(length))
        out.append((f"rev:{s}=", s[::-1], wrong_answer(rng, s)))
    return out


def build(init: str, layers: int = 0):
    """(model, tokenizer): a scalar-head Qwen2 classifier on the char tokenizer. ``layers`` > the
    warm start's (2): the blocks after its own start as the identity (their output projections
    zero), so the model starts as the warm start and the new blocks learn to check its reading."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from areal_like.settings.config import load_config
    from areal_like.tasks.tokenizer import char_tokenizer
    from areal_like.weights.hf import qwen2_config

    cfg = load_config(["experiment=quickstart"])
    tok = char_tokenizer()
    if init == "warm_start":
        from launch.warmstart import ensure_warm_start

        path = ensure_warm_start(cfg).model.path
        config = AutoConfig.from_pretrained(path, num_labels=1)
        own = config.num_hidden_layers
        if layers > own:
            config.num_hidden_layers, config.layer_types = layers, config.layer_types[:1] * layers
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
        with torch.no_grad():
            for block in model.model.layers[own:]:
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
    else:
        config = qwen2_config(cfg.model, tok)
        config.num_labels = 1
        if layers:
            config.num_hidden_layers, config.layer_types = layers, config.layer_types[:1] * layers
        model = AutoModelForSequenceClassification.from_config(config)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def scores(model, tok, texts: list[str]):
    batch = tok(texts, padding=True, return_tensors="pt")
    return model(**batch).logits[:, 0]


def ranking_accuracy(model, tok, triples) -> float:
    """The share of held-out pairs whose right answer scores above the wrong one."""
    import torch

    with torch.no_grad():
        right = scores(model, tok, [p + a for p, a, _ in triples])
        wrong = scores(model, tok, [p + b for p, _, b in triples])
    return (right > wrong).float().mean().item()


def substitution_accuracy(model, tok, n: int = 256, seed: int = EVAL_SEED) -> list[float]:
    """Per position of the answer, the share of ``n`` held-out prompts whose right answer scores
    above it with that one letter replaced by another of the task's: whether the model reads every
    letter (a model that checks only the length, the alphabet and the last letter is at 0.5 on the
    others)."""
    rng, out = random.Random(seed), []
    for i in range(6):
        triples = []
        for _ in range(n):
            s = "".join(rng.choice(LETTERS) for _ in range(6))
            r = s[::-1]
            wrong = r[:i] + rng.choice(LETTERS.replace(r[i], "")) + r[i + 1:]
            triples.append((f"rev:{s}=", r, wrong))
        out.append(round(ranking_accuracy(model, tok, triples), 3))
    return out


def policy_negatives(path: str, n: int, seed: int, temperature: float = 2.0,
                     max_new_tokens: int = 8) -> list[tuple[str, str, str]]:
    """Up to ``n`` (prompt, right, wrong) triples whose wrong answer is a sample of the causal LM at
    ``path`` (a warm start, or an RL job's export) as the rollout engine samples it (the task's
    temperature, no top-k or top-p), for ``n`` prompts of ``pairs``; right samples are dropped."""
    import torch
    from transformers import AutoModelForCausalLM

    from areal_like.tasks.tokenizer import char_tokenizer

    tok = char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(seed)
    triples = pairs(n, seed)
    out = []
    for i in range(0, n, 512):
        chunk = triples[i:i + 512]
        ids = torch.tensor([tok(p)["input_ids"] for p, _, _ in chunk])  # one length: no padding
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        answers = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        out += [(p, a, b) for (p, a, _), b in zip(chunk, answers) if b != a]
    return out


def train(steps: int, batch_size: int = 64, lr: float = 3e-4, init: str = "warm_start",
          seed: int = 0, log=print, negatives: list[tuple[str, str, str]] = (), layers: int = 0):
    """(model, tokenizer, held-out ranking accuracy) after ``steps`` Bradley-Terry steps; with
    ``negatives`` (``policy_negatives``) half of each batch's pairs are drawn from them."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, tok = build(init, layers)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    held_out = pairs(512, EVAL_SEED + seed)
    for step in range(1, steps + 1):
        n_policy = batch_size // 2 if negatives else 0
        batch = (pairs(batch_size - n_policy, seed * 1_000_000 + step)
                 + rng.sample(list(negatives), min(n_policy, len(negatives))))
        n = len(batch)
        r = scores(model, tok, [p + a for p, a, _ in batch] + [p + b for p, _, b in batch])
        loss = -torch.nn.functional.logsigmoid(r[:n] - r[n:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss.item():.3f} held-out ranking accuracy "
                f"{ranking_accuracy(model, tok, held_out):.3f}")
    model.eval()
    return model, tok, ranking_accuracy(model, tok, held_out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the directory to save the reward model in")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--init", choices=("warm_start", "random"), default="warm_start")
    ap.add_argument("--layers", type=int, default=LAYERS,
                    help="decoder blocks (the warm start has 2; more start as the identity)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", action="append", default=None,
                    help="a causal LM directory whose samples are wrong answers for half of each "
                         "batch (repeatable: an RL job's export, to iterate); 'warm_start' (the "
                         "default): the quickstart's; 'none': synthetic wrong answers only")
    ap.add_argument("--policy-samples", type=int, default=4096, help="prompts sampled per policy")
    args = ap.parse_args(argv)
    from areal_like.weights.hf import save_tokenizer

    negatives, held_out_policy = [], []
    for i, path in enumerate(p for p in args.policy or ["warm_start"] if p != "none"):
        if path == "warm_start":
            from areal_like.settings.config import load_config
            from launch.warmstart import ensure_warm_start

            path = ensure_warm_start(load_config(["experiment=quickstart"])).model.path
        negatives += policy_negatives(path, args.policy_samples, args.seed * 1000 + i)
        held_out_policy += policy_negatives(path, 256, EVAL_SEED + args.seed * 1000 + i)
    model, tok, acc = train(args.steps, lr=args.lr, init=args.init, seed=args.seed,
                            negatives=negatives, layers=args.layers)
    model.save_pretrained(args.out)
    save_tokenizer(tok, args.out)
    line = {"name": "reward_model_ranking_accuracy", "figure": round(acc, 4),
            "unit": "share of held-out pairs", "out": str(Path(args.out).resolve()),
            "substitution_accuracy": substitution_accuracy(model, tok)}
    if held_out_policy:  # right answers against the policies' own wrong samples, held out
        line["policy_pairs_accuracy"] = round(ranking_accuracy(model, tok, held_out_policy), 4)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
