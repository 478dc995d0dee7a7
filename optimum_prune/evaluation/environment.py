"""Where and how a pruned model will run: the environment a latency table is measured in and holds for."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}
_MODES = ("prefill", "decode")
_ENGINES = {"torch": "torch", "pytorch": "torch", "llama.cpp": "llama.cpp", "llama_cpp": "llama.cpp",
            "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp"}
_GGUF_ALIASES = {"float32": "f32", "fp32": "f32", "float": "f32", "float16": "f16", "fp16": "f16", "half": "f16",
                 "bfloat16": "bf16"}


@dataclass(frozen=True)
class InferenceEnvironment:
    """Where and how the pruned model will run; a latency table holds only in the environment it was measured in."""

    device: str = "cpu"
    """"cpu", "cuda" or "cuda:N" (llama.cpp: "cpu")."""
    dtype: str | None = None
    """torch: "float32" (default), "float16" or "bfloat16" (aliases fp32/fp16/bf16/half are accepted); llama.cpp:
    the GGUF type the models are exported to and timed in, "f16" (default), "f32", "bf16", "Q8_0", "Q4_K_M", ..."""
    batch_size: int = 1
    seq_len: int = 512
    """prefill: tokens per sequence; decode: length of the KV cache the new token attends to."""
    mode: str = "prefill"
    """"prefill" (one forward over seq_len tokens, no cache) or "decode" (one new token after seq_len cached)."""
    threads: int | None = None
    """CPU threads during measurement; None means torch's current count (llama.cpp: llama-cpp-python's default,
    half the CPUs), recorded as the actual number."""
    engine: str = "torch"
    """"torch" (transformers models timed in PyTorch) or "llama.cpp" (the models exported to GGUF, timed in
    llama.cpp through llama-cpp-python)."""
    logits_to_keep: int | None = None
    """prefill: the LM head runs on the last ``logits_to_keep`` positions only (transformers' ``logits_to_keep``;
    ``generate()`` passes 1 at prefill, so 1 times the prefill of time to first token); 0: on every position.
    None: the engine's default, torch 0 (every position, as before this field existed), llama.cpp 1 (its timing
    asks for the last token's logits only, and no other value is supported there). A large-vocabulary head
    (Gemma 3: 262k tokens) can be most of a full-logits prefill; a model whose forward lacks ``logits_to_keep``
    cannot be timed with it (an error names the fix)."""

    def __post_init__(self) -> None:
        engine = _ENGINES.get(str(self.engine).strip().lower()) if isinstance(self.engine, str) else None
        if engine is None:
            raise ValueError(f"InferenceEnvironment.engine must be 'torch' or 'llama.cpp', got {self.engine!r}")
        object.__setattr__(self, "engine", engine)
        if engine == "llama.cpp":
            self._check_llamacpp()
        else:
            self._check_torch()
        _check_positive_int("batch_size", self.batch_size, "the number of sequences per forward, e.g. 1")
        _check_positive_int("seq_len", self.seq_len,
                            "tokens per sequence (prefill) or KV-cache length (decode), e.g. 512")
        if self.mode not in _MODES:
            raise ValueError(f"InferenceEnvironment.mode must be 'prefill' or 'decode', got {self.mode!r}")
        if self.threads is not None:
            _check_positive_int("threads", self.threads, "a CPU thread count, or None for the engine's default")
        self._check_logits_to_keep()

    def _check_logits_to_keep(self) -> None:
        """None resolved to the engine's default; torch: 0 (every position) or 1..seq_len in prefill; llama.cpp: 1."""
        keep = self.logits_to_keep
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError("InferenceEnvironment.logits_to_keep must be 0 (logits on every position), a positive "
                             f"number of last positions (1: time to first token), or None, got {keep!r}")
        if self.llamacpp:
            if keep not in (None, 1):
                raise ValueError("engine='llama.cpp' times prefill with the last token's logits only "
                                 f"(logits_to_keep=1); logits_to_keep={keep!r} is not supported there")
            object.__setattr__(self, "logits_to_keep", 1)
            return
        keep = 0 if keep is None else keep
        if keep and self.mode != "prefill":
            raise ValueError(f"logits_to_keep={keep} applies to mode='prefill'; a decode step computes one token's "
                             "logits already (use logits_to_keep=0 or None)")
        if keep > self.seq_len:
            raise ValueError(f"logits_to_keep={keep} exceeds seq_len={self.seq_len}; use 1..{self.seq_len}, or 0 "
                             "for every position")
        object.__setattr__(self, "logits_to_keep", keep)

    def _check_llamacpp(self) -> None:
        """llama.cpp: a CPU environment in a GGUF type the export writes."""
        from ..export.gguf import DTYPES, normalize_dtype

        device = str(self.device).strip().lower()
        if device != "cpu":
            raise ValueError(f"engine='llama.cpp' times on the CPU (llama-cpp-python without GPU offload); use "
                             f"device='cpu', or engine='torch' for {self.device!r}")
        object.__setattr__(self, "device", device)
        dtype = "f16" if self.dtype is None else str(self.dtype).strip().replace("torch.", "")
        dtype = _GGUF_ALIASES.get(dtype.lower(), dtype)
        try:
            dtype = normalize_dtype(dtype)
        except ValueError:
            raise ValueError(f"InferenceEnvironment.dtype for engine='llama.cpp' is the GGUF type the models are "
                             f"exported to: one of {', '.join(DTYPES)}, got {self.dtype!r}") from None
        object.__setattr__(self, "dtype", dtype)

    def _check_torch(self) -> None:
        import torch

        if self.dtype is None:
            object.__setattr__(self, "dtype", "float32")
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(self.dtype).replace("torch.", ""))
        if not isinstance(self.device, (str, torch.device)):
            raise ValueError("InferenceEnvironment.device must be a string like 'cpu', 'cuda' or 'cuda:0', "
                             f"got {self.device!r}")
        object.__setattr__(self, "device", str(self.device).strip().lower())
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"InferenceEnvironment.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        dtype = _DTYPES.get(str(self.dtype).strip().lower())
        if dtype is None:
            hint = " (GGUF types such as f16 or Q8_0 need engine='llama.cpp')" if str(self.dtype).lower() in (
                "f16", "f32") or str(self.dtype).upper().startswith("Q") else ""
            raise ValueError("InferenceEnvironment.dtype must be 'float32', 'float16' or 'bfloat16', "
                             f"got {self.dtype!r}{hint}")
        object.__setattr__(self, "dtype", dtype)

    @property
    def llamacpp(self) -> bool:
        """Whether models are timed in llama.cpp (exported to GGUF) rather than in PyTorch."""
        return self.engine == "llama.cpp"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.llamacpp:
            raise ValueError(f"engine='llama.cpp' times GGUF files of type {self.dtype}, not a torch dtype; the "
                             "transformers model stays as loaded")
        return getattr(torch, self.dtype)

    @property
    def torch_device(self) -> torch.device:
        """The device, with the current CUDA index filled in for a bare 'cuda'."""
        import torch

        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def resolved(self) -> InferenceEnvironment:
        """This environment with ``threads`` set to the actual count that a measurement would use."""
        if self.threads is not None:
            return self
        if self.llamacpp:  # llama-cpp-python's own default (Llama(n_threads=None))
            return replace(self, threads=max((os.cpu_count() or 2) // 2, 1))
        import torch

        return replace(self, threads=torch.get_num_threads())

    def check_available(self) -> None:
        """Raise a ValueError naming the fix when this machine cannot run the environment."""
        if self.llamacpp:
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                raise ValueError("engine='llama.cpp' times GGUF exports in llama.cpp: pip install llama-cpp-python "
                                 "(and gguf), or use engine='torch'") from None
            return
        import torch

        device = torch.device(self.device)
        if device.type != "cuda":
            return
        if not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for, but CUDA is not available here (torch "
                             f"{torch.__version__}); use device='cpu', or a CUDA build of torch on a GPU machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {self.device!r} does not exist: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s); use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        if self.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"{torch.cuda.get_device_name(self.torch_device)} does not support bfloat16; "
                             "use dtype='float16'")

    def key(self) -> str:
        """A stable string for cache lookups: engine version, device model and every measurement setting.

        Torch keys are unchanged since before the engine field existed, so cached torch tables stay valid;
        ``logits_to_keep`` enters the key only when it is not 0 (every position, the former only behaviour).
        """
        import torch

        env = self.resolved()
        if env.llamacpp:
            return ";".join([f"engine=llama.cpp", f"llama_cpp={_llamacpp_version()}", "device=cpu",
                             f"name={_cpu_name()}", f"dtype={env.dtype}", f"batch={env.batch_size}",
                             f"seq_len={env.seq_len}", f"mode={env.mode}", f"threads={env.threads}"])
        device = env.torch_device
        parts = [f"torch={torch.__version__}", f"device={device.type}", f"name={_device_name(env)}"]
        if device.type == "cuda":
            parts.append(f"cuda={torch.version.cuda}")
        parts += [f"dtype={env.dtype}", f"batch={env.batch_size}", f"seq_len={env.seq_len}", f"mode={env.mode}",
                  f"threads={env.threads}"]
        if env.logits_to_keep:  # absent for every position (0), so the keys of tables cached before stay valid
            parts.append(f"logits_to_keep={env.logits_to_keep}")
        return ";".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_positive_int(name: str, value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"InferenceEnvironment.{name} must be a positive integer ({what}), got {value!r}")


def _device_name(env: InferenceEnvironment) -> str:
    """GPU model name, or the CPU model from /proc/cpuinfo (platform fallbacks elsewhere)."""
    import torch

    device = env.torch_device
    if device.type == "cuda":
        env.check_available()
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def _llamacpp_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        return "missing"
    return str(getattr(llama_cpp, "__version__", "unknown"))


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    return platform.processor() or platform.machine() or "unknown cpu"
