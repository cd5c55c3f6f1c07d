"""The training step issues no blocking host-to-device copies and reads nothing back on the host (no GPU needed).

On a GPU, a tensor made on the host and moved with a blocking ``.to(device)`` makes the host wait for the
device's queue to drain, every step. ``benchmarks.step_copies.HostCopyCounter`` tracks, on the CPU, where each
tensor would live on a GPU, and lists such copies with their code sites; here it watches real Lightning training
steps of the tiny module (fused Adam, as configs/sd15.yaml) on shards with cached latents.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from benchmarks.step_copies import HostCopyCounter, report

STEPS = 2  # the first pays one-time moves (Lightning's logging state, the noise schedule's table)


@pytest.fixture(scope="module")
def counted_steps(tmp_path_factory):
    import lightning.pytorch as pl

    from data_tools.latents import run_add_latents
    from data_tools.options import AddLatentsOptions, LatentOptions
    from fact_lightning.data.datamodule import FactDataModule
    from fact_lightning.experiments.synthetic import write_synthetic_shards
    from fact_lightning.models.resampler import TINY_RESAMPLER
    from fact_lightning.training.base_spec import TinyBase
    from fact_lightning.training.module import FactModule

    root = tmp_path_factory.mktemp("cached_shards")
    write_synthetic_shards(root, identities=2, images_per_identity=2, groups_per_shard=2, resolution=64)
    run_add_latents(root, AddLatentsOptions(latents=LatentOptions(vae="tiny"), device="cpu"))
    base = TinyBase(seed=0)
    module = FactModule(base, TINY_RESAMPLER, optimizer=partial(torch.optim.Adam, lr=1e-4, fused=True))
    data = FactDataModule(str(root), batch_size=2, token_dim=64, vae=base.describe_vae(), streaming=False,
                          num_workers=0)
    counter: list[HostCopyCounter] = []
    training_step = module.training_step

    def counted(batch, batch_idx):
        if not counter:  # the model is built and on its device by now
            counter.append(HostCopyCounter(module.device, [*module.parameters(), *module.buffers()]))
        counter[0].mark(batch)  # Lightning moved the batch before the step
        with counter[0].at_step(batch_idx):
            return training_step(batch, batch_idx)

    module.training_step = counted
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50)
    trainer.fit(module, data)
    assert module.trainer.global_step == STEPS
    return counter[0]


def test_training_step_makes_no_blocking_host_to_device_copies(counted_steps):
    steady = [e for e in counted_steps.blocking() if e.step > 0]
    assert steady == [], f"{len(steady)} blocking host-to-device copies in training steps:\n{report(steady)}"


def test_training_step_reads_nothing_back_on_the_host(counted_steps):
    """Outside logging steps the fused-Adam step never waits for the device (no .item(), bool(), .tolist())."""
    assert counted_steps.syncs == [], report(counted_steps.syncs)


def test_counter_follows_tensors_to_the_device():
    """The counter itself: what is made on the host and moved counts, what is made or computed on the device not."""
    weight = torch.nn.Parameter(torch.randn(3, 3))
    batch = {"x": torch.randn(2, 3)}
    counter = HostCopyCounter("cpu", [weight, batch])
    with counter.at_step(0):
        y = batch["x"] @ weight                            # on the device: inputs there
        _ = y.to(weight.device)                            # already there: no copy
        noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))  # host: a CPU generator, no device
        _ = y + noise.to(y)                                # blocking copy 1
        _ = torch.stack([noise, noise]).to(y.device, non_blocking=True)  # an asynchronous copy
        _ = torch.zeros(2, device=y.device)                # made on the device
        _ = torch.tensor([1, 2], device=y.device)          # Python data to the device: blocking copy 2
        ids = torch.from_numpy(__import__("numpy").arange(3))  # host (a tokenizer's ids)
        moved = ids.to(weight.device)                      # blocking copy 3
        _ = moved * 2                                      # moved: on the device now
        _ = y.sum().item()                                 # a host read of a device tensor
        _ = noise.sum().item()                             # host data: no read back
        back = y.cpu()                                     # a host read: the copy is on the host
        _ = back.to(y)                                     # blocking copy 4
    assert [e.shape for e in counter.blocking()] == [(2, 3), (2,), (3,), (2, 3)]
    assert len(counter.copies) == 5 and [e.non_blocking for e in counter.copies].count(True) == 1
    assert [e.op for e in counter.syncs] == ["Tensor.item", "Tensor.cpu"]
    assert all("test_bench_step_copies.py" in e.caller for e in counter.copies)
