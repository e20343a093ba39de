"""Generation: the KV-cached batched loop against a naive full-forward argmax loop, padding, seeds, EOS,
position selection, and (slow) a sensible answer from the embedded model."""

from __future__ import annotations

import pytest
import torch

from em_interp.adapters import LoRA, SteeringVector
from em_interp.errors import AdapterError, DataError
from em_interp.eval.generation import as_chats, generate, generate_tokens, prompt_ids, stop_token_ids
from em_interp.model.hooks import hooks_applied, position_offset
from em_interp.model.load import hf_model_of
from em_interp.testing import tiny_model

PROMPTS = ["Hi", "What is the capital of France? Answer in one word, please.", "Tell me about cats."]
N_NEW = 8


@pytest.fixture(scope="module")
def model():
    """A tiny random Llama with large weights, so greedy decoding does not collapse onto one token."""
    return tiny_model(seed=1, initializer_range=0.5)


def _ids(model, prompt):
    return prompt_ids(model.tokenizer, as_chats(prompt)[0])


def _naive_greedy(model, prompt, n_new, steer=None, positions="all"):
    """Argmax over the full bridge forward of the whole sequence at each step, no cache, no padding."""
    ids = _ids(model, prompt)
    stop = stop_token_ids(model)
    out: list[int] = []
    for _ in range(n_new):
        with torch.no_grad():
            if steer is None:
                logits = model(torch.tensor([ids + out]))
            else:
                pos = len(ids) if positions == "answer" else "all"
                with steer.applied(model, positions=pos):
                    logits = model(torch.tensor([ids + out]))
        nxt = int(logits[0, -1].argmax())
        if nxt in stop:
            break
        out.append(nxt)
    return out


def _steer(model, scale=50.0):
    return SteeringVector(model, layer=1, init="random", alpha=scale, seed=3)


def test_greedy_matches_naive_loop(model):
    got = generate_tokens(model, PROMPTS, temperature=0, max_new_tokens=N_NEW, batch_size=1, progress=False)
    want = [_naive_greedy(model, p, N_NEW) for p in PROMPTS]
    assert got == want
    assert len({tuple(g) for g in got}) == len(PROMPTS) and all(len(set(g)) > 1 for g in got)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_matches_hf_generate(family):
    """Token for token against transformers' own `generate` on an unbridged copy of the same weights,
    so a change in the cache API of transformers or TransformerLens fails here."""
    import copy

    from em_interp.model.load import wrap_hf_model
    from em_interp.testing import chat_tokenizer, tiny_hf_model

    tokenizer = chat_tokenizer()
    hf = tiny_hf_model(family, seed=1, vocab_size=len(tokenizer), initializer_range=0.5)
    plain = copy.deepcopy(hf)
    bridged = wrap_hf_model(hf, tokenizer, model_id=f"tiny-{family}")
    stop = sorted(stop_token_ids(bridged))
    n_new = 12
    got = generate_tokens(bridged, PROMPTS, temperature=0, max_new_tokens=n_new, batch_size=1, progress=False)
    for prompt, ours in zip(PROMPTS, got, strict=True):
        ids = torch.tensor([_ids(bridged, prompt)])
        with torch.no_grad():
            out = plain.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, do_sample=False, eos_token_id=stop,
                pad_token_id=stop[0],
            )
        theirs = out[0, ids.shape[1]:].tolist()
        theirs = theirs[: next((i for i, t in enumerate(theirs) if t in stop), len(theirs))]
        assert ours == theirs
    assert any(len(g) >= 4 for g in got)  # the comparison covers cached steps, not only the first token


def _lora(model):
    return LoRA(model, layer=1, rank=2, site=["mlp_out", "attn_q"], alpha=40.0, init="random", seed=2)


@pytest.mark.parametrize("make", [_steer, _lora], ids=["steering", "lora"])
@pytest.mark.parametrize("positions", ["all", "answer"])
def test_greedy_with_adapter_matches_naive_loop(model, positions, make):
    vec = make(model)
    got = generate_tokens(
        model, PROMPTS, adapters=vec, positions=positions, temperature=0, max_new_tokens=N_NEW, batch_size=1,
        progress=False,
    )
    want = [_naive_greedy(model, p, N_NEW, steer=vec, positions=positions) for p in PROMPTS]
    assert got == want
    assert got != generate_tokens(model, PROMPTS, temperature=0, max_new_tokens=N_NEW, progress=False)


def test_steering_attached_by_caller_applies(model):
    vec = _steer(model)
    with vec.applied(model):
        outside = generate_tokens(model, PROMPTS, temperature=0, max_new_tokens=N_NEW, progress=False)
    assert outside == generate_tokens(model, PROMPTS, adapters=[vec], temperature=0, max_new_tokens=N_NEW, progress=False)


@pytest.mark.parametrize("positions", ["all", "answer", "prompt", 3])
def test_left_padded_batch_equals_each_prompt_alone(model, positions):
    vec = _steer(model)
    kwargs = {"adapters": vec, "positions": positions, "temperature": 0, "max_new_tokens": N_NEW, "progress": False}
    batched = generate_tokens(model, PROMPTS, batch_size=len(PROMPTS), **kwargs)
    alone = [generate_tokens(model, [p], batch_size=1, **kwargs)[0] for p in PROMPTS]
    assert len({len(_ids(model, p)) for p in PROMPTS}) == len(PROMPTS)  # really padded
    assert batched == alone


def test_old_position_name_generated_warns_and_means_answer(model):
    vec = _steer(model)
    kwargs = {"adapters": vec, "temperature": 0, "max_new_tokens": N_NEW, "progress": False}
    with pytest.warns(DeprecationWarning, match="positions='generated' is deprecated; use 'answer'"):
        old = generate_tokens(model, PROMPTS, positions="generated", **kwargs)
    assert old == generate_tokens(model, PROMPTS, positions="answer", **kwargs)
    assert old != generate_tokens(model, PROMPTS, positions="all", **kwargs)


def test_seeded_sampling(model):
    kwargs = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9, "n_samples": 3, "progress": False}
    a = generate(model, PROMPTS[:2], seed=1, **kwargs)
    b = generate(model, PROMPTS[:2], seed=1, **kwargs)
    c = generate(model, PROMPTS[:2], seed=2, **kwargs)
    assert a == b
    assert a != c
    assert len(a) == 6 and len(set(a[:3])) > 1  # prompt-major; samples of one prompt differ


def test_n_samples_layout_and_greedy_copies(model):
    out = generate(model, PROMPTS, temperature=0, max_new_tokens=4, n_samples=2, batch_size=4, progress=False)
    single = generate(model, PROMPTS, temperature=0, max_new_tokens=4, progress=False)
    assert out == [s for s in single for _ in range(2)]


def test_top_p_tiny_keeps_only_argmax(model):
    greedy = generate_tokens(model, PROMPTS, temperature=0, max_new_tokens=5, progress=False)
    nucleus = generate_tokens(model, PROMPTS, temperature=1.0, top_p=1e-6, max_new_tokens=5, progress=False)
    assert nucleus == greedy


def _eos_vector(model, alpha=1e5):
    eos = model.tokenizer.eos_token_id
    row = hf_model_of(model).get_output_embeddings().weight[eos].detach()
    return SteeringVector(model, layer=model.cfg.n_layers - 1, init=row / row.norm(), alpha=alpha)


def test_stops_at_eos(model):
    assert model.tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(model)
    vec = _eos_vector(model)
    free = generate_tokens(model, PROMPTS, temperature=0, max_new_tokens=N_NEW, progress=False)
    # EOS is favoured from the 4th generated token's logits on: 4 tokens, then a stop.
    width = max(len(_ids(model, p)) for p in PROMPTS)
    with vec.applied(model, positions=width + 3):
        out = generate_tokens(model, PROMPTS, temperature=0, max_new_tokens=N_NEW, batch_size=3, progress=False)
    assert out == [f[:4] for f in free]
    with vec.applied(model):
        assert generate(model, PROMPTS, temperature=0, max_new_tokens=N_NEW, progress=False) == ["", "", ""]


def test_each_row_stops_on_its_own(model):
    vec = _eos_vector(model)
    width = len(_ids(model, PROMPTS[0]))
    mask = torch.zeros(2, width + N_NEW, dtype=torch.bool)
    mask[0, width + 1 :] = True  # only row 0 is pushed to EOS, after its second token
    free = generate_tokens(model, PROMPTS[:1], temperature=0, max_new_tokens=N_NEW, progress=False)[0]
    with vec.applied(model, positions=mask):
        out = generate_tokens(model, [PROMPTS[0]] * 2, temperature=0, max_new_tokens=N_NEW, batch_size=2, progress=False)
    assert out == [free[:2], free]


def _capture(model, hook_name="blocks.2.hook_resid_post"):
    seen: list[tuple[int, torch.Tensor]] = []

    def record(act, hook):
        seen.append((position_offset.get(), act.detach().clone()))

    return seen, [(hook_name, record)]


@pytest.mark.parametrize("positions", ["answer", "all"])
def test_generated_positions_leave_prompt_untouched(model, positions):
    vec = _steer(model)
    plain, hooks = _capture(model)
    with hooks_applied(model, hooks):
        generate_tokens(model, PROMPTS, temperature=0, max_new_tokens=4, batch_size=3, progress=False)
    steered, hooks = _capture(model)
    with hooks_applied(model, hooks):
        generate_tokens(model, PROMPTS, adapters=vec, positions=positions, temperature=0, max_new_tokens=4,
                        batch_size=3, progress=False)
    assert [o for o, _ in plain][:2] == [0, plain[0][1].shape[1]]  # the prefill, then one token at its offset
    assert torch.equal(plain[0][1], steered[0][1]) == (positions == "answer")
    assert not torch.allclose(plain[1][1], steered[1][1])  # the first generated token is steered


def test_zero_new_tokens_and_system_prompt(model):
    assert generate(model, PROMPTS, max_new_tokens=0, progress=False) == ["", "", ""]
    chats = as_chats(["Hi"], system="Be brief.")
    assert chats == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    one_chat = [{"role": "user", "content": "Hi"}]
    assert len(generate(model, one_chat, max_new_tokens=2, progress=False)) == 1


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"temperature": -1.0}, DataError),
        ({"top_p": 0.0}, DataError),
        ({"n_samples": 0}, DataError),
        ({"positions": "answered"}, AdapterError),
        ({"positions": "last"}, AdapterError),
        ({"adapters": [object()]}, AdapterError),
    ],
)
def test_bad_arguments(model, kwargs, error):
    with pytest.raises(error):
        generate(model, PROMPTS, progress=False, **kwargs)


def test_bad_prompts(model):
    with pytest.raises(DataError, match=r"prompts\[1\]"):
        generate(model, ["Hi", 3], progress=False)
    with pytest.raises(DataError, match="empty"):
        generate(model, [""], progress=False)


@pytest.mark.slow
def test_embedded_model_knows_paris(smollm):
    (answer,) = generate(smollm, ["What is the capital of France?"], temperature=0, max_new_tokens=32, progress=False)
    assert "Paris" in answer


def test_decoder_raises_when_the_cache_does_not_fill(tiny, monkeypatch):
    """A transformers / transformer-lens pair whose bridge leaves the cache empty fails loudly, not silently."""
    from em_interp.errors import ModelLoadError
    from em_interp.model import decode

    monkeypatch.setattr(decode, "_pass_cache", lambda module, args, kwargs: (args, {**kwargs, "past_key_values": None,
                                                                                       "cache": None}))
    with pytest.raises(ModelLoadError, match=r"KV cache holds 0 positions after a forward over [1-9]"):
        generate(tiny, "Hi", max_new_tokens=2, temperature=0, progress=False)
