"""The adapter's EMA (callbacks/ema.py): the update, checkpoints and an exact resume, the exports beside the raw
weights, the previews drawn with it, the resume policy, and 2-process DDP and FSDP2 runs through ``fact-train``."""

from __future__ import annotations

import json
import shutil

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from fact_lightning.callbacks.ema import AdapterEMA, averaged_weights, warmed_up_decay
from fact_lightning.models.adapter_io import load_adapter, read_adapter_metadata
from fact_lightning.models.resampler import TINY_RESAMPLER
from fact_lightning.training import resume
from fact_lightning.training.base_spec import TinyBase
from fact_lightning.training.module import FactModule

from tests.training.runs import callback, fit_here, write_config

EMA = "fact_lightning.callbacks.ema.AdapterEMA"
DECAY = 0.5  # a short horizon: a few steps at Adam's lr move the average visibly away from the raw weights


def tiny_module(adapter_dtype: str = "float32") -> FactModule:
    pl.seed_everything(0)
    module = FactModule(TinyBase(), TINY_RESAMPLER, adapter_dtype=adapter_dtype)
    module.configure_model()
    return module


def weights(module: FactModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.adapter.named_parameters()}


def perturb(module: FactModule, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def ema_state(checkpoint_path) -> dict:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    return checkpoint["callbacks"]["AdapterEMA"]


# -- the update ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter_dtype, warmup", [("float64", True), ("float32", True), ("float64", False)])
def test_update_matches_a_hand_computation(adapter_dtype, warmup):
    module = tiny_module(adapter_dtype)
    ema = AdapterEMA(decay=0.2, warmup=warmup)
    ema.start(module)
    expected = {n: w.double() for n, w in weights(module).items()}
    decays = []
    for k in range(3):
        perturb(module, seed=k)
        ema.update()
        d = min(0.2, (1 + k) / (10 + k)) if warmup else 0.2
        decays.append(d)
        expected = {n: d * expected[n] + (1 - d) * w.double() for n, w in weights(module).items()}
    assert decays == ([0.1, 2 / 11, 0.2] if warmup else [0.2] * 3)  # the warm-up, then the cap
    assert [warmed_up_decay(0.2, warmup, n) for n in range(3)] == decays
    got = ema.full_average()
    assert got.keys() == expected.keys() == {n for n, p in module.adapter.named_parameters() if p.requires_grad}
    want_dtype = torch.float64 if adapter_dtype == "float64" else torch.float32  # at least float32
    tolerance = 1e-12 if adapter_dtype == "float64" else 1e-6
    for name, value in got.items():
        assert value.dtype == want_dtype
        torch.testing.assert_close(value.double(), expected[name], rtol=tolerance, atol=tolerance)
    assert ema.updates == 3


def test_decay_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="AdapterEMA decay"):
        AdapterEMA(decay=1.5)


# -- previews -------------------------------------------------------------------------------------------------
def test_previews_draw_with_the_ema_and_restore_the_raw_weights(shards, monkeypatch):
    from fact_lightning.callbacks.previews import Previews, read_preview_identities
    from fact_lightning.inference.generator import FacePortraitGenerator

    module = tiny_module()
    previews = Previews(every_n_steps=1, prompts=["a photo of {subject}"], inference_steps=1, face_similarity=False)
    previews.identities = read_preview_identities(shards, count=1)
    previews._size = 64
    seen = []
    original = FacePortraitGenerator.__call__

    def spy(generator, *args, **kwargs):
        seen.append(weights(module))
        return original(generator, *args, **kwargs)

    monkeypatch.setattr(FacePortraitGenerator, "__call__", spy)
    ema = AdapterEMA(decay=0.9)
    trainer = pl.Trainer(accelerator="cpu", callbacks=[ema], logger=False, enable_checkpointing=False)
    ema.start(module)
    average = ema.full_average()
    perturb(module, seed=0)  # "training" moved the raw weights away from the average
    raw = weights(module)

    previews.generate(module, trainer)
    assert len(seen) == 2  # with the adapter and at scale 0
    for during in seen:
        assert all(torch.equal(during[n], average[n]) for n in average)
        assert not all(torch.equal(during[n], raw[n]) for n in raw)
    assert all(torch.equal(value, raw[n]) for n, value in weights(module).items())  # bit for bit back

    seen.clear()  # without an EMA callback: the raw weights
    previews.generate(module, pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False))
    assert all(torch.equal(seen[0][n], raw[n]) for n in raw)


def test_averaged_weights_is_a_no_op_without_ema():
    module = tiny_module()
    before = weights(module)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    with averaged_weights(trainer, module) as ema:
        assert ema is None
        assert all(torch.equal(p, before[n]) for n, p in weights(module).items())


# -- checkpoints, exact resume and exports (the real fact-train program, in this process) --------------------------
@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """An uninterrupted 6-step run, and one stopped at step 4 and resumed to 6 (both with EMA decay 0.5)."""
    tmp = tmp_path_factory.mktemp("ema_runs")
    ema = callback(EMA, decay=DECAY)
    whole, split = tmp / "whole", tmp / "split"
    (tmp / "c6").mkdir(), (tmp / "c4").mkdir()
    six, four = write_config(tmp / "c6", shards, steps=6), write_config(tmp / "c4", shards, steps=4)
    assert fit_here(six, whole, ema) == 0
    assert fit_here(four, split, ema) == 0
    at_four = tmp / "at_four"
    shutil.copytree(split, at_four)  # the run as it stood at step 4, for the resume-policy tests
    assert fit_here(six, split, ema, "--ckpt_path", "last") == 0
    return {"whole": whole, "split": split, "at_four": at_four, "six": six, "tmp": tmp}


@pytest.mark.slow
def test_checkpoints_hold_the_ema_and_a_resume_restores_it_exactly(runs):
    whole = ema_state(runs["whole"] / "checkpoints" / "last.ckpt")
    assert {k: whole[k] for k in ("format", "version", "decay", "warmup", "updates", "step")} == \
        {"format": "fact-adapter-ema", "version": 1, "decay": DECAY, "warmup": True, "updates": 6, "step": 6}
    raw = torch.load(runs["whole"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert {"adapter." + k for k in whole["average"]} == set(raw)  # every trainable weight, and only those
    assert all(v.dtype == torch.float64 for v in whole["average"].values())  # the run's float64 adapter
    assert ema_state(runs["at_four"] / "checkpoints" / "last.ckpt")["updates"] == 4
    split = ema_state(runs["split"] / "checkpoints" / "last.ckpt")
    assert split["updates"] == 6 and split["step"] == 6
    assert all(torch.equal(split["average"][k], v) for k, v in whole["average"].items())  # exact, to the bit


@pytest.mark.slow
def test_exports_write_the_ema_beside_the_raw_weights(runs):
    run = runs["whole"]
    average = ema_state(run / "checkpoints" / "last.ckpt")["average"]
    final = run / "adapters" / "final"
    raw, ema = load_file(final / "adapter.safetensors"), load_file(final / "adapter_ema.safetensors")
    assert raw.keys() == ema.keys() == average.keys()
    assert all(torch.equal(ema[k], average[k]) for k in average)  # dtype null: float64 as trained
    difference = max((ema[k] - raw[k]).abs().max().item() for k in raw)
    assert difference > 1e-4, difference
    assert json.loads(read_adapter_metadata(final / "adapter_ema.safetensors")["ema"]) == \
        {"decay": DECAY, "warmup": True, "updates": 6}
    loaded = load_adapter(final / "adapter_ema.safetensors")  # the project's own loader takes it
    assert all(torch.equal(p.detach(), average[n].to(p.dtype)) for n, p in loaded.named_parameters())
    official_raw = torch.load(final / "fact_adapter.bin", map_location="cpu", weights_only=True)
    official_ema = torch.load(final / "fact_adapter_ema.bin", map_location="cpu", weights_only=True)
    assert official_raw.keys() == official_ema.keys()
    assert torch.equal(official_ema["local_fac_prj.latents"].double(), average["projection.latents"])
    assert not torch.equal(official_ema["local_fac_prj.latents"], official_raw["local_fac_prj.latents"])
    for step in ("step-000002", "step-000004", "step-000006"):  # every checkpoint's export has both
        assert (run / "adapters" / step / "adapter_ema.safetensors").is_file()
    card = (run / "README.md").read_text()
    assert "EMA: on (decay 0.5" in card and "adapters/final/adapter_ema.safetensors" in card
    split = load_file(runs["split"] / "adapters" / "final" / "adapter_ema.safetensors")
    assert all(torch.equal(split[k], ema[k]) for k in ema)


@pytest.mark.slow
def test_a_resume_with_another_decay_continues_the_average_with_a_warning(runs, caplog):
    run = runs["tmp"] / "decay"
    shutil.copytree(runs["at_four"], run)
    with caplog.at_level("WARNING", logger="fact_lightning.callbacks.ema"):
        assert fit_here(runs["six"], run, callback(EMA, decay=0.25), "--ckpt_path", "last") == 0
    assert "trainer.callbacks.AdapterEMA.decay 0.5 -> 0.25" in caplog.text
    state = ema_state(run / "checkpoints" / "last.ckpt")
    assert state["decay"] == 0.25 and state["updates"] == 6  # continued, not restarted
    whole = ema_state(runs["whole"] / "checkpoints" / "last.ckpt")["average"]
    assert not all(torch.equal(state["average"][k], v) for k, v in whole.items())  # the new decay applied


@pytest.mark.slow
def test_a_resume_without_saved_ema_starts_it_from_the_resumed_weights(shards, runs, caplog):
    run = runs["tmp"] / "late"
    four = write_config(runs["tmp"] / "c4", shards, steps=4)
    assert fit_here(four, run) == 0  # no EMA
    with caplog.at_level("WARNING", logger="fact_lightning.callbacks.ema"):
        assert fit_here(runs["six"], run, callback(EMA, decay=DECAY, warmup=False), "--ckpt_path", "last") == 0
    assert "trainer.callbacks.AdapterEMA 'off' -> 'on'" in caplog.text
    state = ema_state(run / "checkpoints" / "last.ckpt")
    assert state["updates"] == 2 and state["step"] == 6
    # average = 0.25 w4 + 0.25 w5 + 0.5 w6 (decay 0.5, no warm-up, from the resumed weights w4)
    w = {s: load_file(run / "adapters" / f"step-00000{s}" / "adapter.safetensors") for s in (4, 6)}
    key = "projection.latents"
    assert not torch.equal(state["average"][key], w[6][key]) and not torch.equal(state["average"][key], w[4][key])


def test_resume_check_reports_every_ema_change():
    saved = {"callbacks": {"AdapterEMA": {"format": resume.AVERAGING_FORMAT, "decay": 0.999, "warmup": True}}}
    assert resume.saved_averaging(saved) == {"decay": 0.999, "warmup": True}
    assert resume.saved_averaging({"callbacks": {}}) is None
    ema = AdapterEMA(decay=0.9999)
    assert resume.averaging_changes(resume.saved_averaging(saved), ema.settings()) == \
        [("trainer.callbacks.AdapterEMA.decay", 0.999, 0.9999)]
    assert resume.averaging_changes(None, ema.settings()) == [("trainer.callbacks.AdapterEMA", "off", "on")]
    assert resume.averaging_changes({"decay": 0.9, "warmup": True}, None) == \
        [("trainer.callbacks.AdapterEMA", "on", "off")]
    assert resume.averaging_changes(None, None) == []


def test_the_resume_check_names_an_ema_switched_off():
    module = tiny_module()
    checkpoint = {"callbacks": {"AdapterEMA": {"format": resume.AVERAGING_FORMAT, "decay": 0.9, "warmup": True}}}
    assert ("trainer.callbacks.AdapterEMA", "on", "off") in resume.check(checkpoint, module, callbacks=[])
    assert resume.check(checkpoint, module, callbacks=[AdapterEMA(decay=0.9)]) == []


def test_a_foreign_ema_state_is_one_error_line():
    ema = AdapterEMA()
    with pytest.raises(resume.CheckpointMismatch, match="EMA state"):
        ema.load_state_dict({"format": "something-else", "version": 1})
    ema.load_state_dict({"format": resume.AVERAGING_FORMAT, "version": 1, "decay": 0.9999, "warmup": True,
                         "updates": 1, "step": 1, "average": {"not.a.weight": torch.zeros(1)}})
    with pytest.raises(resume.CheckpointMismatch, match="does not match the adapter"):
        ema.start(tiny_module())


# -- 2 processes: DDP and FSDP2 through the real fact-train --------------------------------------------------------
@pytest.fixture(scope="module")
def single_process_ema(shards, tmp_path_factory):
    """The reference: test_distributed's run on one process (batch 4), with the EMA."""
    from fact_lightning.cli import main

    from tests.training.test_distributed import write_run_config

    config = write_run_config(tmp_path_factory.mktemp("ema_single"), shards, "single")
    main(["fit", "--config", str(config), "--data.batch_size", "4", "--trainer.default_root_dir", str(config.parent),
          callback(EMA, decay=DECAY), *MOMENTUM])
    final = config.parent / "adapters" / "final"
    return load_file(final / "adapter_ema.safetensors"), load_file(final / "adapter.safetensors")


# SGD with momentum: an optimizer with state, as Lightning 2.6's FSDP2 resume needs (with a stateless one it fails
# in _rekey_optimizer_state_if_needed), and no Adam, whose first steps turn the batch split's rounding into
# full-size updates.
MOMENTUM = ("--model.optimizer.init_args.momentum", "0.9")


def run_two_processes(tmp, shards, strategy: str, *overrides: str, resume: bool = False) -> None:
    """test_distributed's run on 2 processes, through the real program (Lightning starts rank 1). ``resume``: the
    run again from its own config.yaml (which the first run rewrote with the callbacks below) and last.ckpt."""
    import os
    import subprocess
    import sys

    if strategy == "ddp":
        extra = ["--trainer.strategy", "ddp"]
    else:
        extra = ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
                 "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
                 "--trainer.strategy.save_distributed_checkpoint", "false"]  # as sd15_fsdp.yaml
    config = tmp / strategy / "config.yaml"
    cmd = [sys.executable, "-m", "fact_lightning.cli", "fit", "--config", str(config), *overrides]
    if resume:
        cmd += ["--ckpt_path", "last"]
    else:
        cmd += ["--data.batch_size", "2", "--trainer.devices", "2", *extra, callback(EMA, decay=DECAY),
                "--trainer.enable_checkpointing", "true",
                callback("lightning.pytorch.callbacks.ModelCheckpoint", dirpath=str(config.parent / "checkpoints"),
                         every_n_train_steps=1, save_last=True), *MOMENTUM]
    result = subprocess.run(cmd, cwd=config.parent, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_average_as_one(strategy, single_process_ema, shards, tmp_path):
    """Both end with the single process's EMA, and their checkpoint (under FSDP2 gathered from the shards) holds
    the exported one. The FSDP2 run stops after 2 steps and resumes from its full checkpoint (sd15_fsdp.yaml's
    format): the weights and the EMA are restored into the shards exactly."""
    from tests.training.test_distributed import write_run_config

    write_run_config(tmp_path, shards, strategy)
    if strategy == "fsdp2":
        run_two_processes(tmp_path, shards, strategy, "--trainer.max_steps", "2")
        run_two_processes(tmp_path, shards, strategy, "--trainer.max_steps", "3", resume=True)
    else:
        run_two_processes(tmp_path, shards, strategy)
    got = load_file(tmp_path / strategy / "adapters" / "final" / "adapter_ema.safetensors")
    saved = ema_state(tmp_path / strategy / "checkpoints" / "last.ckpt")
    assert saved["updates"] == 3 and all(torch.equal(saved["average"][k], v) for k, v in got.items())
    want, want_raw = single_process_ema
    init = {k: v.double() for k, v in weights(tiny_module()).items()}  # as test_distributed's runs start
    keys = sorted(want)
    assert got.keys() == want.keys()
    flat = lambda state: torch.cat([state[k].flatten().double() for k in keys])  # noqa: E731
    moved = (flat(want) - flat(init)).norm()
    assert moved > 1e-3 and (flat(want) - flat(want_raw)).norm() > 1e-4  # it trained; the average is not the raw
    error = ((flat(got) - flat(want)).norm() / moved).item()
    print(f"{strategy}: EMA error relative to its movement {error:.2e}")
    # Measured: 1.3e-8 for DDP and for FSDP2 (float64 runs; the batch split's rounding only).
    assert error < 1e-6, error
