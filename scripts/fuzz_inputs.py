"""Drive the `subsetsel` command line with hostile inputs and audit every file it leaves.

    python scripts/fuzz_inputs.py [--only REGEX] [--jobs 2] [--timeout 180] [--keep] [--list]

Each case runs the CLI as subprocesses (this interpreter, this checkout first on PYTHONPATH,
SUBSETSEL_CACHE in a temporary cache, one torch/BLAS thread, 6 GiB of address space at most) in
its own folder under a temporary directory, and prints one line per command: the case, the exit
code against the expected one (`!!` on a mismatch), whether a traceback was printed, whether the
files are intact, the command and the last line it printed. The end is a count.

"Files intact": every input the case handed over is unchanged; every selection file present
opens with `SelectionStore.open` and its rounds agree with the log of the run that wrote it (its
`file_id`, the epochs of the logged new selections; complete when the run finished); every
log.jsonl line and every .json file is strict JSON with strictly increasing epochs; every
checkpoint loads. A `.NAME.*.tmp` left behind is reported (it is expected only right after a
kill), and so is a claimed run folder that holds no run.

Cases (see `--list`): non-finite values of every float option of `train`, `onepass` and `search`
(found from the click commands) and out-of-range integers for their integer options; broken npz
files and ImageFolders; broken selection files through `train --replay`, `inspect` and `search`;
concurrent runs; kill -9 during `select` and `train`, then replay and resume; a few more.
Exit status: 0 when no case printed a traceback, broke, lost or mislabelled a file, timed out or
exited with an unexpected code; else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

SIZES = ["--train-size", "300", "--test-size", "100"]
SMALL = [*SIZES, "--epochs", "2", "--quiet"]
MEMORY_LIMIT = 6 << 30  # bytes of address space per CLI process (torch needs ~3 GiB)
ENTRY = "import sys; from subsetsel.cli import main; sys.exit(main(prog_name='subsetsel'))"
HUGE = 10**30  # beyond 64 bits: must be refused
BIG = 10**12  # fits in 64 bits; must not crash or hang where it means no more work
BIG_OK = {  # integer options where BIG asks for no unbounded work
    "train": {"--select-every", "--batch-size", "--eval-every", "--check-every",
              "--picks-per-step", "--history", "--interrupt", "--prefetch", "--shuffle-buffer",
              "--staleness", "--warmup-epochs", "--threads", "--image-size", "--seed",
              "--data-seed"},
    "onepass": {"--batch-size", "--reference-epochs", "--threads", "--seed", "--image-size"},
    "search": {"--heartbeat", "--batch-size", "--eval-every", "--seed", "--threads"},
}
NOT_FUZZED = {"--nproc"}  # N processes started by torchrun: a huge N is a fork bomb, not a test
BAR = ("broken", "lost", "wrong")  # file problems that fail the bar
DEAD_PID = 0  # set in main(): a pid that no process holds


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class Problem:
    kind: str  # broken | lost | wrong | tmp | leftover | harness
    text: str


@dataclass
class Step:
    """One command of a case and what it left."""

    label: str
    rc: int | None  # None: timed out
    expected: tuple[int, ...]
    traceback: bool = False
    problems: list[Problem] = field(default_factory=list)
    message: str = ""
    needle_missing: str = ""

    @property
    def unexpected(self) -> bool:
        return self.rc is not None and self.rc not in self.expected


@dataclass
class Case:
    name: str
    run: Callable[[Ctx], list[Step]]
    cost: int = 1  # rough CLI starts, to start the long cases first


# ----------------------------------------------------------------------------------------------
# running the CLI


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@dataclass
class Ran:
    rc: int | None
    out: str
    seconds: float


class Ctx:
    """A case's folder, environment and CLI runner."""

    def __init__(self, root: Path, name: str, env: dict[str, str], timeout: float) -> None:
        self.root = root
        self.dir = root / "cases" / re.sub(r"[^\w.=-]+", "_", name)
        self.dir.mkdir(parents=True)
        self.env = env
        self.timeout = timeout
        self.inputs: dict[Path, str] = {}
        self.transcript = root / "outputs" / f"{self.dir.name}.txt"
        self.transcript.parent.mkdir(exist_ok=True)
        self.lock = threading.Lock()

    # files
    def fixture(self, name: str, dest: str | None = None) -> Path:
        """Copy fixtures/NAME into the case folder (at DEST, default the same relative path) and
        record it as an input that must stay unchanged."""
        src = self.root / "fixtures" / name
        dst = self.dir / (dest or f"fixtures/{name}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        self.track(dst)
        return dst

    def track(self, path: Path) -> None:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            self.inputs[f] = sha256(f)

    # processes
    def start(self, args: list[str], cwd: Path | None = None) -> subprocess.Popen[str]:
        with self.lock, open(self.transcript, "a") as f:
            f.write(f"$ (in {rel(cwd or self.dir, self.root)}) {command(args)}\n")
        return subprocess.Popen(
            [sys.executable, "-c", ENTRY, *args], cwd=cwd or self.dir, env=self.env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_limit,
            start_new_session=True,
        )

    def finish(self, proc: subprocess.Popen[str], timeout: float | None = None) -> Ran:
        began = time.monotonic()
        try:
            out, _ = proc.communicate(timeout=timeout or self.timeout)
            ran = Ran(proc.returncode, out, time.monotonic() - began)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, _ = proc.communicate()
            ran = Ran(None, out, time.monotonic() - began)
        with self.lock, open(self.transcript, "a") as f:
            f.write(f"[pid {proc.pid} exit {ran.rc}, {ran.seconds:.1f} s]\n{ran.out}\n")
        return ran

    def cli(self, args: list[str], expected: Iterable[int], *, label: str | None = None,
            needle: str = "", timeout: float | None = None, cwd: Path | None = None,
            temps_ok: bool = False, audit_files: bool = True) -> tuple[Step, Ran]:
        ran = self.finish(self.start(args, cwd), timeout)
        step = self.step(label or command(args), ran, expected, needle=needle)
        if audit_files:
            step.problems += audit(self.dir, self.inputs, temps_ok=temps_ok)
        return step, ran

    def step(self, label: str, ran: Ran, expected: Iterable[int], needle: str = "") -> Step:
        lines = [x for x in ran.out.splitlines() if x.strip()]
        return Step(
            label=label, rc=ran.rc, expected=tuple(expected),
            traceback="Traceback (most recent call last)" in ran.out,
            message=(lines[-1].strip() if lines else "")[:160],
            needle_missing=needle if needle and needle not in ran.out else "",
        )


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def command(args: list[str]) -> str:
    return "subsetsel " + shlex.join(args)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_lines(path: Path, count: int, proc: subprocess.Popen[str], timeout: float) -> bool:
    """Poll until `path` holds `count` lines; False if the process ended or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if path.read_text().count("\n") >= count:
                return True
        except OSError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def simple(args: list[str], expected: Iterable[int], *, needle: str = "",
           setup: Callable[[Ctx], None] | None = None,
           timeout: float | None = None) -> Callable[[Ctx], list[Step]]:
    """A case of one command (after an optional setup of its folder)."""

    def run(ctx: Ctx) -> list[Step]:
        if setup is not None:
            setup(ctx)
        step, _ = ctx.cli(args, expected, needle=needle, timeout=timeout)
        return [step]

    return run


# ----------------------------------------------------------------------------------------------
# auditing files


def audit(folder: Path, inputs: dict[Path, str], *, temps_ok: bool = False,
          skip: tuple[str, ...] = ()) -> list[Problem]:
    """Every problem with the files under `folder` (see the module docstring), leaving out
    the top-level entries named in `skip` (a run still in progress)."""
    from subsetsel.report import strict_json
    from subsetsel.store import SelectionFileError, SelectionStore

    problems: list[Problem] = []
    for path, digest in inputs.items():
        if not path.exists():
            problems.append(Problem("lost", f"input {rel(path, folder)} was deleted"))
        elif sha256(path) != digest:
            problems.append(Problem("lost", f"input {rel(path, folder)} was modified"))
    def skipped(path: Path) -> bool:
        return path.relative_to(folder).parts[0] in skip

    for path in sorted(folder.rglob("*")):
        if path in inputs or not path.is_file() or skipped(path):
            continue
        name = rel(path, folder)
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            if not temps_ok:
                problems.append(Problem("tmp", f"temporary file left: {name}"))
        elif path.suffix in (".h5", ".hdf5"):
            try:
                SelectionStore.open(path)
            except SelectionFileError as err:
                problems.append(Problem("broken", f"{name} does not open: {err}"))
        elif path.suffix == ".json":
            try:
                strict_json(path.read_text())
            except Exception as err:  # noqa: BLE001 - any failure is the finding
                problems.append(Problem("broken", f"{name} is not strict JSON: {err}"))
        elif path.suffix == ".jsonl":
            problems += _audit_log(path, name)
        elif path.name == "checkpoint.pt":
            problems += _audit_checkpoint(path, name)
    for config in sorted(folder.rglob("config.json")):
        if config in inputs or skipped(config):
            continue
        problems += _audit_run(config.parent, folder)
    return problems


def _read_log(path: Path) -> list[dict]:
    from subsetsel.report import strict_json

    if not path.exists():
        return []
    return [strict_json(line) for line in path.read_text().splitlines() if line.strip()]


def _audit_log(path: Path, name: str) -> list[Problem]:
    try:
        records = _read_log(path)
    except Exception as err:  # noqa: BLE001
        return [Problem("broken", f"{name} has a line that is not strict JSON: {err}")]
    epochs = [r["epoch"] for r in records if isinstance(r, dict) and "epoch" in r]
    if any(b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
        return [Problem("wrong", f"{name}: epochs not strictly increasing: {epochs}")]
    return []


def _audit_checkpoint(path: Path, name: str) -> list[Problem]:
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        return [Problem("broken", f"{name} does not load: {type(err).__name__}: {err}")]
    return []


def _audit_run(run_dir: Path, cwd: Path) -> list[Problem]:
    """A run folder's config, log and selection file agree."""
    from subsetsel.report import strict_json
    from subsetsel.store import SelectionFileError, SelectionStore

    name = rel(run_dir, cwd)
    try:
        config = strict_json((run_dir / "config.json").read_text())
        records = _read_log(run_dir / "log.jsonl")
    except Exception:  # noqa: BLE001 - reported by audit() already
        return []
    if config == {} and not records:
        return [Problem("leftover", f"{name}/ was claimed (config.json is {{}}) but holds no run")]
    selection = config.get("selection_file") if isinstance(config, dict) else None
    if not isinstance(selection, dict) or "path" not in selection:
        return []
    path = _resolve(Path(selection["path"]), run_dir, cwd)
    logged = [r["epoch"] for r in records if r.get("new_selection")]
    if not path.exists():
        if logged:
            return [Problem("lost", f"{rel(path, cwd)}, the selection file of {name}/, is gone; "
                                    f"its log shows rounds at epochs {logged}")]
        return []
    try:
        store = SelectionStore.open(path)
    except SelectionFileError:
        return []  # reported as broken by audit()
    out: list[Problem] = []
    want_id = selection.get("file_id")
    if want_id and store.metadata.file_id != want_id:
        out.append(Problem("wrong", f"{rel(path, cwd)} has file id {store.metadata.file_id} but "
                                    f"{name}/ wrote {want_id}"))
        return out
    stored = [r.epoch for r in store.rounds]
    finished = (run_dir / "summary.json").exists()
    if stored[: len(logged)] != logged or len(stored) > len(logged) + 1:
        out.append(Problem("wrong", f"{rel(path, cwd)} rounds at epochs {stored}, but {name}/ "
                                    f"logged new selections at {logged}"))
    elif finished and (stored != logged or not store.complete):
        out.append(Problem("wrong", f"{name}/ finished but {rel(path, cwd)} has rounds {stored} "
                                    f"(logged {logged}), complete={store.complete}"))
    elif store.complete and not finished and stored != logged:
        out.append(Problem("wrong", f"{rel(path, cwd)} is marked complete with rounds {stored} "
                                    f"but {name}/ logged {logged}"))
    return out


def _resolve(path: Path, run_dir: Path, top: Path) -> Path:
    """A run's relative path, from the folder the run was started in: the nearest folder
    above `run_dir` (up to `top`) where it exists, else `top`."""
    if path.is_absolute():
        return path
    here = run_dir.parent
    while True:
        if (here / path).exists() or here == top or top not in here.parents:
            return here / path if (here / path).exists() else top / path
        here = here.parent


def rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def same_rounds(a: Path, b: Path) -> str:
    """'' when the two selection files hold equal rounds, else what differs."""
    from subsetsel.store import SelectionStore

    x, y = SelectionStore.open(a), SelectionStore.open(b)
    if [r.epoch for r in x.rounds] != [r.epoch for r in y.rounds]:
        return f"round epochs {[r.epoch for r in x.rounds]} vs {[r.epoch for r in y.rounds]}"
    for i, (r, s) in enumerate(zip(x.rounds, y.rounds, strict=True)):
        if not (np.array_equal(r.indices.numpy(), s.indices.numpy())
                and np.array_equal(r.weights.numpy(), s.weights.numpy())):
            return f"round {i} (epoch {r.epoch}) holds other indices or weights"
    return ""


# ----------------------------------------------------------------------------------------------
# fixtures


def build_fixtures(root: Path, env: dict[str, str]) -> None:
    """Selection files and run folders (via the CLI), npz files, ImageFolders and broken
    selection files under root/fixtures."""
    fx = root / "fixtures"
    fx.mkdir(parents=True)
    runs = {
        "src": ["select", *SMALL, "--select-every", "1", "--strategy", "random",
                "--save-selections", "fixtures/src", "--out", "fixtures/run-src"],
        "srcpb": ["select", *SMALL, "--select-every", "1", "--strategy", "randompb",
                  "--fraction", "0.3", "--batch-size", "16", "--save-selections",
                  "fixtures/srcpb", "--out", "fixtures/run-srcpb"],
    }
    procs = {k: subprocess.Popen([sys.executable, "-c", ENTRY, *a], cwd=root, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 preexec_fn=_limit) for k, a in runs.items()}
    for key, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise SystemExit(f"fixture {key} failed ({command(runs[key])}):\n{out}")
    _npz_fixtures(fx / "npz")
    _folder_fixtures(fx / "folders")
    _selection_fixtures(fx)


def _npz_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(300, 40)).astype(np.float32), "y": np.arange(300) % 10,
            "x_test": rng.normal(size=(100, 40)).astype(np.float32),
            "y_test": np.arange(100) % 10}


NPZ_BREAKS: dict[str, Callable[[dict[str, np.ndarray]], None]] = {
    "ok": lambda a: None,
    "nan-x": lambda a: a["x"].__setitem__((0, 0), np.nan),
    "inf-x": lambda a: a["x"].__setitem__((5, 3), np.inf),
    "nan-x_test": lambda a: a["x_test"].__setitem__((0, 0), np.nan),
    "-inf-x_test": lambda a: a["x_test"].__setitem__((1, 1), -np.inf),
    "label-1e9": lambda a: a["y"].__setitem__(0, 10**9),
    "label-test-1e9": lambda a: a["y_test"].__setitem__(0, 10**9),
    "negative-label": lambda a: a["y"].__setitem__(3, -1),
    "float-labels": lambda a: a.__setitem__("y", a["y"] + 0.5),
    "nan-labels": lambda a: a.__setitem__("y", np.where(np.arange(300) == 0, np.nan,
                                                        a["y"].astype(float))),
    "empty-train": lambda a: a.update(x=np.zeros((0, 40), np.float32), y=np.zeros(0, int)),
    "empty-test": lambda a: a.update(x_test=np.zeros((0, 40), np.float32),
                                     y_test=np.zeros(0, int)),
    "y-too-short": lambda a: a.__setitem__("y", a["y"][:299]),
    "x_test-other-width": lambda a: a.__setitem__("x_test", np.zeros((100, 41), np.float32)),
    "x-1d": lambda a: a.__setitem__("x", np.zeros(300, np.float32)),
    "x-5d": lambda a: a.__setitem__("x", np.zeros((300, 1, 1, 4, 10), np.float32)),
    "missing-y_test": lambda a: a.pop("y_test"),
    "object-array": lambda a: a.__setitem__("x", np.array([None] * 300, dtype=object)),
    "num_classes-nan": lambda a: a.__setitem__("num_classes", np.array(np.nan)),
    "num_classes-2": lambda a: a.__setitem__("num_classes", np.array(2)),
}


def _npz_fixtures(folder: Path) -> None:
    folder.mkdir()
    for name, breaker in NPZ_BREAKS.items():
        arrays = _npz_arrays()
        breaker(arrays)
        np.savez(folder / f"{name}.npz", **arrays)
    good = (folder / "ok.npz").read_bytes()
    (folder / "truncated.npz").write_bytes(good[: len(good) // 2])
    (folder / "not-a-zip.npz").write_bytes(b"these bytes are not a zip archive\n" * 20)
    (folder / "zero-bytes.npz").write_bytes(b"")


def _folder_fixtures(folder: Path) -> None:
    from make_image_folder import make_image_folder

    def fresh(name: str) -> Path:
        make_image_folder(folder / name, size=8, limit=80)
        return folder / name

    fresh("ok")
    shutil.rmtree(fresh("missing-train") / "train")
    shutil.rmtree(fresh("missing-val") / "val")
    for png in (fresh("empty-class") / "train" / "3").glob("*.png"):
        png.unlink()
    path = fresh("non-image-train")
    next(iter(sorted((path / "train" / "1").glob("*.png")))).write_bytes(b"not an image\n")
    path = fresh("non-image-val")
    next(iter(sorted(path.rglob("val/*/*.png")))).write_bytes(b"not an image\n")
    for png in fresh("empty-val").rglob("val/*/*.png"):
        png.unlink()
    path = fresh("extra-val-class")
    (path / "val" / "zz").mkdir()
    shutil.copy(next(iter(sorted(path.rglob("val/*/*.png")))), path / "val" / "zz" / "a.png")
    path = fresh("zero-byte-image")
    next(iter(sorted((path / "train" / "2").glob("*.png")))).write_bytes(b"")


def _h5_edit(path: Path, edit: Callable[[object], None]) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        edit(f)


def _set(f: object, dataset: str, index: int, value: object) -> None:
    f[dataset][index] = value  # type: ignore[index]


SEL_BREAKS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "valid": ("src", lambda p: None),
    "valid-pb": ("srcpb", lambda p: None),
    "truncated": ("src", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "random-bytes": ("src", lambda p: p.write_bytes(
        np.random.default_rng(1).bytes(p.stat().st_size))),
    "zero-bytes": ("src", lambda p: p.write_bytes(b"")),
    "foreign-hdf5": ("src", lambda p: _foreign(p)),
    "format-99": ("src", lambda p: _h5_edit(
        p, lambda f: f.attrs.__setitem__("format_version", np.int64(99)))),
    "zero-weights": ("src", lambda p: _h5_edit(
        p, lambda f: f["rounds/000000/weights"].__setitem__(Ellipsis, 0.0))),
    "nan-weight": ("src", lambda p: _h5_edit(
        p, lambda f: _set(f, "rounds/000001/weights", 0, np.nan))),
    "index-out-of-range": ("src", lambda p: _h5_edit(
        p, lambda f: _set(f, "rounds/000000/indices", 0, 300))),
    "negative-index": ("src", lambda p: _h5_edit(
        p, lambda f: _set(f, "rounds/000000/indices", 2, -5))),
    "duplicate-indices": ("src", lambda p: _h5_edit(
        p, lambda f: _set(f, "rounds/000000/indices", 1, f["rounds/000000/indices"][0]))),
    "junk-batch-ids": ("srcpb", lambda p: _h5_edit(
        p, lambda f: _set(f, "rounds/000000/batch_ids", 0, 10**9))),
    "duplicate-batch-ids": ("srcpb", lambda p: _h5_edit(
        p, lambda f: _set(f, "rounds/000000/batch_ids", 1, f["rounds/000000/batch_ids"][0]))),
    "epochs-not-increasing": ("src", lambda p: _h5_edit(
        p, lambda f: f["rounds/000001"].attrs.__setitem__("epoch", np.int64(0)))),
    "no-rounds-group": ("src", lambda p: _h5_edit(p, lambda f: f.__delitem__("rounds"))),
    "other-fingerprint": ("src", lambda p: _h5_edit(
        p, lambda f: f.attrs.__setitem__("fingerprint", "0" * 64))),
}


def _foreign(path: Path) -> None:
    import h5py

    path.unlink()
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(10)
        f.attrs["title"] = "someone else's file"


def _selection_fixtures(fx: Path) -> None:
    folder = fx / "sel"
    folder.mkdir()
    for name, (source, breaker) in SEL_BREAKS.items():
        path = folder / f"{name}.h5"
        shutil.copy2(fx / f"{source}.h5", path)
        breaker(path)


# ----------------------------------------------------------------------------------------------
# cases: options


def numeric_options(cmd: str, kind: str) -> list[tuple[str, list[str]]]:
    """(flag, context) for every option of `cmd` whose click type name is `kind` ('float' or
    'integer'); context selects the strategy / policy that takes a component option."""
    from subsetsel.cli import main

    out = []
    for param in main.commands[cmd].params:
        name = param.type.name
        if not (name == kind or (kind == "integer" and name == "integer range")):
            continue
        if param.opts[0] in NOT_FUZZED:
            continue
        context: list[str] = []
        match = re.match(r"(strategy|policy) ([\w-]+) \[", getattr(param, "help", "") or "")
        if match:
            context = [f"--{match.group(1)}", match.group(2)]
        out.append((param.opts[0], context))
    return out


def base_args(cmd: str) -> list[str]:
    if cmd == "search":
        return ["search", "--selections", "selections/src.h5", "--trials", "1", "--sampler",
                "random", "--epochs", "1", "--quiet"]
    if cmd == "onepass":
        return ["onepass", *SIZES, "--quiet"]
    return [cmd, *SMALL]


def with_option(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag value` replacing any earlier occurrence of the flag."""
    out, skip = [], False
    for i, token in enumerate(args):
        if skip:
            skip = False
            continue
        if token == flag and i + 1 < len(args):
            skip = True
            continue
        out.append(token)
    return [*out, flag, value]


def _src_setup(ctx: Ctx) -> None:
    ctx.fixture("src.h5", "selections/src.h5")


def option_cases() -> list[Case]:
    cases = []
    for cmd in ("train", "onepass", "search"):
        setup = _src_setup if cmd == "search" else None
        for flag, context in numeric_options(cmd, "float"):
            for value in ("nan", "inf", "-inf"):
                args = with_option([*base_args(cmd), *context], flag, value)
                cases.append(Case(f"float/{cmd}/{flag}={value}",
                                  simple(args, (2,), needle=flag, setup=setup)))
        for flag, context in numeric_options(cmd, "integer"):
            args = with_option([*base_args(cmd), *context], flag, str(HUGE))
            cases.append(Case(f"int/{cmd}/{flag}=1e30",
                              simple(args, (2,), needle=flag, setup=setup, timeout=45)))
            if flag in BIG_OK[cmd]:
                args = with_option([*base_args(cmd), *context], flag, str(BIG))
                cases.append(Case(f"big/{cmd}/{flag}=1e12",
                                  simple(args, (0, 1, 2), setup=setup, timeout=45)))
    return cases


# ----------------------------------------------------------------------------------------------
# cases: data


NPZ_EXPECT = {"ok": (0,), "num_classes-2": (1,)}  # every other broken npz: exit 1


def data_cases() -> list[Case]:
    cases = []
    names = [*NPZ_BREAKS, "truncated", "not-a-zip", "zero-bytes"]
    for name in names:
        def setup(ctx: Ctx, name: str = name) -> None:
            ctx.fixture(f"npz/{name}.npz", "data.npz")

        args = ["train", "--dataset", "npz:data.npz", "--epochs", "2", "--quiet"]
        cases.append(Case(f"npz/{name}", simple(args, NPZ_EXPECT.get(name, (1,)), setup=setup)))
    for name in ("ok", "missing-train", "missing-val", "empty-class", "non-image-train",
                 "non-image-val", "empty-val", "extra-val-class", "zero-byte-image"):
        def setup(ctx: Ctx, name: str = name) -> None:
            ctx.fixture(f"folders/{name}", "images")

        args = ["train", "--dataset", "folder:images", "--workers", "0", "--image-size", "8",
                "--epochs", "2", "--strategy", "random", "--quiet"]
        cases.append(Case(f"folder/{name}",
                          simple(args, (0,) if name == "ok" else (1,), setup=setup)))
    return cases


# ----------------------------------------------------------------------------------------------
# cases: selection files


def selection_cases() -> list[Case]:
    cases = []
    for name in SEL_BREAKS:
        valid = name.startswith("valid")

        def setup(ctx: Ctx, name: str = name) -> None:
            ctx.fixture(f"sel/{name}.h5", "selections/bad.h5")

        uses = {
            "replay": (["train", "--replay", "selections/bad.h5", *SMALL, "--out", "rep"],
                       (0,) if valid else (1,)),
            "inspect": (["inspect", "--json", "selections/bad.h5"],
                        (0,) if valid or name == "other-fingerprint" else (1,)),
            "search": (["search", "--selections", "selections/bad.h5", "--trials", "1",
                        "--sampler", "random", "--epochs", "1", "--quiet"],
                       (0,) if valid else (1,)),
        }
        for use, (args, expected) in uses.items():
            cases.append(Case(f"sel/{name}/{use}", _selection_use(args, expected, setup)))
    return cases


def _selection_use(args: list[str], expected: tuple[int, ...],
                   setup: Callable[[Ctx], None]) -> Callable[[Ctx], list[Step]]:
    def run(ctx: Ctx) -> list[Step]:
        from subsetsel.report import strict_json

        setup(ctx)
        step, ran = ctx.cli(args, expected)
        if args[0] == "inspect" and ran.rc == 0:
            try:
                strict_json(ran.out)
            except Exception as err:  # noqa: BLE001
                step.problems.append(Problem("broken", f"inspect --json printed no strict "
                                                       f"JSON: {err}"))
        return [step]

    return run


# ----------------------------------------------------------------------------------------------
# cases: concurrency


CONC = ["train", *SIZES, "--epochs", "3", "--select-every", "1", "--strategy", "random",
        "--quiet"]
STAMP = re.compile(r"(\d{8}-\d{6})(-\d+)?$")


def _pair(ctx: Ctx, a: list[str], b: list[str], cwd: Path) -> tuple[Ran, Ran]:
    pa, pb = ctx.start(a, cwd), ctx.start(b, cwd)
    return ctx.finish(pa), ctx.finish(pb)


def _epochs_of(run_dir: Path) -> list[int]:
    try:
        return [r["epoch"] for r in _read_log(run_dir / "log.jsonl")]
    except Exception:  # noqa: BLE001 - audit reports it
        return []


def case_same_default_name(ctx: Ctx) -> list[Step]:
    """Two identical runs started at once: same default run name, within the same second."""
    for attempt in range(3):
        cwd = ctx.dir / f"try{attempt}"
        cwd.mkdir()
        ra, rb = _pair(ctx, CONC, CONC, cwd)
        runs = sorted(p for p in (cwd / "runs").iterdir()) if (cwd / "runs").is_dir() else []
        stamps = {m.group(1) for p in runs if (m := STAMP.search(p.name))}
        if len(stamps) == 1 or attempt == 2:
            break
    label = f"2x at once in {cwd.name}/: {command(CONC)}"
    steps = [ctx.step(f"{label} [first]", ra, (0,)), ctx.step(f"{label} [second]", rb, (0,))]
    problems = audit(ctx.dir, ctx.inputs)
    if len(runs) != 2:
        problems.append(Problem("wrong", f"expected 2 run folders, found {[p.name for p in runs]}"))
    if len(stamps) != 1:
        problems.append(Problem("harness", f"not started within one second: {sorted(stamps)}"))
    sel_paths = []
    for run_dir in runs:
        if _epochs_of(run_dir) != [0, 1, 2]:
            problems.append(Problem("wrong", f"{run_dir.name}: log epochs {_epochs_of(run_dir)}"))
        try:
            sel_paths.append(json.loads((run_dir / "config.json").read_text())
                             ["selection_file"]["path"])
        except Exception:  # noqa: BLE001
            problems.append(Problem("wrong", f"{run_dir.name}: no selection file in config"))
    if len(set(sel_paths)) != len(sel_paths):
        problems.append(Problem("wrong", f"two runs share a selection file: {sel_paths}"))
    steps[-1].problems = problems
    steps[-1].label += f" -> {', '.join(p.name for p in runs)}"
    return steps


def case_same_out(ctx: Ctx) -> list[Step]:
    """Two runs started at once with the same --out: one runs, the other is refused."""
    a = [*CONC, "--out", "same"]
    b = [*CONC, "--lr", "0.2", "--out", "same"]
    ra, rb = _pair(ctx, a, b, ctx.dir)
    codes = sorted(x.rc for x in (ra, rb) if x.rc is not None)
    steps = [ctx.step(f"at once: {command(a)}", ra, (0, 2)),
             ctx.step(f"at once: {command(b)}", rb, (0, 2))]
    problems = audit(ctx.dir, ctx.inputs)
    if codes != [0, 2]:
        problems.append(Problem("wrong", f"exit codes {codes}, expected one 0 and one 2"))
    if _epochs_of(ctx.dir / "same") != [0, 1, 2]:
        problems.append(Problem("wrong", f"same/log.jsonl epochs {_epochs_of(ctx.dir / 'same')}"))
    winner_lr = 0.05 if ra.rc == 0 else 0.2
    try:
        lr = json.loads((ctx.dir / "same" / "config.json").read_text())["config"]["lr"]
        if lr != winner_lr:
            problems.append(Problem("wrong", f"same/config.json has lr {lr}, the winner ran "
                                             f"{winner_lr}"))
    except Exception as err:  # noqa: BLE001
        problems.append(Problem("wrong", f"same/config.json unreadable: {err}"))
    steps[-1].problems = problems
    return steps


def case_same_selection_file(ctx: Ctx) -> list[Step]:
    """Two runs started at once, different --out, the same --save-selections."""
    a = [*CONC, "--out", "a", "--save-selections", "shared"]
    b = [*CONC, "--out", "b", "--save-selections", "shared"]
    ra, rb = _pair(ctx, a, b, ctx.dir)
    steps = [ctx.step(f"at once: {command(a)}", ra, (0, 1)),
             ctx.step(f"at once: {command(b)}", rb, (0, 1))]
    problems = audit(ctx.dir, ctx.inputs)
    if sorted(x.rc for x in (ra, rb) if x.rc is not None) != [0, 1]:
        problems.append(Problem("wrong", f"exit codes {ra.rc}, {rb.rc}: expected one run to "
                                         "write the file and the other refused"))
    steps[-1].problems = problems
    return steps


def case_same_basename(ctx: Ctx) -> list[Step]:
    """Two runs started at once with --out x/run and --out y/run (same default file name)."""
    a = [*CONC, "--out", "x/run"]
    b = [*CONC, "--out", "y/run"]
    ra, rb = _pair(ctx, a, b, ctx.dir)
    steps = [ctx.step(f"at once: {command(a)}", ra, (0, 1)),
             ctx.step(f"at once: {command(b)}", rb, (0, 1))]
    steps[-1].problems = audit(ctx.dir, ctx.inputs)
    return steps


# ----------------------------------------------------------------------------------------------
# cases: kill -9 and resume


KILL_SLOW = [*SIZES, "--epochs", "12", "--select-every", "1", "--strategy", "gradmatch",
             "--slow-input", "2.0", "--quiet"]
KILL_FAST = [*SIZES, "--epochs", "60", "--select-every", "1", "--strategy", "gradmatch",
             "--quiet"]


def plant_stale_temp(sel: Path) -> Path:
    tmp = sel.with_name(f".{sel.name}.{DEAD_PID}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(b"half a selection file")
    return tmp


def _kill_step(ctx: Ctx, proc: subprocess.Popen[str], args: list[str], log: Path,
               lines: int, skip: tuple[str, ...] = ()) -> Step:
    reached = wait_lines(log, lines, proc, timeout=240)
    if reached:
        proc.send_signal(signal.SIGKILL)
    ran = ctx.finish(proc)
    step = ctx.step(f"kill -9 after log line {lines}: {command(args)}", ran, (-9,))
    if not reached:
        step.problems.append(Problem("harness", f"the run ended before log line {lines}"))
    step.problems += audit(ctx.dir, ctx.inputs, temps_ok=True, skip=skip)
    return step


def _check_incomplete(ctx: Ctx, sel: str) -> Step:
    from subsetsel.report import strict_json

    step, ran = ctx.cli(["inspect", "--json", sel], (0,), temps_ok=True)
    if ran.rc == 0:
        try:
            if strict_json(ran.out).get("complete") is not False:
                step.problems.append(Problem("wrong", f"{sel} of a killed run is not marked "
                                                      "incomplete"))
        except Exception as err:  # noqa: BLE001
            step.problems.append(Problem("broken", f"inspect --json: {err}"))
    return step


def kill_case(cmd: str, fast: bool) -> Callable[[Ctx], list[Step]]:
    """Kill -9 a run (once after its first log line; or, fast, three times at growing log
    lengths, killing the resumed runs too), check the file it left, replay it with and
    without --allow-incomplete, resume to the end and compare with an uninterrupted twin."""

    def run(ctx: Ctx) -> list[Step]:
        opts = KILL_FAST if fast else KILL_SLOW
        twin_args = [cmd, *opts, "--out", "whole", "--save-selections", "whole"]
        cut_args = [cmd, *opts, "--out", "cut", "--save-selections", "cut"]
        (ctx.dir / "twin").mkdir()
        twin = ctx.start(twin_args, ctx.dir / "twin")
        log, sel = ctx.dir / "cut" / "log.jsonl", "selections/cut.h5"
        steps = [_kill_step(ctx, ctx.start(cut_args), cut_args, log, 5 if fast else 1,
                            skip=("twin",))]
        steps.append(ctx.step(f"(in twin/) {command(twin_args)}", ctx.finish(twin), (0,)))
        steps.append(_check_incomplete(ctx, sel))
        replay = ["train", "--replay", sel, *SIZES, "--epochs", "4", "--quiet"]
        step, _ = ctx.cli([*replay, "--out", "refused"], (1,), needle="--allow-incomplete",
                          temps_ok=True)
        steps.append(step)
        step, _ = ctx.cli([*replay, "--allow-incomplete", "--out", "replayed"], (0,),
                          temps_ok=True)
        steps.append(step)
        step, _ = ctx.cli([*replay, "--allow-incomplete", "--out", "refused"], (0,),
                          label=f"(same --out as the refused replay) "
                                f"{command([*replay, '--allow-incomplete', '--out', 'refused'])}",
                          temps_ok=True)
        steps.append(step)
        resume = [cmd, "--resume", "cut", "--quiet"]
        for lines in ((20, 40) if fast else ()):
            steps.append(_kill_step(ctx, ctx.start(resume), resume, log, lines))
        planted = plant_stale_temp(ctx.dir / sel)
        step, _ = ctx.cli(resume, (0,))
        if planted.exists():
            step.problems.append(Problem("tmp", f"planted stale temp {planted.name} survived"))
        a, b = ctx.dir / "twin" / "selections" / "whole.h5", ctx.dir / sel
        try:
            differs = same_rounds(a, b)
            if differs:
                step.problems.append(Problem("wrong", f"resumed file differs from the "
                                                      f"uninterrupted one: {differs}"))
            from subsetsel.store import SelectionStore

            if not SelectionStore.open(b).complete:
                step.problems.append(Problem("wrong", f"{sel} not complete after the resume"))
        except Exception as err:  # noqa: BLE001
            step.problems.append(Problem("broken", f"comparing selection files: {err}"))
        ea, eb = _epochs_of(ctx.dir / "twin" / "whole"), _epochs_of(ctx.dir / "cut")
        if ea != eb:
            step.problems.append(Problem("wrong", f"log epochs {eb} vs uninterrupted {ea}"))
        steps.append(step)
        return steps

    return run


# ----------------------------------------------------------------------------------------------
# cases: more


def _run_src(ctx: Ctx) -> Path:
    ctx.fixture("src.h5")
    return ctx.fixture("run-src")


def _break_run(part: str, how: Callable[[Path], None], keep: bool = True
               ) -> Callable[[Ctx], None]:
    """Copy the finished fixture run, drop its summary and break one of its files. keep: the
    run folder must stay as it is (else only the selection file must)."""

    def setup(ctx: Ctx) -> None:
        run_dir = _run_src(ctx)
        (run_dir / "summary.json").unlink()
        how(run_dir / part)
        ctx.inputs.clear()
        ctx.track(ctx.dir / "fixtures" if keep else ctx.dir / "fixtures" / "src.h5")

    return setup


def misc_cases() -> list[Case]:
    def mkdir(name: str) -> Callable[[Ctx], None]:
        return lambda ctx: (ctx.dir / name).mkdir(parents=True)

    def touch(ctx: Ctx) -> None:
        (ctx.dir / "afile").write_text("not a folder\n")
        ctx.track(ctx.dir / "afile")

    def bad_log(text: str) -> Callable[[Ctx], None]:
        def setup(ctx: Ctx) -> None:
            run_dir = _run_src(ctx)
            (run_dir / "log.jsonl").unlink()
            (run_dir / "log.jsonl").write_text(text)
            ctx.track(run_dir)

        return setup

    truncate = lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # noqa: E731
    nan_line = '{"epoch": 0, "test_acc": NaN, "elapsed_seconds": 1.0}\n'
    cut_line = '{"epoch": 0, "test_acc": 0.5, "elapsed_sec'
    return [
        Case("misc/replay-missing-file", simple(["train", "--replay", "selections/nope.h5",
                                                 *SMALL], (1,))),
        Case("misc/resume-missing-folder", simple(["train", "--resume", "nope", "--quiet"], (1,))),
        Case("misc/resume-empty-folder", simple(["train", "--resume", "empty", "--quiet"], (1,),
                                                setup=mkdir("empty"))),
        Case("misc/resume-truncated-config", simple(
            ["select", "--resume", "fixtures/run-src", "--quiet"], (1,),
            setup=_break_run("config.json", truncate))),
        Case("misc/resume-truncated-checkpoint", simple(
            ["select", "--resume", "fixtures/run-src", "--quiet"], (1,),
            setup=_break_run("checkpoint.pt", truncate))),
        Case("misc/resume-garbage-log", simple(  # the checkpoint holds the log's records
            ["select", "--resume", "fixtures/run-src", "--quiet"], (0, 1),
            setup=_break_run("log.jsonl", lambda p: p.write_text("garbage\n"), keep=False))),
        Case("misc/resume-finished-run", simple(
            ["select", "--resume", "fixtures/run-src", "--quiet"], (0, 1, 2),
            setup=lambda ctx: _run_src(ctx) and ctx.inputs.clear())),
        Case("misc/report-nan-token-log", simple(["report", "fixtures/run-src"], (1,),
                                                 setup=bad_log(nan_line))),
        Case("misc/report-truncated-log", simple(["report", "fixtures/run-src"], (1,),
                                                 setup=bad_log(cut_line))),
        Case("misc/inspect-a-folder", simple(["inspect", "sel.h5"], (1, 2),
                                             setup=mkdir("sel.h5"))),
        Case("misc/save-over-existing-file", simple(
            [*CONC, "--save-selections", "fixtures/src.h5", "--out", "r"], (1,),
            setup=lambda ctx: ctx.fixture("src.h5") and None)),
        Case("misc/out-is-a-file", simple([*CONC, "--out", "afile"], (2,), setup=touch)),
        Case("misc/npz-missing", simple(["train", "--dataset", "npz:none.npz", *SMALL], (1,))),
    ]


def all_cases() -> list[Case]:
    return [
        Case("kill/select", kill_case("select", fast=False), cost=6),
        Case("kill/train", kill_case("train", fast=False), cost=6),
        Case("kill/train-repeated", kill_case("train", fast=True), cost=8),
        Case("conc/same-default-name", case_same_default_name, cost=3),
        Case("conc/same-out", case_same_out, cost=2),
        Case("conc/same-selection-file", case_same_selection_file, cost=2),
        Case("conc/same-out-basename", case_same_basename, cost=2),
        *misc_cases(), *data_cases(), *selection_cases(), *option_cases(),
    ]


# ----------------------------------------------------------------------------------------------
# main


def source_state() -> str:
    """The checkout's commit and whether its package differs from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "subsetsel"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head}" + (", subsetsel/ has uncommitted changes" if dirty else "")


def format_step(case: str, step: Step) -> str:
    rc = "timeout" if step.rc is None else str(step.rc)
    mark = " !!" if step.unexpected or step.rc is None else ""
    bad = [p for p in step.problems if p.kind in BAR]
    files = "intact" if not bad else "NOT INTACT"
    head = (f"{case:<42} rc={rc:>3} exp={'/'.join(map(str, step.expected)):<6}{mark:<3} "
            f"traceback={'YES' if step.traceback else 'no'} files={files}")
    lines = [f"{head}  $ {step.label}", f"{'':<44}-> {step.message}"]
    lines += [f"{'':<44}[{p.kind}] {p.text}" for p in step.problems]
    if step.needle_missing:
        lines.append(f"{'':<44}[message] does not name {step.needle_missing!r}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name matches this regex")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per command")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args()
    global DEAD_PID
    probe = subprocess.Popen(["true"])
    probe.wait()
    DEAD_PID = probe.pid

    cases = [c for c in all_cases() if re.search(args.only, c.name)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    root = Path(tempfile.mkdtemp(prefix="subsetsel-fuzz-"))
    env = {**os.environ, "SUBSETSEL_CACHE": str(root / "cache"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} | {len(cases)} cases | jobs {args.jobs} | "
          f"load {load:.2f} | {os.cpu_count()} cores | folder {root}", flush=True)
    print(f"# code under test: {REPO} ({source_state()})", flush=True)
    began = time.monotonic()
    build_fixtures(root, env)
    print(f"# fixtures ready in {time.monotonic() - began:.0f} s", flush=True)

    lock = threading.Lock()
    results: list[tuple[str, list[Step]]] = []

    def execute(case: Case) -> tuple[str, list[Step]]:
        ctx = Ctx(root, case.name, env, args.timeout)
        try:
            steps = case.run(ctx)
        except Exception as err:  # noqa: BLE001 - a harness failure is reported, not raised
            steps = [Step(f"harness error: {type(err).__name__}: {err}", None, (0,),
                          problems=[Problem("harness", repr(err))])]
        seen: set[tuple[str, str]] = set()
        for step in steps:  # a file problem is reported once, by the first command that shows it
            step.problems = [p for p in step.problems if (p.kind, p.text) not in seen]
            seen.update((p.kind, p.text) for p in step.problems)
        with lock:
            for step in steps:
                print(format_step(case.name, step), flush=True)
        return case.name, steps

    ordered = sorted(cases, key=lambda c: -c.cost)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in as_completed([pool.submit(execute, c) for c in ordered]):
            results.append(future.result())

    steps = [s for _, ss in results for s in ss]
    kinds = {k: sum(1 for s in steps for p in s.problems if p.kind == k)
             for k in (*BAR, "tmp", "leftover", "harness")}
    count = {
        "cases": len(results), "commands": len(steps),
        "tracebacks": sum(s.traceback for s in steps),
        **{f"{k} files": kinds[k] for k in BAR},
        "unexpected exit codes": sum(s.unexpected for s in steps),
        "timeouts": sum(s.rc is None for s in steps),
        "stale temps": kinds["tmp"], "leftover run folders": kinds["leftover"],
        "messages not naming the option": sum(bool(s.needle_missing) for s in steps),
        "harness problems": kinds["harness"],
    }
    print(f"\n# failing or flagged ({time.monotonic() - began:.0f} s in all):")
    for name, ss in sorted(results):
        for s in ss:
            if (s.traceback or s.unexpected or s.rc is None or s.problems or s.needle_missing):
                print(format_step(name, s))
    print("\n# count: " + " | ".join(f"{k} {v}" for k, v in count.items()))
    if args.keep:
        print(f"# kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    failed = (count["tracebacks"] + sum(kinds[k] for k in BAR) + count["unexpected exit codes"]
              + count["timeouts"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
