"""A batch that can never form is an error before training starts (a stream would spin forever, an in-memory
run would end without a step), and a data set on which the same-identity shuffle cannot act is said so."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fact_lightning.data.datamodule import FactDataModule
from fact_lightning.experiments.synthetic import write_synthetic_shards

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).parents[2]
NO_PARTNER = "no partner for any sample"


def _data(root, **kw) -> FactDataModule:
    return FactDataModule(str(root), resolution=64, token_dim=64, encoder="tiny", num_workers=0, **kw)


@pytest.fixture(scope="module")
def singletons(tmp_path_factory) -> Path:
    """Three identities with one photo each: no sample has a same-identity partner."""
    root = tmp_path_factory.mktemp("singletons")
    write_synthetic_shards(root, identities=3, images_per_identity=1, groups_per_shard=2, resolution=64)
    return root


def test_a_batch_larger_than_a_streaming_epoch_is_refused(shards):
    data = _data(shards, batch_size=8, streaming=True, epoch_samples=5)
    with pytest.raises(ValueError, match=r"data.batch_size 8 is larger than data.epoch_samples 5"):
        data.check()
    with pytest.raises(ValueError, match=r"data.batch_size 8 is larger than data.epoch_samples 5"):
        data.setup("fit")  # also without fact-train's check first
    _data(shards, batch_size=5, streaming=True, epoch_samples=5).check()


def test_a_batch_larger_than_the_data_set_is_refused(shards):
    with pytest.raises(ValueError, match=rf"data.batch_size 13 is larger than the data set: 12 samples in {shards}"):
        _data(shards, batch_size=13, streaming=False).check()
    data = _data(shards, batch_size=12, streaming=False)
    data.check()
    data.setup("fit")
    assert len(data.train_dataloader()) == 1


def test_each_process_needs_a_full_batch_of_its_share(shards):
    data = _data(shards, batch_size=7, streaming=False)
    data.check()  # 12 samples, one process: fits
    data.trainer = SimpleNamespace(world_size=2, global_rank=0)
    with pytest.raises(ValueError, match=r"12 samples in .* \(6 per process on 2\)"):
        data.setup("fit")


def test_a_data_set_without_a_same_identity_pair_is_said_so(singletons, shards, caplog):
    with caplog.at_level(logging.WARNING, logger="fact_lightning.data.datamodule"):
        data = _data(singletons, batch_size=2, streaming=False)
        data.check()
        data.setup("fit")
    said = [r.getMessage() for r in caplog.records if NO_PARTNER in r.getMessage()]
    assert len(said) == 1 and "same-identity shuffle" in said[0] and str(singletons) in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fact_lightning.data.datamodule"):
        _data(shards, batch_size=2, streaming=False).check()
    assert not [r for r in caplog.records if NO_PARTNER in r.getMessage()]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fact_train_refuses_a_batch_that_never_forms_in_one_line(shards, tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([str(Path(sys.executable).parent / "fact-train"), "fit", "--config",
                           str(ROOT / "configs" / "tiny.yaml"), "--data.root", str(shards), "--data.resolution", "64",
                           "--data.streaming", "false", "--data.batch_size", "13",
                           "--trainer.default_root_dir", str(run)], capture_output=True, text=True, timeout=280)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "data.batch_size 13" in errors[0] and "12 samples" in errors[0]
    assert not run.exists()  # refused before the run folder was made
