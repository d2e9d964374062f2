"""Where a model runs and in which number format: ``--device`` and ``--dtype``
checked once, with one clear error naming what is accepted."""
from __future__ import annotations

import contextlib
import os
import platform
import re

import torch

from norton.errors import NortonError

# accepted spellings of the inference number formats
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (N below the number of visible GPUs);
    ``None`` means cuda when available.  Under torchrun a bare ``cuda`` is the
    process's own GPU (``LOCAL_RANK``)."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise NortonError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise NortonError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NortonError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise NortonError(f"device {name!r} does not exist: this machine has {count} GPU{'s' if count != 1 else ''} "
                          f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    if device.type == "cuda" and "LOCAL_RANK" in os.environ and device.index is None:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """``float32`` (``fp32``), ``bfloat16`` (``bf16``) or ``float16`` (``fp16``,
    ``half``); ``None`` is float32.  float16 is refused on the CPU, where
    PyTorch's convolutions do not run it at speed (bfloat16 does)."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        dtype = name
        if dtype not in DTYPE_NAMES:
            raise NortonError(f"dtype {dtype} is not supported; use {', '.join(DTYPE_NAMES.values())}")
    else:
        dtype = DTYPES.get(str(name).lower())
        if dtype is None:
            raise NortonError(f"unknown dtype {name!r}; use float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    if dtype == torch.float16 and device is not None and torch.device(device).type == "cpu":
        raise NortonError("dtype float16 runs on a GPU; on the CPU use float32 or bfloat16")
    return dtype


def device_name(device: torch.device | str) -> str:
    """What the hardware is called: the GPU's name, or the CPU's model and the
    threads torch uses — the key under which timings are kept."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def machine_record(device: torch.device | str = "cpu") -> dict[str, str | int]:
    """What a recorded result ran on: CPU model and threads, the BLAS and
    convolution libraries torch was built with, the GPU (if ``device`` is one)
    and the library versions."""
    device = torch.device(device)
    blas = re.search(r"\bBLAS_INFO=([^,\s]+)", torch.__config__.show())
    record: dict[str, str | int] = {
        "cpu": device_name("cpu"), "threads": torch.get_num_threads(), "blas": blas[1] if blas else "unknown",
        "onednn": str(torch.backends.mkldnn.is_available()).lower(), "torch": str(torch.__version__),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        record["gpu"] = device_name(device)
        record["cuda"] = str(torch.version.cuda)
    return record


def provenance(command: str | None = None) -> dict[str, str | None]:
    """When and from which code a recorded result was produced: the UTC date and
    time, the git commit of the norton checkout it ran from (``+changes`` when
    its files differ from that commit; "unknown" outside a checkout) and the
    command that produced it."""
    import datetime
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", os.path.dirname(here)):
        commit += "+changes"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit or "unknown", "command": command}


def provenance_text(record: dict, *more: str | None) -> str:
    """A record's ``provenance`` as a page prints it: "date, commit X" and ``more`` (parts left out where empty)."""
    return ", ".join(x for x in (record.get("date"), record.get("commit") and f"commit {record['commit']}", *more) if x)


@contextlib.contextmanager
def deterministic_numerics(device: torch.device | str | None = None):
    """Reproducible float32 arithmetic while inside: on CUDA, cuDNN's
    deterministic algorithms without autotuning, and no TF32 in convolutions or
    matmuls (their 10-bit mantissa, and algorithms picked by timing, make two
    evaluations of one checkpoint differ by an image); the settings are restored
    after.  On the CPU nothing needs changing."""
    if device is None or torch.device(device).type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved
