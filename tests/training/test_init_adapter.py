"""``model.init_adapter``: a run starts from released weights (ours or the official file), checked first."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from fact_lightning.errors import UserError
from fact_lightning.experiments.synthetic import write_synthetic_shards
from fact_lightning.files import sha256_file
from fact_lightning.interop.official import export_fact_checkpoint
from fact_lightning.models.adapter_io import read_adapter_metadata, save_adapter
from fact_lightning.models.resampler import TINY_RESAMPLER
from fact_lightning.training.base_spec import TinyBase
from fact_lightning.training.module import FactModule
from tests.training.runs import error_lines, fact_train, final_adapter, fit_here, same_weights, write_config
from tests.training.test_objective import make_data


def built(**kw) -> FactModule:
    module = FactModule(TinyBase(), kw.pop("projection", TINY_RESAMPLER), mask_loss_prob=1.0, fair_weight=0.01, **kw)
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A module whose adapter differs from a fresh one everywhere (open gates, perturbed weights), saved
    in our format (float32 and float16) and the official one."""
    torch.manual_seed(1)
    module = built()
    with torch.no_grad():
        for param in module.adapter.parameters():
            param.add_(0.05 * torch.randn_like(param))
        for block in module.adapter.blocks.values():
            block.alpha_attn.fill_(0.8)
            block.alpha_dense.fill_(0.6)
    folder = tmp_path_factory.mktemp("init")
    files = {"float32": save_adapter(module.adapter, folder / "adapter.safetensors"),
             "float16": save_adapter(module.adapter, folder / "adapter16.safetensors", dtype=torch.float16),
             "official": export_fact_checkpoint(module.adapter, folder / "fact_adapter.bin")}
    return module, files


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_images")
    write_synthetic_shards(root, identities=1, images_per_identity=2, groups_per_shard=1, resolution=64)
    data = make_data(root)
    data.setup("fit")
    return default_collate(data._train.samples[:2])


def loss(module: FactModule, batch: dict) -> float:
    with torch.no_grad():
        return module.compute_losses(batch, step=-1)["loss"].item()  # fixed draws (seed, step, key)


@pytest.mark.parametrize("kind", ["float32", "official", "float16"])
def test_the_loaded_adapter_is_the_one_trained(trained, batch, kind):
    source, files = trained
    module = built(init_adapter=str(files[kind]))
    saved, loaded = source.adapter.state_dict(), module.adapter.state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:  # float16: equal up to float16's rounding
        want = saved[key].half().float() if kind == "float16" else saved[key]
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], want.reshape(loaded[key].shape)), key
    assert module.hparams.init_adapter_sha256 == sha256_file(files[kind])
    fresh, trained_loss, started = loss(built(), batch), loss(source, batch), loss(module, batch)
    if kind == "float16":
        assert started == pytest.approx(trained_loss, rel=1e-3)
    else:
        assert started == trained_loss
    assert abs(started - fresh) > 1e-4 * abs(fresh)


def test_a_file_of_another_width_names_every_field_that_differs(tmp_path):
    other = built(projection=dataclasses.replace(TINY_RESAMPLER, dim=128, num_queries=8))
    native = save_adapter(other.adapter, tmp_path / "adapter.safetensors")
    official = export_fact_checkpoint(other.adapter, tmp_path / "fact_adapter.ckpt")
    for path in (native, official):
        with pytest.raises(UserError) as err:
            built(init_adapter=str(path))
        message = str(err.value)
        assert "\n" not in message and str(path) in message
        assert "projection.dim 128 (file) vs 64 (model)" in message
        assert "projection.num_queries 8 (file) vs 16 (model)" in message and "token_dim" not in message
    with pytest.raises(UserError, match="does not exist"):
        built(init_adapter=str(tmp_path / "missing.bin"))


def test_nonfinite_weights_are_refused(trained, tmp_path):
    good, path = trained[1]["float32"], tmp_path / "nan.safetensors"
    state = load_file(str(good))
    state[next(iter(state))][..., 0] = float("nan")
    save_file(state, str(path), metadata=read_adapter_metadata(good))
    with pytest.raises(UserError, match="non-finite") as err:
        built(init_adapter=str(path))
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_fact_train_starts_from_a_file_and_records_it(trained, shards, tmp_path):
    _, files = trained
    config = write_config(tmp_path, shards, steps=2)
    run = tmp_path / "run"
    done = fact_train(config, run, "--model.init_adapter", str(files["official"]))
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert checkpoint["hyper_parameters"]["init_adapter"] == str(files["official"])
    assert checkpoint["hyper_parameters"]["init_adapter_sha256"] == sha256_file(files["official"])


@pytest.mark.slow
def test_fact_train_refuses_a_file_of_another_width_in_one_line(shards, tmp_path):
    other = built(projection=dataclasses.replace(TINY_RESAMPLER, dim=128))
    path = save_adapter(other.adapter, tmp_path / "wide.safetensors")
    run = tmp_path / "run"
    done = fact_train(write_config(tmp_path, shards, steps=2), run, "--model.init_adapter", str(path))
    assert done.returncode == 2, done.stderr[-3000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "projection.dim 128 (file) vs 64 (model)" in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not run.exists()


@pytest.mark.slow
def test_a_resume_keeps_the_checkpoint_weights_and_refuses_another_file(trained, shards, tmp_path, capsys):
    """Lightning restores the checkpoint after configure_model loaded the file: a resumed run ends where an
    uninterrupted one does. The same file under the same path resumes; another file's content is refused."""
    _, files = trained
    start = ("--model.init_adapter", str(files["official"]))
    config = write_config(tmp_path, shards, steps=4)
    assert fit_here(config, tmp_path / "whole", *start) == 0
    assert fit_here(config, tmp_path / "cut", *start, "--trainer.max_steps", "2") == 0
    capsys.readouterr()
    assert fit_here(config, tmp_path / "cut", "--ckpt_path", "last", "--model.init_adapter", str(files["float32"])) == 2
    refused = error_lines(capsys.readouterr().err)
    assert len(refused) == 1 and "is not the file the checkpoint started from" in refused[0]
    assert fit_here(config, tmp_path / "cut", *start, "--ckpt_path", "last") == 0
    assert same_weights(final_adapter(tmp_path / "cut"), final_adapter(tmp_path / "whole"))


def test_the_weights_check_names_a_missing_init_adapter(shards, tmp_path, capsys):
    missing = tmp_path / "weights" / "fact_adapter.bin"
    code = fit_here(write_config(tmp_path, shards), tmp_path / "run", "--model.init_adapter", str(missing))
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1 and f"model.init_adapter {missing} does not exist" in lines[0]
    assert not (tmp_path / "run").exists()
