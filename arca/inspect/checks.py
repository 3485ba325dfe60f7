"""The inputs of `arca inspect`, checked before any model is loaded: the prompts file (JSON lines), the adapter (a
PEFT LoRA directory) and whether the adapter fits the base (every adapted module exists in the base, with the
shapes the LoRA matrices expect). Only JSON and safetensors headers are read, never a weight: no torch here.

Left out: adapters saved as `adapter_model.bin` (pickled torch tensors) are accepted, but their shapes are checked
by PEFT when it loads them, not here; so are bases saved only as `.bin` files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from safetensors import safe_open

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A saved LoRA tensor: `base_model.model.<module>.lora_A.weight` (PEFT drops the adapter name of `default`).
LORA_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_(?:embedding_)?[AB])\b")


class InputError(ValueError):
    """A bad input of `arca inspect`; the message names the input (file and line, directory) and the fix."""


@dataclass(frozen=True)
class Adapter:
    """A checked PEFT LoRA adapter directory.

    Attributes:
        path: the directory; config: its adapter_config.json; rank: LoRA r.
        shapes: saved LoRA tensor name -> shape, from the safetensors header (empty for a `.bin` adapter).
    """

    path: Path
    config: dict
    rank: int
    shapes: dict[str, tuple[int, ...]]


def read_prompts(path: Path | str) -> pd.DataFrame:
    """The prompts file: one JSON object per line with a string `problem`, optionally `answer` (string or number),
    `id` (a unique string; default `line-<n>`, n the 1-based line number) and `messages` (the whole chat prompt,
    e.g. a system prompt and few-shot turns, instead of `problem` as the one user message). Blank lines are skipped.

    Returns:
        prompt_id, problem, answer, messages (None where the line has none), in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f'--prompts {path}: no such file; give a JSON-lines file with one {{"problem": ...}} a line')
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            rows.append(_prompt_row(path, number, line))
    if not rows:
        raise InputError(f'--prompts {path}: no prompts (the file is empty); write one {{"problem": ...}} per line')
    frame = pd.DataFrame(
        {
            "prompt_id": [r["prompt_id"] for r in rows],
            "problem": [r["problem"] for r in rows],
            "answer": pd.Series([r["answer"] for r in rows], dtype=object),  # None stays None, not NaN
            "messages": pd.Series([r["messages"] for r in rows], dtype=object),
        }
    )
    repeated = frame["prompt_id"][frame["prompt_id"].duplicated()].tolist()
    if repeated:
        raise InputError(f"--prompts {path}: `id` {repeated[0]!r} is used twice; give every line its own id")
    return frame


def _prompt_row(path: Path, number: int, line: str) -> dict[str, object]:
    where = f"--prompts {path} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise InputError(f"{where}: a JSON object with `problem` expected, got {type(row).__name__}")
    problem = row.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise InputError(f"{where}: `problem` must be a non-empty string, got {problem!r}")
    answer = row.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise InputError(f"{where}: `answer` must be a string or a number (or absent), got {answer!r}")
    prompt_id = row.get("id", f"line-{number:05d}")
    if not isinstance(prompt_id, (str, int)) or isinstance(prompt_id, bool) or not str(prompt_id).strip():
        raise InputError(f"{where}: `id` must be a non-empty string or an int, got {prompt_id!r}")
    messages = row.get("messages")
    if messages is not None and not (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise InputError(f'{where}: `messages` must be a non-empty list of {{"role": ..., "content": ...}} strings')
    answer = None if answer is None else str(answer)
    return {"prompt_id": str(prompt_id), "problem": problem, "answer": answer, "messages": messages}


def check_adapter(path: Path | str) -> Adapter:
    """A PEFT LoRA adapter directory: adapter_config.json with `peft_type: LORA` and its weights."""
    path = Path(path)
    hint = "give the directory PeftModel.save_pretrained wrote (adapter_config.json, adapter_model.safetensors)"
    if not path.is_dir():
        raise InputError(f"--adapter {path}: no such directory; {hint}")
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise InputError(f"--adapter {path}: not a PEFT adapter, it has no {ADAPTER_CONFIG}; {hint}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"--adapter {config_file}: not valid JSON ({err.msg}, line {err.lineno})") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "LORA":
        raise InputError(
            f"--adapter {path}: peft_type is {peft_type!r}, not 'LORA'; arca inspect reads LoRA adapters only "
            "(its signals read the LoRA matrices, and the reference policy is the adapter switched off)"
        )
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise InputError(f"--adapter {config_file}: `r` must be a positive int, got {rank!r}")
    weights = path / ADAPTER_WEIGHTS
    if weights.is_file():
        return Adapter(path, config, rank, header_shapes([weights]))
    if (path / "adapter_model.bin").is_file():
        return Adapter(path, config, rank, {})  # shapes checked by PEFT on load (see the module docstring)
    raise InputError(f"--adapter {path}: no {ADAPTER_WEIGHTS}; {hint}")


def header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over safetensors files, from their headers only (no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as handle:
                shapes |= {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise InputError(f"{file}: not a readable safetensors file ({err})") from None
    return shapes


def check_adapter_fits(adapter: Adapter, base: str, base_shapes: dict[str, tuple[int, ...]] | None) -> int:
    """Every module the adapter adapts exists in the base, with the in/out sizes its LoRA matrices expect
    (`lora_A`: (r, in), `lora_B`: (out, r); `fan_in_fan_out` bases store (in, out)). Returns the modules checked.

    Args:
        base_shapes: the base's tensor name -> shape (`base_shapes`), or None when the base has no safetensors
            files (nothing is checked here then; PEFT checks on load).
    """
    if base_shapes is None or not adapter.shapes:
        return 0
    swapped = bool(adapter.config.get("fan_in_fan_out"))
    missing, wrong, modules = [], [], set()
    for key, shape in sorted(adapter.shapes.items()):
        match = LORA_KEY.match(key)
        if match is None or len(shape) != 2:
            continue  # modules_to_save copies, DoRA magnitudes: not LoRA matrices
        module, kind = match["module"], match["kind"]
        modules.add(module)
        weight = _base_weight(module, base_shapes)
        if weight is None:
            missing.append(module)
            continue
        target = base_shapes[weight]
        if kind.startswith("lora_embedding"):  # A: (r, num_embeddings), B: (dim, r); the table is (num, dim)
            expected = (None, target[0]) if kind.endswith("A") else (target[1], None)
        else:
            out_dim, in_dim = (target[1], target[0]) if swapped else (target[0], target[1])
            expected = (None, in_dim) if kind.endswith("A") else (out_dim, None)
        if any(e is not None and e != s for e, s in zip(expected, shape)):
            wrong.append(f"{key} is {list(shape)} but {base}'s {weight} is {list(target)}")
    trained_on = adapter.config.get("base_model_name_or_path")
    origin = f" (adapter_config.json: base_model_name_or_path = {trained_on!r})" if trained_on else ""
    if missing:
        names = ", ".join(sorted(set(missing))[:3])
        raise InputError(
            f"--adapter {adapter.path} does not fit --base {base}: {len(set(missing))} of its {len(modules)} adapted "
            f"modules are not in the base, e.g. {names}; was it trained on another model?{origin}"
        )
    if wrong:
        raise InputError(
            f"--adapter {adapter.path} does not fit --base {base}: {len(wrong)} LoRA shapes differ, e.g. {wrong[0]}; "
            f"was it trained on another model?{origin}"
        )
    return len(modules)


def _base_weight(module: str, base_shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The base tensor `<module>.weight`, trying shorter module paths too: a checkpoint may store its keys without
    the wrapper prefix the model class adds (`transformer.h.0.attn` saved as `h.0.attn`)."""
    parts = module.split(".")
    for start in range(len(parts)):
        name = ".".join(parts[start:]) + ".weight"
        if name in base_shapes:
            return name
    return None


@dataclass(frozen=True)
class Base:
    """Where `--base` lives: a local directory (a model folder, or its snapshot in the hub cache), or a hub id
    not yet downloaded (folder None: `from_pretrained` downloads it). shapes: tensor name -> shape from the
    safetensors headers, None when the base has no safetensors files."""

    name: str
    folder: Path | None
    shapes: dict[str, tuple[int, ...]] | None


def resolve_base(base: str) -> Base:
    """`--base` as a local model directory or a hub id: the directory itself, else the id's snapshot in the hub
    cache (what `from_pretrained` reads with HF_HUB_OFFLINE=1), else, online, the safetensors headers over HTTP."""
    from huggingface_hub import constants, get_safetensors_metadata, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    path = Path(base).expanduser()
    if path.is_dir():
        return _local_base(base, path)
    if path.exists():
        raise InputError(f"--base {base}: a file; give a model directory (config.json, *.safetensors) or a hub id")
    try:
        folder = Path(snapshot_download(base, local_files_only=True))
        return _local_base(base, folder)
    except HFValidationError:
        raise InputError(f"--base {base}: neither a local directory nor a valid hub id (org/name)") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise InputError(
                f"--base {base}: not a local directory and not in the hub cache ({constants.HF_HUB_CACHE}), and "
                "HF_HUB_OFFLINE=1 forbids a download; download it first (`hf download <id>`) or give its directory"
            ) from None
    try:  # online, not cached: the weights' headers only; from_pretrained downloads the rest later
        files = get_safetensors_metadata(base).files_metadata.values()
        return Base(base, None, {k: tuple(v.shape) for f in files for k, v in f.tensors.items()})
    except Exception as err:  # not found, gated, no safetensors, no network: say so, do not guess
        raise InputError(f"--base {base}: could not read the hub repository's safetensors headers ({err})") from None


def _local_base(name: str, folder: Path) -> Base:
    if not (folder / "config.json").is_file():
        raise InputError(
            f"--base {name}: {folder} has no config.json; give a directory save_pretrained wrote (or a hub id)"
        )
    files = sorted(folder.glob("*.safetensors"))
    return Base(name, folder, header_shapes(files) if files else None)
