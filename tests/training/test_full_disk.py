"""A full disk during a checkpoint or an export: one error line naming the file, nothing half-written, the
previous files intact. In this process (torch's and safetensors' own ENOSPC errors, as they raise them), and
through the real program on a tiny tmpfs in a private mount namespace."""

from __future__ import annotations

import errno
import subprocess

import pytest
import safetensors
import torch

from fact_lightning.errors import UserError
from fact_lightning.files import assembled_folder
from fact_lightning.training.checkpoints import AtomicCheckpointIO, read_checkpoint
from tests.training.runs import CONFIG, FACT_TRAIN, error_lines
from tests.conftest import NEEDS_MOUNT_NS, unshare_mount_works

pytestmark = pytest.mark.timeout(300)


def _enospc_after_some_bytes(original):
    """torch.save that writes a little, then fails as torch does on a full disk: a RuntimeError whose
    context is the OSError its file object raised."""

    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    return save


def test_a_full_disk_during_a_checkpoint_is_one_user_error_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "epoch": 0, "state_dict": {}}, path)
    monkeypatch.setattr(torch, "save", _enospc_after_some_bytes(torch.save))
    with pytest.raises(UserError, match=f"cannot write the checkpoint {path}: No space left on device"):
        io.save_checkpoint({"global_step": 2, "epoch": 0, "state_dict": {}}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file
    assert read_checkpoint(path)["global_step"] == 1


def test_a_full_disk_during_an_export_leaves_the_old_folder_and_no_staging(tmp_path):
    dest = tmp_path / "final"
    with assembled_folder(dest) as staged:
        (staged / "adapter.safetensors").write_bytes(b"old")
    with pytest.raises(safetensors.SafetensorError):
        with assembled_folder(dest) as staged:
            (staged / "adapter.safetensors").write_bytes(b"new, half")
            raise safetensors.SafetensorError("I/O error: No space left on device (os error 28)")
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert (dest / "adapter.safetensors").read_bytes() == b"old"


@pytest.mark.slow
@pytest.mark.parametrize("full", ["checkpoints", "adapters"])
def test_a_full_disk_ends_the_fit_in_one_line_with_nothing_half_written(shards, tmp_path, full):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert unshare_mount_works(mnt), NEEDS_MOUNT_NS  # a real full disk, never skipped
    config = CONFIG.format(steps=4, shards=shards)
    config = config.replace("every_n_train_steps: 2,", f"every_n_train_steps: 2, dirpath: {mnt}/checkpoints,"
                            if full == "checkpoints" else "every_n_train_steps: 2,")
    config = config.replace("{dtype: null}", f"{{dtype: null, dirpath: {mnt}/adapters}}" if full == "adapters"
                            else "{dtype: null}")
    (tmp_path / "config.yaml").write_text(config)
    # 1 MiB: the folders are made, and the first checkpoint (~24 MB) or export (~8 MB) does not fit.
    script = ('mount -t tmpfs -o size=1m tmpfs "$1" || exit 99; '
              '"$2" fit --config "$3" --trainer.default_root_dir "$4"; '
              'rc=$?; echo "LISTING:"; cd "$1" && find . -mindepth 1; exit $rc')
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(mnt), FACT_TRAIN,
                             str(tmp_path / "config.yaml"), str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "No space left on device" in lines[0] and str(mnt / full) in lines[0], lines[0]
    listing = result.stdout.split("LISTING:")[1].split()
    # No temporary file, no staging folder, no half checkpoint: at most the (empty) folder itself.
    assert set(listing) <= {f"./{full}"}, listing
