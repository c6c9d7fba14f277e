"""Greedy generation with a shared prefix and verified drafts gives plain greedy decoding's
tokens, and costs one forward pass where a draft is right."""

from __future__ import annotations

import pytest
import torch

from evomerge.evaluators.generation import Drafts, common_prefix, generate_ids, generate_tokens
from evomerge.toy.tokenizer import make_tokenizer
from tests.test_accuracy import PROMPTS, generate_to_the_end_then_cut

# a shared prefix longer than the BOS, as a chat template's system turn makes one
CHAT = ["sys:be brief|" + p for p in PROMPTS]


@pytest.fixture(scope="module")
def sharp(tiny_models):
    """Two different models with sharp logits (no near-ties for a batch shape to flip)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import perturbed

    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["base"]).eval()
    return perturbed(base, seed=7, scale=0.5), perturbed(base, seed=8, scale=0.5)


def forward_sizes(model):
    """(batch rows, input tokens) of every forward call, and the hook to remove."""
    calls: list[tuple[int, int]] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    return calls, hook


def test_common_prefix_leaves_each_sequence_a_token():
    assert common_prefix([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix([[1, 2], [1, 2, 3]]) == 1  # [1, 2] keeps its last token
    assert common_prefix([[5, 2], [1, 2]]) == 0
    assert common_prefix([[1, 2, 3]]) == 0  # alone: nothing to share


@pytest.mark.parametrize("stop", [("\n",), ("y", "zv"), ()])
def test_shared_prefix_equals_each_prompt_alone(sharp, stop):
    model, _ = sharp
    tok = make_tokenizer()
    with torch.inference_mode():
        want = [generate_to_the_end_then_cut(model, tok, p, 10, stop) for p in CHAT]
        seqs = [tok(p)["input_ids"] for p in CHAT]
        calls, hook = forward_sizes(model)
        try:
            got = generate_ids(model, tok, seqs, max_new_tokens=10, stop=stop, batch_size=16)
        finally:
            hook.remove()
    assert got == want
    shared = common_prefix(seqs)
    assert shared >= 13  # BOS + "sys:be brief|"
    assert calls[0] == (1, shared)  # the prefix once, at batch size 1
    assert calls[1][0] == len(CHAT) and calls[1][1] == max(len(s) for s in seqs) - shared


@pytest.mark.parametrize("stop", [("\n",), ("y", "zv"), ()])
def test_drafts_from_another_model_give_this_models_answers(sharp, stop):
    """Drafts right, wrong at the first token, wrong midway, too long: the answers are the
    model's own greedy ones, and the rejected draft tokens do not leak into later steps."""
    model_a, model_b = sharp
    tok = make_tokenizer()
    seqs = [tok(p)["input_ids"] for p in CHAT]
    with torch.inference_mode():
        want_b = [generate_to_the_end_then_cut(model_b, tok, p, 10, stop) for p in CHAT]
        drafts = Drafts()
        generate_ids(model_a, tok, seqs, max_new_tokens=10, stop=stop, drafts=drafts)
        assert len(drafts.answers) == len(CHAT)
        got = generate_ids(model_b, tok, seqs, max_new_tokens=10, stop=stop, drafts=drafts,
                           batch_size=4)
    assert got == want_b
    assert drafts.drafted == len(CHAT)
    assert drafts.hits < len(CHAT)  # the two models disagree somewhere


def test_drafts_with_garbage_and_partial_agreement(sharp):
    model, _ = sharp
    tok = make_tokenizer()
    seqs = [tok(p)["input_ids"] for p in CHAT]
    with torch.inference_mode():
        truth = generate_tokens(model, tok, seqs, max_new_tokens=10, stop=())
        drafts = Drafts()
        for i, (seq, new) in enumerate(zip(seqs, truth, strict=True)):
            bad = (new[0] + 1) % tok.vocab_size
            drafts.put(seq, [[bad] * 9, new[:2] + [bad] * 7, new + [bad] * 5][i % 3])
        got = generate_tokens(model, tok, seqs, max_new_tokens=10, stop=(), drafts=drafts)
    assert got == truth


def test_right_drafts_cost_one_pass(sharp):
    """The same model again: every draft is accepted whole, so the batch takes the prefix pass
    and one verifying pass, no decoding step."""
    model, _ = sharp
    tok = make_tokenizer()
    seqs = [tok(p)["input_ids"] for p in CHAT]
    drafts = Drafts()
    with torch.inference_mode():
        first = generate_ids(model, tok, seqs, max_new_tokens=10, stop=("\n",), drafts=drafts)
        calls, hook = forward_sizes(model)
        try:
            again = generate_ids(model, tok, seqs, max_new_tokens=10, stop=("\n",),
                                 drafts=drafts)
        finally:
            hook.remove()
    assert again == first
    assert drafts.hits == drafts.drafted == len(CHAT)
    assert len(calls) == 2 and calls[0][0] == 1 and calls[1][0] == len(CHAT)


def test_lm_eval_speculative_equals_lm_eval_generate(sharp, tmp_path):
    """The lm_eval evaluator on evomerge's generation scores what lm-eval's own HF path does,
    for two different models in a row (the second verifies the first's answers): the answers
    are model A's greedy texts, so a hit needs the exact text."""
    import json

    from evomerge.config import LmEvalConfig
    from evomerge.evaluators.lm_eval import LmEvalEvaluator
    from evomerge.evaluators.lm_tasks import write_toy_tasks

    model_a, model_b = sharp
    tok = make_tokenizer()
    with torch.inference_mode():
        answers = [generate_to_the_end_then_cut(model_a, tok, p, 32, ("\n",))[0] for p in CHAT]
    for split in ("validation", "test"):
        folder = tmp_path / "data" / "t"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{split}.jsonl").write_text("".join(
            json.dumps({"prompt": p, "answer": a}) + "\n"
            for p, a in zip(CHAT, answers, strict=True)))
    tasks = write_toy_tasks(tmp_path, ["t"])

    drafts_seen: list[int] = []

    def hits(speculative: bool) -> list[list[float]]:
        cfg = LmEvalConfig(name="lm_eval", tasks=("toy_t",), include_path=str(tasks),
                           speculative=speculative)
        ev = LmEvalEvaluator(cfg)
        out = []
        for model in (model_a, model_b, model_a):
            per: dict = {}
            ev.evaluate(model, tok, per_example=per)
            out.append(per["lm_eval/toy_t"]["values"])
            if speculative:
                drafts_seen.append(ev.drafts.drafted)
        return out

    fast, plain = hits(True), hits(False)
    assert drafts_seen == [0, len(CHAT), 2 * len(CHAT)]  # models 2 and 3 had drafts
    assert fast == plain
    assert fast[0] == [1.0] * len(CHAT) == fast[2]
    assert fast[1] != fast[0]  # model B answers otherwise: its drafts were rejected


def test_generation_builds_no_autograd_graph(sharp):
    """lm-eval calls ``_model_generate`` without a no-grad guard: a forward pass through
    parameters that require grad would keep the whole generation's graph (every step's KV
    cache) alive, ~5 GB for 48 SmolLM2 answers. Generation runs in inference mode."""
    model, _ = sharp
    model.requires_grad_(True)  # as a model someone else loaded and handed over
    tok = make_tokenizer()
    seen: list[bool] = []
    hook = model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits.requires_grad))
    try:
        generate_tokens(model, tok, [tok(p)["input_ids"] for p in CHAT], max_new_tokens=6,
                        stop=(), batch_size=16, drafts=Drafts())
    finally:
        hook.remove()
        model.requires_grad_(False)
    assert seen and not any(seen)


def test_loaded_models_are_frozen(tiny_models):
    from evomerge.config import LoadConfig
    from evomerge.merge.loading import load_model

    model = load_model("base", str(tiny_models["base"]), load=LoadConfig(device="cpu"))
    assert not any(p.requires_grad for p in model.parameters())
