"""GGUF variants for llama.cpp: plan, write (atomic), self-check.

One pass over the source writes every requested "direct" type at once (F32, F16, BF16 and the
legacy block quants, converted with the ``gguf`` package's numpy quantizers); each source tensor
is read once, converted for every output, written, and dropped. The k-quant mixes (Q4_K_M, ...)
are made by llama.cpp's own quantizer (``llama_cpp.llama_model_quantize``) from a lossless
intermediate written in that same pass (BF16 for a bf16 source), never by re-reading the source,
or from one given (``--intermediate``: a build writes it once for all its k-quant steps).

Tensor names come from ``gguf.TensorNameMap``; per-tensor type rules and the Q/K row permutation
follow llama.cpp's ``convert_hf_to_gguf`` so that files match the reference converter's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from release import hashing
from release.architectures import Architecture, check
from release.atomic import fsync_path
from release.capture import capture_fd, tail
from release.checkpoint import Checkpoint, check_tied, open_checkpoint, plan_tensors
from release.datafiles import data_file
from release.errors import BadInputError, CheckFailedError, os_error_to_release_error
from release.formats import gguf_quants
from release.formats import gguf_rope as rope
from release.formats import imatrix as imatrix_fmt
from release.formats.gguf_header import read_header, tensor_digests
from release.formats.gguf_names import lossless_type, tensor_name_map, variant_files
from release.formats.gguf_vocab import GGUFVocab, load_vocab
from release.licensing import apply_policy
from release.metadata import ReleaseMetadata
from release.progress import NULL, Reporter
from release.resources import cpu_threads
from release.tensors import TensorRef, has_nonfinite, tensor_bytes

Q = gguf.GGMLQuantizationType
# llama.cpp's k-quants work on super-blocks of 256 values along a row.
K_BLOCK = 256
LEGACY_LOW_BIT = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


@dataclass(frozen=True)
class GGUFType:
    name: str
    via: str  # gguf | llama.cpp
    file_type: gguf.LlamaFileType
    tensor_type: Q | None  # for via == gguf
    needs_imatrix: bool = False  # llama.cpp refuses these without an importance matrix


def gguf_types() -> dict[str, GGUFType]:
    out = {}
    for name, spec in data_file("gguf", "types.json")["types"].items():
        tensor_type = Q[spec["tensor_type"]] if "tensor_type" in spec else None
        file_type = gguf.LlamaFileType[spec["file_type"]]
        out[name] = GGUFType(name, spec["via"], file_type, tensor_type, bool(spec.get("needs_imatrix")))
    return out


def resolve_types(names: list[str]) -> list[GGUFType]:
    known = gguf_types()
    by_upper = {k.upper(): v for k, v in known.items()}
    out: list[GGUFType] = []
    for n in names:
        t = by_upper.get(n.strip().upper())
        if t is None:
            raise BadInputError(f"unknown GGUF type {n!r} (known: {', '.join(known)})")
        if t not in out:
            out.append(t)
    if not out:
        raise BadInputError(f"no GGUF type requested (known: {', '.join(known)})")
    return out


@dataclass
class PlannedTensor:
    ref: TensorRef
    name: str  # GGUF name
    permute_heads: int | None  # rotary row permutation (q/k projections)

    is_output: bool = False  # output.weight, or token_embd.weight when the two are tied
    shift: float = 0.0  # added to the values (Gemma's norms are stored as w - 1)
    generated: torch.Tensor | None = None  # computed from config.json (rope_freqs), not read

    @property
    def is_norm_or_vector(self) -> bool:
        return len(self.ref.shape) <= 1 or self.name.endswith("_norm.weight")

    def tensor_type(self, t: GGUFType) -> Q:
        """The converter's rules: vectors and norms stay F32; a row that is not a whole number of
        quant blocks falls back to F16."""
        assert t.tensor_type is not None
        if self.is_norm_or_vector:
            return Q.F32
        if t.tensor_type in (Q.F32, Q.F16, Q.BF16):
            return t.tensor_type
        if self.is_output and t.tensor_type in LEGACY_LOW_BIT and self.ref.shape[-1] % 32 == 0:
            # llama.cpp's quantizer keeps the output matrix (the embeddings when tied) at 6 bits or
            # more in these files; gguf's numpy quantizers have no Q6_K, so Q8_0.
            return Q.Q8_0
        block = gguf.GGML_QUANT_SIZES[t.tensor_type][0]
        return t.tensor_type if self.ref.shape[-1] % block == 0 else Q.F16


@dataclass
class GGUFPlan:
    """What one pass writes: the tensors in order, the per-layer scalars that llama.cpp takes as
    metadata arrays instead (Apertus' xIELU), and the keys computed from config.json."""

    arch: Architecture
    tensors: list[PlannedTensor]
    scalars: list[TensorRef] = field(default_factory=list)  # read for the source hash and the keys
    keys: dict[str, list[float]] = field(default_factory=dict)


def plan_gguf(ckpt: Checkpoint) -> GGUFPlan:
    """Checkpoint tensors (checked against the architecture, tied copies dropped) with GGUF names,
    plus the tensors llama.cpp's converter computes from config.json (rope frequency factors)."""
    plan = plan_tensors(ckpt)
    arch = plan.architecture
    name_map = tensor_name_map(arch)
    spec = arch.spec["gguf"]
    check_tied(ckpt, plan)
    shift = spec.get("norm_shift") or {}
    scalar_keys = {k: v for k, v in (spec.get("layer_scalars") or {}).items() if k != "comment"}
    out = GGUFPlan(arch, [])
    per_layer: dict[str, list[float]] = {}
    for ref in plan.tensors:
        key = next((k for s, k in scalar_keys.items() if ref.name.endswith("." + s)), None)
        if key is not None:
            with ckpt.open(ref) as t:
                per_layer.setdefault(key, []).append(float(t.float().reshape(-1)[0]))
            out.scalars.append(ref)
            continue
        name = name_map.get_name(ref.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BadInputError(f"tensor {ref.name} has no GGUF name for {spec['arch']}")
        heads = None
        for suffix, k in (spec.get("rope_permute") or {}).items():
            if ref.name.endswith(suffix):
                heads = int(arch.values[k])
        add = float(shift["add"]) if shift and ref.name.endswith(shift["suffix"]) else 0.0
        out.tensors.append(PlannedTensor(ref, name, heads, shift=add))
    out.keys = per_layer
    for gguf_name, values in rope.extra_tensors(arch).items():
        ref = TensorRef(f"({gguf_name}: computed from config.json)", "F32", tuple(values.shape), Path("config.json"))
        out.tensors.append(PlannedTensor(ref, gguf_name, None, generated=values))
    names = {pt.name for pt in out.tensors}
    for pt in out.tensors:
        pt.is_output = pt.name == "output.weight" or (pt.name == "token_embd.weight" and "output.weight" not in names)
    return out


def permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """HF keeps each head's rotary halves apart; GGML wants them interleaved (the converter's permute)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


class SourceTensor:
    """One source tensor, permuted as GGML wants it, with its float32 form made once on demand."""

    def __init__(self, t: torch.Tensor, pt: PlannedTensor) -> None:
        self.t = permute_rows(t, pt.permute_heads) if pt.permute_heads else t
        if pt.shift:
            self.t = self.t.to(torch.float32) + pt.shift  # in float32, as transformers computes 1 + w
        self._f32: np.ndarray | None = None

    @property
    def f32(self) -> np.ndarray:
        """What the converter hands to gguf's quantizers: float32 (float16 kept as it is)."""
        if self._f32 is None:
            t = self.t if self.t.dtype in (torch.float16, torch.float32) else self.t.to(torch.float32)
            self._f32 = np.ascontiguousarray(t.numpy())
        return self._f32


def encode(src: SourceTensor, qtype: Q, out: np.ndarray | None = None) -> np.ndarray:
    """Tensor bytes for one GGUF type. Float casts run in torch (round to nearest even, as numpy
    does, several times faster); the block quants use ggml's quantizer when llama-cpp-python is
    installed (``gguf_quants``), else gguf's numpy quantizers: the same bytes either way."""
    if qtype == Q.F32:
        return src.t.to(torch.float32).contiguous().numpy()
    if qtype == Q.F16:
        return src.t.to(torch.float16).contiguous().numpy()
    if qtype == Q.BF16 and src.t.dtype == torch.bfloat16:
        return src.t.contiguous().view(torch.int16).numpy().view(np.uint8)
    fast = gguf_quants.quantize(src.t, qtype, out=out)  # ggml's C quantizer, same bytes, threaded
    return fast if fast is not None else gguf.quants.quantize(src.f32, qtype)


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _hparams(writer: gguf.GGUFWriter, arch: Architecture, plan_keys: dict[str, list[float]]) -> None:
    """The architecture's keys (release/data/architectures), its rope scaling and the per-layer
    arrays read from scalar tensors."""
    spec = arch.spec["gguf"]
    for key, (kind, source, *flags) in spec["keys"].items():
        value = arch.values.get(source)
        if value is None:
            if "optional" in flags:
                continue
            raise BadInputError(f"config.json: {source} is missing (needed for GGUF key {key})")
        full = key.format(arch=spec["arch"])
        if kind == "uint32":
            writer.add_uint32(full, int(value))
        elif kind == "float32":
            writer.add_float32(full, float(value))
        elif kind == "bool_array":
            writer.add_array(full, [bool(v) for v in value])
        else:
            raise ValueError(f"{arch.name}: unknown key type {kind!r} for {key}")
    for key, values in plan_keys.items():
        writer.add_array(key, values)
    if spec.get("add_space_prefix") is not None:
        writer.add_add_space_prefix(bool(spec["add_space_prefix"]))
    rope.add_scaling_keys(writer, arch)


def _release_keys(w: gguf.GGUFWriter, meta: ReleaseMetadata) -> None:
    """The release's general.* keys and our model_release.* provenance keys."""
    meta.to_gguf().set_gguf_meta_model(w)
    for k, v in meta.gguf_provenance().items():
        w.add_string(k, v)


class GGUFFile:
    """One output file, streamed: header and tensor infos first (sizes are known from the plan),
    then tensor data in plan order. The source hash is a fixed-length placeholder in the header,
    patched in place at the end (the data of GGUF comes after its metadata)."""

    def __init__(
        self,
        path: Path,
        gtype: GGUFType,
        plan: GGUFPlan,
        vocab: GGUFVocab,
        meta: ReleaseMetadata,
    ) -> None:
        tensors, arch = plan.tensors, plan.arch
        self.path = path
        self.gtype = gtype
        self.types = {pt.name: pt.tensor_type(gtype) for pt in tensors}
        self.digests: dict[str, str] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        w = gguf.GGUFWriter(path=None, arch=arch.spec["gguf"]["arch"])
        _release_keys(w, meta.with_(source_checkpoint_hash=hashing.PLACEHOLDER_HASH))
        _hparams(w, arch, plan.keys)
        w.add_file_type(gtype.file_type.value)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(w)
        for pt in tensors:
            q = self.types[pt.name]
            w.add_tensor_info(pt.name, pt.ref.shape, np.dtype(np.float32), _nbytes(pt.ref.shape, q), raw_dtype=q)
        w.write_header_to_file(path=path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        self._w = w
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-write")
        self._pending: Future[None] | None = None
        self._bufs: list[np.ndarray | None] = [None, None]
        self._slot = 0
        self._buf_bytes = max((_nbytes(pt.ref.shape, self.types[pt.name]) for pt in tensors), default=0)

    def write(self, pt: PlannedTensor, data: SourceTensor, *, allow_nonfinite: bool) -> None:
        """Encode this tensor while the previous one is still being written (a writer thread):
        at 7B, writing 7 GB into the page cache runs at disk speed once the kernel throttles dirty
        pages, and would otherwise leave both cores idle. Two reused output buffers alternate."""
        q = self.types[pt.name]
        slot = self._buffer(q, pt)
        out = encode(data, q, out=slot)
        if q == Q.F16 and not allow_nonfinite and has_nonfinite(torch.from_numpy(out)):
            raise BadInputError(f"tensor {pt.ref.name}: values overflow float16 in {self.gtype.name}")
        digest = hashing.write_digest(memoryview(out).cast("B"))
        self._drain()
        assert self._w.fout is not None
        start = self._w.fout[0].tell()
        start += -start % self._w.data_alignment  # where write_tensor_data puts it, after padding
        self.offsets[pt.name] = (start, out.nbytes)
        self.digests[pt.name] = digest
        base, size = data.t.data_ptr(), data.t.numel() * data.t.element_size()
        if base <= out.ctypes.data < base + size:
            # The bytes are the memory-mapped source itself (BF16 from bf16): write them now, before
            # the reader drops those pages; a later write would fault them back in for good.
            self._w.write_tensor_data(out)
        else:
            self._pending = self._writer.submit(self._w.write_tensor_data, out)

    def _buffer(self, q: Q, pt: PlannedTensor) -> np.ndarray | None:
        """The free one of two output buffers sized for the largest tensor (types ggml quantizes)."""
        if q not in gguf_quants.TYPES:
            return None
        self._slot ^= 1
        if self._bufs[self._slot] is None:
            self._bufs[self._slot] = np.empty(self._buf_bytes, dtype=np.uint8)
        return self._bufs[self._slot]

    def _drain(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a write error (disk full) here

    def finish(self, source_hash: str) -> None:
        self._drain()
        self._writer.shutdown(wait=True)
        w = self._w
        assert w.fout is not None
        for f in w.fout:
            f.flush()
            os.fsync(f.fileno())
        w.close()
        _patch_placeholder(self.path, source_hash)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._drain()
        self._writer.shutdown(wait=True)
        with contextlib.suppress(Exception):
            self._w.close()


def _patch_placeholder(path: Path, value: str) -> None:
    old = hashing.PLACEHOLDER_HASH.encode()
    new = value.encode()
    assert len(old) == len(new)
    with open(path, "r+b") as f:
        head = f.read(64 * 2**20)  # the KV section, vocabulary included, is far smaller
        at = head.find(old)
        if at < 0 or head.find(old, at + 1) >= 0:
            raise RuntimeError(f"{path.name}: provenance placeholder not found exactly once")
        f.seek(at)
        f.write(new)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class GGUFOutput:
    type: str
    file: str
    bytes: int
    tensor_types: dict[str, int]
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    parts: list[str] = field(default_factory=list)  # a split set's files, in order (file is the first)
    imatrix: dict[str, Any] | None = None  # the quantize.imatrix.* keys llama.cpp recorded, if one was used


@dataclass
class GGUFResult:
    output_dir: str
    source: str
    name: str
    source_checkpoint_hash: str
    outputs: list[GGUFOutput]
    warnings: list[str]
    seconds: float
    imatrix: dict[str, Any] | None = None  # the importance matrix used: file, and how it was collected

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self)}


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not cleaned:
        raise BadInputError(f"--name {name!r} leaves nothing usable for a file name")
    return cleaned


def _lossless_type(tensors: list[PlannedTensor]) -> str:
    """The intermediate for llama.cpp's quantizer that holds the source's values exactly."""
    counts: Counter[str] = Counter()
    for pt in tensors:
        counts[pt.ref.dtype] += pt.ref.numel
    return lossless_type(counts.most_common(1)[0][0])


def write_gguf(
    src: Path,
    out_dir: Path,
    types: list[str],
    *,
    name: str | None = None,
    metadata: ReleaseMetadata | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
    split_max_size: int | None = None,
    imatrix: str = "auto",
    calibration: Path | None = None,
    imatrix_chunks: int | None = None,
    device: str = "cpu",
    forward: str = "auto",
    intermediate: Path | None = None,
    reporter: Reporter = NULL,
) -> GGUFResult:
    """Write ``<name>-<TYPE>.gguf`` into ``out_dir`` for every requested type; with
    ``split_max_size``, a file larger than that becomes llama.cpp's split set
    ``<name>-<TYPE>-00001-of-0000N.gguf`` ... (one variant, loaded from its first part).

    ``imatrix`` applies to the types llama.cpp quantizes (k-quants, IQ): ``auto`` collects an
    importance matrix from the source on ``calibration`` (built-in medical text by default) and
    writes it beside the variants as ``<name>.imatrix`` (on ``imatrix_chunks`` 512-token chunks of
    it, None: all it gives, as the release file's ``imatrix_chunks``); a path uses that file;
    ``none`` uses none (the types that need one are then refused).

    ``intermediate``: the lossless GGUF the llama.cpp types are quantized from, already written (a
    build writes it once for all its k-quant and IQ steps, or ships it as its F16/BF16 variant);
    checked against the source's tensors and this run's metadata, and left in place."""
    started = time.monotonic()
    wanted = resolve_types(types)
    src = Path(src)
    out_dir = Path(out_dir).absolute()
    meta = apply_policy(metadata or ReleaseMetadata())
    base = _safe_name(name or meta.name or src.absolute().name)
    meta = meta.with_(name=meta.name or name or base)
    targets = {t.name: out_dir / f"{base}-{t.name}.gguf" for t in wanted}
    for p in targets.values():
        if variant_files(p) and not force:
            raise BadInputError(f"{variant_files(p)[0]} exists (pass --force to replace it)")
    if split_max_size is not None and split_max_size < 1 << 20:
        raise BadInputError(f"--split-max-size {split_max_size} bytes is too small (at least 1 MB)")
    kquants = [t for t in wanted if t.via == "llama.cpp"]
    im_mode = _imatrix_mode(imatrix, kquants, imatrix_chunks)
    im_target = out_dir / f"{base}{imatrix_fmt.SUFFIX}"
    if im_mode == "auto" and im_target.exists() and not force:
        raise BadInputError(f"{im_target} exists (pass --force to replace it, or --imatrix {im_target} to use it)")
    warnings: list[str] = []
    with open_checkpoint(src) as ckpt:
        plan = plan_gguf(ckpt)
        arch, tensors = plan.arch, plan.tensors
        for w in arch.spec["gguf"].get("warn", []):  # what the runtime computes differently, said once
            if check(w["check"], arch.values):
                warnings.append(w["message"].format(**arch.values))
        vocab = load_vocab(ckpt.root, int(arch.values["vocab_size"]))
        meta = meta.with_(source_format=ckpt.format, origin_checkpoint_hash=ckpt.recorded_origin())
        direct = [t for t in wanted if t.via == "gguf"]
        if kquants:
            _llama_cpp()  # fail before writing anything if the quantizer is missing
        im: imatrix_fmt.IMatrix | None = None
        im_file = ""
        if im_mode == "file":
            im_file = Path(imatrix).name
            im = imatrix_fmt.read(Path(imatrix))
            _check_imatrix(im, tensors, Path(imatrix))
        inter_name = _lossless_type(tensors)
        known = gguf_types()
        given_hash = None
        if intermediate is not None and kquants:
            given_hash = _check_intermediate(Path(intermediate), known[inter_name], plan, meta)
        need_inter = bool(kquants) and known[inter_name] not in direct and intermediate is None
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        with (
            _remove_if_failed(out_dir, created),
            tempfile.TemporaryDirectory(prefix=".model-release-", dir=out_dir) as tmpdir,
        ):
            tmp = Path(tmpdir)
            try:
                files: dict[str, GGUFFile] = {}
                source_hash = given_hash or ""
                if direct or need_inter:  # else every type comes from the given intermediate: no source read
                    files, source_hash = _write_direct(ckpt, plan, vocab, meta,
                                                       direct + ([known[inter_name]] if need_inter else []), tmp,
                                                       allow_nonfinite=allow_nonfinite, reporter=reporter,
                                                       warnings=warnings)  # fmt: skip
                    if given_hash and source_hash != given_hash:
                        raise BadInputError(f"--intermediate {Path(intermediate).name} was made from other weights "
                                            "than the source")  # fmt: skip
                if im_mode == "auto":  # after the pass that refuses NaN weights with the tensor's name
                    im = imatrix_fmt.collect(src, calibration=calibration, chunks=imatrix_chunks, device=device,
                                             forward=forward, reporter=reporter, warnings=warnings)  # fmt: skip
                    imatrix_fmt.write(tmp / im_target.name, im)
                    im_file = im_target.name
                outputs: list[GGUFOutput] = []
                for t in direct:
                    outputs.append(_check_direct(files[t.name], t, tensors))
                inter = Path(intermediate) if given_hash else files[inter_name].path if kquants else None
                for t in kquants:
                    assert inter is not None
                    out = tmp / f"{t.name}.gguf"
                    outputs.append(_quantize_llama_cpp(inter, out, t, tensors, reporter, im, im_file))
                for o in outputs:
                    final = targets[o.type]
                    made = split_gguf(tmp / o.file, split_max_size) if split_max_size else [tmp / o.file]
                    stem = Path(o.file).stem
                    dests = (
                        [final.with_name(final.stem + p.name[len(stem) :]) for p in made] if len(made) > 1 else [final]
                    )
                    for old in variant_files(final):  # an earlier single file or split set of this type
                        if old not in dests:
                            old.unlink()
                    for p, d in zip(made, dests, strict=True):
                        os.replace(p, d)  # atomic per file, replacing an old one under --force
                    o.file = dests[0].name
                    o.parts = [d.name for d in dests] if len(dests) > 1 else []
                    o.bytes = sum(d.stat().st_size for d in dests)
                if im_mode == "auto":
                    os.replace(tmp / im_target.name, im_target)
                fsync_path(out_dir)
            except OSError as exc:
                raise os_error_to_release_error(exc, f"writing {out_dir}") from exc
    for w in warnings:
        reporter.warn(w)
    return GGUFResult(
        output_dir=str(out_dir),
        source=str(src),
        name=meta.name or base,
        source_checkpoint_hash=source_hash,
        outputs=outputs,
        warnings=warnings,
        seconds=round(time.monotonic() - started, 3),
        imatrix=_imatrix_summary(im, im_file, im_target if im_mode == "auto" else Path(imatrix)),
    )


def _check_intermediate(path: Path, want: GGUFType, plan: GGUFPlan, meta: ReleaseMetadata) -> str:
    """Refuse an intermediate that is not this source's lossless GGUF with this run's metadata (llama.cpp's
    quantizer copies its keys into every output); return the source hash it records."""
    if not path.is_file():
        raise BadInputError(f"--intermediate {path} does not exist")
    try:
        header = read_header(path)
    except (ValueError, OSError) as exc:
        raise BadInputError(f"--intermediate {path} is not a readable GGUF file ({exc})") from None
    value = header.value

    if value("general.file_type") != want.file_type.value:
        raise BadInputError(f"--intermediate {path.name} is not {want.name}, the lossless type of this source")
    have = {rt.name: rt.n_elements for rt in header.tensors}
    expected = {pt.name: int(np.prod(pt.ref.shape)) for pt in plan.tensors}
    if have != expected:
        diff = sorted(set(have) ^ set(expected)) or sorted(k for k in have if have[k] != expected[k])
        raise BadInputError(f"--intermediate {path.name} holds other tensors than this source (first: {diff[0]})")
    w = gguf.GGUFWriter(path=None, arch=plan.arch.spec["gguf"]["arch"])
    _release_keys(w, meta)  # what GGUFFile writes for this run
    for k, kv in w.kv_data[0].items():
        got = value(k)
        if k != "model_release.source_checkpoint_hash" and got != kv.value:
            raise BadInputError(f"--intermediate {path.name} was written with {k}={got!r}, this run says {kv.value!r}")
    recorded = value("model_release.source_checkpoint_hash")
    if not recorded:
        raise BadInputError(f"--intermediate {path.name} records no source checkpoint hash (not model-release's)")
    return str(recorded)


def _imatrix_summary(im: imatrix_fmt.IMatrix | None, file: str, path: Path) -> dict[str, Any] | None:
    if im is None:
        return None
    return {"file": file, "path": str(path), "datasets": im.datasets, "chunks": im.chunk_count,
            "chunk_size": im.chunk_size, "entries": len(im.sums), **im.info}  # fmt: skip


def _imatrix_mode(imatrix: str, kquants: list[GGUFType], chunks: int | None) -> str:
    """auto | file | none, after refusing what cannot work."""
    mode = imatrix if imatrix in ("auto", "none") else "file"
    if chunks is not None and mode != "auto":
        raise BadInputError("--imatrix-chunks sets how much text --imatrix auto collects on; it does not apply to "
                            f"--imatrix {imatrix}")  # fmt: skip
    if mode == "file" and not Path(imatrix).is_file():
        raise BadInputError(f"--imatrix {imatrix}: no such file (or use auto / none)")
    if not kquants:
        return "none"  # only the direct types: gguf's converters take no importance matrix
    if mode == "none":
        needy = [t.name for t in kquants if t.needs_imatrix]
        if needy:
            raise BadInputError(
                f"{', '.join(needy)} need{'s' if len(needy) == 1 else ''} an importance matrix: llama.cpp's "
                "very-low-bit types are unusable without one",
                hint="use --imatrix auto (collected from the source on calibration text) or --imatrix FILE",
            )
    return mode


def _check_imatrix(im: imatrix_fmt.IMatrix, tensors: list[PlannedTensor], path: Path) -> None:
    """An imatrix made for another model would make llama.cpp abort mid-file: refuse it first."""
    widths = {pt.name: pt.ref.shape[-1] for pt in tensors if not pt.is_norm_or_vector}
    known = [n for n in im.sums if n in widths]
    if not known:
        raise BadInputError(f"{path}: no imatrix entry names a weight of this model (made for another model?)")
    for n in known:
        if im.sums[n].size != widths[n]:
            raise BadInputError(
                f"{path}: {n} has {im.sums[n].size} columns in the imatrix, {widths[n]} in the model "
                "(made for another model?)"
            )


@contextlib.contextmanager
def _remove_if_failed(folder: Path, created: bool) -> Iterator[None]:
    """A failed run leaves no trace: the output folder goes too if this run made it."""
    try:
        yield
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: never delete what someone else put there
        raise


def _write_direct(
    ckpt: Checkpoint,
    plan: GGUFPlan,
    vocab: GGUFVocab,
    meta: ReleaseMetadata,
    types: list[GGUFType],
    tmp: Path,
    *,
    allow_nonfinite: bool,
    reporter: Reporter,
    warnings: list[str],
) -> tuple[dict[str, GGUFFile], str]:
    """The single pass over the source. Returns the files by type name and the source hash."""
    files = {t.name: GGUFFile(tmp / f"{t.name}.gguf", t, plan, vocab, meta) for t in types}
    digests: dict[str, tuple[str, tuple[int, ...], str]] = {}
    tensors = plan.tensors
    reporter.start(f"writing GGUF {', '.join(files)}", sum(pt.ref.nbytes for pt in tensors))
    # The source hash runs on a helper thread (BLAKE3 releases the GIL) beside the conversion.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-hash")
    try:
        for ref in plan.scalars:  # in the hash like every source tensor; their values are keys
            with ckpt.open(ref) as t:
                digests[ref.name] = (ref.dtype, ref.shape, hashing.tensor_digest(tensor_bytes(t), 1))
        for pt in tensors:
            if pt.generated is not None:  # from config.json: not part of the checkpoint's hash
                data = SourceTensor(pt.generated, pt)
                for f in files.values():
                    f.write(pt, data, allow_nonfinite=allow_nonfinite)
                continue
            with ckpt.open(pt.ref) as t:
                digest = pool.submit(hashing.tensor_digest, tensor_bytes(t), 1)
                if has_nonfinite(t):
                    msg = f"tensor {pt.ref.name} holds NaN/Inf values"
                    if not allow_nonfinite:
                        raise BadInputError(msg, hint="pass --allow-nonfinite to write it anyway")
                    warnings.append(msg)
                data = SourceTensor(t, pt)
                for f in files.values():
                    f.write(pt, data, allow_nonfinite=allow_nonfinite)
                del data
                digests[pt.ref.name] = (pt.ref.dtype, pt.ref.shape, digest.result())  # before the pages go
            reporter.advance(pt.ref.nbytes)
        source_hash = hashing.checkpoint_hash(digests)
        for f in files.values():
            f.finish(source_hash)
    except BaseException:
        for f in files.values():
            f.abort()
        raise
    finally:
        pool.shutdown(wait=True)
        reporter.done()
    return files, source_hash


def _check_direct(f: GGUFFile, t: GGUFType, tensors: list[PlannedTensor]) -> GGUFOutput:
    """Read every tensor back from disk at the offset it was written to and compare digests.

    (``gguf.GGUFReader`` would re-parse the whole header, vocabulary included: ~4 s for SmolLM2's
    49k tokens and merges in pure Python. The tests read every file with it and with llama.cpp.)
    """
    size = f.path.stat().st_size
    with open(f.path, "rb", buffering=0) as fh:
        if fh.read(4) != b"GGUF":
            raise CheckFailedError(f"{f.path.name}: not a GGUF file after writing")
        for pt in tensors:
            start, n = f.offsets[pt.name]
            if start + n > size:
                raise CheckFailedError(f"{f.path.name}: truncated after writing")
            if hashing.file_digest(fh, start, n) != f.digests[pt.name]:
                raise CheckFailedError(f"{f.path.name}: tensor {pt.name} on disk differs from what was written")
    fallbacks = [
        f"{pt.name}: row of {pt.ref.shape[-1]} is not a multiple of the {t.name} block, written as F16"
        for pt in tensors
        if f.types[pt.name] == Q.F16 and t.tensor_type not in (Q.F16, Q.F32, Q.BF16)
    ]
    counts = Counter(q.name for q in f.types.values())
    return GGUFOutput(t.name, f.path.name, f.path.stat().st_size, dict(counts), fallbacks)


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise BadInputError(
            f"k-quant and IQ types need llama.cpp's quantizer: pip install 'model-release[gguf]' ({exc})"
        ) from None
    return llama_cpp


@contextlib.contextmanager
def _quiet_llama_logs() -> Iterator[Any]:
    """llama.cpp's quantizer prints a line per tensor (fallback warnings included) on fd 2, partly
    around the log callback: capture it. Our summary reports the fallbacks; a failure quotes the tail."""
    logger = logging.getLogger("llama-cpp-python")  # gates llama-cpp-python's own log callback
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with capture_fd(2) as log:
            yield log
    finally:
        logger.setLevel(level)


def _quantize_llama_cpp(
    inter: Path,
    out: Path,
    t: GGUFType,
    tensors: list[PlannedTensor],
    reporter: Reporter,
    im: imatrix_fmt.IMatrix | None = None,
    im_file: str = "",
) -> GGUFOutput:
    llama_cpp = _llama_cpp()
    started = time.monotonic()
    reporter.start(f"quantizing {t.name} with llama.cpp" + (" and the importance matrix" if im else ""), 1)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = t.file_type.value
    params.nthread = cpu_threads()
    inputs = None  # its ctypes arrays must outlive the call that reads them
    if im is not None:
        inputs = imatrix_fmt.QuantizerInputs(llama_cpp, im, im_file)
        inputs.apply(params)
    with _quiet_llama_logs() as log:
        rc = llama_cpp.llama_model_quantize(str(inter).encode(), str(out).encode(), params)
        said = tail(log) if rc != 0 or not out.is_file() else ""
    reporter.done()
    if rc != 0 or not out.is_file():
        raise CheckFailedError(f"llama.cpp failed to quantize to {t.name} (code {rc}): {said}")
    with open(out, "rb+") as f:
        os.fsync(f.fileno())
    try:
        header = read_header(out)
    except (ValueError, OSError) as exc:
        raise CheckFailedError(f"{out.name}: unreadable after quantizing ({exc})") from None
    by_name = {pt.name: pt for pt in tensors}
    counts: Counter[str] = Counter()
    fallbacks = []
    for rt in header.tensors:
        q = Q(rt.tensor_type)
        counts[q.name] += 1
        pt = by_name.get(rt.name)
        if pt is None:
            raise CheckFailedError(f"{out.name}: unexpected tensor {rt.name}")
        if not pt.is_norm_or_vector and "_K" not in q.name and pt.ref.shape[-1] % K_BLOCK:
            fallbacks.append(f"{rt.name}: row of {pt.ref.shape[-1]} is not a multiple of 256, llama.cpp used {q.name}")
    missing = set(by_name) - {rt.name for rt in header.tensors}
    if missing:
        raise CheckFailedError(f"{out.name}: tensors missing after quantization: {', '.join(sorted(missing)[:3])}")
    recorded = None
    if im is not None:
        keys = (imatrix_fmt.KV_FILE, imatrix_fmt.KV_DATASET, imatrix_fmt.KV_ENTRIES, imatrix_fmt.KV_CHUNKS)
        recorded = {k.removeprefix("quantize.imatrix."): header.value(k) for k in keys if k in header.fields}
        if "entries_count" not in recorded:
            raise CheckFailedError(f"{out.name}: llama.cpp did not record the importance matrix it was given")
    seconds = round(time.monotonic() - started, 3)
    return GGUFOutput(t.name, out.name, out.stat().st_size, dict(counts), fallbacks, seconds, imatrix=recorded)


# --- split sets (llama.cpp's `gguf-split` convention; names in gguf_names.py) ----------------


def split_gguf(path: Path, max_bytes: int) -> list[Path]:
    """Rewrite one GGUF file as a split set of parts of at most ``max_bytes`` of tensor data each,
    the way llama.cpp's ``gguf-split`` does (``split.no``/``split.count``/``split.tensors.count`` in
    every part, all other metadata in the first), with the ``gguf`` package's writer, which
    implements that convention; tensor data are copied from the memory-mapped source. A file that
    fits is left as it is. Every part is read back and each tensor compared with the source."""
    if path.stat().st_size <= max_bytes:
        return [path]
    reader = gguf.GGUFReader(path)  # the writer needs every key's value: the whole header, decoded
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    # The writer counts tensor data only; the first part also holds the metadata (the vocabulary).
    data_budget = max(1 << 20, max_bytes - reader.data_offset - (1 << 20))
    writer = gguf.GGUFWriter(path=None, arch=arch, split_max_size=data_budget)
    for kv in reader.fields.values():
        if kv.name == gguf.Keys.General.ARCHITECTURE or kv.name.startswith("GGUF."):
            continue  # written by the writer itself
        vtype = kv.types[0]
        sub = kv.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(kv.name, kv.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    with contextlib.redirect_stdout(None), _quiet_gguf_logger():
        writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    expected = {}
    for t in reader.tensors:
        expected[t.name] = (int(t.tensor_type), _data_digest(t.data))
        writer.write_tensor_data(t.data)
    parts = [Path(f.name) for f in writer.fout or []]
    for f in writer.fout or []:
        f.flush()
        os.fsync(f.fileno())
    writer.close()
    del reader
    seen: dict[str, tuple[int, str]] = {}
    for p in parts:
        seen.update(_tensor_digests(p))
    if seen != expected:
        bad = sorted(set(expected) ^ set(seen)) or [n for n in expected if expected[n] != seen.get(n)]
        raise CheckFailedError(f"{path.name}: split parts differ from the file at {bad[0]}")
    path.unlink()
    return parts


def _data_digest(data: np.ndarray) -> str:
    return hashing.write_digest(memoryview(np.ascontiguousarray(data)).cast("B"))


def _tensor_digests(path: Path) -> dict[str, tuple[int, str]]:
    """Each tensor's (type, digest of its bytes) as written, from the header's table (not GGUFReader:
    the first part of a split set holds the vocabulary)."""
    try:
        header = read_header(path)
        digests = tensor_digests(path, header)
    except (ValueError, OSError) as exc:
        raise CheckFailedError(f"{path.name}: unreadable after writing ({exc})") from None
    return {t.name: (int(t.tensor_type), digests[t.name]) for t in header.tensors}


@contextlib.contextmanager
def _quiet_gguf_logger() -> Iterator[None]:
    """The writer logs its shard plan at INFO; our summary lists the parts."""
    logger = logging.getLogger("gguf.gguf_writer")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
