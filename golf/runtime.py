"""Runtime: devices and processes (CUDA + NCCL, CPU + gloo, or one plain process), CPU threads,
seeding, the run's logs, events and status file, progress lines, atomic writes and hashing.
"""

import contextlib
import glob
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from golf.config import BaseHyperparameters

# Runtime: one code path for CUDA + NCCL under torchrun, CPU + gloo under torchrun, and a plain
# process. `grad_accum_steps = 8 // world_size` keeps the maths of 8 GPUs on 1, 2 or 4. Rank 0 alone
# writes files.


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    grad_accum_steps: int
    threads: str = ""  # the CPU thread choice and why, logged by open_run

    @property
    def is_main(self):
        return self.rank == 0


def setup_runtime(env=None):
    env = os.environ if env is None else env
    ints = {
        name: BaseHyperparameters.parse_env_value(name, env.get(name, default), int)
        for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))
    }
    world_size = ints["WORLD_SIZE"]
    if world_size < 1 or 8 % world_size:
        raise ValueError(f"WORLD_SIZE={world_size}: must divide 8 (1, 2, 4 or 8 processes)")
    distributed = "RANK" in env and "WORLD_SIZE" in env
    use_cuda = torch.cuda.is_available() and env.get("FORCE_CPU", "0") != "1"
    threads = ""
    if use_cuda:
        device = torch.device("cuda", ints["LOCAL_RANK"])
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
        torch.set_flush_denormal(True)  # denormal weights (EMA tails) slow CPU matmuls several-fold
        threads = set_cpu_threads(env, ints["WORLD_SIZE"] if distributed else 1)
    if distributed and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None
        )
    return Runtime(
        rank=ints["RANK"],
        world_size=world_size,
        local_rank=ints["LOCAL_RANK"],
        device=device,
        distributed=distributed,
        grad_accum_steps=8 // world_size,
        threads=threads,
    )


def physical_cores():
    """Physical cores (distinct physical id / core id pairs of /proc/cpuinfo), else logical ones:
    a second hyper-thread adds little to a matmul and competes with the first."""
    pairs = set()
    package = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                package = value.strip()
            elif key == "core id":
                pairs.add((package, value.strip()))
    return len(pairs) or os.cpu_count() or 1


def busy_cores_now(interval=0.25):
    """How many cores other processes keep busy right now: two /proc/stat samples `interval` apart
    (this process sleeps between them). The 1-minute load average, the fallback where /proc is
    missing, lags: the install and corpus build that run just before a run would count against it
    and halve a laptop's threads."""

    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all jiffies, idle + iowait

    try:
        total_before, idle_before = sample()
        time.sleep(interval)
        total_after, idle_after = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0
    total = total_after - total_before
    if total <= 0:
        return 0.0
    idle = idle_after - idle_before
    return (os.cpu_count() or 1) * (1.0 - idle / total)


def choose_cpu_threads(env, cores, load, physical, local_procs=1):
    """(threads or None, why). OMP_NUM_THREADS set: None (torch already follows it). Otherwise the
    free cores (usable cores minus the cores other processes keep busy, `load`, at least 1), at
    most the physical cores, shared by this node's processes: a busy machine does not collapse a
    run whose threads would wait on each other (issue 18)."""
    if env.get("OMP_NUM_THREADS", "").strip():
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} (set by the caller)"
    free = max(1, round(cores - load))
    threads = max(1, min(free, physical) // max(1, local_procs))
    why = f"free cores {free} (cores {cores} - busy {load:.2f}), physical cores {physical}"
    if local_procs > 1:
        why += f", {local_procs} processes on this node"
    return threads, why


# torch's own thread count when this module was imported, and the one set_cpu_threads chose: a
# count different from both was set by the caller (a test, an embedding program) and is kept.
_THREADS_AT_IMPORT = torch.get_num_threads()
_THREADS_CHOSEN = [None]


def set_cpu_threads(env, world_size=1):
    """Set torch's CPU threads by choose_cpu_threads; returns the logged note. The OpenMP wait
    policy is read once, when torch loads its OpenMP library, so it is set before `import torch`
    in each script's header (OMP_WAIT_POLICY=PASSIVE unless given); the note says which it is."""
    current = torch.get_num_threads()
    policy = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP spins before sleeping)")
    if current not in (_THREADS_AT_IMPORT, _THREADS_CHOSEN[0]) and not env.get("OMP_NUM_THREADS"):
        return f"{current} (set by the caller), OMP_WAIT_POLICY={policy}"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    load = busy_cores_now()
    local = BaseHyperparameters.parse_env_value(
        "LOCAL_WORLD_SIZE", env.get("LOCAL_WORLD_SIZE", world_size), int
    )
    threads, why = choose_cpu_threads(env, cores, load, physical_cores(), local)
    if threads is None:
        return f"{torch.get_num_threads()}: {why}, OMP_WAIT_POLICY={policy}"
    torch.set_num_threads(threads)
    _THREADS_CHOSEN[0] = threads
    return f"{threads}: {why}, OMP_WAIT_POLICY={policy}"


def seed_everything(seed):
    torch.manual_seed(seed)  # seeds every CUDA device too
    np.random.seed(seed % (2**32))


def dist_sum(t, op=None):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def dist_max(t):
    return dist_sum(t, dist.ReduceOp.MAX)


def device_description(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{max(1, torch.cuda.device_count())}"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


@contextlib.contextmanager
def named_on_failure(path):
    """An OSError of a write (a full disk: ENOSPC; a file-size limit: EFBIG) names the file, as a
    one-line error should; the OS reports none for a write to an open file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, path) from None


def write_bytes_atomic(path, blob):
    """Write through a temporary file (`<path>.tmp<PID>`) and a rename: a concurrent reader sees
    the old file or the new one, never half of one. On any failure (a full disk, an interrupt) the
    temporary file is removed before the error goes on. Returns the bytes written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        with named_on_failure(path), open(tmp_path, "wb") as f:
            f.write(blob)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise
    return len(blob)


def remove_stale_temps(paths):
    """Remove the atomic writer's leftovers (`<path>.tmp<PID>`) of these paths, from an earlier run
    of the same RUN_ID that died mid-write. Returns the removed paths."""
    removed = []
    for path in paths:
        for tmp in glob.glob(glob.escape(path) + ".tmp*"):
            if tmp[len(path) + 4 :].isdigit() and os.path.isfile(tmp):
                os.remove(tmp)
                removed.append(tmp)
    return removed


def write_json_atomic(path, obj):
    write_bytes_atomic(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


class RunLogger:
    """The text log (source first, then baseline-format lines), the JSONL events and the status
    file."""

    def __init__(self, log_dir, run_id, enabled):
        self.enabled = enabled
        self._status_written = 0.0
        self.text_path = os.path.join(log_dir, f"{run_id}.txt")
        self.events_path = os.path.join(log_dir, f"{run_id}.jsonl")
        self.status_path = os.path.join(log_dir, f"{run_id}.status.json")
        self.status = {"run_id": run_id, "budget_bytes": 16_000_000, "history": {}}
        if enabled:
            os.makedirs(log_dir, exist_ok=True)
            for path in (self.text_path, self.events_path):
                open(path, "w", encoding="utf-8").close()

    def log0(self, msg, console=True):
        if not self.enabled:
            return
        if console:
            print(msg, flush=True)
        with named_on_failure(self.text_path), open(self.text_path, "a", encoding="utf-8") as f:
            print(msg, file=f)

    def event(self, kind, **fields):
        if not self.enabled:
            return
        line = json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n"
        with named_on_failure(self.events_path), open(self.events_path, "a", encoding="utf-8") as f:
            f.write(line)

    def update_status(self, force=False, history=None, **fields):
        """Merge fields into the status file; rewrite it when forced or every 10 s at least."""
        if not self.enabled:
            return
        self.status.update(fields)
        for key, value in (history or {}).items():
            series = self.status["history"].setdefault(key, [])
            series.append(value)
            if len(series) > 1000:  # thin out, keeping the whole run's shape
                del series[::2]
        now = time.time()
        if force or now - self._status_written >= 10.0:
            self.status["updated_at"] = round(now, 3)
            write_json_atomic(self.status_path, self.status)
            self._status_written = now

    def record_failure(self, exc):
        """An exception that ends the run, where people look: `error: <one line>` in the text log
        (with the traceback after it), an `error` event, and the status file's `state: failed`.
        Returns the one-line message."""
        message = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (ValueError, FileNotFoundError)):
            message = f"{type(exc).__name__}: {message}"
        if not self.enabled:
            return message
        import traceback

        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        with contextlib.suppress(OSError):  # a full disk must not hide the original error
            self.log0(f"error: {message}", console=False)
            self.log0(trace.rstrip(), console=False)
            self.event("error", message=message)
            self.update_status(force=True, state="failed", error=message)
        return message


# Progress of the long steps (evals, GPTQ calibration, serialization, the manifold build): a tqdm
# bar on an interactive terminal, else a plain line at most every PROGRESS_EVERY_S seconds for logs
# and CI (`progress: eval sliding 37% 1234/3300 eta 42s`), and the same in the status file's
# `progress` for the dashboard. Rank 0 alone shows it (issue 18).
PROGRESS_EVERY_S = 10.0
_PROGRESS_LOGGER = [None]  # the run's RunLogger, set by open_run; None: lines go to stderr
_OPEN_PROGRESS = []  # the open Progress instances, innermost last


def set_progress_logger(logger):
    """Send progress lines to this RunLogger (console and text log) and its status file."""
    _PROGRESS_LOGGER[0] = logger


def _is_rank0():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _short_time(seconds):
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 100:
        return f"{seconds / 60:.1f}min"
    return f"{seconds:.0f}s"


class Progress:
    """One long step's progress: `advance(n)` after each batch or chunk, `close()` at the end (or
    use it as a context manager). The estimate of the time left is the elapsed time per unit done
    times the units left. `Progress.advance_active(n)` advances the innermost open one, so a helper
    deep inside a loop (a batch scorer) counts without being handed it. interactive=None: a tqdm
    bar when stderr is a terminal and CI is not set."""

    def __init__(
        self, stage, total, state=None, every_s=None, interactive=None, logger=None, stream=None
    ):
        self.stage = stage
        self.total = max(int(total), 0)
        self.state = state
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.logger = logger or (None if stream else _PROGRESS_LOGGER[0])
        self.stream = stream
        self.done = 0
        self.lines = 0
        self.shown = _is_rank0()
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._bar = None
        if interactive is None:
            err = sys.stderr
            interactive = bool(err and err.isatty()) and not os.environ.get("CI")
        if self.shown and interactive:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, desc=stage, leave=False, dynamic_ncols=True)
        _OPEN_PROGRESS.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @classmethod
    def advance_active(cls, n=1):
        if _OPEN_PROGRESS:
            _OPEN_PROGRESS[-1].advance(n)

    def eta_s(self):
        """Seconds left at the rate so far; None before the first unit."""
        if not self.done:
            return None
        elapsed = time.perf_counter() - self.t0
        return elapsed / self.done * max(self.total - self.done, 0)

    def fields(self):
        """What the status file's `progress` holds: stage, fraction, units, eta and elapsed time."""
        eta = self.eta_s()
        return {
            "stage": self.stage,
            "fraction": round(self.done / self.total, 4) if self.total else 1.0,
            "done": self.done,
            "total": self.total,
            "eta_s": None if eta is None else round(eta, 1),
            "elapsed_s": round(time.perf_counter() - self.t0, 1),
        }

    def line(self):
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta_s()
        eta_text = "?" if eta is None else _short_time(eta)
        return f"progress: {self.stage} {pct:.0f}% {self.done}/{self.total} eta {eta_text}"

    def advance(self, n=1):
        self.done = min(self.done + int(n), self.total)
        if not self.shown:
            return
        if self._bar is not None:
            self._bar.update(int(n))
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._emit(self.line())

    def _emit(self, text):
        self.lines += 1
        logger = self.logger
        if logger is not None and logger.enabled:
            # The tqdm bar is the console's view; the text log always gets the plain line.
            logger.log0(text, console=self._bar is None)
            fields = {"progress": self.fields()}
            if self.state:
                fields["state"] = self.state
            logger.update_status(force=True, **fields)
        elif self._bar is None:
            print(text, file=self.stream or sys.stderr, flush=True)

    def close(self):
        if self in _OPEN_PROGRESS:
            _OPEN_PROGRESS.remove(self)
        if not self.shown:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.lines:  # a step long enough to have shown progress also shows its end
            took = _short_time(time.perf_counter() - self.t0)
            self._emit(f"progress: {self.stage} done {self.done}/{self.total} in {took}")


def sha256_hex(data):
    """The sha256 of bytes, as 64 hex digits: the one hash of artifacts, headers, scripts,
    tokenizers."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path):
    """sha256_hex of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
