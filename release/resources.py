"""What a step needs (memory, GPU memory, disk) estimated from the model's shapes, and what the
machine has. One place, so `build`'s up-front refusal, `--jobs` scheduling, the reference's choice
between a resident and a streamed forward pass and GPTQ validation's fit check agree.

Estimates come from config.json and the checkpoint's tensor headers only; nothing is loaded. The
constants are measured (README, "Scaling"), not derived: a Python process with torch and
transformers imported is ~0.7 GB before it holds any weight.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from release.checkpoint import TensorPlan

GB = 1 << 30
# In a step's environment, set by the executors: the step watches its parent (cli._output).
STEP_ENV = "MODEL_RELEASE_STEP"
# Resident set of a step process with torch + transformers imported, before any weight (measured: 0.69 GB).
PY_BASE = int(0.8 * GB)


def _proc_kb(path: str, key: str) -> int | None:
    """A ``Key:   123 kB`` line of a /proc file, in bytes; None when absent or unreadable."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_threads() -> int:
    """How many threads a step may use: ``OMP_NUM_THREADS`` when set (what torch reads, what Ray sets
    to a task's CPU request, what a test worker sharing the machine is given), else the CPUs this
    process may run on. llama.cpp's quantizer and our ggml quantizer threads follow it too, so a
    step run under a CPU limit neither oversubscribes the machine nor depends on its core count."""
    import os

    try:
        env = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        env = 0
    if env > 0:
        return env
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def mem_available() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping)."""
    found = _proc_kb("/proc/meminfo", "MemAvailable")
    return 8 * GB if found is None else found


def rss_anon() -> int:
    """This process's anonymous resident memory (RssAnon): what it allocated, without the pages of
    files it maps (llama.cpp maps a GGUF file: those pages are page cache the kernel can drop)."""
    return _proc_kb("/proc/self/status", "RssAnon") or 0


def vm_hwm(pid: int) -> int:
    """Peak resident memory (VmHWM) of a live process since it exec'd its program; 0 once gone.

    Not ``wait4``'s ru_maxrss: Linux carries a parent's peak into a forked child across exec, so a
    step started from a process holding 4 GB would report at least 4 GB whatever it did."""
    return _proc_kb(f"/proc/{pid}/status", "VmHWM") or 0


def gpu_free() -> int | None:
    """Free memory of the current CUDA device, or None without one (never initialises CUDA twice)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    except Exception:  # a broken driver is "no GPU" here; the step that needs one says so
        return None


def disk_free(path: Path) -> int:
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def fmt(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def activations(tokens: int, hidden: int, intermediate: int, vocab: int) -> int:
    """Float32 activations of one prompt through one layer (attention scores of sdpa in float32
    included) plus its logits and their float64 log-softmax."""
    per_layer = tokens * (4 * hidden + 3 * intermediate) * 4 + tokens * tokens * 4 * 8
    return per_layer + tokens * vocab * (4 + 8 + 8)


@dataclass(frozen=True)
class ModelShape:
    """The sizes a memory estimate needs, from config.json and tensor headers."""

    parameters: int
    stored_bytes: int  # the weights as stored (bf16: 2 bytes a parameter)
    largest_layer_params: int  # one decoder layer
    largest_tensor_params: int
    head_params: int  # lm_head (or the tied embedding)
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    dtype: str = "F32"  # the stored dtype of most parameters (safetensors code)

    @property
    def fp32_bytes(self) -> int:
        return self.parameters * 4

    def forward_activations(self, tokens: int) -> int:
        return activations(tokens, self.hidden, self.intermediate, self.vocab)

    def streamed_forward(self, tokens: int) -> int:
        """One layer in float32, the head in chunks no larger than a layer, activations."""
        head_chunk = min(self.head_params, max(self.largest_layer_params, 64 << 20)) * 4
        return max(self.largest_layer_params * 4, head_chunk) + self.forward_activations(tokens)

    def resident_forward(self, tokens: int) -> int:
        return self.fp32_bytes + self.forward_activations(tokens)


def model_shape(src: Path) -> ModelShape:
    """Shapes of a checkpoint folder (headers only)."""
    from release.checkpoint import open_checkpoint, plan_tensors

    with open_checkpoint(src) as ckpt:
        return plan_shape(plan_tensors(ckpt))


def plan_shape(plan: TensorPlan) -> ModelShape:
    """Shapes of an already planned checkpoint (for callers that hold one open)."""
    values: dict[str, Any] = plan.architecture.values
    per_layer: dict[str, int] = {}
    head = 0
    by_dtype: dict[str, int] = {}
    for ref in plan.tensors:
        by_dtype[ref.dtype] = by_dtype.get(ref.dtype, 0) + ref.numel
        parts = ref.name.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            key = ".".join(parts[: i + 2])
            per_layer[key] = per_layer.get(key, 0) + ref.numel
        if ref.name == "lm_head.weight" or (ref.name.endswith("embed_tokens.weight") and not head):
            head = max(head, ref.numel)
    return ModelShape(
        parameters=plan.parameters,
        stored_bytes=sum(r.nbytes for r in plan.tensors),
        largest_layer_params=max(per_layer.values(), default=0),
        largest_tensor_params=max((r.numel for r in plan.tensors), default=0),
        head_params=head,
        hidden=int(values["hidden_size"]),
        intermediate=int(values.get("intermediate_size") or 4 * int(values["hidden_size"])),
        vocab=int(values["vocab_size"]),
        layers=plan.architecture.num_layers,
        dtype=max(by_dtype, key=by_dtype.__getitem__, default="F32"),
    )


@dataclass(frozen=True)
class Need:
    """One step's estimated peak needs (bytes); gpu is None for a CPU-only step."""

    ram: int
    disk: int = 0
    gpu: int | None = None

    def describe(self) -> str:
        parts = [f"{fmt(self.ram)} RAM"]
        if self.gpu:
            parts.append(f"{fmt(self.gpu)} GPU memory")
        if self.disk:
            parts.append(f"{fmt(self.disk)} disk")
        return ", ".join(parts)


def forward_need(shape: ModelShape, tokens: int, device: str, mode: str) -> Need:
    """A reference or transformers validation run (see ``release.forward``)."""
    work = shape.resident_forward(tokens) if mode == "resident" else shape.streamed_forward(tokens)
    if device.startswith("cuda"):
        # Weights pass through host memory one tensor at a time; logits come back per prompt.
        host = PY_BASE + shape.largest_tensor_params * 2 + shape.forward_activations(tokens)
        return Need(ram=host, gpu=work)
    return Need(ram=PY_BASE + work)


def fits(need: Need, *, ram: int | None = None, gpu: int | None = None) -> bool:
    ram = mem_available() if ram is None else ram
    if need.ram > ram:
        return False
    return not (need.gpu and (gpu is None or need.gpu > gpu))


def resident_fits(shape: ModelShape, tokens: int, device: str, ram: int, gpu: int | None) -> bool:
    """The ``auto`` rule of the forward pass: resident when the float32 model fits in 80% of what is
    free (the estimate is a model, not a measurement of the run), streamed otherwise."""
    need = forward_need(shape, tokens, device, "resident")
    return fits(need, ram=int(ram * 0.8), gpu=int(gpu * 0.8) if gpu is not None else None)


# --- per-step estimates for `build` ----------------------------------------------------------------
# Measured on the 7B-shaped checkpoint (README, "Scaling"); each is a peak of the step's process.


def convert_need(shape: ModelShape, out_itemsize: int) -> Need:
    """Streaming conversion: a tensor in hand, its cast copy and the shard writer's buffer."""
    return Need(ram=PY_BASE + 3 * shape.largest_tensor_params * 4, disk=shape.parameters * out_itemsize)


def gguf_need(shape: ModelShape, bpw: float) -> Need:
    """The direct writer holds the largest tensor in float32 and gguf's block arrays; llama.cpp's
    quantizer streams from the build's one lossless intermediate (its own step, its own disk)."""
    ram = PY_BASE + int(2.5 * shape.largest_tensor_params * 4)
    return Need(ram=ram, disk=int(shape.parameters * bpw / 8))


def llama_cpp_validate_need(shape: ModelShape, n_ctx: int = 2048) -> Need:
    """llama.cpp maps the file (page cache, reclaimable: not counted); it allocates the KV cache,
    a logits row per context position (logits_all) and compute buffers."""
    kv = 2 * n_ctx * shape.layers * shape.hidden * 2
    logits = n_ctx * shape.vocab * 4
    return Need(ram=PY_BASE + kv + logits + shape.forward_activations(n_ctx // 4) + (256 << 20))


def gptq_need(shape: ModelShape, device: str, tokens: int = 256, samples: int = 128) -> Need:
    """GPTQModel holds the model in its stored dtype on the host and quantizes layer by layer
    (measured on SmolLM2 on the CPU: 1.74 GB for 0.27 GB of weights)."""
    layer = shape.largest_layer_params * 4 * 3 + samples * tokens * shape.hidden * 4 * 4
    ram = int(1.5 * PY_BASE) + 2 * shape.stored_bytes
    disk = int(shape.parameters * 4.25 / 8) + shape.vocab * shape.hidden * 2
    if device.startswith("cuda"):
        return Need(ram=ram, gpu=layer, disk=disk)
    return Need(ram=ram + layer, disk=disk)


def gptq_validate_need(stored: int, act: int, device: str) -> Need:
    """A GPTQ model runs whole on its device: ``stored`` bytes of files take ~1.3x loaded (scales,
    g_idx, workspace; measured on SmolLM2 on the CPU), plus ``act`` of activations and logits."""
    work = int(stored * 1.3) + act
    if device.startswith("cuda"):
        return Need(ram=PY_BASE + act, gpu=work)
    return Need(ram=PY_BASE + work)


SMALL = Need(ram=PY_BASE)
