"""Checkpoints in Hugging Face format: atomic save with tokenizer and model card, safetensors-only load, Hub push."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unimoe.errors import CheckpointError, HubError


@dataclass
class EvalScore:
    """One number for the model card's results table and its ``model-index``."""

    task: str
    metric: str
    value: float
    dataset: str | None = None
    task_type: str = "multimodal"


CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A **UniMoE** checkpoint: a {{ family }} decoder whose feed-forward layers are sparse Mixture-of-Experts blocks
({{ num_experts }} {{ expert_type }} experts, {{ routing }}, MoE on {{ num_moe_layers }} of {{ num_layers }} layers).

| | |
|---|---|
| parameters (total) | {{ total_params }} |
| parameters active per token | {{ active_params }} |
| hidden size / layers / heads | {{ hidden_size }} / {{ num_layers }} / {{ num_heads }} |
| experts | {{ experts_summary }} |
| modalities | {{ modalities }} |

## Usage

```python
import unimoe  # registers the `unimoe` model type with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ repo_or_path }}")
tokenizer = AutoTokenizer.from_pretrained("{{ repo_or_path }}")
```

## Evaluation
{% if results_table %}
{{ results_table }}
{% else %}
No evaluation results were recorded for this checkpoint.
{% endif %}
{% if notes %}
## Notes

{{ notes }}
{% endif %}
"""


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def results_markdown(results: Sequence[EvalScore]) -> str:
    lines = ["| task | metric | value |", "|---|---|---|"]
    lines += [f"| {r.task} | {r.metric} | {r.value:.4f} |" for r in results]
    return "\n".join(lines)


def build_model_card(
    model: Any,
    *,
    model_name: str,
    results: Sequence[EvalScore] = (),
    repo_or_path: str | None = None,
    notes: str = "",
    license: str = "apache-2.0",
):
    """A :class:`huggingface_hub.ModelCard` with the architecture, usage and an eval table + ``model-index``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from unimoe.moe import count_parameters

    cfg = model.config
    moe = cfg.moe_config
    tc = cfg.text_config
    counts = count_parameters(model)
    eval_results = [
        EvalResult(
            task_type=r.task_type,
            dataset_type=r.dataset or r.task,
            dataset_name=r.dataset or r.task,
            metric_type=r.metric,
            metric_value=float(r.value),
        )
        for r in results
    ]
    data = ModelCardData(
        library_name="transformers",
        license=license,
        model_name=model_name,
        tags=["unimoe", "mixture-of-experts", "multimodal"],
        pipeline_tag="text-generation",
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        model_name=model_name,
        family=tc.model_type,
        num_experts=moe.num_experts,
        experts_summary=(
            f"{moe.num_experts} routed"
            + (f" + {moe.num_null_experts} null" if moe.num_null_experts else "")
            + (f" + {moe.num_shared_experts} shared" if moe.num_shared_experts else "")
            + f", top-{moe.top_k}"
        ),
        expert_type=moe.expert_type,
        routing=f"top-p {moe.top_p} (k <= {moe.top_k})" if moe.routing == "topp" else f"top-{moe.top_k}",
        top_k=moe.top_k,
        num_moe_layers=len(cfg.moe_layer_indices()),
        num_layers=tc.num_hidden_layers,
        hidden_size=tc.hidden_size,
        num_heads=tc.num_attention_heads,
        total_params=_human(counts["total"]),
        active_params=_human(counts["active"]),
        modalities=", ".join(cfg.modalities),
        repo_or_path=repo_or_path or model_name,
        results_table=results_markdown(results) if results else "",
        notes=notes,
    )


def save_checkpoint(
    model: Any,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    processor: Any = None,
    results: Sequence[EvalScore] = (),
    model_name: str | None = None,
    notes: str = "",
    max_shard_size: str | int = "2GB",
    extra_files: dict[str, str | Path] | None = None,
) -> Path:
    """Write a complete checkpoint atomically: everything goes to a temporary sibling directory that replaces
    ``out_dir`` only once it is complete, so a crash mid-save never leaves a half-written checkpoint.
    ``extra_files`` maps paths inside the checkpoint (e.g. ``images/expert_load.png``, which the card's ``notes``
    can show) to files copied there."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # ours, or left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tok = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        if tok is not None:
            model.generation_config.pad_token_id = tok.pad_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(tmp)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        card = build_model_card(model, model_name=model_name or out_dir.name, results=results, notes=notes)
        card.save(tmp / "README.md")
        for name, source in (extra_files or {}).items():
            target = tmp / name
            if tmp.resolve() not in target.resolve().parents:
                raise CheckpointError(f"extra file {name!r} would be written outside the checkpoint")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        _replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def check_replaceable(out_dir: Path) -> None:
    """A checkpoint may be written to a new path, an empty directory, or over an older checkpoint (a directory with
    ``config.json``) — never over a file or a directory of other things, which the atomic swap would delete."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file; give a directory for the checkpoint")
    if out_dir.is_dir() and not (out_dir / "config.json").is_file() and any(out_dir.iterdir()):
        raise CheckpointError(
            f"{out_dir} is a directory that holds other files and no checkpoint; give a new or empty directory "
            "(an existing checkpoint is replaced)"
        )


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is renamed aside first and removed only after the swap."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)


def check_checkpoint_dir(path: str | Path) -> Path:
    """A local checkpoint directory must exist and hold ``config.json`` and safetensors weights (never pickles)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
        raise CheckpointError(f"checkpoint {path} has no .safetensors weights{hint}")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)
    return path


def check_safetensors(path: Path) -> None:
    """Read a safetensors file's header (not its tensors): a file cut short by an interrupted copy or download fails
    here with one line naming it, instead of deep inside ``from_pretrained``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({detail}); was it cut short?") from None


def looks_local(path: str | Path) -> bool:
    """Whether ``path`` names a local directory rather than a Hub id (``org/name``): it exists, starts with ``.``,
    ``/`` or ``~``, has more than one ``/``, or its first component is a local directory (``runs/x`` beside an
    existing ``runs/``). A missing local path then fails at once with one line instead of minutes of Hub retries."""
    return _plainly_local(str(path)) or _local_by_folder(str(path))


def _plainly_local(text: str) -> bool:
    return Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def _local_by_folder(text: str) -> bool:
    """``org/name`` read as a local path only because a folder ``org/`` is here."""
    return "/" in text and Path(text.split("/", 1)[0]).is_dir()


def check_local_checkpoint(path: str | Path) -> None:
    """A ``path`` that names a local directory (:func:`looks_local`) must be a checkpoint; a Hub id passes."""
    if looks_local(path):
        text = str(path)
        if not _plainly_local(text):
            raise CheckpointError(
                f"checkpoint {text} does not exist (if it is a Hub id: the folder {text.split('/')[0]}/ here makes "
                "it read as a local path; run from another directory)"
            )
        check_checkpoint_dir(path)


#: how long :func:`hub_reachable` waits for a TCP connection to the Hub before calling it unreachable
HUB_PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_reachable() -> bool:
    """Whether a TCP connection to the Hub endpoint (``HF_ENDPOINT``) opens within ``HUB_PROBE_TIMEOUT_S``. With a
    proxy set (``HTTPS_PROXY``) the direct probe says nothing, so the Hub counts as reachable. Probed once a process."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def hub_access(path: str | Path) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a checkpoint: none for a local directory or a reachable Hub;
    ``local_files_only`` for a Hub id already in the local cache when the Hub cannot be reached. A Hub id that is
    neither fails at once with one line (huggingface_hub would otherwise retry for about a minute)."""
    from huggingface_hub import constants, try_to_load_from_cache

    text = str(path)
    if looks_local(text) or constants.HF_HUB_OFFLINE or hub_reachable():
        return {}
    try:
        cached = try_to_load_from_cache(text, "config.json")
    except ValueError:  # not a valid repo id either
        cached = None
    if isinstance(cached, str):
        return {"local_files_only": True}
    raise CheckpointError(
        f"checkpoint {text}: no such local directory, and the Hugging Face Hub ({constants.ENDPOINT}) cannot be "
        "reached to fetch it as a Hub id"
    )


def load_model(path: str | Path, **kwargs: Any):
    """Load a UniMoE (or supported dense) causal LM from a local directory or a Hub id, safetensors only."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    import unimoe  # noqa: F401  (registers the model type)

    check_local_checkpoint(path)
    kwargs = {"use_safetensors": True, **hub_access(path), **kwargs}
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except OSError as err:  # Hub id not reachable / not found
        raise CheckpointError(f"could not load {path}: {str(err).splitlines()[0]}") from err
    except SafetensorError as err:  # a downloaded shard cut short
        raise CheckpointError(f"could not load {path}: its safetensors weights are unreadable ({err})") from err
    except RuntimeError as err:
        if "mismatched" not in str(err):
            raise
        # transformers logs which tensors differ just before raising; say what it means in one line
        raise CheckpointError(
            f"{path}: its weights do not fit the model its config.json describes (tensor shapes differ; e.g. a "
            "checkpoint written by an older UniMoE whose forecasting head had one linear map)"
        ) from err


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a checkpoint directory to the Hub. Returns the commit URL; raises :class:`HubError` with one line."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = check_checkpoint_dir(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    except OfflineModeIsEnabled as err:
        raise HubError(
            f"cannot push {folder} to {repo_id}: Hugging Face Hub offline mode is enabled (HF_HUB_OFFLINE)"
        ) from err
    except HfHubHTTPError as err:
        raise HubError(f"cannot push {folder} to {repo_id}: {str(err).splitlines()[0]}") from err
    except Exception as err:  # network errors (httpx, requests, OSError): one line, not a traceback
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HubError(f"cannot push {folder} to {repo_id}: {first}") from err
    return str(getattr(info, "commit_url", info))
