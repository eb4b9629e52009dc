"""Two "nodes" on one machine (gloo on the CPU): each node its own launcher (torchrun with c10d rendezvous, or
``accelerate launch --num_machines 2``), one process each, training SCAN for real.

Checked: the processes sit on distinct nodes and shuffle-BN hands each rows of the other; the queue holds the keys
of both nodes; mining across the nodes gives the single-process table; the checkpoint resumes under the same
2-node launch, under ``accelerate launch`` on two machines and under a single-node 2-process launch to the
weights of the uninterrupted run, bit for bit; a node killed mid-run, or silent for longer than --dist-timeout,
ends the other with one line and exit status 4, and ``--resume latest`` then finishes the run identically.
Thread counts are pinned (OMP_NUM_THREADS=1) so every launcher computes in the same order.
"""

import os
import re
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import BIN, COMMON, ROOT, free_port, make_image_folder, model_state, run_cli, sigkill
from safetensors.torch import load_file

APPEARANCE = ROOT / "scan_zoo" / "weights" / "test_resnet.moco_digits"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
BATCH, K, QUEUE, STEPS = 9, 2, 40, 4


def scan_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A 4-step SCAN run (a checkpoint every 2 steps), mining its neighbours with the shipped MoCo weights."""
    return [
        "--method",
        "scan",
        "--data",
        str(data),
        "--batch-size",
        str(BATCH),
        "--k",
        str(K),
        "--queue-size",
        str(QUEUE),
        "--max-steps",
        str(STEPS),
        "--save-every-steps",
        "2",
        "--appearance-model",
        str(APPEARANCE),
        "--output-dir",
        str(out),
        *COMMON,
        *extra,
    ]


def node_cmd(launcher: str, node: int, port: int, script: list[str]) -> list[str]:
    """The command that starts ``node`` (0 or 1) of a 2-node, 1-process-per-node job on 127.0.0.1:``port``.

    torchrun: c10d rendezvous, node 0 hosting its store (``is_host``), so node 1 can die without taking the
    rendezvous with it. Which node gets global rank 0 is the rendezvous' choice, not ``--node-rank``'s.
    """
    if launcher == "torchrun":
        return [
            str(BIN / "torchrun"),
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(node),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            f"job{port}",
            "--rdzv-conf",
            f"is_host={int(node == 0)}",
            *script,
        ]
    return [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_machines",
        "2",
        "--machine_rank",
        str(node),
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *script,
    ]


def start_nodes(launcher: str, script: list[str], logs: Path, env: dict | None = None) -> list[subprocess.Popen]:
    """Both nodes, each its own launcher in its own session; output in ``logs/node{R}.{out,err}``."""
    logs.mkdir(parents=True, exist_ok=True)
    port, procs = free_port(), []
    for node in (0, 1):
        with open(logs / f"node{node}.out", "w") as out, open(logs / f"node{node}.err", "w") as err:
            procs.append(
                subprocess.Popen(
                    node_cmd(launcher, node, port, script),
                    cwd=ROOT,
                    stdout=out,
                    stderr=err,
                    env={**os.environ, **ENV, **(env or {})},
                    start_new_session=True,
                )
            )
    return procs


def run_nodes(launcher: str, script: list[str], logs: Path) -> None:
    """Run both nodes to the end; both must succeed."""
    procs = start_nodes(launcher, script, logs)
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    for node, code in enumerate(codes):
        assert code == 0, f"node {node} exited {code}:\n{(logs / f'node{node}.err').read_text()[-3000:]}"


def assert_same_state(run: Path, want: dict) -> None:
    got = model_state(run)
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:5]}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("multinode") / "data")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted 2-node torchrun run: checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("reference")
    run_nodes("torchrun", ["train.py", *scan_args(data, out / "run")], out / "logs")
    assert [c.name for c in sorted((out / "run" / "checkpoints").glob("step_*"))] == ["step_00000002", "step_00000004"]
    return out / "run"


def resumable_copy(reference: Path, to: Path) -> Path:
    """A run directory holding only the reference run's step-2 checkpoint (as after a stop at step 2)."""
    (to / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step_00000002", to / "checkpoints" / "step_00000002")
    return to


PROBE = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    from scan_zoo.common import distributed as D
    from scan_zoo.train.trainer import make_accelerator

    out = Path(sys.argv[1])
    make_accelerator(out, log_with=None)  # the process group training uses
    rank = D.rank()
    x = torch.stack([torch.full((3,), float(rank)), torch.arange(3.0) + 10 * rank], 1)  # [3, 2]: (rank, row id)
    got = []
    for step in range(4):  # MoCo's shuffle-BN seeds, one per step
        shuffled, idx, sizes = D.shuffle_across(x, torch.Generator().manual_seed(step))
        got.append((shuffled, D.unshuffle_across(shuffled, idx, sizes)))
    torch.save({"rank": rank, "node": os.environ["GROUP_RANK"], "x": x, "got": got}, out / f"probe{rank}.pt")
    torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_processes_on_two_nodes_and_shuffle_bn_across_them(tmp_path):
    """The process group the trainer makes spans both nodes: shuffle-BN gives each process rows of the other,
    unshuffle returns its own."""
    (tmp_path / "probe.py").write_text(PROBE)
    run_nodes("torchrun", [str(tmp_path / "probe.py"), str(tmp_path)], tmp_path / "logs")
    r = [torch.load(tmp_path / f"probe{i}.pt", weights_only=True) for i in range(2)]
    assert [p["rank"] for p in r] == [0, 1]
    assert {p["node"] for p in r} == {"0", "1"}  # one process on each node
    crossed = [False, False]
    for i in range(2):
        for shuffled, back in r[i]["got"]:
            assert torch.equal(back, r[i]["x"])
            crossed[i] |= bool((shuffled[:, 0] != i).any())
    assert crossed == [True, True]
    rows = sorted(tuple(v.tolist()) for p in r for row in [p["got"][0][0]] for v in row)
    assert rows == sorted(tuple(v.tolist()) for p in r for v in p["x"])  # the global batch, each row once


def naive_queue_labels(data: Path, run: Path) -> torch.Tensor:
    """The queue's labels after STEPS steps, by a plain FIFO over the global batches: rank 0's images, then
    rank 1's, at each step (the sampler says which images each process reads)."""
    from scan_zoo.data import datasets as data_lib

    targets = data_lib.image_folder(data, "train").targets
    neighbors = load_file(str(run / "neighbors.safetensors"))["indices"]
    batches = []
    for rank in range(2):
        sampler = data_lib.NeighborBatchSampler(
            len(targets), BATCH // (K + 1), neighbors, rank=rank, world_size=2, seed=0
        )
        sampler.set_epoch(0, 0)
        batches.append([[targets[int(e[0])] for e in b] for b, _ in zip(sampler, range(STEPS))])
    queue, ptr = [-1] * QUEUE, 0
    for step in range(STEPS):
        for label in batches[0][step] + batches[1][step]:
            queue[ptr] = label
            ptr = (ptr + 1) % QUEUE
    return torch.tensor(queue)


@pytest.mark.slow
def test_two_node_torchrun_queue_mining_and_single_node_resume(data, reference, tmp_path):
    from scan_zoo.train.mining import mine_dataset

    final = model_state(reference)
    assert int(final["queue.ptr"]) == STEPS * 2 * BATCH % QUEUE  # both nodes' keys enqueued at every step
    assert torch.equal(final["queue.labels"], naive_queue_labels(data, reference))

    # mining across the nodes: the table one process mines
    single = mine_dataset(
        str(APPEARANCE), data, tmp_path / "single.safetensors", K, 16, 16, arch="test_resnet", num_workers=0
    )
    across = load_file(str(reference / "neighbors.safetensors"))
    assert torch.equal(across["indices"], single)
    assert torch.equal(across["similarities"], load_file(str(tmp_path / "single.safetensors"))["similarities"])

    # the step-2 checkpoint of the 2-node run, resumed by one node with two processes
    run = resumable_copy(reference, tmp_path / "one_node")
    p = run_cli(
        [
            str(BIN / "torchrun"),
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "train.py",
            *scan_args(data, run, "--resume", "latest"),
        ],
        env=ENV,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_state(run, final)


@pytest.mark.slow
def test_two_machine_accelerate_launch_train_and_resume(data, reference, tmp_path):
    run = tmp_path / "run"
    run_nodes("accelerate", ["train.py", *scan_args(data, run, "--stop-after-steps", "2")], tmp_path / "a")
    step2 = load_file(str(reference / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert_same_state(run, step2)
    run_nodes("accelerate", ["train.py", *scan_args(data, run, "--resume", "latest")], tmp_path / "b")
    assert_same_state(run, model_state(reference))


def paused_at_step_3(data: Path, run: Path, logs: Path, timeout: int, procs: list) -> tuple[int, Path, Path]:
    """Start a 2-node torchrun run (its launchers appended to ``procs``) and wait until it waits after step 3, its
    step-2 checkpoint written; returns the pid of node 1's process and the markers holding node 1's and node 0's."""
    # every process waits after step 3 (tests/pause_train.py: train.py with a pausing callback)
    procs += start_nodes(
        "torchrun",
        ["tests/pause_train.py", "--pause", "step:3", *scan_args(data, run, "--dist-timeout", str(timeout))],
        logs,
    )
    markers = [run / f".paused_step_3.{rank}" for rank in range(2)]
    wait_for(markers, procs, logs)
    by_pid = {int(m.read_text()): m for m in markers}
    node1_child = next(pid for pid in by_pid if parent_of(pid) == procs[1].pid)
    return node1_child, by_pid[node1_child], next(m for pid, m in by_pid.items() if pid != node1_child)


def one_line_then_launcher_report(err: str, reason: str) -> None:
    """Node 0's stderr: one line of ours naming the loss (``reason``, a regex), nothing of our process after it (no traceback), then
    torchrun's own report of its worker's exit status 4 (its ChildFailedError traceback, the only one)."""
    ours = [line for line in err.splitlines() if line.startswith("train.py:")]
    assert len(ours) == 1 and "lost contact with another process" in ours[0], err[-3000:]
    assert re.search(reason, ours[0], re.IGNORECASE), ours[0]
    assert "exitcode: 4" in err, err[-3000:]
    before_report = err.split("exitcode: 4")[0]
    assert "Traceback" not in before_report and ours[0] == before_report.splitlines()[-2], err[-3000:]


@pytest.mark.slow
def test_killed_node_ends_the_other_in_one_line_and_resume_finishes(data, reference, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "logs"
    procs = []
    try:
        _, node1_marker, node0_marker = paused_at_step_3(data, run, logs, 30, procs)
        sigkill(procs[1], [node1_marker])  # node 1: its torchrun and its process
        node0_marker.unlink()  # node 0 goes on, to a collective with nobody on the other side
        code = procs[0].wait(timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert code != 0
    one_line_then_launcher_report((logs / "node0.err").read_text(), "connection (closed|reset) by peer")
    assert [c.name for c in sorted((run / "checkpoints").glob("step_*"))] == ["step_00000002"]

    run_nodes("torchrun", ["train.py", *scan_args(data, run, "--resume", "latest")], tmp_path / "resume")
    assert_same_state(run, model_state(reference))


@pytest.mark.slow
def test_silent_node_ends_the_other_after_dist_timeout(data, tmp_path):
    """A node that stops answering (SIGSTOP: its sockets stay open, as when a machine freezes or the network
    splits) ends the other after --dist-timeout, in the same one line."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    procs, node1_child = [], None
    try:
        node1_child, _, node0_marker = paused_at_step_3(data, run, logs, 15, procs)
        os.kill(node1_child, signal.SIGSTOP)
        os.killpg(procs[1].pid, signal.SIGSTOP)
        node0_marker.unlink()
        code = procs[0].wait(timeout=90)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        if node1_child is not None:
            os.kill(node1_child, signal.SIGKILL)
    assert code != 0
    one_line_then_launcher_report((logs / "node0.err").read_text(), "timed out waiting 15000 ?ms")


def wait_for(markers: list[Path], procs: list[subprocess.Popen], logs: Path) -> None:
    import time

    deadline = time.monotonic() + 240
    while not all(m.exists() for m in markers):
        for node, p in enumerate(procs):
            assert p.poll() is None, f"node {node} ended early:\n{(logs / f'node{node}.err').read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.1)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_peer_lost_names_only_lost_peers():
    from scan_zoo.common.distributed import peer_lost

    assert peer_lost(ValueError("connection (closed|reset) by peer")) is None
    assert peer_lost(RuntimeError("DataLoader worker timed out")) is None  # one process: not a peer's doing
    line = peer_lost(dist.DistNetworkError("Failed to recv, got 0 bytes.\nException raised from recvBytes at x"))
    assert line == "Failed to recv, got 0 bytes."
