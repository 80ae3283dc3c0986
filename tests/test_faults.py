"""The fault suite: runs killed, out of disk space, run twice at once, interrupted, or handed
corrupt files, each then rerun and compared with a run that nothing happened to.

Fault injection the way SQLite tests itself (DESIGN 6b): every write of a run directory goes
through `keras_aevb._io`, which counts its write points (a file written to its temporary name
and about to be renamed, an old file about to be deleted, TensorBoard's events about to be
flushed) and, when the environment asks, SIGKILLs the process or raises ENOSPC at the N-th one.
`test_write_points_of_a_run` pins the points of the tiny run used here, and the sweeps go over
every one of them.

Every case runs `keras-aevb train` in a process of its own. Importing TensorFlow takes 5-40 s on
the shared 2-core machine, so the processes are forked from one "zygote" that imported it once
and never ran a TensorFlow op (forking after the first op would lose TensorFlow's thread pools).
A forked child runs the CLI's `main` and exits through the interpreter's normal shutdown, like
`python -m keras_aevb` (a crash at exit, such as HDF5's, shows as a signal).

What "compared" means: history.csv equal in every column but `seconds`, and the final weights
(model and optimizer, the noise generators' states included) equal bit for bit: a resumed run
continues the data stream where it stopped and restores its noise generators' states, so it
ends as the uninterrupted run does (the same float32 operations in the same order). Set
`RESUME_IS_EXACT` to False to compare only what is committed before a fault.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

KILL = "KERAS_AEVB_FAULT_KILL_AT_WRITE"
ENOSPC = "KERAS_AEVB_FAULT_ENOSPC_AT_WRITE"
STOP = "KERAS_AEVB_FAULT_STOP_AT_WRITE"
TRACE = "KERAS_AEVB_FAULT_TRACE"

# A resumed run replays the data order and noise of an uninterrupted one (fdd46e7): the epochs
# trained after a resume equal the reference's bit for bit (see the module docstring).
RESUME_IS_EXACT = True

EPOCHS = 2
# 300 training examples in batches of 100: 3 steps per epoch. Nz = 2 and 8 hidden units keep a
# run to the cost of tracing its functions.
TINY = [
    "--latent-dim",
    "2",
    "--hidden-units",
    "8",
    "--batch-size",
    "100",
    "--learning-rate",
    "0.1",
    "--seed",
    "0",
    "--verbose",
    "0",
]

# The write points of a 2-epoch run with TensorBoard logs, in order (kind, file relative to the
# run directory; events files are named by TensorFlow with time and PID, shown here by folder).
WRITE_POINTS = [
    ("write", "config.json"),
    ("write", "history.csv"),
    ("write", "checkpoints/epoch-000001.weights.h5"),
    ("write", "checkpoints/state.json"),
    ("write", "history.csv"),
    ("events", "logs/train"),
    ("events", "logs/validation"),
    ("events", "logs/images"),
    ("write", "checkpoints/epoch-000002.weights.h5"),
    ("write", "checkpoints/state.json"),
    ("write", "history.csv"),
    ("delete", "checkpoints/epoch-000001.weights.h5"),
    ("events", "logs/train"),
    ("events", "logs/validation"),
    ("events", "logs/images"),
    ("write", "model.keras"),
]
POINTS = range(1, len(WRITE_POINTS) + 1)
# Points swept on every test run; the others are `slow`. Each fault class at its first write
# (a directory holding only a temporary file), the first commit (checkpoints/ being made),
# a later checkpoint, an old weights file's deletion, TensorBoard, and the final model.
FAST_KILL_POINTS = (1, 3, 10)
FAST_ENOSPC_POINTS = (9, 13)


# ------------------------------------------------------------------------------ processes


@dataclass
class Result:
    rc: int
    out: str
    err: str


class Zygote:
    """A process that imported TensorFlow once and forks a fresh `keras-aevb` per request."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.count = 0
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        for name in (KILL, ENOSPC, STOP, TRACE):
            env.pop(name, None)
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(workdir / "zygote.err", "w"),  # noqa: SIM115 (closed with the process)
            cwd=workdir,
            env=env,
            text=True,
        )
        assert self._reply() == {"ready": True}

    def _reply(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"zygote died: {(self.workdir / 'zygote.err').read_text()[-3000:]}")
        return json.loads(line)

    def _ask(self, **request):
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def start(self, argv, env=None):
        """Forks `keras-aevb ARGV` with `env` added; returns (pid, stdout path, stderr path)."""
        self.count += 1
        out = self.workdir / f"{self.count}.out"
        err = self.workdir / f"{self.count}.err"
        pid = self._ask(
            cmd="start",
            argv=[str(a) for a in argv],
            env={k: str(v) for k, v in (env or {}).items()},
            out=str(out),
            err=str(err),
        )["pid"]
        return pid, out, err

    def wait(self, started, timeout=600) -> Result:
        pid, out, err = started
        rc = self._ask(cmd="wait", pid=pid)["rc"]
        return Result(rc, out.read_text(), err.read_text())

    def run(self, argv, env=None) -> Result:
        return self.wait(self.start(argv, env))

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _zygote_main():
    """The zygote: imports TensorFlow and the CLI, then forks one child per request."""
    import tensorflow  # noqa: F401  (imported, never run: forking stays safe)

    import keras_aevb.cli
    import keras_aevb.training  # noqa: F401

    def reply(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "wait":
            _, status = os.waitpid(request["pid"], 0)
            reply({"rc": os.waitstatus_to_exitcode(status)})
            continue
        pid = os.fork()
        if pid:
            reply({"pid": pid})
            continue
        # The child: stdin from /dev/null, stdout and stderr to files, then the CLI, exiting
        # through the interpreter's shutdown (atexit handlers run, as in `python -m keras_aevb`).
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.environ.update(request["env"])
        # As `python -m keras_aevb` from a terminal gets Ctrl-C, even where pytest (and so the
        # zygote) was started with SIGINT ignored (a background job of a script).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise SystemExit(keras_aevb.cli.main(request["argv"]))


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def train_argv(run_dir, data_dir, *extra):
    return [
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        data_dir,
        "--output",
        run_dir,
        *TINY,
        "--epochs",
        str(EPOCHS),
        *extra,
    ]


# ------------------------------------------------------------------------------ reading runs


def read_trace(path):
    """[(kind, path relative to the run directory's parent folder structure)] of a trace file."""
    points = []
    for line in Path(path).read_text().splitlines():
        number, kind, name = line.split(" ", 2)
        assert int(number) == len(points) + 1
        points.append((kind, name))
    return points


def relative_point(point, run_dir):
    kind, name = point
    relative = Path(name).relative_to(run_dir)
    if kind == "events":
        relative = relative.parent
    return kind, relative.as_posix()


def history(run_dir):
    with open(Path(run_dir) / "history.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def committed_epoch(run_dir):
    state = Path(run_dir) / "checkpoints" / "state.json"
    return json.loads(state.read_text())["epoch"] if state.is_file() else 0


def weights_arrays(path):
    """Every dataset of a `.weights.h5` file: {name: array}."""
    import h5py

    arrays = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, item: (
                arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None
            )
        )
    return arrays


def scratch_files(run_dir):
    """Temporary files (a write that never reached its rename) left in the run directory."""
    return [
        p
        for p in Path(run_dir).rglob("*")
        if p.is_file() and (".tmp" in p.name or p.name.startswith("tmp-"))
    ]


def event_file_is_whole(path):
    """True if the events file is a sequence of complete TFRecord frames (length, crc, data,
    crc): a torn last record is what a writer that ran out of space leaves."""
    data = Path(path).read_bytes()
    offset = 0
    while offset < len(data):
        if offset + 12 > len(data):
            return False
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        offset += 12 + length + 4
    return offset == len(data)


def assert_whole_files(run_dir):
    """Everything the run directory holds is complete: no temporary files, parseable JSON and
    CSV, readable HDF5 and zip archives, events files made of whole records."""
    run_dir = Path(run_dir)
    assert scratch_files(run_dir) == []
    for path in run_dir.rglob("*.json"):
        json.loads(path.read_text())
    if (run_dir / "history.csv").exists():
        columns, _ = history(run_dir)
        assert columns == ["epoch", "examples_seen", "seconds", "train_elbo", "test_elbo"]
    for path in run_dir.rglob("*.weights.h5"):
        weights_arrays(path)
    if (run_dir / "model.keras").exists():
        with zipfile.ZipFile(run_dir / "model.keras") as archive:
            assert archive.testzip() is None
    for path in run_dir.rglob("events.out.tfevents.*"):
        assert event_file_is_whole(path), path


def assert_same_run(run_dir, reference, committed):
    """`run_dir`, resumed after a fault that left epoch `committed` committed, against the
    uninterrupted `reference` (see the module docstring for what is exact today)."""
    assert_whole_files(run_dir)
    columns, rows = history(run_dir)
    ref_columns, ref_rows = history(reference)
    assert columns == ref_columns
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert [r["examples_seen"] for r in rows] == [r["examples_seen"] for r in ref_rows]
    exact = RESUME_IS_EXACT or committed in (0, EPOCHS)
    for row, ref in zip(rows, ref_rows, strict=True):
        if exact or int(row["epoch"]) <= committed:
            # Both bounds are written with 6 decimals from the same float32 computations.
            assert (row["train_elbo"], row["test_elbo"]) == (ref["train_elbo"], ref["test_elbo"])
    state = json.loads((Path(run_dir) / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == EPOCHS
    weights = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("*.weights.h5"))
    assert weights == [f"epoch-{EPOCHS:06d}.weights.h5"]
    if exact:
        name = f"checkpoints/epoch-{EPOCHS:06d}.weights.h5"
        got, want = weights_arrays(Path(run_dir) / name), weights_arrays(Path(reference) / name)
        assert sorted(got) == sorted(want)
        for key in want:
            # Bit for bit: the same float32 operations in the same order.
            assert (got[key] == want[key]).all(), key
    assert (Path(run_dir) / "model.keras").is_file()


def error_line(result):
    """The one `keras-aevb: error:` line of a failed command (and no traceback)."""
    assert "Traceback" not in result.err, result.err[-3000:]
    lines = [line for line in result.err.splitlines() if line.startswith("keras-aevb:")]
    assert len(lines) == 1, result.err[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------ the mechanisms


def test_lock_refuses_a_second_holder_and_undoes_what_it_made(tmp_path):
    from keras_aevb import _io

    run_dir = tmp_path / "a" / "run"
    lock = _io.RunLock(run_dir).acquire()
    assert (run_dir / ".lock").is_file()
    # flock locks belong to an open file: a second open in the same process is refused too.
    with pytest.raises(_io.RunLockedError, match=rf"in use by .*\(PID {os.getpid()}\)"):
        _io.RunLock(run_dir).acquire()
    assert (run_dir / ".lock").is_file()  # the refused one removed nothing
    # A run that fails before writing leaves nothing: the lock file and the folders it made go.
    lock.release(undo=True)
    assert not (tmp_path / "a").exists()
    # Once the run writes, its PID is in the lock file and nothing is undone.
    lock = _io.RunLock(run_dir).acquire()
    (run_dir / ".config.json.123.x1.tmp").write_text("{")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "tmp-123-epoch-000001.weights.h5").write_bytes(b"")
    (run_dir / "checkpoints" / ".state.json.123.x2.tmp").write_text("{")
    (run_dir / "notes.txt").write_text("mine")
    lock.begin_writing()
    assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
    assert sorted(p.name for p in run_dir.rglob("*")) == [".lock", "checkpoints", "notes.txt"]
    lock.release(undo=True)
    assert (run_dir / ".lock").is_file()
    _io.RunLock(run_dir).acquire().release()  # released: free again


def test_atomic_write_turns_enospc_into_one_error(tmp_path, monkeypatch):
    from keras_aevb import _io

    monkeypatch.setattr(_io, "_points", 0)
    monkeypatch.setenv(ENOSPC, "2")
    monkeypatch.setenv(TRACE, str(tmp_path / "trace"))
    target = tmp_path / "out" / "state.json"
    target.parent.mkdir()
    _io.atomic_write(target, lambda f: f.write(b"first"))
    with pytest.raises(_io.DiskFullError) as raised:
        _io.atomic_write(target, lambda f: f.write(b"second"))
    assert str(raised.value) == (
        f"no space left on device writing {target}; free space and rerun to resume"
    )
    assert isinstance(raised.value, OSError) and raised.value.errno == 28
    # Nothing half-written: the old file as it was, no temporary file.
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]
    assert target.read_bytes() == b"first"
    assert read_trace(tmp_path / "trace") == [("write", str(target))] * 2


def test_full_disk_errors_of_libraries_are_recognized():
    from keras_aevb import _io

    h5py_like = OSError(
        "Can't close file (file write failed: errno = 28, error message = "
        "'No space left on device')"
    )
    assert _io.is_no_space(h5py_like)
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("writing the summary failed") from inner
    except RuntimeError as outer:
        assert _io.is_no_space(outer)
    assert not _io.is_no_space(OSError(13, "Permission denied"))


# ------------------------------------------------------------------------------ the reference


@pytest.fixture(scope="module")
def reference(zygote, tmp_path_factory, mnist_dir):
    """An uninterrupted run, with the trace of its write points."""
    base = tmp_path_factory.mktemp("reference")
    run_dir = base / "run"
    result = zygote.run(train_argv(run_dir, mnist_dir), env={TRACE: base / "trace"})
    assert result.rc == 0, result.err[-3000:]
    trace = base / "trace"
    points = [relative_point(p, run_dir) for p in read_trace(trace)] if trace.exists() else []
    return run_dir, points


def test_write_points_of_a_run(reference):
    """The sweeps below cover every write of the run: its points, in order."""
    run_dir, points = reference
    assert points == WRITE_POINTS
    assert_whole_files(run_dir)
    assert (run_dir / ".lock").is_file()


def kill_case(zygote, tmp_path, mnist_dir, reference, n):
    run_dir = tmp_path / "run"
    argv = train_argv(run_dir, mnist_dir)
    killed = zygote.run(argv, env={KILL: n})
    assert killed.rc == -signal.SIGKILL, killed.err[-3000:]
    committed = committed_epoch(run_dir)
    rerun = zygote.run(argv)
    assert rerun.rc == 0, rerun.err[-3000:]
    assert_same_run(run_dir, reference[0], committed)


@pytest.mark.parametrize("n", FAST_KILL_POINTS)
def test_sigkill_at_a_write_then_rerun(zygote, tmp_path, mnist_dir, reference, n):
    kill_case(zygote, tmp_path, mnist_dir, reference, n)


@pytest.mark.slow
@pytest.mark.parametrize("n", [n for n in POINTS if n not in FAST_KILL_POINTS])
def test_sigkill_at_every_write_then_rerun(zygote, tmp_path, mnist_dir, reference, n):
    kill_case(zygote, tmp_path, mnist_dir, reference, n)


def enospc_case(zygote, tmp_path, mnist_dir, reference, n):
    run_dir = tmp_path / "run"
    argv = train_argv(run_dir, mnist_dir)
    kind, name = WRITE_POINTS[n - 1]
    failed = zygote.run(argv, env={ENOSPC: n, TRACE: tmp_path / "trace"})
    if kind == "delete":  # ENOSPC is a write's error; a deletion goes on
        assert failed.rc == 0, failed.err[-3000:]
    else:
        assert failed.rc == 1, failed.err[-3000:]
        path = read_trace(tmp_path / "trace")[-1][1]
        assert relative_point(("write", path), run_dir)[1].startswith(name)
        assert error_line(failed) == (
            f"keras-aevb: error: no space left on device writing {path}; "
            "free space and rerun to resume"
        )
        assert_whole_files(run_dir)
    committed = committed_epoch(run_dir)
    rerun = zygote.run(argv)
    assert rerun.rc == 0, rerun.err[-3000:]
    assert_same_run(run_dir, reference[0], committed)


@pytest.mark.parametrize("n", FAST_ENOSPC_POINTS)
def test_enospc_at_a_write_then_rerun(zygote, tmp_path, mnist_dir, reference, n):
    enospc_case(zygote, tmp_path, mnist_dir, reference, n)


@pytest.mark.slow
@pytest.mark.parametrize("n", [n for n in POINTS if n not in FAST_ENOSPC_POINTS])
def test_enospc_at_every_write_then_rerun(zygote, tmp_path, mnist_dir, reference, n):
    enospc_case(zygote, tmp_path, mnist_dir, reference, n)


def test_resumed_run_is_bit_identical(zygote, tmp_path, mnist_dir, reference):
    """Killed in epoch 2 (weights written, state.json not): epoch 2 is retrained on resume."""
    run_dir = tmp_path / "run"
    argv = train_argv(run_dir, mnist_dir)
    assert zygote.run(argv, env={KILL: 9}).rc == -signal.SIGKILL
    assert committed_epoch(run_dir) == 1
    assert zygote.run(argv).rc == 0
    _, rows = history(run_dir)
    _, ref_rows = history(reference[0])
    assert [(r["train_elbo"], r["test_elbo"]) for r in rows] == [
        (r["train_elbo"], r["test_elbo"]) for r in ref_rows
    ]
    name = f"checkpoints/epoch-{EPOCHS:06d}.weights.h5"
    got, want = weights_arrays(run_dir / name), weights_arrays(reference[0] / name)
    assert all((got[k] == want[k]).all() for k in want)


# ------------------------------------------------------------------------------ a real full disk


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (root only): the disk that fills up."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount, leave):
    """Fills the file system at `mount` up to `leave` free bytes; returns the filler file."""
    filler = mount / "filler"
    stat = os.statvfs(mount)
    free = stat.f_bavail * stat.f_frsize
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.parametrize(
    "full_at, stop_at, leave, written",
    [
        # Held before epoch 1's TensorBoard check (its images are flushed), the disk is filled
        # to 32 KiB: epoch 2's weights (140 KiB) do not fit.
        ("weights", 8, 32 * 1024, "checkpoints/epoch-000002.weights.h5"),
        # Held at epoch 1's history.csv (before any TensorBoard write of the epoch), the disk is
        # filled up: TensorFlow's writer drops the images silently; the run's check sees it.
        # (TensorFlow raises when it cannot create the images' events file: the folder is named.)
        ("events", 5, 0, "logs/images"),
    ],
)
def test_disk_full_on_a_real_tmpfs(
    zygote, small_tmpfs, mnist_dir, reference, full_at, stop_at, leave, written
):
    """A real full disk (a 4 MiB tmpfs, filled while the run is held at a write point): one
    line, exit 1, no segfault (HDF5 crashed at exit here before), every file whole; the rerun
    resumes once the filler is gone and ends like the reference."""
    run_dir = small_tmpfs / "run"
    argv = train_argv(run_dir, mnist_dir)
    started = zygote.start(argv, env={STOP: stop_at})
    wait_stopped(started[0])
    filler = fill(small_tmpfs, leave)
    os.kill(started[0], signal.SIGCONT)
    failed = zygote.wait(started)
    assert failed.rc == 1, failed.err[-3000:]
    message = error_line(failed)
    assert message.startswith(f"keras-aevb: error: no space left on device writing {run_dir}/")
    assert f"{run_dir}/{written}" in message
    assert message.endswith("; free space and rerun to resume")
    assert committed_epoch(run_dir) == 1
    assert_whole_files(run_dir)
    filler.unlink()
    rerun = zygote.run(argv)
    assert rerun.rc == 0, rerun.err[-3000:]
    assert_same_run(run_dir, reference[0], 1)


# ------------------------------------------------------------------------------ two processes


def wait_stopped(pid, timeout=300):
    """Waits until process `pid` has stopped itself (SIGSTOP at a write point)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never reached its write point")


def test_second_process_on_a_run_directory_is_refused(zygote, tmp_path, mnist_dir, reference):
    """A run held at its first checkpoint; a second train (same settings or others) on the
    directory is refused at once naming the first's PID and changes nothing; the first goes
    on and ends like the reference."""
    run_dir = tmp_path / "run"
    argv = train_argv(run_dir, mnist_dir)
    first = zygote.start(argv, env={STOP: 4})  # about to commit epoch 1
    try:
        wait_stopped(first[0])
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        for other in (argv, train_argv(run_dir, mnist_dir, "--latent-dim", "3")):
            started = time.monotonic()
            second = zygote.run(other)
            assert second.rc == 2, second.err[-3000:]
            assert error_line(second) == (
                f"keras-aevb: error: {run_dir} is in use by another keras-aevb process "
                f"(PID {first[0]}); wait for it to end, or stop it, then rerun"
            )
            # Refused before loading data or building a model (those take seconds).
            assert time.monotonic() - started < 30
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    finally:
        os.kill(first[0], signal.SIGCONT)
    assert zygote.wait(first).rc == 0
    assert_same_run(run_dir, reference[0], 0)


# ------------------------------------------------------------------------------ corrupt files


def corrupt_state(content):
    return lambda run: (run / "checkpoints" / "state.json").write_bytes(content)


def config_without(key):
    def damage(run):
        config = json.loads((run / "config.json").read_text())
        del config[key]
        (run / "config.json").write_text(json.dumps(config))

    return damage


def replace_checkpoints_by_a_file(run):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a directory")


def truncate_weights(run):
    path = run / "checkpoints" / f"epoch-{EPOCHS:06d}.weights.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "state_missing": (
        lambda run: (run / "checkpoints" / "state.json").unlink(),
        "checkpoints/state.json is missing",
    ),
    "state_null": (corrupt_state(b"null"), "checkpoints/state.json is not a keras-aevb"),
    "state_list": (corrupt_state(b"[]"), "checkpoints/state.json is not a keras-aevb"),
    "state_empty_object": (corrupt_state(b"{}"), "checkpoints/state.json is not a keras-aevb"),
    "state_garbage": (
        corrupt_state(bytes(range(256)) * 4),
        "checkpoints/state.json is not valid JSON",
    ),
    "checkpoints_deleted": (
        lambda run: shutil.rmtree(run / "checkpoints"),
        "checkpoints is missing",
    ),
    "checkpoints_a_file": (replace_checkpoints_by_a_file, "checkpoints is not a directory"),
    "weights_truncated": (
        truncate_weights,
        f"checkpoints/epoch-{EPOCHS:06d}.weights.h5 is not a readable weights file",
    ),
    "weights_missing": (
        lambda run: (run / "checkpoints" / f"epoch-{EPOCHS:06d}.weights.h5").unlink(),
        f"checkpoints/epoch-{EPOCHS:06d}.weights.h5 is missing",
    ),
    "config_list": (
        lambda run: (run / "config.json").write_text("[]"),
        "config.json is not a keras-aevb",
    ),
    "config_without_learning_rate_used": (
        config_without("learning_rate_used"),
        "config.json is not a keras-aevb",
    ),
    "config_missing": (lambda run: (run / "config.json").unlink(), "config.json is missing"),
}


def snapshot(directory):
    return {
        p.relative_to(directory): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_run_directory_is_refused(zygote, tmp_path, mnist_dir, reference, case):
    """One line naming the file and how to start fresh, exit 2, the directory unchanged."""
    damage, problem = CORRUPTIONS[case]
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    damage(run_dir)
    before = snapshot(run_dir)
    # A larger budget than the run's: a resume that would train (and write) if it went on.
    result = zygote.run(train_argv(run_dir, mnist_dir, "--epochs", "3"))
    assert result.rc == 2, result.err[-3000:]
    message = error_line(result)
    assert f"{run_dir}/{problem}" in message, message
    assert message.endswith(
        f"{run_dir} holds a run that cannot be resumed; pass a new --output to start fresh"
    ), message
    assert snapshot(run_dir) == before


def test_temporary_files_of_a_dead_process_are_removed(zygote, tmp_path, mnist_dir, reference):
    """A directory holding only what a run killed in its first write leaves (its lock file and
    a temporary config.json) starts the run; temporary files are removed."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("999999\n")
    (run_dir / ".config.json.999999.abcd.tmp").write_text('{"half": ')
    result = zygote.run(train_argv(run_dir, mnist_dir))
    assert result.rc == 0, result.err[-3000:]
    assert_same_run(run_dir, reference[0], 0)


# ------------------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_then_rerun(zygote, tmp_path, mnist_dir, reference):
    """SIGINT while epoch 2's checkpoint is written: one line, exit 130, and a rerun resumes."""
    run_dir = tmp_path / "run"
    argv = train_argv(run_dir, mnist_dir)
    started = zygote.start(argv, env={STOP: 9})
    wait_stopped(started[0])
    os.kill(started[0], signal.SIGINT)
    os.kill(started[0], signal.SIGCONT)
    result = zygote.wait(started)
    assert result.rc == 130, result.err[-3000:]
    assert error_line(result) == "keras-aevb: interrupted; rerun the same command to resume"
    assert_whole_files(run_dir)
    committed = committed_epoch(run_dir)
    assert committed == 1
    assert zygote.run(argv).rc == 0
    assert_same_run(run_dir, reference[0], committed)


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    _zygote_main()
