"""Scale-out launches for real: `accelerate launch` with 2 processes, two "nodes" on 127.0.0.1, torchrun.

Every run is a real launcher starting real ``python -m lokr_trainer.train``
processes that talk over gloo (CPU), as they would over NCCL on GPUs.  The
properties checked are the ones docs/scale-out.md promises:

* the demo config runs end to end under ``accelerate launch --multi_gpu
  --num_processes 2`` (validation, previews, a periodic save, the final
  adapter) with the global batch it has on one process, and the output folder
  is written once, by the global main process, not once per rank;
* two machines (``--num_machines 2``, one process each, one shared output
  folder) train the adapter one process with twice the accumulation trains,
  to float rounding; a state written by the two nodes resumes on one process;
* a node that cannot run (a missing path, another copy of the data) stops
  every node with one error line, under accelerate and torchrun, instead of
  leaving the others waiting for it.

Every launch has a timeout and runs in its own process group, which is killed
when the test fails or hangs (a rank that never reaches a collective must fail
the test, not stall CI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lokr_trainer.config import RunConfig, load_config, save_config
from lokr_trainer.demo import DEMO_CONFIG
from lokr_trainer.testing import make_tiny_dataset
from lokr_trainer.train.checkpoint import STATE_DIR, list_states
from lokr_trainer.train.loop import Trainer

#: seconds any one launch may take before it counts as a hang (a launch takes 10-30 s here)
LAUNCH_TIMEOUT = 240

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
#: what makes `accelerate launch` start gloo (MULTI_CPU) processes on a machine without GPUs;
#: `--cpu --num_processes 2` would silently start ONE process (research/training.md)
ACCELERATE_CPU = ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
TRAIN = ["-m", "lokr_trainer.train", "--no-progress"]

#: the demo config, shortened: 6 steps (two epochs of 3), validation at 0/3/6, a save at 3, previews at 6.
#: grad_accum 2 on one process is the demo's global batch 4; on two processes it is grad_accum 1.
DEMO_SHORT = ["train.max_steps=6", "train.save_every=3", "validation.every=3", "sample.every=6"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class Finished:
    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str


def launch_all(cmds: list[list[str]], cwd: Path, timeout: float = LAUNCH_TIMEOUT) -> list[Finished]:
    """Start ``cmds`` concurrently (each in its own process group), wait for all, kill all on a hang.

    Output goes to files, not pipes: a process blocked on a full pipe while
    the test waits on another would hang both.
    """
    logs = cwd / f"launch-logs-{time.monotonic_ns()}"
    logs.mkdir(parents=True)
    procs = []
    try:
        for i, cmd in enumerate(cmds):
            out, err = open(logs / f"{i}.out", "w"), open(logs / f"{i}.err", "w")
            procs.append((cmd, out, err, subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=err,
                                                          start_new_session=True)))
        deadline = time.monotonic() + timeout
        for cmd, _, _, p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"launch hung for more than {timeout} s: {' '.join(cmd)}\n" + _tails(logs, len(procs)))
    finally:
        for _, out, err, p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the launcher and every rank it started
                except ProcessLookupError:
                    pass
                p.wait()
            out.close()
            err.close()
    return [Finished(cmd, p.returncode, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
            for i, (cmd, _, _, p) in enumerate(procs)]


def _tails(logs: Path, n: int) -> str:
    return "\n".join(f"--- process {i} stderr ---\n{(logs / f'{i}.err').read_text()[-2000:]}" for i in range(n))


def assert_ok(runs: list[Finished]) -> None:
    for r in runs:
        assert r.returncode == 0, f"{' '.join(r.cmd)} exited {r.returncode}\n{r.stderr[-3000:]}"


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def global_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖a‖ over all adapter tensors (as tests/test_train_loop.py measures layout independence)."""
    assert set(a) == set(b)
    num = sum(((a[k] - b[k]).double() ** 2).sum() for k in a)
    den = sum((a[k].double() ** 2).sum() for k in a)
    return float((num / den).sqrt())


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def temp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs on one thread, as the launched ranks (OMP_NUM_THREADS=1): on this shared
    2-core machine two spinning OpenMP threads made a 5-step run take 20-90 s instead of 5."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo_dir(tiny_sdxl, tmp_path_factory) -> Path:
    """A working dir laid out as `python -m lokr_trainer.demo` lays it out: demo_output/{tiny_sdxl,data}.

    The model and images come from the code the demo calls (``make_tiny_sdxl(…, seed=0)``
    is the session fixture; ``make_tiny_dataset(…, n=8, seed=0)``), so configs/demo.toml
    runs here with its own relative paths.
    """
    root = tmp_path_factory.mktemp("demo")
    (root / "demo_output").mkdir()
    (root / "demo_output" / "tiny_sdxl").symlink_to(tiny_sdxl.root, target_is_directory=True)
    make_tiny_dataset(root / "demo_output" / "data", n=8, seed=0)
    return root


# ----------------------------------------------------------------------------- the demo config on 2 processes


def test_accelerate_launch_two_processes_runs_the_demo_config_end_to_end(demo_dir, monkeypatch):
    cfg1 = load_config(DEMO_CONFIG)
    _, global_batch = cfg1.train.accumulation(1)  # what the demo config means on one process: 2 x 2 x 1
    assert global_batch == 4
    sets = [*DEMO_SHORT, "train.grad_accum=1", "train.output_dir=ddp"]
    cmd = [*ACCELERATE, *ACCELERATE_CPU, "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(_free_port()), *TRAIN, "--config", str(DEMO_CONFIG)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    (run,) = launch_all([cmd], demo_dir)
    wall = time.perf_counter() - t0
    assert_ok([run])
    out = demo_dir / "ddp"

    # the global batch is the config's, printed once (by the global main process, not per rank)
    line = f"global batch {global_batch} = batch 2 x accumulation 1 x processes 2"
    assert run.stdout.count("global batch ") == 1 and line in run.stdout, run.stdout
    assert run.stdout.count("trained 6 steps") == 1
    final = out / "lokr.safetensors"
    meta = metadata(final)
    assert meta["lokr_trainer.global_batch"] == str(global_batch) and meta["lokr_trainer.step"] == "6"
    states = list_states(out / STATE_DIR)
    assert [s for s, _ in states] == [3, 6]
    for step, path in states:
        trainer = json.loads((path / "trainer.json").read_text())
        assert trainer["step"] == step and trainer["identity"]["train.resolved_global_batch"] == global_batch

    # the same adapter file (exact key set, dtypes, shapes) a one-process run of the demo config writes
    one = load_config(DEMO_CONFIG, ["train.max_steps=1", "validation.every=0", "sample.every=0",
                                    f"train.output_dir={demo_dir / 'one'}"])
    monkeypatch.chdir(demo_dir)  # the demo config's paths are relative to the working dir
    single = Trainer(one, progress=False).fit()
    a, b = adapter_tensors(single.adapter), adapter_tensors(final)
    assert set(a) == set(b) and len(a) > 600
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    assert metadata(single.adapter)["lokr_trainer.global_batch"] == str(global_batch)

    # what the demo promises ran: validation at 0/3/6, previews at 6, a periodic save at 3 — once each
    assert sorted(p.name for p in out.glob("lokr*.safetensors")) == ["lokr-step-000003.safetensors", "lokr.safetensors"]
    for step in (0, 3, 6):
        assert run.stderr.count(f"step {step}: validation loss") == 1, run.stderr[-3000:]
    assert [p.relative_to(out).as_posix() for p in sorted((out / "samples").rglob("*.png"))] == ["samples/step-000006/00.png"]

    # written once: one config, one TensorBoard writer, nothing half-written left behind
    assert [p.relative_to(out).as_posix() for p in out.rglob("config.toml")] == ["config.toml"]
    assert load_config(out / "config.toml").train.accumulation(2) == (1, global_batch)
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1
    assert temp_leftovers(out) == []

    # the latent cache is shared by the ranks: each built its half, each image is in it once, none was
    # encoded again during training (rank-dependent cache keys would build every entry twice)
    latents = sorted((out / "cache" / "latents").rglob("*.safetensors"))
    assert len(latents) == 8
    assert len({metadata(p)["vae_digest"] for p in latents}) == 1
    assert sorted(p.name for p in (out / "cache").glob("content_hashes.*.json")) == [
        "content_hashes.0.json", "content_hashes.1.json"]
    assert "latent cache (rank 0): 4 entries: 0 reused, 4 built" in run.stderr
    assert "latent cache (rank 1): 4 entries: 0 reused, 4 built" in run.stderr
    assert "not in the latent cache" not in run.stderr
    print(f"\naccelerate launch, 2 processes, demo config 6 steps: {wall:.1f} s")


def test_cache_digest_ignores_config_bookkeeping_whose_order_changes_per_process(tiny_models):
    """The cause of per-rank cache keys: diffusers' ``_use_default_values`` is a set turned into a list."""
    from diffusers import AutoencoderKL
    from diffusers.configuration_utils import FrozenDict

    from lokr_trainer.train.encode import module_digest

    vae = AutoencoderKL.from_config(tiny_models.vae.config)  # an own copy: the fixture is shared
    before = module_digest(vae)
    cfg = dict(vae.config)
    assert len(cfg["_use_default_values"]) > 1
    vae._internal_dict = FrozenDict({**cfg, "_use_default_values": list(reversed(cfg["_use_default_values"]))})
    assert module_digest(vae) == before  # another process's order, same digest
    vae._internal_dict = FrozenDict({**cfg, "scaling_factor": 0.5})
    assert module_digest(vae) != before  # a real config change still counts


# ----------------------------------------------------------------------------- two nodes on 127.0.0.1


#: kohaku-xl-delta without the tiny UNet's degenerate ResNet time projections (see
#: tests/test_train_loop.py::test_two_processes_equal_accumulation_equal_bigger_batch)
NO_EMB = {"preset": "kohaku-xl-delta", "exclude": ["*emb_layers*"]}


def node_config(demo_dir: Path, out: Path, **train) -> RunConfig:
    """5 steps of global batch 4 (3 steps per epoch: crosses an epoch end and uses padded steps)."""
    base = load_config(DEMO_CONFIG).to_dict()
    base["model"]["path"] = str(demo_dir / "demo_output" / "tiny_sdxl" / "tiny_sdxl.safetensors")
    base["data"]["path"] = [str(demo_dir / "demo_output" / "data")]
    base["lokr"] = NO_EMB
    base["validation"] = {"every": 0}
    base["sample"] = {"every": 0}
    base["train"].update({"output_dir": str(out), "max_steps": 5, "save_every": 3, "keep_last": 3, "seed": 3,
                          "batch_size": 2, "grad_accum": None, "global_batch": 4, **train})
    base["train"] = {k: v for k, v in base["train"].items() if v is not None}
    return RunConfig.from_dict(base)


@pytest.fixture(scope="module")
def one_process(demo_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: one process, batch 2 x accumulation 2 (the same global batch 4)."""
    root = tmp_path_factory.mktemp("one_process")
    result = Trainer(node_config(demo_dir, root / "run", global_batch=None, grad_accum=2), progress=False).fit()
    return adapter_tensors(result.adapter)


def two_node_commands(launcher: str, cfg_file: Path) -> list[list[str]]:
    port = str(_free_port())
    cmds = []
    for rank in (0, 1):
        if launcher == "accelerate":
            head = [*ACCELERATE, *ACCELERATE_CPU, "--num_machines", "2", "--machine_rank", str(rank),
                    "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes", "2"]
        else:
            head = [*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                    "--master_addr", "127.0.0.1", "--master_port", port]
        cmds.append([*head, *TRAIN, "--config", str(cfg_file)])
    return cmds


def test_two_nodes_train_the_adapter_one_process_with_twice_the_accumulation_trains(demo_dir, one_process, tmp_path):
    """Equal within 1e-6 of the adapter's norm, not promised bit-equal.

    Here (2 ranks x batch 2 vs 1 process x 2 micro-batches of 2, one thread everywhere) the
    kernels see the same shapes and a two-term sum is exact, and the adapters came out
    bit-equal; with 2 threads in the reference process they differed by 4.5e-8.  In general
    the per-device batch size (BLAS picks other kernels), the thread count, GPU kernels and
    NCCL's chunked ring all-reduce over more than two ranks change the order of float sums,
    so the contract is the 1e-6 bound.  ``torchrun --nnodes 2`` (two_node_commands("torchrun", …))
    measured the same 0.0 here; it is not repeated in CI (15-25 s), its two-node launch is tested
    by test_a_node_that_cannot_run_stops_every_node_with_one_error_line[other_data]."""
    launcher = "accelerate"
    out = tmp_path / "shared"  # one output_dir for both nodes: the shared disk
    cfg_file = save_config(node_config(demo_dir, out), tmp_path / "run.toml")
    t0 = time.perf_counter()
    node0, node1 = launch_all(two_node_commands(launcher, cfg_file), tmp_path)
    wall = time.perf_counter() - t0
    assert_ok([node0, node1])

    # only the global main process (node 0) reports and writes, although each node has a local main
    assert "global batch 4 = batch 2 x accumulation 1 x processes 2" in node0.stdout
    assert "global batch" not in node1.stdout and "trained 5 steps" not in node1.stdout
    assert len(list((out / "logs").glob("events.out.tfevents.*"))) == 1
    assert [s for s, _ in list_states(out / STATE_DIR)] == [3, 5]
    assert temp_leftovers(out) == []

    two = adapter_tensors(out / "lokr.safetensors")
    rel = global_rel_diff(one_process, two)
    print(f"\n{launcher} 2 nodes x 1 process vs 1 process x accumulation 2: ||d||/||w|| = {rel:.2e}, "
          f"launch {wall:.1f} s")
    assert rel < 1e-6
    assert any(k.endswith("lokr_w2") and v.abs().max() > 0 for k, v in two.items())  # it trained

    # the nodes' state at step 3 resumes on ONE process (another layout of the same global batch)
    moved = tmp_path / "moved"
    (moved / STATE_DIR).mkdir(parents=True)
    shutil.copytree(out / STATE_DIR / "step-000003", moved / STATE_DIR / "step-000003")
    resumed = Trainer(node_config(demo_dir, moved, global_batch=None, grad_accum=2), resume="latest",
                      progress=False).fit()
    assert resumed.start_step == 3 and resumed.steps_done == 2
    rel_resumed = global_rel_diff(one_process, adapter_tensors(resumed.adapter))
    print(f"2 nodes to step 3, resumed on 1 process x accumulation 2 to step 5: ||d||/||w|| = {rel_resumed:.2e}")
    assert rel_resumed < 1e-6


# ----------------------------------------------------------------------------- one node differs: all stop, none hangs


@pytest.mark.parametrize("node1_differs,launcher", [("model_missing", "accelerate"), ("other_data", "torchrun")])
def test_a_node_that_cannot_run_stops_every_node_with_one_error_line(demo_dir, tmp_path, node1_differs, launcher):
    """Node 1 lacks the model (it stopped before the process group existed: node 0 hung in it until
    the timeout) or reads another copy of the data (each node trained its own batch plan, silently)."""
    out = tmp_path / "shared"
    cfg0 = save_config(node_config(demo_dir, out), tmp_path / "node0.toml")
    cfg1 = node_config(demo_dir, out)
    if node1_differs == "model_missing":
        cfg1 = load_config(cfg0, [f"model.path={tmp_path / 'missing.safetensors'}"])
        expect = "model.path: "
    else:
        fewer = tmp_path / "data_copy"
        shutil.copytree(demo_dir / "demo_output" / "data", fewer)
        for p in fewer.glob("img_007.*"):
            p.unlink()
        cfg1 = load_config(cfg0, [f"data.path=[{str(fewer)!r}]"])
        expect = "sees another run than rank 0 (data.digest, data.path differ)"
    cfg1_file = save_config(cfg1, tmp_path / "node1.toml")
    cmds = two_node_commands(launcher, cfg0)
    cmds[1][-1] = str(cfg1_file)
    t0 = time.perf_counter()
    node0, node1 = launch_all(cmds, tmp_path, timeout=120)
    wall = time.perf_counter() - t0
    errors = [[line for line in r.stderr.splitlines() if line.startswith("error: ")] for r in (node0, node1)]
    print(f"\n{launcher}, {node1_differs}: both nodes stopped in {wall:.1f} s: {errors}")
    assert node0.returncode != 0 and node1.returncode != 0
    assert all(len(e) == 1 for e in errors), errors
    if node1_differs == "model_missing":
        assert errors[1][0].startswith(f"error: {expect}")
        assert errors[0][0].startswith("error: rank 1 of 2 (host ") and expect in errors[0][0]
    else:
        assert all(expect in e[0] for e in errors), errors
    assert not (out / STATE_DIR).exists()  # nothing trained
