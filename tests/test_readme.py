"""README's examples run as written: the Python example, and every shell command of its ```bash blocks.

The shell commands are read from README.md when the test runs, so README and test cannot drift. Each README
section runs in a fresh ``bash -e`` after README's own set-up (``source .venv/bin/activate``), its commands in
README's order, in a scratch copy of the repository's layout (``configs/``, ``tests/fixtures``, ``.venv``) so
that what they write (``out/``, ``runs/``, ``sheet.png``) lands there. A command is run unless ``NOT_RUN``
names it with the reason; a new or changed README command therefore runs, or fails here until it is
classified; a command README gives twice runs once. ``make demo`` is not run whole: its first step, the shard build, runs as the Makefile writes it, so
that the commands that look at the demo's shards have them. ``tensorboard`` runs for real: started on a free
port (``--port``), asked over HTTP for its runs until it answers (bounded), then stopped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
SETUP = "source .venv/bin/activate"  # README's set-up: every shell runs it first

# README commands this test does not run, as README writes them (comments dropped, whitespace collapsed).
NEEDS_REAL_WEIGHTS = "needs real weights (README, Real weights): none can be downloaded here"
NEEDS_GPUS = "the paper's recipe: 8 GPUs and the real SD1.5 weights (tests/training/test_weights_check.py runs " \
             "it on this CPU machine and checks its one-line errors)"
NETWORK = "downloads from the network, which this test does not use"
CLUSTER = "starts ranks on the nodes of a cluster (tests/training/test_multinode.py runs the by-hand launch " \
          "with two processes on one machine)"
NOT_RUN = {
    "make demo": "the whole demo (~2.5 min); its shard build runs here as the Makefile writes it, and its fit and "
                 "generate steps are this README's tiny fact-train and fact-generate commands at a smaller size",
    "make test": "the test suite itself",
    'python3 -m venv .venv && .venv/bin/pip install -e ".[all,dev]"': "installs from the package registry "
                                                                      "(network, minutes): the .venv under test "
                                                                      "stands for it",
    "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir weights/sd15 unet/config.json "
    "unet/diffusion_pytorch_model.safetensors vae/config.json vae/diffusion_pytorch_model.safetensors "
    "text_encoder/config.json text_encoder/model.safetensors tokenizer/vocab.json tokenizer/merges.txt "
    "tokenizer/tokenizer_config.json tokenizer/special_tokens_map.json scheduler/scheduler_config.json": NETWORK,
    "hf download openai/clip-vit-large-patch14 --local-dir weights/clip-vit-large-patch14 config.json "
    "model.safetensors preprocessor_config.json tokenizer.json tokenizer_config.json vocab.json merges.txt "
    "special_tokens_map.json": NETWORK,
    "modelscope download --model yucheng1996/FaceChain-FACT --revision v1.0.0 --local_dir weights/fact":
        NETWORK + " (and modelscope is not installed)",
    "fact-data build --src raw/ --out shards/ --encoder S --encoder-weights ms1mv2_model_TransFace_S.pt":
        NEEDS_REAL_WEIGHTS,
    "fact-train fit --config configs/sd15.yaml --data.root /data/shards": NEEDS_GPUS,
    "fact-train fit --config configs/sd15.yaml --config configs/sd15_fsdp.yaml": NEEDS_GPUS,
    "fact-train fit --config configs/sd15.yaml --ckpt_path last": NEEDS_GPUS + "; and a run to resume",
    "fact-train fit --config configs/sd15.yaml --trainer.default_root_dir runs/exp2": NEEDS_GPUS,
    "torchrun --nnodes 2 --nproc-per-node 8 --node-rank $NODE_RANK --master-addr $HEAD --master-port 29500 -m "
    "fact_lightning.cli fit --config configs/sd15.yaml --trainer.num_nodes 2 --trainer.devices 8": CLUSTER,
    "srun fact-train fit --config configs/sd15.yaml --trainer.num_nodes 2 --trainer.devices 8": CLUSTER,
    "MASTER_ADDR=$HEAD MASTER_PORT=29500 NODE_RANK=1 fact-train fit --config configs/sd15.yaml "
    "--trainer.num_nodes 2": CLUSTER,
    "fact-generate --base path/to/sd15 --adapter fact.safetensors --face-encoder ms1mv2_model_TransFace_S.pt "
    "--reference me1.jpg --reference me2.jpg --prompts configs/prompts/example.txt --subject \"a woman\" --seed 0 "
    "--seed 1 --out out/generate": NEEDS_REAL_WEIGHTS,
    "fact-evaluate --base path/to/sd15 --adapter fact.safetensors --face-encoder ms1mv2_model_TransFace_S.pt "
    "--clip path/to/clip-vit-large-patch14 --identities eval_ids/ --prompts configs/prompts/example.txt "
    "--subject \"a person\" --seed 0 --out out/eval": NEEDS_REAL_WEIGHTS,
    "make bench": "a timing run of about a minute on 2 cores, more than this test's budget; its code paths are "
                  "the tiny fit and data reader that run here",
    "make bench-full": "SD1.5-size CPU benchmark: minutes and ~10 GB of memory",
    "python -m benchmarks.gpu --out bench_results/gpu.json [--compile]": "needs a GPU ([--compile] is optional "
                                                                         "syntax, not shell); "
                                                                         "tests/test_benchmarks.py runs it "
                                                                         "with --device cpu --tiny",
    "python -m benchmarks.gpu --base sdxl --out bench_results/gpu_sdxl.json": "needs a GPU (SDXL size); "
                                                                             "tests/test_benchmarks.py runs it with "
                                                                             "--device cpu --tiny --base sdxl",
}
# Sections whose commands do not read the demo's outputs: they start at once, beside the demo's shard build.
WITHOUT_DEMO = ("Generate", "Evaluate")
WORKERS = 2  # sections run two at a time (each command is one Python process with one compute thread)

# ``tensorboard ARGS`` in the shells: the real server on a free port, asked for its runs over HTTP, then stopped.
TENSORBOARD = r'''
import glob, json, os, shutil, socket, subprocess, sys, time, urllib.request
args = sys.argv[1:]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
logdir = args[args.index("--logdir") + 1]
has_events = bool(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True))
server = subprocess.Popen([shutil.which("tensorboard"), *args, "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
runs, deadline = None, time.monotonic() + 90
try:
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/data/runs", timeout=5) as answer:
                runs = json.load(answer)
            if runs or not has_events:
                break
        except OSError:
            pass
        time.sleep(0.25)
finally:
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
if runs is None or (has_events and not runs):
    sys.exit(f"tensorboard {' '.join(args)} did not serve its runs: {server.stderr.read()[-2000:]}")
print(f"tensorboard {' '.join(args)} served on port {port}: runs {runs}")
'''


def normalize(command: str) -> str:
    """A command as README writes it, comments dropped and whitespace collapsed (quotes kept)."""
    out, quote = [], None
    for i, char in enumerate(command):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or command[i - 1].isspace()):
            break
        out.append(char)
    return " ".join("".join(out).split())


def readme_commands() -> list[tuple[str, str, str]]:
    """(section, command as written, normalized) for every command of README's ```bash blocks, in order."""
    text = README.read_text(encoding="utf-8")
    found, section = [], ""
    for match in re.finditer(r"^## ([^\n]+)$|^```bash\n(.*?)^```", text, re.S | re.M):
        if match.group(1):
            section = match.group(1).strip()
            continue
        for command in re.sub(r"\\\n", " ", match.group(2)).splitlines():
            if normalize(command):
                found.append((section, command.strip(), normalize(command)))
    return found


def makefile_demo_build() -> str:
    """The first command of the Makefile's ``demo`` recipe (the shard build), its variables substituted."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*[:?]?=\s*(.*?)\s*$", text, re.M))
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    command = re.sub(r"\\\n\t*", " ", recipe).splitlines()[0].strip()
    assert "fact-data build" in command, command
    return re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], command)


def test_readme_python_example_runs():
    text = README.read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["identity"].shape == (1, 16, 32)
    assert scope["noise_pred"].shape == (1, 4, 16, 16) and torch.isfinite(scope["noise_pred"]).all()


def test_every_readme_command_is_run_or_excepted_with_its_reason():
    commands = readme_commands()
    written = {normalized for _, _, normalized in commands}
    assert SETUP in written, f"README's set-up ({SETUP}) is gone: update SETUP"
    assert not set(NOT_RUN) - written, f"NOT_RUN names commands README no longer has: {set(NOT_RUN) - written}"
    assert all(reason for reason in NOT_RUN.values())
    assert any(normalized not in NOT_RUN and normalized != SETUP for _, _, normalized in commands)


def _venv() -> Path:
    """The venv README's set-up activates: the one running the tests (make test runs them from .venv)."""
    assert sys.prefix != sys.base_prefix, "README's commands need the venv they were installed in: run the tests from it"
    return Path(sys.prefix)


def _scratch(tmp_path: Path) -> Path:
    """The repository's layout as README's commands see it, with a fresh place for what they write."""
    scratch = tmp_path / "repo"
    scratch.mkdir()
    (scratch / ".venv").symlink_to(_venv())
    (scratch / "configs").symlink_to(ROOT / "configs")
    (scratch / "tests").mkdir()
    (scratch / "tests" / "fixtures").symlink_to(ROOT / "tests" / "fixtures")
    return scratch


def _shell_env(tmp_path: Path) -> dict:
    """A shell as a newcomer opens it: the venv not active, its commands not on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    venv_bin = str(_venv() / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MPLCONFIGDIR=str(tmp_path / "mpl"))
    return env


def _run_shell(lines: list[str], cwd: Path, env: dict, harness: Path) -> subprocess.CompletedProcess:
    script = [SETUP, f'tensorboard() {{ python "{harness}" "$@"; }}']
    for line in lines:
        script += [f"printf '\\n>>> %s\\n' {_quote(line)}", line]
    return subprocess.run(["bash", "--noprofile", "--norc", "-e", "-c", "\n".join(script)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    scratch = _scratch(tmp_path)
    env = _shell_env(tmp_path)
    harness = tmp_path / "tensorboard_once.py"
    harness.write_text(TENSORBOARD)
    sections: dict[str, list[str]] = {}
    seen = {SETUP, *NOT_RUN}  # a command README gives twice runs once, where it first appears
    for section, command, normalized in readme_commands():
        if normalized not in seen:
            seen.add(normalized)
            sections.setdefault(section, []).append(command)

    results: dict[str, subprocess.CompletedProcess] = {}
    demo_built = threading.Event()
    # Longest first, and the sections that need no demo while the demo's shards are built.
    queue = sorted(sections, key=lambda s: (not s.startswith(WITHOUT_DEMO), -len(sections[s])))
    lock = threading.Lock()

    def next_section() -> str | None:
        """The next section that can start (waiting for the demo's shards if it needs them); None when all ran."""
        while True:
            with lock:
                ready = [s for s in queue if s.startswith(WITHOUT_DEMO) or demo_built.is_set()]
                if ready or not queue:
                    return queue.pop(queue.index(ready[0])) if ready else None
            demo_built.wait(600)

    def worker(build_demo: bool) -> None:
        if build_demo:
            try:
                results["make demo: the shard build"] = _run_shell([makefile_demo_build()], scratch, env, harness)
            finally:
                demo_built.set()  # a failed build fails the sections that need it, each with its own message
        while (name := next_section()) is not None:
            results[name] = _run_shell(sections[name], scratch, env, harness)

    threads = [threading.Thread(target=worker, args=(i == 0,)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    ran = [c for cs in sections.values() for c in cs]
    assert len(results) == len(sections) + 1, (sorted(results), sorted(sections))
    for name, done in results.items():
        failed = re.findall(r"^>>> (.*)$", done.stdout, re.M)
        assert done.returncode == 0, f"README section {name!r}: `{failed[-1] if failed else '?'}` failed " \
                                     f"(exit {done.returncode}):\n{done.stdout[-4000:]}"
        assert len(failed) == len(sections.get(name, [1])), done.stdout[-2000:]
    assert any("tensorboard --logdir runs" in c for c in ran)
    train = next(done.stdout for name, done in results.items() if name.startswith("Train"))
    assert re.search(r"tensorboard --logdir runs served on port \d+: runs \[.*'tiny'.*\]", train), train[-2000:]
    assert (scratch / "runs" / "tiny" / "adapters" / "final" / "adapter.safetensors").is_file()
    assert (scratch / "sheet.png").is_file() and list((scratch / "out" / "generate" / "images").glob("*.png"))
    assert (scratch / "out" / "eval" / "metrics.json").is_file()
