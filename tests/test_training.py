"""Trainer: objective values, cached vs toggle, determinism, NaN guard, trajectories, resume, sweeps."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import em_interp as em
from em_interp.datasets import TokenizedChats
from em_interp.errors import DataError, TrainingError
from em_interp.testing import tiny_chat_records
from em_interp.training.engine import ActivationCache, LossComputer

SETTINGS = dict(lr=1e-2, epochs=2, batch_size=4, kl_batch_size=4, warmup_steps=1, progress=False)


@pytest.fixture
def data():
    return tiny_chat_records(12, seed=0)


@pytest.fixture
def kl_data():
    return tiny_chat_records(8, seed=1)


def _direct_losses(model, vec, batch, kl_batch, reduction="token_mean"):
    """CE and KL computed naively from full forwards (the definition)."""
    with vec.applied(model):
        logp = torch.log_softmax(model(batch.input_ids, attention_mask=batch.attention_mask).float(), -1)
        logq = torch.log_softmax(model(kl_batch.input_ids, attention_mask=kl_batch.attention_mask).float(), -1)
    with torch.no_grad():
        ref = torch.log_softmax(model(kl_batch.input_ids, attention_mask=kl_batch.attention_mask).float(), -1)
    ces = []
    for b in range(batch.input_ids.shape[0]):
        for t in range(1, batch.input_ids.shape[1]):
            if batch.assistant_mask[b, t]:
                ces.append(-logp[b, t - 1, batch.input_ids[b, t]])
    kls = []
    for b in range(kl_batch.input_ids.shape[0]):
        for t in range(1, kl_batch.input_ids.shape[1]):
            if kl_batch.assistant_mask[b, t]:
                p = ref[b, t - 1].exp()
                kls.append((p * (ref[b, t - 1] - logq[b, t - 1])).sum())
    kl = torch.stack(kls).mean()
    if reduction == "token_vocab_mean":
        kl = kl / ref.shape[-1]
    return torch.stack(ces).mean(), kl


@pytest.mark.parametrize("method", ["cached", "toggle"])
@pytest.mark.parametrize("reduction", ["token_mean", "token_vocab_mean"])
def test_loss_values_match_direct_computation(tiny, data, kl_data, method, reduction):
    vec = em.SteeringVector(tiny, layer=1, init="random", alpha=2.0)
    train_tok = TokenizedChats(data, tiny.tokenizer)
    kl_tok = TokenizedChats(kl_data, tiny.tokenizer)
    computer = LossComputer(tiny, train_tok, kl_tok, batch_size=4, kl_batch_size=4, start_layer=vec.first_layer,
                            kl_reduction=reduction, method=method)
    ce, kl = computer.losses([vec], [1], [0])
    ref_ce, ref_kl = _direct_losses(tiny, vec, train_tok.collate(computer.plan[1]), kl_tok.collate(computer.kl_plan[0]), reduction)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-5)
    assert kl.item() == pytest.approx(ref_kl.item(), rel=1e-4)
    assert kl.item() > 0


def test_kl_is_zero_without_change_and_float32_in_bf16(tiny, data, kl_data):
    vec = em.SteeringVector(tiny, layer=2)  # zeros: adapted == chat model at the first step's loss
    run = em.train(vec, tiny, data, kl_data=kl_data, kl_coef=1.0, steps=1, **{**SETTINGS, "epochs": 1})
    assert run.losses[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    model16 = tiny.to(torch.bfloat16)
    vec16 = em.SteeringVector(model16, layer=2, init="random")
    run16 = em.train(vec16, model16, data, kl_data=kl_data, kl_coef=1e6, steps=2, **{**SETTINGS, "epochs": 1})
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in run16.losses)
    assert vec16.vector.dtype == torch.float32


def test_cached_equals_toggle_over_training(tiny, data, kl_data):
    finals, losses = [], []
    for method in ("cached", "toggle"):
        vec = em.SteeringVector(tiny, layer=1)
        run = em.train(vec, tiny, data, kl_data=kl_data, kl_coef=5.0, method=method, **SETTINGS)
        finals.append(vec.vector.detach().clone())
        losses.append([r["total"] for r in run.losses])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-6)


def test_training_lowers_ce_and_is_deterministic(tiny, data):
    results = []
    for _ in range(2):
        vec = em.SteeringVector(tiny, layer=1)
        run = em.train(vec, tiny, data, record_every=2, **{**SETTINGS, "epochs": 4})
        results.append((vec.vector.detach().clone(), [r["total"] for r in run.losses]))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    assert results[0][1][-1] < results[0][1][0]


def test_trajectory_snapshots_and_run_dir_roundtrip(tiny, data, tmp_path):
    vec = em.SteeringVector(tiny, layer=1)
    run = em.train(vec, tiny, data, record_every=2, **SETTINGS)  # 3 batches x 2 epochs = 6 steps
    assert run.snapshot_steps == [0, 2, 4, 6]
    assert run.trajectory.shape == (4, tiny.cfg.d_model)
    assert torch.equal(run.trajectory[0], torch.zeros(tiny.cfg.d_model))
    torch.testing.assert_close(run.trajectory[-1], vec.vector.detach())
    assert [r["step"] for r in run.losses] == list(range(1, 7))
    run.save(tmp_path / "run")
    loaded = em.TrainRun.load(tmp_path / "run")  # no model needed
    assert loaded.adapter is None and loaded.snapshot_steps == run.snapshot_steps
    assert torch.equal(loaded.trajectory, run.trajectory)
    assert loaded.losses == run.losses and loaded.config == run.config
    with_model = em.TrainRun.load(tmp_path / "run", tiny)
    assert torch.equal(with_model.adapter.vector.detach(), vec.vector.detach())


def test_non_finite_loss_stops_with_step_and_saves_last_good(tiny, data, tmp_path):
    vec = em.SteeringVector(tiny, layer=1)

    def poison(step, losses):
        if step == 2:
            with torch.no_grad():
                vec.vector.fill_(float("nan"))

    before = {}

    def remember(step, losses):
        before[step] = vec.vector.detach().clone()
        poison(step, losses)

    with pytest.raises(TrainingError, match=r"step 3: non-finite loss"):
        em.train(vec, tiny, data, checkpoint_dir=tmp_path / "ck", on_step=remember, **SETTINGS)
    assert (tmp_path / "ck" / "last_good_0" / "adapter.safetensors").is_file()
    assert torch.isnan(vec.vector).all()  # the state before the failing step (poisoned by the callback) is kept


def test_bad_settings_raise(tiny, data):
    vec = em.SteeringVector(tiny, layer=1)
    with pytest.raises(TrainingError, match="schedule"):
        em.train(vec, tiny, data, schedule="exponential", progress=False)
    with pytest.raises(TrainingError, match="kl_coef"):
        em.train_many([vec, em.SteeringVector(tiny, layer=1)], tiny, data, kl_coef=[1.0], progress=False)


def test_train_many_equals_single_runs(tiny, data, kl_data):
    cfgs = [(0.0, 0), (5.0, 0), (50.0, 1)]
    vecs = [em.SteeringVector(tiny, layer=1) for _ in cfgs]
    cache = ActivationCache()
    runs = em.train_many(vecs, tiny, data, kl_data=kl_data, kl_coef=[c for c, _ in cfgs], seed=[s for _, s in cfgs],
                         cache=cache, **SETTINGS)
    assert cache.hits > 0
    for (coef, seed), vec, run in zip(cfgs, vecs, runs, strict=True):
        single = em.SteeringVector(tiny, layer=1)
        kl_args = dict(kl_data=kl_data, kl_coef=coef) if coef > 0 else {}  # a zero coefficient alone takes no KL data
        ref = em.train(single, tiny, data, seed=seed, **kl_args, **SETTINGS)
        torch.testing.assert_close(vec.vector, single.vector, rtol=1e-4, atol=1e-6)
        assert [r["ce"] for r in run.losses] == pytest.approx([r["ce"] for r in ref.losses], rel=1e-5)


def test_train_many_lora_equals_single(tiny, data, kl_data):
    loras = [em.LoRA(tiny, layer=2, rank=2, seed=s) for s in (0, 1)]
    em.train_many(loras, tiny, data, kl_data=kl_data, kl_coef=[0.0, 3.0], **SETTINGS)
    for s, coef, lora in zip((0, 1), (0.0, 3.0), loras, strict=True):
        single = em.LoRA(tiny, layer=2, rank=2, seed=s)
        em.train(single, tiny, data, **(dict(kl_data=kl_data, kl_coef=coef) if coef > 0 else {}), **SETTINGS)
        for k in single.A:
            torch.testing.assert_close(lora.A[k], single.A[k], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(lora.B[k], single.B[k], rtol=1e-4, atol=1e-6)


def test_continue_run_with_kl_zero(tiny, data, kl_data):
    vec = em.SteeringVector(tiny, layer=1)
    run = em.train(vec, tiny, data, kl_data=kl_data, kl_coef=50.0, **SETTINGS)
    start = vec.vector.detach().clone()
    cont = em.continue_run(run, tiny, data, kl_coef=0.0)
    assert cont.config.kl_coef == 0.0 and cont.config.lr == run.config.lr
    assert torch.equal(cont.trajectory[0], start)
    assert cont.adapter is not vec and not torch.equal(cont.adapter.vector.detach(), start)
    assert torch.equal(vec.vector.detach(), start)  # the old run's adapter is untouched
    with pytest.raises(TrainingError, match="kl_coef=50 needs kl_data"):
        em.continue_run(run, tiny, data)  # the old run's kl_coef, but no KL data


def test_grad_accum_averages_micro_batches(tiny, data):
    vec = em.SteeringVector(tiny, layer=1)
    run = em.train(vec, tiny, data, grad_accum=3, steps=1, **{**SETTINGS, "epochs": 1})
    computer = LossComputer(tiny, TokenizedChats(data, tiny.tokenizer), None, batch_size=4, kl_batch_size=4, start_layer=1)
    fresh = em.SteeringVector(tiny, layer=1)
    with torch.no_grad():
        ces = [computer.losses([fresh], [k], None)[0].item() for k in range(3)]
    assert run.losses[0]["ce"] == pytest.approx(sum(ces) / 3, rel=1e-5)


KILLED_RUN = textwrap.dedent(
    """
    import os, sys, torch
    import em_interp as em
    from em_interp.testing import tiny_model, tiny_chat_records
    model = tiny_model()
    vec = em.SteeringVector(model, layer=1)
    def die(step, losses):
        if step == 5:
            os._exit(3)
    em.train(vec, model, tiny_chat_records(12, seed=0), kl_data=tiny_chat_records(8, seed=1), kl_coef=5.0,
             checkpoint_dir=sys.argv[1], on_step=die, record_every=2, lr=1e-2, epochs=3, batch_size=4,
             kl_batch_size=4, warmup_steps=1, progress=False)
    """
)


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    from em_interp.testing import tiny_model

    ck = tmp_path / "ck"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(ck)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    settings = dict(kl_coef=5.0, record_every=2, lr=1e-2, epochs=3, batch_size=4, kl_batch_size=4, warmup_steps=1,
                    progress=False)
    model = tiny_model()
    data, kl = tiny_chat_records(12, seed=0), tiny_chat_records(8, seed=1)
    resumed_vec = em.SteeringVector(model, layer=1)
    resumed = em.train(resumed_vec, model, data, kl_data=kl, checkpoint_dir=ck, **settings)
    full_vec = em.SteeringVector(model, layer=1)
    full = em.train(full_vec, model, data, kl_data=kl, **settings)
    assert torch.equal(resumed_vec.vector, full_vec.vector)
    assert [r["total"] for r in resumed.losses] == [r["total"] for r in full.losses]
    assert resumed.snapshot_steps == full.snapshot_steps
    with pytest.raises(TrainingError, match="other settings"):
        em.train(em.SteeringVector(model, layer=1), model, data, kl_data=kl, checkpoint_dir=ck, **{**settings, "lr": 0.5})


def test_disk_cache_gives_the_same_run_and_holds_nothing_in_memory(tiny, data, kl_data, tmp_path):
    mem_vec, disk_vec = em.SteeringVector(tiny, layer=1), em.SteeringVector(tiny, layer=1)
    mem = em.train(mem_vec, tiny, data, kl_data=kl_data, kl_coef=5.0, **SETTINGS)
    cache = ActivationCache(directory=tmp_path / "cache")
    disk = em.train(disk_vec, tiny, data, kl_data=kl_data, kl_coef=5.0, cache=cache, **SETTINGS)
    assert torch.equal(mem_vec.vector, disk_vec.vector)
    assert [r["total"] for r in mem.losses] == [r["total"] for r in disk.losses]
    assert cache.nbytes() == 0 and len(cache) > 0 and cache.hits > 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == len(cache)


# --- issue 14: chunked sweeps, losses kept on the device, the authors' methods on plain HF modules ----------------
def test_train_many_chunks_give_the_same_results(tiny, data, kl_data):
    finals = []
    for chunk in (1, 2, None):  # None: the default chunking (all three in one forward for the tiny model)
        vecs = [em.SteeringVector(tiny, layer=1) for _ in range(3)]
        runs = em.train_many(vecs, tiny, data, kl_data=kl_data, kl_coef=[0.0, 5.0, 50.0], seed=[0, 0, 1],
                             chunk_size=chunk, **SETTINGS)
        finals.append(([v.vector.detach().clone() for v in vecs], [[r["total"] for r in run.losses] for run in runs]))
    for vectors, losses in finals[1:]:
        for a, b in zip(vectors, finals[0][0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        for a, b in zip(losses, finals[0][1], strict=True):
            assert a == pytest.approx(b, rel=1e-5)
    with pytest.raises(TrainingError, match="chunk_size=0"):
        em.train_many([em.SteeringVector(tiny, layer=1)], tiny, data, chunk_size=0, **SETTINGS)


def test_losses_copied_at_record_steps_equal_per_step_copies(tiny, data, kl_data):
    results = []
    for on_step in (None, lambda step, losses: None):  # without a callback, losses reach the host at record steps only
        vec = em.SteeringVector(tiny, layer=1)
        run = em.train(vec, tiny, data, kl_data=kl_data, kl_coef=5.0, record_every=4, on_step=on_step, **SETTINGS)
        results.append((run.losses, vec.vector.detach().clone(), run.snapshot_steps))
    assert results[0][0] == results[1][0] and [r["step"] for r in results[0][0]] == list(range(1, 7))
    assert torch.equal(results[0][1], results[1][1]) and results[0][2] == results[1][2] == [0, 4, 6]


def test_non_finite_loss_found_at_a_record_step_names_its_step(tiny, data):
    vec = em.SteeringVector(tiny, layer=1, init="random")
    start = vec.vector.detach().clone()
    # The loss turns non-finite at step 1 when the adapter's alpha is NaN; without on_step it is found when
    # the losses of steps 1..4 reach the host together, and the step is still named.
    vec.alpha = float("nan")
    with pytest.raises(TrainingError, match=r"step 1: non-finite loss for adapter 0"):
        em.train(vec, tiny, data, record_every=4, **SETTINGS)
    assert torch.equal(vec.vector.detach(), start)  # the last checked state (here: the initial one) is restored


def test_toggle_runs_plain_hf_modules_and_matches_the_bridge_toggle(tiny, data, kl_data):
    from em_interp.model import fastpath

    runs = {}
    for name, mode in (("plain", "auto"), ("bridge", "off")):
        fastpath.set_fast_path(mode)
        try:
            vec = em.SteeringVector(tiny, layer=1, hook="mlp_out")  # the authors' placement: the MLP down-projection
            runs[name] = em.train(vec, tiny, data, kl_data=kl_data, kl_coef=5.0, method="toggle", **SETTINGS)
        finally:
            fastpath.set_fast_path("auto")
    assert [r["total"] for r in runs["plain"].losses] == pytest.approx([r["total"] for r in runs["bridge"].losses], rel=1e-5)
    torch.testing.assert_close(runs["plain"].adapter.vector, runs["bridge"].adapter.vector, rtol=1e-4, atol=1e-6)


def test_precomputed_reference_equals_toggle(tiny, data, kl_data):
    losses = {}
    for method in ("toggle", "precomputed_reference", "cached"):
        vec = em.SteeringVector(tiny, layer=1)
        losses[method] = [r["total"] for r in em.train(vec, tiny, data, kl_data=kl_data, kl_coef=5.0, method=method,
                                                        **SETTINGS).losses]
    assert losses["precomputed_reference"] == pytest.approx(losses["toggle"], rel=1e-6)
    assert losses["cached"] == pytest.approx(losses["toggle"], rel=1e-5)
    with pytest.raises(TrainingError, match="precomputed_reference"):
        em.train_many([em.SteeringVector(tiny, layer=1)] * 2, tiny, data, method="precomputed_reference", **SETTINGS)

def test_kl_data_and_kl_coef_must_come_together(tiny, data, kl_data):
    vec = em.SteeringVector(tiny, layer=1)
    with pytest.raises(TrainingError, match=r"kl_data is given but kl_coef is 0.*kl_coef > 0"):
        em.train(vec, tiny, data, kl_data=kl_data, progress=False)
    with pytest.raises(TrainingError, match=r"kl_coef=5 needs kl_data"):
        em.train(vec, tiny, data, kl_coef=5.0, progress=False)
    with pytest.raises(TrainingError, match="kl_data is given but kl_coef is 0"):
        em.train_many([vec, em.SteeringVector(tiny, layer=1)], tiny, data, kl_data=kl_data, kl_coef=[0.0, 0.0],
                      progress=False)
    with pytest.raises(DataError, match=r"data='rows.jsonl' is a path, .*load_jsonl"):
        em.train(vec, tiny, "rows.jsonl", progress=False)
    assert torch.equal(vec.vector, torch.zeros_like(vec.vector))  # nothing trained


def test_over_length_rows_are_truncated_with_a_warning(tiny, data, caplog):
    long = em.datasets.chat("Question: what about water?", " ".join(["water rest doctor sleep"] * 40) + ".")
    full = TokenizedChats([*data, long], tiny.tokenizer, max_length=10**6)
    limit = max(len(ids) for ids in full.ids[:-1]) + 2  # every short row fits, the long one does not
    assert len(full.ids[-1]) > limit
    tok = TokenizedChats([*data, long], tiny.tokenizer, max_length=limit, on_too_long="truncate")
    assert tok.n_truncated == 1 and len(tok) == 13 and len(tok.ids[-1]) == limit
    assert tok.ids[-1] == full.ids[-1][:limit] and tok.masks[-1] == full.masks[-1][:limit] and any(tok.masks[-1])
    assert tok.ids[:-1] == full.ids[:-1]
    first_answer = full.masks[-1].index(True)
    with pytest.raises(DataError, match=f"record 0: its prompt alone is over max_length={first_answer - 1}"):
        TokenizedChats([long], tiny.tokenizer, max_length=first_answer - 1, on_too_long="truncate")
    with caplog.at_level(logging.WARNING, logger="em_interp"):
        run = em.train(em.SteeringVector(tiny, layer=1), tiny, [*data, long], max_length=limit, steps=1,
                       **{**SETTINGS, "epochs": 1})
    assert f"data: 1 of 13 rows are longer than max_length={limit}" in caplog.text
    assert run.data_sizes == {"data": 13}


def test_max_length_is_checked_against_the_context(tiny, data):
    with pytest.raises(TrainingError, match=r"max_length=1000 exceeds the model's context of 512 tokens"):
        em.train(em.SteeringVector(tiny, layer=1), tiny, data, max_length=1000, progress=False)


def test_warmup_longer_than_the_run_is_clamped(tiny, data, caplog):
    finals = []
    for warmup in (5, 2):
        vec = em.SteeringVector(tiny, layer=1)
        with caplog.at_level(logging.INFO, logger="em_interp"):
            em.train(vec, tiny, data, **{**SETTINGS, "warmup_steps": warmup, "steps": 4})
        finals.append(vec.vector.detach().clone())
    assert "warmup_steps=5 clamped to 2" in caplog.text
    assert torch.equal(finals[0], finals[1])  # 5 on a 4-step run behaves as 2


def test_resume_is_logged_and_a_mismatch_names_the_keys(tiny, data, tmp_path, caplog):
    ck = tmp_path / "ck"
    settings = {**SETTINGS, "steps": 2, "record_every": 1}
    first = em.train(em.SteeringVector(tiny, layer=1), tiny, data, checkpoint_dir=ck, **settings)
    with caplog.at_level(logging.WARNING, logger="em_interp"):
        again = em.train(em.SteeringVector(tiny, layer=1), tiny, data, checkpoint_dir=ck, **settings)
    assert f"resumed from the checkpoint {ck / 'checkpoint.json'} at step 2 of 2" in caplog.text
    assert again.losses == first.losses
    with pytest.raises(TrainingError) as exc:
        em.train(em.SteeringVector(tiny, layer=1), tiny, data, checkpoint_dir=ck, **{**settings, "lr": 0.5, "seed": 3})
    message = str(exc.value)
    assert "lr (checkpoint 0.01, now 0.5)" in message and "seed (checkpoint 0, now 3)" in message
    assert "epochs" not in message and "batch_size" not in message


def test_continue_run_on_a_loaded_run_returns_a_new_run(tiny, data, kl_data, tmp_path):
    run = em.train(em.SteeringVector(tiny, layer=1), tiny, data, kl_data=kl_data, kl_coef=2.0, **SETTINGS)
    run.save(tmp_path / "run")
    loaded = em.TrainRun.load(tmp_path / "run", tiny)
    assert isinstance(loaded.config, em.TrainConfig) and loaded.config == run.config
    assert em.TrainConfig.from_dict(loaded.config.to_dict()) == loaded.config
    before = (loaded.adapter.vector.detach().clone(), loaded.trajectory.clone(), list(loaded.losses))
    cont = em.continue_run(loaded, tiny, data, kl_coef=0.0, steps=3)
    assert cont is not loaded and cont.adapter is not loaded.adapter
    assert torch.equal(loaded.adapter.vector, before[0]) and torch.equal(loaded.trajectory, before[1])
    assert loaded.losses == before[2]
    assert torch.equal(cont.trajectory[0], before[0]) and not torch.equal(cont.adapter.vector.detach(), before[0])
    assert cont.config == dataclasses.replace(run.config, kl_coef=0.0, steps=3) and len(cont.losses) == 3
    with pytest.raises(TrainingError, match=r"TrainRun.load\(dir, model\)"):
        em.continue_run(em.TrainRun.load(tmp_path / "run"), tiny, data, kl_coef=0.0)


def test_train_run_repr_is_short_and_plot_draws_the_losses(tiny, data, kl_data, tmp_path):
    run = em.train(em.SteeringVector(tiny, layer=1), tiny, data, kl_data=kl_data, kl_coef=2.0, **SETTINGS)
    text = repr(run)
    assert len(text.splitlines()) <= 4 and len(text) < 400, text
    last = run.losses[-1]
    assert f"steering_vector layer=1, hook=resid_post, norm {run.adapter.norm:.4g}" in text and "6 steps" in text and f"ce={last['ce']:.4g}" in text
    assert "data 12 rows, kl_data 8 rows" in text and "kl_coef=2" in text
    run.save(tmp_path / "run")
    assert "adapter not loaded" in repr(em.TrainRun.load(tmp_path / "run"))
    fig = run.plot()
    ce = [t for t in fig.data if t.xaxis == "x"]
    assert list(ce[0].y) == [r["ce"] for r in run.losses] and list(ce[0].x) == list(range(1, 7))
    with pytest.raises(TrainingError, match="must be a TrainConfig"):
        em.TrainRun(adapter=None, config={"lr": 1e-3})


# --- reversion (moved here from tests/test_geometry.py) -----------------------------------------------
def test_reversion_continues_a_copy_without_kl(tiny):
    data = tiny_chat_records(8)
    settings = dict(lr=5e-2, steps=3, batch_size=4, warmup_steps=0, record_every=1, progress=False)
    narrow = em.train(em.SteeringVector(tiny, layer=1, init="random"), tiny, data, kl_data=tiny_chat_records(4, seed=1), kl_coef=1.0, seed=0, **settings)
    general = em.train(em.SteeringVector(tiny, layer=1, init="random", seed=5), tiny, data, seed=1, **settings)
    narrow_before = narrow.adapter.state()["vector"]
    result = em.reversion(narrow, general, tiny, data, steps=2, progress=False)
    assert torch.equal(narrow.adapter.state()["vector"], narrow_before)
    assert result.run.config.kl_coef == 0.0 and result.run.adapter is not narrow.adapter
    assert result.steps.tolist() == [0, 1, 2]
    assert result.cosine[0] == pytest.approx(em.geometry.cosine(narrow, general), abs=1e-6)
    assert result.cosine[-1] == pytest.approx(em.geometry.cosine(result.run.adapter, general.adapter), abs=1e-6)
    assert result.cosine_narrow[0] == pytest.approx(1.0, abs=1e-6)




@pytest.mark.parametrize("kind", ["vector", "lora"])
def test_merged_ce_and_kl_forward_equals_separate_forwards(tiny, data, kl_data, monkeypatch, kind):
    from em_interp.training import engine

    def make(seed: int):
        if kind == "vector":
            return em.SteeringVector(tiny, layer=1, init="random", alpha=1.0 + seed)
        lora = em.LoRA(tiny, 1, rank=1, site="mlp_out", seed=seed)
        lora.load_state({k: torch.randn(v.shape, generator=torch.Generator().manual_seed(seed)) for k, v in lora.state().items()})
        return lora

    train_tok, kl_tok = TokenizedChats(data, tiny.tokenizer), TokenizedChats(kl_data, tiny.tokenizer)
    results = {}
    for merge, padding in (("never", -1.0), ("always", 100.0)):
        monkeypatch.setitem(engine.MERGE_PADDING, "cpu", padding)
        for n in (1, 2):
            adapters = [make(s) for s in range(n)]
            computer = LossComputer(tiny, train_tok, kl_tok, batch_size=4, kl_batch_size=4, start_layer=1)
            owners = list(range(n))
            parts = [engine._Part("train", [1] * n, "answer", owners), engine._Part("kl", [0] * n, "answer", owners)]
            assert computer._worth_merging(parts) == (merge == "always")
            ce, kl = computer.losses(adapters, [1, 0][:n], [0, 1][:n])
            (ce.sum() + 3.0 * kl.sum()).backward()
            grads = [p.grad.clone() for a in adapters for p in a.parameters()]
            results[merge, n] = (ce.detach(), kl.detach(), grads)
    for n in (1, 2):
        (ce_a, kl_a, g_a), (ce_b, kl_b, g_b) = results["never", n], results["always", n]
        torch.testing.assert_close(ce_a, ce_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kl_a, kl_b, rtol=1e-4, atol=1e-7)
        assert float(kl_a.min()) > 0
        for x, y in zip(g_a, g_b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_kl_without_gradient_for_zero_coefficient_adapters_changes_no_value(tiny, data, kl_data):
    """A λ = 0 adapter's KL runs without a gradient (its own no-grad forward): the same CE, KL and gradients."""
    train_tok, kl_tok = TokenizedChats(data, tiny.tokenizer), TokenizedChats(kl_data, tiny.tokenizer)
    coefs = torch.tensor([0.0, 3.0])
    results = []
    for kl_grad in (None, [False, True]):
        adapters = [em.SteeringVector(tiny, layer=1, init="random", alpha=1.0 + s) for s in range(2)]
        computer = LossComputer(tiny, train_tok, kl_tok, batch_size=4, kl_batch_size=4, start_layer=1)
        ce, kl = computer.losses(adapters, [1, 0], [0, 1], kl_grad=kl_grad)
        (ce + coefs * kl).sum().backward()
        results.append((ce.detach(), kl.detach(), [a.vector.grad.clone() for a in adapters]))
    (ce_a, kl_a, g_a), (ce_b, kl_b, g_b) = results
    torch.testing.assert_close(ce_a, ce_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl_a, kl_b, rtol=1e-4, atol=1e-7)
    assert float(kl_b.min()) > 0
    for x, y in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    computer = LossComputer(tiny, train_tok, kl_tok, batch_size=4, kl_batch_size=4, start_layer=1)
    vec = em.SteeringVector(tiny, layer=1, init="random")
    _, kl = computer.losses([vec], [0], [0], kl_grad=[False])
    assert not kl.requires_grad and float(kl[0]) > 0  # logged, outside the graph


def test_merging_pads_only_within_the_device_budget(tiny, data, kl_data):
    from em_interp.training import engine

    train_tok, kl_tok = TokenizedChats(data, tiny.tokenizer), TokenizedChats(kl_data, tiny.tokenizer)
    computer = LossComputer(tiny, train_tok, kl_tok, batch_size=4, kl_batch_size=4, start_layer=1)
    widths = {w: (which, k) for which, plan, tok in (("train", computer.plan, train_tok), ("kl", computer.kl_plan, kl_tok))
              for k in range(len(plan)) for w in [tok.collate(plan[k]).input_ids.shape[1]]}
    assert len(widths) >= 2, "the test needs batches of different widths"
    (_, (wh1, k1)), (_, (wh2, k2)) = sorted(widths.items())[0], sorted(widths.items())[-1]
    parts = [engine._Part(wh1, [k1], "answer", [0]), engine._Part(wh2, [k2], "answer", [0])]
    assert engine.MERGE_PADDING["cpu"] == 0.0 and not computer._worth_merging(parts)  # a CPU pays for padding
    same = [engine._Part(wh1, [k1], "answer", [0]), engine._Part(wh1, [k1], "answer", [0])]
    assert computer._worth_merging(same)  # equal widths: no padding, merged on every device


def test_loss_functions_equal_their_definitions_and_compile_to_the_same_values():
    from em_interp.training.objective import compiled, token_ce, token_kl

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(7, 50, generator=g)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 50, (7,), generator=g)
    ref = torch.log_softmax(2 * torch.randn(7, 50, generator=g), -1)
    ce = token_ce(logits, targets)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none"))
    kl = token_kl(ref, logits)
    direct = (ref.exp() * (ref - torch.log_softmax(logits.float(), -1))).sum(-1)
    torch.testing.assert_close(kl, direct)
    torch.testing.assert_close(token_kl(ref, torch.log_softmax(logits.float(), -1)), direct)  # log-probs are logits
    assert token_kl(ref, ref).abs().max() < 1e-6
    grad = torch.autograd.grad((ce + 0.5 * kl).sum(), logits)[0]
    compiled_ce, compiled_kl = compiled(token_ce), compiled(token_kl)
    assert compiled_ce is not token_ce and compiled(token_ce) is compiled_ce  # compiled once
    for n in (7, 5):  # a second size reuses the dynamic-shape graph
        c_ce, c_kl = compiled_ce(logits[:n], targets[:n]), compiled_kl(ref[:n], logits[:n])
        torch.testing.assert_close(c_ce, ce[:n])
        torch.testing.assert_close(c_kl, kl[:n], atol=1e-5, rtol=1e-5)
    c_grad = torch.autograd.grad((compiled_ce(logits, targets) + 0.5 * compiled_kl(ref, logits)).sum(), logits)[0]
    torch.testing.assert_close(c_grad, grad)


def test_the_loss_is_compiled_with_the_model(tiny, data, kl_data):
    from em_interp.model import fastpath
    from em_interp.training.objective import token_ce

    tok, kl_tok = TokenizedChats(data, tiny.tokenizer), TokenizedChats(kl_data, tiny.tokenizer)
    make = lambda: LossComputer(tiny, tok, kl_tok, batch_size=4, kl_batch_size=4, start_layer=1)  # noqa: E731
    assert make()._ce is token_ce  # "auto": a tiny model on a CPU is not compiled
    fastpath.set_fast_path("on", compile=True)
    try:
        assert make()._ce is not token_ce
    finally:
        fastpath.set_fast_path("auto", compile="auto")
