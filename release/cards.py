"""Model cards: Hugging Face front matter + a body from the templates in ``model_cards/``.

``render_cards(RELEASE_DIR)`` reads the release file in RELEASE_DIR (``release.json``/``.yaml``),
decides the licenses (``licensing.decide``), and for every release folder inside it (the main
safetensors model, a folder of GGUF files, a GPTQ folder) writes ``README.md`` and the license
files. The front matter is checked against ``release/data/schemas/model_card.schema.json`` and
must round-trip through ``huggingface_hub.ModelCard``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from release import TOOL_NAME
from release.agreement import card_license_fields, check_embedded_licenses, recorded_hashes
from release.atomic import atomic_file
from release.datafiles import data_file, project_folder
from release.errors import BadInputError, CheckFailedError
from release.hashing import origin_hash, sha256_file
from release.licensing import LicenseDecision, decide, license_info, write_license_files
from release.metadata import ReleaseMetadata
from release.progress import NULL, Reporter
from release.safetensors_header import folder_metadata, folder_parameters

RELEASE_FILES = ("release.yaml", "release.yml", "release.json")
# Our own wording, added to every card of a model whose release declares domain "medical".
MEDICAL_ADVISORY = (
    "This model is a research artefact. It has not been validated for clinical use: do not use it "
    "to diagnose, treat or decide anything about a patient without further, independent validation "
    "in the setting where it would be used. Its outputs can be wrong, incomplete or biased, and a "
    "qualified professional must review any use in a health context."
)


def templates_dir() -> Path:
    return project_folder("model_cards", "MODEL_RELEASE_CARDS", "model.md.j2")


def find_release_file(release_dir: Path) -> Path:
    for name in RELEASE_FILES:
        if (release_dir / name).is_file():
            return release_dir / name
    raise BadInputError(f"{release_dir}: no release file ({', '.join(RELEASE_FILES)})")


def folder_kind(folder: Path) -> str | None:
    """model | gguf | gptq | None (not a release folder)."""
    if any(folder.glob("*.gguf")):
        return "gguf"
    config = folder / "config.json"
    if config.is_file() and any(folder.glob("*.safetensors")):
        cfg = json.loads(config.read_text(encoding="utf-8"))
        return "gptq" if (cfg.get("quantization_config") or {}).get("quant_method") == "gptq" else "model"
    return None


def release_folders(
    release_dir: Path, metadata_file: Path | None = None
) -> tuple[ReleaseMetadata, list[tuple[Path, str]]]:
    """The release metadata of RELEASE_DIR and its release folders with their kinds (what `card`,
    `manifest`, `sign` and `publish` walk)."""
    release_dir = Path(release_dir)
    if not release_dir.is_dir():
        raise BadInputError(f"{release_dir}: no such release folder")
    meta = ReleaseMetadata.from_file(metadata_file or find_release_file(release_dir))
    folders = [(p, k) for p in sorted(release_dir.iterdir()) if p.is_dir() and (k := folder_kind(p))]
    if not folders:
        raise BadInputError(f"{release_dir}: no release folders (a safetensors model, GGUF files or a GPTQ folder)")
    return meta, folders


def repo_id(url: str | None, fallback: str) -> str:
    if url and "huggingface.co/" in url:
        return url.rstrip("/").split("huggingface.co/", 1)[1]
    return fallback


def _validation(path: Path) -> dict[str, Any] | None:
    from release.validation.report import find_folder_report

    if path.is_dir():
        report = find_folder_report(path, ".validation.json")
    else:
        base = path.with_suffix("") if path.is_file() else path
        report = base.parent / f"{base.name}.validation.json"
    return json.loads(report.read_text(encoding="utf-8")) if report is not None and report.is_file() else None


def kl_plots(folder: Path, kind: str) -> list[tuple[str, str]]:
    """(label, path in the repository) of the per-token KL histograms `validate` drew. A GGUF
    folder holds one per file; a model or GPTQ folder gets its `validation.kl.png` from the
    manifest step, which copies it in from beside the folder."""
    if kind == "gguf":
        return [(p.name.removesuffix(".kl.png"), p.name) for p in sorted(folder.glob("*.kl.png"))]
    from release.validation.report import find_folder_report

    made = find_folder_report(folder, ".kl.png") or (folder / "validation.kl.png").is_file()
    return [(folder.name, "validation.kl.png")] if made else []


def files_table(folder: Path, kind: str, parameters: int) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table of the weight files with size, sha256 and validation results."""
    rows = []
    weights = sorted(folder.glob("*.gguf" if kind == "gguf" else "*.safetensors"))
    folder_report = _validation(folder) if kind != "gguf" else None
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    from release.formats.gguf_names import set_name

    set_bytes: dict[str, int] = {}
    if kind == "gguf":  # a split set counts as one variant: bits from all its parts
        for f in weights:
            set_bytes[set_name(f.name)] = set_bytes.get(set_name(f.name), 0) + f.stat().st_size
    for f in weights:
        size = f.stat().st_size
        report = _validation(f) if kind == "gguf" else folder_report
        if kind == "gguf":
            logical = Path(set_name(f.name))
            report = _validation(folder / logical.stem)
            method = logical.stem.rsplit("-", 1)[-1] if "-" in logical.stem else "gguf"
            bits = f"{set_bytes[logical.name] * 8 / parameters:.2f}" if parameters else "?"
            fmt = "GGUF" if logical.name == f.name else "GGUF (split)"
        elif kind == "gptq":
            q = config.get("quantization_config", {})
            method, bits, fmt = f"GPTQ g{q.get('group_size', '?')}", str(q.get("bits", "?")), "safetensors"
        else:
            dtype = config.get("dtype") or config.get("torch_dtype") or "?"
            method, bits, fmt = (
                dtype,
                {"bfloat16": "16", "float16": "16", "float32": "32"}.get(dtype, "?"),
                "safetensors",
            )
        m = (report or {}).get("metrics", {})
        rows.append(
            {
                "file": f.name, "format": fmt, "method": method, "bits": bits, "bytes": size, "sha256": sha256_file(f),
                "kl_mean": m.get("kl_mean"), "top1": m.get("top1_agreement"),
                "validated": None if report is None else bool(report.get("passed")),
                "kl_quantiles": (report or {}).get("kl_quantiles") or {},
                "imatrix": _imatrix_note((report or {}).get("quantization") or {}) if report is not None else None,
                "set_bytes": set_bytes[set_name(f.name)] if kind == "gguf" else size,
                "tokenizer": (report or {}).get("tokenizer") or {},
            }
        )  # fmt: skip
    gguf = kind == "gguf"
    lines = [
        "| file | format | quant method | bits | size | sha256 | KL | top-1 |"
        + (" importance matrix |" if gguf else ""),
        "|---|---|---|---:|---:|---|---:|---:|" + ("---|" if gguf else ""),
    ]
    for r in rows:
        kl = "not validated" if r["kl_mean"] is None else f"{r['kl_mean']:.2e}"
        top1 = "" if r["top1"] is None else f"{r['top1']:.3f}"
        im = (f" {r['imatrix'] or 'no'} |" if r["imatrix"] is not None else " ? |") if gguf else ""
        lines.append(
            f"| {r['file']} | {r['format']} | {r['method']} | {r['bits']} | {r['bytes'] / 1e6:.1f} MB | "
            f"`{r['sha256']}` | {kl} | {top1} |{im}"
        )
    return "\n".join(lines), rows


def _imatrix_note(q: dict[str, str]) -> str:
    """'' when the file was quantized without an importance matrix, else on what text."""
    if "imatrix.entries_count" not in q and "imatrix.file" not in q:
        return ""
    dataset = q.get("imatrix.dataset", "?").removeprefix("model-release:")
    chunks = q.get("imatrix.chunks_count")
    return f"yes: {dataset}" + (f", {chunks} chunks" if chunks else "")


CONTEXT = 4096  # tokens of context the memory estimates assume
BUDGETS_GB = (4, 6, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128, 192, 256)


def kv_cache_bytes(config: dict[str, Any], context: int = CONTEXT) -> int:
    """llama.cpp's default KV cache (f16 keys and values) for ``context`` tokens."""
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads)
    return 2 * int(config.get("num_hidden_layers", 0)) * kv_heads * head_dim * context * 2


def tokenizer_note(rows: list[dict[str, Any]]) -> str:
    """What validation's tokenizer check proved for the folder's files, in one sentence ('' when it
    did not run: a reference made before the check, or no validated file)."""
    checked = [r for r in rows if r["validated"] and r["tokenizer"].get("checked")]
    if not checked or len(checked) < len([r for r in rows if r["validated"]]):
        return ""
    probes = checked[0]["tokenizer"]["probes"]
    template = all(r["tokenizer"].get("chat_template") == "carried" for r in checked)
    note = (
        f"Tokenizer: every file was checked to tokenize {probes} probes (texts in several scripts, code, "
        "whitespace, emoji; rendered chats) as the original tokenizer does, special and added tokens whole"
        + (", and carries its chat template" if template else "")
    )
    split = sorted({p for r in checked for p in r["tokenizer"].get("mismatched") or []})
    if split:  # a passed file's differences are its runtime's pre-tokenizer, not its added tokens
        note += f"; the runtime splits plain text of {', '.join(split)} slightly differently (its own pre-tokenizer)"
    return note + "."


def choose_section(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    """'Which file should I choose': for each memory size, the validated file with the lowest
    measured KL whose file plus KV cache fits with 1 GB to spare. Computed, not hand-written."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:  # a split set is one choice, named by its first part
        if r["validated"] and r["kl_mean"] is not None:
            seen.setdefault(r["method"], r)
    if not seen:
        return ""
    kv = kv_cache_bytes(config)
    options = sorted(seen.values(), key=lambda r: r["set_bytes"])
    need = {r["method"]: r["set_bytes"] + kv for r in options}
    best_overall = min(options, key=lambda r: r["kl_mean"])
    lines = [
        f"Memory needed is the file plus llama.cpp's KV cache for a {CONTEXT}-token context "
        f"({kv / 1e9:.2f} GB in f16 for this model), in RAM on a CPU or in VRAM when every layer is offloaded "
        "to a GPU. Each row picks, among the files that passed validation, the one with the lowest measured KL "
        "that fits with 1 GB to spare.",
        "",
        "| memory you have | choose | size | memory needed | KL | top-1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    previous = None
    entries: list[tuple[int, dict[str, Any]]] = []
    for gb in BUDGETS_GB:
        fitting = [r for r in options if need[r["method"]] + 1e9 <= gb * 1e9]
        if not fitting:
            continue
        pick = min(fitting, key=lambda r: r["kl_mean"])
        if previous is None or pick["method"] != previous["method"]:
            entries.append((gb, pick))
        previous = pick
        if pick is best_overall:
            break
    if not entries:
        smallest = options[0]
        return "\n".join([*lines[:2], f"Even the smallest file ({smallest['method']}) needs "
                           f"{need[smallest['method']] / 1e9:.1f} GB."])  # fmt: skip
    for i, (gb, r) in enumerate(entries):
        upper = entries[i + 1][0] if i + 1 < len(entries) else None
        span = f"{gb} GB or more" if upper is None else f"{gb} to {upper} GB"
        lines.append(
            f"| {span} | {r['method']} | {r['set_bytes'] / 1e9:.2f} GB | {need[r['method']] / 1e9:.2f} GB | "
            f"{r['kl_mean']:.2e} | {r['top1']:.3f} |"
        )
    smallest = options[0]
    lines += [
        "",
        f"Lowest KL: **{best_overall['method']}** ({best_overall['kl_mean']:.2e}). Smallest file that passed "
        f"validation: **{smallest['method']}** ({smallest['set_bytes'] / 1e9:.2f} GB, KL {smallest['kl_mean']:.2e}).",
    ]
    return "\n".join(lines)


KL_COMPARISON = "kl-comparison.png"


def kl_comparison(folder: Path, rows: list[dict[str, Any]]) -> str | None:
    """Draw the variants' per-token KL side by side (smallest file first) into the folder."""
    from release.validation.report import plot_side_by_side

    entries, seen = [], set()
    for r in sorted(rows, key=lambda r: r["set_bytes"]):
        if r["kl_quantiles"] and r["method"] not in seen:
            seen.add(r["method"])
            entries.append((r["method"], r["kl_quantiles"]))
    if len(entries) < 2:
        (folder / KL_COMPARISON).unlink(missing_ok=True)
        return None
    with atomic_file(folder / KL_COMPARISON, force=True) as tmp:
        plot_side_by_side(entries, tmp, "per-token KL from the original model, smallest file first")
    return KL_COMPARISON


def front_matter(meta: ReleaseMetadata, decision: LicenseDecision, kind: str, parent_repo: str) -> dict[str, Any]:
    fm: dict[str, Any] = card_license_fields(decision.weights_license)
    if kind == "model":
        bases = [
            repo_id(b.repo_url, b.name if not b.organization else f"{b.organization}/{b.name}")
            for b in meta.base_models
        ]
        if bases:
            fm["base_model"] = bases
            if meta.base_model_relation:
                fm["base_model_relation"] = meta.base_model_relation
    else:
        fm["base_model"] = [parent_repo]
        fm["base_model_relation"] = "quantized"
    if meta.languages:
        fm["language"] = list(meta.languages)
    if meta.datasets:
        fm["datasets"] = list(meta.datasets)
    tags = ["model-release", *meta.tags]
    if meta.domain:
        tags.append(meta.domain)
    if kind in ("gguf", "gptq"):
        tags.append(kind)
    fm["tags"] = list(dict.fromkeys(tags))
    fm["pipeline_tag"] = "text-generation"
    fm["library_name"] = "gguf" if kind == "gguf" else "transformers"
    if meta.gated_prompt:
        fm["extra_gated_prompt"] = meta.gated_prompt
        fm["extra_gated_fields"] = {"I accept the license and the acceptable use policy": "checkbox"}
    return fm


def check_front_matter(fm: dict[str, Any], where: str) -> None:
    try:
        jsonschema.validate(fm, data_file("schemas", "model_card.schema.json"))
    except jsonschema.ValidationError as exc:
        raise CheckFailedError(f"{where}: model card front matter invalid: {exc.message}") from None


def license_section(decision: LicenseDecision, meta: ReleaseMetadata) -> str:
    w = license_info(decision.weights_license or "")
    c = license_info(decision.code_license)
    shipped = ", ".join(f"`{f.name}`" for f in decision.files)
    lines = [f"**{decision.display}**\n"] if decision.display else []
    lines += [
        f"The weights are released under the [{w['name']}]({w['link']}) (`{decision.weights_license}`): "
        f"see {shipped} in this repository, which {'ships' if len(decision.files) == 1 else 'ship'} "
        "with every copy.",
    ]
    if decision.inherited:
        for lic, bases in decision.inherited.items():
            lines.append(f"They derive from {', '.join(bases)}, distributed under `{lic}`, whose terms carry over.")
    lines.append(f"The code that produced them is released under the [{c['name']}]({c['link']}).")
    if decision.obligations:
        lines.append("\nWhat this license asks of you:\n")
        lines.extend(f"- {o}" for o in decision.obligations)
    return "\n".join(lines)


@dataclass
class CardOutput:
    folder: str
    kind: str
    repo_id: str
    license_files: list[str]
    files: list[dict[str, Any]]


# The libraries that make each kind of folder, named in its card's Provenance section.
_MAKERS = {"model": ("torch", "transformers", "safetensors"), "gguf": ("gguf", "llama-cpp-python"),
           "gptq": ("gptqmodel", "torch", "transformers")}  # fmt: skip


def provenance_context(folder: Path, kind: str) -> dict[str, Any]:
    """What a card's Provenance section says: the source checkpoint's hash (as the weights record it)
    and the versions of the tools that make this kind of folder. The build record itself is written
    later, by `sign`; the card says where it is and how to check it."""
    from release.versions import library_versions, llama_cpp_commit

    versions = library_versions()
    tools = [f"{TOOL_NAME} {versions[TOOL_NAME]}"]
    tools += [f"{n} {versions[n]}" for n in _MAKERS[kind] if n in versions]
    if kind == "gguf" and (commit := llama_cpp_commit()):
        tools.append(f"llama.cpp {commit}")
    return {"source_checkpoint_hash": origin_hash(recorded_hashes(folder, kind)), "tools": ", ".join(tools)}


def render_cards(release_dir: Path, *, metadata_file: Path | None = None, reporter: Reporter = NULL) -> dict[str, Any]:
    import jinja2
    from huggingface_hub import ModelCard

    release_dir = Path(release_dir)
    meta, folders = release_folders(release_dir, metadata_file)
    decision = decide(meta)
    decision.raise_for_violations()
    for folder, _ in folders:  # before any card is written: a card must not relicense the files
        check_embedded_licenses(folder, decision.weights_license)
    main = next((p for p, k in folders if k == "model"), None)
    name = meta.name or (main.name if main else release_dir.name)
    main_repo = repo_id(meta.repo_url, name)
    parameters = 0
    architecture = "?"
    main_config: dict[str, Any] = {}
    if main is not None:
        main_config = json.loads((main / "config.json").read_text(encoding="utf-8"))
        parameters = folder_parameters(main)
        architecture = str((main_config.get("architectures") or [None])[0])
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    advisory = MEDICAL_ADVISORY if meta.domain == "medical" else None
    variants = [
        {"name": f"{main_repo}-{k.upper()}", "url": f"https://huggingface.co/{main_repo}-{k.upper()}"}
        for _, k in folders
        if k != "model"
    ]
    outputs = []
    for folder, kind in folders:
        reporter.start(f"card for {folder.name}", 1)
        table, rows = files_table(folder, kind, parameters)
        this_repo = main_repo if kind == "model" else f"{main_repo}-{kind.upper()}"
        fm = front_matter(meta, decision, kind, main_repo)
        check_front_matter(fm, str(folder))
        common = {
            "name": name, "version": meta.version, "description": meta.description, "advisory": advisory,
            "files_table": table, "kl_plots": kl_plots(folder, kind), "repo_id": this_repo,
            "tokenizer_note": tokenizer_note(rows),
            "license_section": license_section(decision, meta),
            "citation": meta.citation, "example_prompt": "What are the first-line treatments for hypertension?",
            "provenance": provenance_context(folder, kind),
        }  # fmt: skip
        if kind == "model":
            w, c = license_info(decision.weights_license or ""), license_info(decision.code_license)
            body = env.get_template("model.md.j2").render(
                **common, architecture=architecture, parameters=f"{parameters / 1e6:.0f}M",
                base_models=[asdict(b) for b in meta.base_models], license=decision.weights_license,
                license_name=w["name"], code_license=decision.code_license, code_license_name=c["name"],
                source_checkpoint_hash=origin_hash(folder_metadata(folder)), variants=variants,
            )  # fmt: skip
        else:
            first = rows[0]["file"] if rows else ""
            gguf = kind == "gguf"
            body = env.get_template("variant.md.j2").render(
                **common, variant_format=kind.upper(), parent_name=name,
                choose=choose_section(rows, main_config) if gguf else "",
                kl_comparison=kl_comparison(folder, rows) if gguf else None,
                imatrix_file=next((p.name for p in sorted(folder.glob("*.imatrix"))), None) if gguf else None,
                parent_url=f"https://huggingface.co/{main_repo}",
                runtime="llama.cpp" if kind == "gguf" else "transformers with GPTQModel",
                example_file=first, example_type=rows[0]["method"] if rows and kind == "gguf" else "",
            )  # fmt: skip
        text = "---\n" + yaml.safe_dump(fm, sort_keys=False, allow_unicode=True) + "---\n\n" + _tidy(body)
        card = ModelCard(text)  # parses the front matter the way the Hub does
        if card.data.to_dict() != fm:
            raise CheckFailedError(f"{folder}: the card's metadata does not round-trip through huggingface_hub")
        with atomic_file(folder / "README.md", force=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
        shipped = write_license_files(decision, folder)
        outputs.append(CardOutput(str(folder), kind, this_repo, shipped, rows))
        reporter.done()
    return {
        "ok": True,
        "release_dir": str(release_dir),
        "license": decision.to_dict(),
        "cards": [asdict(o) for o in outputs],
    }


def _tidy(text: str) -> str:
    """Collapse the blank lines template conditionals leave behind."""
    out: list[str] = []
    for line in text.splitlines():
        if not line.strip() and out and not out[-1].strip():
            continue
        out.append(line.rstrip())
    return "\n".join(out).strip() + "\n"
