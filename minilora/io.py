"""Adapter files in PEFT's format, so that `peft.PeftModel.from_pretrained` reads what minilora writes and back.

A saved adapter is a directory with two files:

* `adapter_model.safetensors`: one tensor per factor, keyed by the module's full name behind PEFT's
  `base_model.model.` prefix and without the adapter name:
  `base_model.model.<module>.lora_A.weight` (r, in), `...lora_B.weight` (out, r) and, for DoRA,
  `...lora_magnitude_vector` (out,) (no ".weight": PEFT strips it on save and re-adds it on load);
  modules trained whole (`modules_to_save`, and a task's head such as SEQ_CLS's `classifier` / `score`) under
  their own names, `base_model.model.classifier.weight` (PEFT drops the wrapper's `modules_to_save.<adapter>`);
  with `bias="all"` / `"lora_only"` the trained biases under the wrapped model's names
  (`...query.base_layer.bias` for a wrapped layer);
* `adapter_config.json`: the `LoraConfig` fields PEFT needs to rebuild the layers (peft_type, r,
  lora_alpha, target_modules, rank_pattern / alpha_pattern for layers with another r or alpha,
  modules_to_save, bias, init_lora_weights, use_rslora, use_dora, fan_in_fan_out, task_type, ...).

An adapter made with init_lora_weights="pissa" / "olora" changed the base weights it sits on (W0 − s·B A);
its file says so, and loading it into the original model runs that init again before it copies the
trained A and B in, as PEFT does: the pair then computes what the trained model did.

Only safetensors and JSON are read (never pickle). Loading checks every key, shape, dtype and value before it
changes the model; if anything is off it raises one ValueError that lists all problems, and the model is
untouched.

The two files are one unit: weights trained with lora_alpha=16 read with a config that says 8 would load
without complaint and compute a different layer. So `save_adapter` writes both to temporary files first and
only then renames them into place, one right after the other: an error while writing leaves the old pair
as it was. Against a crash in the instant between the two renames, the weights file records the settings
that give the weights their meaning (r, lora_alpha, use_rslora, use_dora) in its safetensors metadata, and
`load_adapter` refuses a config that disagrees with them. Files without that record (PEFT's) load as before.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from itertools import chain
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from collections import Counter

from minilora.inject import (
    TASK_HEADS,
    ModulesToSave,
    _save_targets,
    find_target_modules,
    inject,
    lora_layers,
    outer_modules,
    pattern_value,
    saved_modules,
)
from minilora.lora import LoRALinear, check_hparams, check_init_and_dtype, default_adapter_dtype, features_of, is_conv1d

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PREFIX",
    "adapter_state_dict",
    "adapter_config",
    "save_adapter",
    "load_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) . model (the wrapped model)
# safetensors metadata key under which the weights file records the config settings it was saved with
SETTINGS_KEY = "minilora_lora_settings"
# the config fields that change what the same tensors compute (the shapes check the rest)
_PAIRED_FIELDS = ("r", "lora_alpha", "use_rslora", "use_dora")

# LoraConfig features minilora does not implement: a file that uses one is refused rather than half-loaded.
_UNSUPPORTED_IF_SET = (
    "target_parameters",
    "layer_replication",
    "trainable_token_indices",
    "lora_bias",
    "use_qalora",
    # LoRA variants that change the forward pass (PEFT tags them is_lora_variant); use_dora is supported
    "alora_invocation_tokens",
    "use_bdlora",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
)
# init methods that leave W0 alone (a loaded adapter's values replace whatever they drew); "pissa" and "olora"
# rewrite W0 and are run again on load; the others (loftq, corda, pissa_niter_k) are refused
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_WEIGHT_INITS = ("pissa", "olora")


# ---------------------------------------------------------------------------------------------------------
# Saving


def _adapter_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, LoRALinear]]:
    layers = [(n, layer) for n, layer in lora_layers(model) if adapter_name in layer.lora_A]
    if not layers:
        known = sorted({a for _, layer in lora_layers(model) for a in layer.adapter_names})
        raise ValueError(f"the model has no adapter named {adapter_name!r} (it has {known})")
    return layers


def _bias_mode(layers: list[tuple[str, LoRALinear]], adapter_name: str) -> str:
    modes = {layer.bias_mode.get(adapter_name, "none") for _, layer in layers}
    if len(modes) != 1:
        raise ValueError(f"adapter {adapter_name!r} has different bias modes per layer: {sorted(modes)}")
    return modes.pop()


def _saved_whole(model: nn.Module, adapter_name: str, task_type: str | None) -> list[tuple[str, nn.Module]]:
    """(name, module) of what is saved whole with the adapter: its modules_to_save copies and, for a task type
    with a head (SEQ_CLS: classifier / score) that no wrapper holds, the head as it is now (trained by hand)."""
    found = {n: w.modules_to_save[adapter_name] for n, w in saved_modules(model) if adapter_name in w.modules_to_save}
    for n, module in outer_modules(model):
        if any(n.endswith(h) for h in TASK_HEADS.get(task_type or "", ())) and n not in found \
                and not isinstance(module, (ModulesToSave, LoRALinear)):
            found[n] = module
    return list(found.items())


def _inside(name: str, modules: list[str]) -> bool:
    return any(name.startswith(m + ".") for m in modules)


def adapter_state_dict(
    model: nn.Module, adapter_name: str = "default", task_type: str | None = None
) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's file keys (see module docstring), detached, on the CPU."""
    tensors: dict[str, Tensor] = {}
    layers = _adapter_layers(model, adapter_name)
    for name, layer in layers:
        key = f"{PREFIX}{name}."
        tensors[key + "lora_A.weight"] = layer.lora_A[adapter_name]
        tensors[key + "lora_B.weight"] = layer.lora_B[adapter_name]
        if layer.use_dora[adapter_name]:
            tensors[key + "lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
    whole = _saved_whole(model, adapter_name, task_type)
    for name, module in whole:
        tensors.update({f"{PREFIX}{name}.{k}": v for k, v in module.state_dict().items()})
    mode = _bias_mode(layers, adapter_name)
    if mode == "lora_only":
        tensors.update({f"{PREFIX}{n}.base_layer.bias": layer.bias for n, layer in layers if layer.bias is not None})
    elif mode == "all":  # PEFT's rule: every parameter whose name says "bias"; the modules saved whole hold their own
        wrappers = [n for n, _ in saved_modules(model)] + [n for n, _ in whole]
        tensors.update({f"{PREFIX}{n}": p for n, p in model.named_parameters()
                        if "bias" in n and "lora_" not in n and not _inside(n, wrappers)})
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _weight_init(layer: LoRALinear, adapter_name: str) -> str | bool:
    """The init a file records: "pissa" / "olora" (they changed the base, and loading runs them again), else True."""
    init = layer.init_lora_weights.get(adapter_name, True)
    return init if init in _WEIGHT_INITS else True


def _short_targets(model: nn.Module, names: list[str]) -> list[str]:
    # Last name parts ("query", "value") when they pick out exactly these layers, as PEFT writes them for
    # long lists; otherwise the full names, which match exactly.
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    hits = {n for n, _ in outer_modules(model) if any(n == k or n.endswith("." + k) for k in suffixes)}
    return suffixes if hits == set(names) else sorted(names)


def adapter_config(
    model: nn.Module,
    adapter_name: str = "default",
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """The adapter_config.json contents PEFT needs to rebuild `adapter_name` on a fresh copy of the model.

    r and lora_alpha are the values most layers have; layers with others are listed, by full name, in
    rank_pattern / alpha_pattern.
    """
    layers = _adapter_layers(model, adapter_name)
    shared = {
        (
            layer.use_rslora[adapter_name],
            layer.use_dora[adapter_name],
            float(getattr(layer.lora_dropout[adapter_name], "p", 0.0)),
            _weight_init(layer, adapter_name),
        )
        for _, layer in layers
    }
    if len(shared) != 1:
        raise ValueError(
            f"adapter {adapter_name!r} has different (rslora, dora, dropout, init) per layer: {sorted(shared)}; "
            "one adapter_config.json holds one setting of these"
        )
    rslora, use_dora, dropout, init = shared.pop()
    r = Counter(layer.r[adapter_name] for _, layer in layers).most_common(1)[0][0]
    alpha = Counter(layer.lora_alpha[adapter_name] for _, layer in layers).most_common(1)[0][0]
    if base_model_name_or_path is None:
        candidate = getattr(model, "name_or_path", None)
        base_model_name_or_path = candidate if isinstance(candidate, str) and candidate else None
    names = [n for n, _ in layers]
    whole = [n for n, _ in _saved_whole(model, adapter_name, task_type)]
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "use_dora": use_dora,
        "target_modules": _short_targets(model, names),
        "exclude_modules": None,
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for _, layer in layers),
        "bias": _bias_mode(layers, adapter_name),
        "lora_bias": False,
        "init_lora_weights": init,
        "inference_mode": True,
        "modules_to_save": _short_targets(model, whole) if whole else None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {n: layer.r[adapter_name] for n, layer in layers if layer.r[adapter_name] != r},
        "alpha_pattern": {n: layer.lora_alpha[adapter_name] for n, layer in layers
                          if layer.lora_alpha[adapter_name] != alpha},
    }


def _settings_record(config: dict[str, Any]) -> str:
    """The paired fields of `config` as canonical JSON, for the weights file's metadata."""
    return json.dumps({k: config[k] for k in _PAIRED_FIELDS}, sort_keys=True)


def _config_bytes(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _check_directory(directory: Path) -> None:
    """Raise NotADirectoryError if `directory`, or the nearest of its parents that exists, is not a directory."""
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is" if existing == directory else f"lies inside {existing}, which is"
        raise NotADirectoryError(
            f"cannot save an adapter to {directory}: it {where} a file, not a directory. An adapter is a "
            f"directory holding {WEIGHTS_NAME} and {CONFIG_NAME}; pass a directory path (new or existing)."
        )


def _stage(final: Path, write: Callable[[str], None]) -> str:
    """Write `final`'s new contents via `write(tmp)` to a temporary file beside it; return that file's path.

    The file is flushed to disk before it is renamed, so that a rename never exposes a half-written file.
    """
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def _write_pair(directory: Path, writers: list[tuple[str, Callable[[str], None]]]) -> None:
    """Write every file of `writers` [(name, write)] in full, then rename them all into `directory`.

    Any error while writing leaves the directory as it was (temporaries removed): all files or none.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for name, write in writers:
            staged.append((_stage(directory / name, write), directory / name))
        for tmp, final in staged:  # renames only: each is atomic, and they follow each other at once
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter `adapter_name` to directory `path` (created if needed) in PEFT's format; returns `path`.

    `task_type` ("CAUSAL_LM", "SEQ_CLS", ...) tells PEFT which PeftModel class to build on load; for SEQ_CLS,
    TOKEN_CLS and QUESTION_ANS the task's head is saved whole, as PEFT saves it (the adapter's modules_to_save
    copy, or the head as it is if no copy holds it). Any
    adapter name is written to `path` itself (PEFT's save_pretrained puts non-"default" ones in `path/<name>`).
    Both files are written in full before either replaces an old one (see the module docstring), so a failed
    save leaves the previous adapter in `path` loadable.
    """
    from safetensors.torch import save_file

    directory = Path(path)
    _check_directory(directory)
    tensors = adapter_state_dict(model, adapter_name, task_type)
    config = adapter_config(
        model, adapter_name, task_type=task_type, base_model_name_or_path=base_model_name_or_path
    )
    metadata = {"format": "pt", SETTINGS_KEY: _settings_record(config)}
    config_bytes = _config_bytes(config)
    directory.mkdir(parents=True, exist_ok=True)

    def write_weights(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)

    def write_config(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(config_bytes)

    _write_pair(directory, [(WEIGHTS_NAME, write_weights), (CONFIG_NAME, write_config)])
    return directory


# ---------------------------------------------------------------------------------------------------------
# Loading


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    used = [k for k in _UNSUPPORTED_IF_SET if config.get(k) not in (None, False, {}, [], "")]
    if used:
        raise ValueError(f"{file} uses LoraConfig features minilora does not support: {used}")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"{file}: bias must be 'none', 'all' or 'lora_only', got {config['bias']!r}")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        try:
            check_init_and_dtype(init, None)  # names what is refused, and why
        except ValueError as err:
            raise ValueError(f"{file}: {err}") from None
    check_hparams(config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0))
    if config.get("target_modules") is None:
        raise ValueError(f"{file}: target_modules is missing")
    return config


def _read_tensors(directory: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The weights file's tensors (on the CPU) and its safetensors metadata."""
    from safetensors import SafetensorError, safe_open

    file = directory / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory} (only safetensors files are read)")
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} is not a readable safetensors file: {err}") from None


def _check_pair(directory: Path, config: dict[str, Any], metadata: dict[str, str]) -> None:
    """Refuse a config whose settings differ from those the weights file was saved with (if it says)."""
    record = metadata.get(SETTINGS_KEY)
    if record is None:
        return  # written by PEFT or another tool: nothing to compare against
    try:
        saved = json.loads(record)
    except json.JSONDecodeError:
        raise ValueError(f"{directory / WEIGHTS_NAME}: metadata {SETTINGS_KEY!r} is not valid JSON") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{directory / WEIGHTS_NAME}: metadata {SETTINGS_KEY!r} must hold a JSON object")
    defaults = {"use_rslora": False, "use_dora": False}
    differ = [
        f"{k}: weights {saved[k]!r}, config {config.get(k, defaults.get(k))!r}"
        for k in _PAIRED_FIELDS
        if k in saved and saved[k] != config.get(k, defaults.get(k))
    ]
    if differ:
        raise ValueError(
            f"{WEIGHTS_NAME} and {CONFIG_NAME} in {directory} do not belong together ({'; '.join(differ)}). "
            "A save into this directory was cut off between its two files, or the config was edited by hand. "
            "Save the adapter again, or put back the config that was saved with these weights."
        )


def _check_materialized(plan: list[tuple[str, nn.Module, torch.dtype]], model: nn.Module, adapter_name: str) -> None:
    """Refuse layers whose weights (or existing adapter) live on the meta device: a copy there is dropped."""
    on_meta = [
        n
        for n, base, _ in plan
        if any(t.is_meta for t in chain(base.parameters(), base.buffers(), _adapter_tensors(model, n, adapter_name)))
    ]
    if on_meta:
        raise ValueError(
            f"layers {on_meta[:5]}{' ...' if len(on_meta) > 5 else ''} are on the meta device: they have shapes but "
            "no values, so the adapter's values would be dropped. Load the base model's weights first (e.g. "
            "without init_empty_weights / device_map='meta', or model.to_empty(device=...) followed by "
            "load_state_dict), then load the adapter."
        )


def _adapter_tensors(model: nn.Module, name: str, adapter_name: str) -> list[Tensor]:
    layer = model.get_submodule(name)
    if not isinstance(layer, LoRALinear) or adapter_name not in layer.lora_A:
        return []
    return [getattr(layer, kind)[adapter_name] for kind in ("lora_A", "lora_B", "lora_magnitude_vector")
            if adapter_name in getattr(layer, kind)]


def _targets(model: nn.Module, config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(LoRA layer names, names of the modules saved whole) that the config selects in `model`, as PEFT would."""
    task = config.get("task_type")
    saved = list(config.get("modules_to_save") or []) + list(TASK_HEADS.get(task or "", ()))
    names = find_target_modules(
        model, config["target_modules"], task, exclude_modules=config.get("exclude_modules"),
        layers_to_transform=config.get("layers_to_transform"), layers_pattern=config.get("layers_pattern"),
        modules_to_save=saved,
    )
    return names, _save_targets(model, saved)


def _expected(model: nn.Module, config: dict[str, Any], adapter_name: str) -> tuple[dict, dict, list[str], bool]:
    """({file key: shape}, {file key: (kind, where, dtype)}, file-key prefixes to ignore, whether the adapter
    exists). kind: "lora_A" / "lora_B" / "lora_magnitude_vector" (where: the layer's name), "whole" (where:
    (module name, its state_dict key)) or "param" (where: the parameter's name once the adapter is in)."""
    use_dora = bool(config.get("use_dora", False))
    existing = [(n, layer) for n, layer in lora_layers(model) if adapter_name in layer.lora_A]
    if existing:
        _check_same_settings(existing, config, adapter_name)
        plan = [(n, layer.base_layer, layer.lora_A[adapter_name].dtype, layer.r[adapter_name]) for n, layer in existing]
        whole = [n for n, w in saved_modules(model) if adapter_name in w.modules_to_save]
    else:
        plan = []
        names, whole = _targets(model, config)
        for n in names:
            module = model.get_submodule(n)
            base = module.base_layer if isinstance(module, LoRALinear) else module
            r = int(pattern_value(config.get("rank_pattern"), n, config["r"]))
            plan.append((n, base, default_adapter_dtype(base), r))
    _check_materialized([(n, base, dtype) for n, base, dtype, _ in plan], model, adapter_name)
    shapes, where = {}, {}
    for n, base, dtype, r in plan:
        n_in, n_out = features_of(base)
        key = f"{PREFIX}{n}."
        parts = [("lora_A.weight", (r, n_in)), ("lora_B.weight", (n_out, r))]
        if use_dora:
            parts.append(("lora_magnitude_vector", (n_out,)))
        for suffix, shape in parts:
            shapes[key + suffix] = shape
            where[key + suffix] = (suffix.split(".")[0], n, dtype)
    for n in whole:
        module = model.get_submodule(n)
        if isinstance(module, ModulesToSave):
            copies = module.modules_to_save
            module = copies[adapter_name] if adapter_name in copies else module.original_module
        for k, t in module.state_dict().items():
            shapes[f"{PREFIX}{n}.{k}"] = tuple(t.shape)
            where[f"{PREFIX}{n}.{k}"] = ("whole", (n, k), t.dtype)
    for name, p in _trained_biases(model, config.get("bias", "none"), [n for n, *_ in plan], whole):
        shapes[PREFIX + name] = tuple(p.shape)
        where[PREFIX + name] = ("param", name, p.dtype)
    # PEFT's bias="all" also writes the biases of a wrapped module-to-save as `<name>.original_module.bias` and
    # `<name>.modules_to_save.bias`: copies of what its own keys hold
    ignored = [f"{PREFIX}{n}.{part}." for n in whole for part in ("original_module", "modules_to_save")]
    return shapes, where, ignored, bool(existing)


def _trained_biases(model: nn.Module, mode: str, layers: list[str], whole: list[str]) -> list[tuple[str, Tensor]]:
    """(name once the adapter is in, parameter) of each bias the `bias` mode trains and saves: for "lora_only"
    the biases of the LoRA layers, for "all" every parameter whose name says "bias" (PEFT's rule) outside the
    modules saved whole. A LoRA layer's bias is named `<layer>.base_layer.bias`, also before it is wrapped."""
    found = []
    for name, p in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if module in layers:  # a layer not wrapped yet: its name for the bias once it is
            name = f"{module}.base_layer.{leaf}"
        of_a_layer = name.endswith(".base_layer.bias") and name.removesuffix(".base_layer.bias") in layers
        if (mode == "lora_only" and of_a_layer) or \
                (mode == "all" and "bias" in name and "lora_" not in name and not _inside(name, whole)):
            found.append((name, p))
    return found


def _check_same_settings(existing: list[tuple[str, LoRALinear]], config: dict[str, Any], adapter_name: str) -> None:
    for n, layer in existing:
        want = (float(pattern_value(config.get("alpha_pattern"), n, config["lora_alpha"])),
                bool(config.get("use_rslora", False)), bool(config.get("use_dora", False)))
        have = (float(layer.lora_alpha[adapter_name]), layer.use_rslora[adapter_name], layer.use_dora[adapter_name])
        if have != want:
            raise ValueError(
                f"adapter {adapter_name!r} already exists with (alpha, rslora, dora) = {have} at {n!r}, the file "
                f"has {want}; load it under another adapter_name"
            )
        if layer.merged_adapter == adapter_name:
            raise ValueError(f"adapter {adapter_name!r} is merged at {n!r}; unmerge it before loading over it")


def _problems(tensors: dict[str, Tensor], shapes: dict, where: dict) -> list[str]:
    def listing(title: str, items: list[str]) -> list[str]:
        if not items:
            return []
        shown = items[:10] + ([f"... and {len(items) - 10} more"] if len(items) > 10 else [])
        return [f"{title} ({len(items)}):"] + [f"    {s}" for s in shown]

    missing = sorted(k for k in shapes if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in shapes)
    bad_shape, bad_dtype, bad_value = [], [], []
    for key in sorted(k for k in shapes if k in tensors):
        t = tensors[key]
        if tuple(t.shape) != shapes[key]:
            bad_shape.append(f"{key}: file {tuple(t.shape)}, model expects {shapes[key]}")
        elif not t.is_floating_point():
            bad_dtype.append(f"{key}: {t.dtype} is not a floating-point dtype")
        elif not torch.isfinite(t.to(where[key][2])).all() and where[key][0] != "whole":
            bad_value.append(f"{key}: non-finite values (as {where[key][2]})")
    return (
        listing("missing keys", missing)
        + listing("unexpected keys", unexpected)
        + listing("wrong shapes", bad_shape)
        + listing("wrong dtypes", bad_dtype)
        + listing("non-finite tensors", bad_value)
    )


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> dict[str, Any]:
    """Load a PEFT-format adapter from directory `path` into `model` as `adapter_name`; returns its config.

    Without that adapter in the model, the layers (and modules to save whole) the config selects are injected
    first, exactly as `inject` would with the config's settings (so a fresh model becomes trainable on the
    loaded adapter; a "pissa" / "olora" adapter rewrites the base as its init did). With it, the weights are
    overwritten (alpha / rslora / dora must agree). Everything is validated first; on any problem a
    ValueError lists them all and the model is not touched. Refused as well: a weights file whose recorded
    settings differ from the config beside it (an interrupted save), and layers on the meta device.
    """
    directory = Path(path)
    config = _read_config(directory)
    tensors, metadata = _read_tensors(directory)
    _check_pair(directory, config, metadata)
    shapes, where, ignored, exists = _expected(model, config, adapter_name)
    tensors = {k: t for k, t in tensors.items() if not any(k.startswith(prefix) for prefix in ignored)}
    problems = _problems(tensors, shapes, where)
    if problems:
        raise ValueError(f"adapter in {directory} does not fit this model:\n" + "\n".join(problems))

    if not exists:
        layers = sorted({name for kind, name, _ in where.values() if kind.startswith("lora_")})
        whole = sorted({target[0] for kind, target, _ in where.values() if kind == "whole"})
        init = config.get("init_lora_weights", True)
        inject(
            model,
            target_modules="|".join(re.escape(n) for n in layers),  # exactly these layers
            r=int(config["r"]),
            lora_alpha=config["lora_alpha"],
            lora_dropout=float(config.get("lora_dropout", 0.0)),
            use_rslora=bool(config.get("use_rslora", False)),
            use_dora=bool(config.get("use_dora", False)),
            adapter_name=adapter_name,
            init_lora_weights=init if init in _WEIGHT_INITS else True,
            rank_pattern=config.get("rank_pattern") or None,
            alpha_pattern=config.get("alpha_pattern") or None,
            modules_to_save=whole or None,
            bias=config.get("bias", "none"),
        )
    with torch.no_grad():
        for key, (kind, target, _) in where.items():
            if kind == "whole":
                name, state_key = target
                trained_copy = model.get_submodule(name).modules_to_save[adapter_name]
                trained_copy.state_dict(keep_vars=True)[state_key].copy_(tensors[key])
            elif kind == "param":
                model.get_parameter(target).copy_(tensors[key])
            else:
                getattr(model.get_submodule(target), kind)[adapter_name].copy_(tensors[key])
    return config
