"""Load models and tokenizers from a local folder or the Hugging Face hub; check compatibility.

A source is a local folder or a hub id, optionally pinned as ``org/name@revision``. Only
safetensors weights are loaded unless ``LoadConfig.allow_pickle`` is set: a pickle (``.bin``)
file can run arbitrary code when it is read.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.config import LoadConfig

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def parse_source(source: str) -> tuple[str, str | None]:
    """Split ``org/name@revision``; an existing local path is never split.

    >>> parse_source("org/model@v1.0")
    ('org/model', 'v1.0')
    >>> parse_source("org/model")
    ('org/model', None)
    """
    if "@" not in source or Path(source).expanduser().exists():
        return source, None
    location, _, revision = source.rpartition("@")
    return location, revision or None


def locate(name: str, source: str) -> tuple[str, str | None, bool]:
    """(location, revision, is_local) for model ``name``; FileNotFoundError if it is neither."""
    location, revision = parse_source(source)
    path = Path(location).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model {name!r}: {location!r} is a file; give the model's folder")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model {name!r}: {location!r} has no config.json; is it a Hugging Face model "
                "folder (saved with save_pretrained)?"
            )
        return str(path), revision, True
    if location.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(location):
        raise FileNotFoundError(
            f"model {name!r}: path {location!r} does not exist (and is not a hub id "
            "like 'org/name'); check models.*.path"
        )
    return location, revision, False


def check_weight_files(name: str, folder: Path, *, allow_pickle: bool) -> None:
    """Refuse a folder that has only pickle weights unless ``allow_pickle``."""
    files = sorted(p.name for p in folder.iterdir())
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if not pickles:
        raise FileNotFoundError(f"model {name!r}: no *.safetensors weights in {str(folder)!r}")
    if not allow_pickle:
        raise ValueError(
            f"model {name!r} in {str(folder)!r} has only pickle weights ({', '.join(pickles)}), "
            "which can run arbitrary code when loaded. Convert them to safetensors, or set "
            "load.allow_pickle: true (LoadConfig(allow_pickle=True)) if you trust the files."
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers in ``folder`` (the index's shards if
    it is sharded); reads a few kilobytes per file, never the weights."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{str(index)!r} is not a valid safetensors index ({err})") from None
        files = [folder / shard for shard in shards]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(
                    f"{str(index)!r} lists shard {f.name!r}, which is missing; download it again"
                )
    else:
        files = sorted(folder.glob("*.safetensors"))
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(safetensors_header_shapes(f))
    return shapes


def safetensors_header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from one safetensors file's JSON header."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(size) if 0 < size <= 100_000_000 else b""
    try:
        header = json.loads(raw)
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(
            f"{str(path)!r} is not a valid safetensors file (bad header); download or save "
            "it again"
        ) from None


def load_model(name: str, source: str, *, load: LoadConfig) -> Any:
    """Load model ``name`` from ``source`` in ``load.dtype`` on ``load.device``, in eval mode,
    its parameters frozen: a merged model is only evaluated, and a forward pass through
    parameters that require grad keeps its whole autograd graph alive while any output is
    held (a KV cache through a generation: ~5 GB for 48 answers of SmolLM2-135M)."""
    import transformers

    from evomerge.merge.reference import DTYPES

    location, revision, local = locate(name, source)
    if local:
        check_weight_files(name, Path(location), allow_pickle=load.allow_pickle)
    opts: dict[str, Any] = {"trust_remote_code": load.trust_remote_code}
    if revision is not None:
        opts["revision"] = revision
    try:
        config = transformers.AutoConfig.from_pretrained(location, **opts)
        model = _model_class(config).from_pretrained(
            location, config=config, dtype=DTYPES[load.dtype],
            use_safetensors=None if load.allow_pickle else True, **opts,
        )
    except OSError as err:
        raise OSError(_load_error(name, location, revision, err, load)) from err
    return model.to(load.device).eval().requires_grad_(False)


def _model_class(config: Any) -> Any:
    import transformers

    archs = getattr(config, "architectures", None) or []
    if archs and hasattr(transformers, archs[0]):
        return getattr(transformers, archs[0])
    return transformers.AutoModelForCausalLM


def _load_error(name: str, location: str, revision: str | None, err: Exception,
                load: LoadConfig) -> str:
    where = f"{location!r}" + (f" at revision {revision!r}" if revision else "")
    msg = f"model {name!r}: could not load {where}: {err}"
    if "safetensors" in str(err) and not load.allow_pickle:
        msg += " (if it only has .bin weights and you trust them, set load.allow_pickle: true)"
    return msg


def load_tokenizer(name: str, source: str, *, load: LoadConfig) -> Any:
    """Load the tokenizer stored with model ``name``."""
    from transformers import AutoTokenizer

    location, revision, _ = locate(name, source)
    opts: dict[str, Any] = {"trust_remote_code": load.trust_remote_code}
    if revision is not None:
        opts["revision"] = revision
    try:
        return AutoTokenizer.from_pretrained(location, **opts)
    except (OSError, ValueError) as err:
        msg = f"model {name!r}: could not load a tokenizer from {location!r}: {err}"
        raise type(err)(msg) from err


def tensor_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a model's state dict."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_compatible(ref_name: str, ref: Any, name: str, model: Any) -> None:
    """Same architecture and the same tensor names and shapes, or ValueError naming the first
    difference."""
    want = (ref.config.model_type, tuple(ref.config.architectures or ()))
    got = (model.config.model_type, tuple(model.config.architectures or ()))
    if want != got:
        raise ValueError(
            f"model {name!r} is {got[0]} {list(got[1])} but {ref_name!r} is {want[0]} "
            f"{list(want[1])}; models to merge must share one architecture"
        )
    check_same_tensors(ref_name, tensor_shapes(ref), name, tensor_shapes(model))


def check_compatible_config(ref_name: str, ref: Any, name: str, source: str, *,
                            load: LoadConfig) -> None:
    """:func:`check_compatible`'s architecture check from model ``name``'s config alone (its
    tensors are compared by :func:`check_same_tensors` on the safetensors headers)."""
    import transformers

    location, revision, _ = locate(name, source)
    opts: dict[str, Any] = {"trust_remote_code": load.trust_remote_code}
    if revision is not None:
        opts["revision"] = revision
    config = transformers.AutoConfig.from_pretrained(location, **opts)
    want = (ref.config.model_type, tuple(ref.config.architectures or ()))
    got = (config.model_type, tuple(config.architectures or ()))
    if want != got:
        raise ValueError(
            f"model {name!r} is {got[0]} {list(got[1])} but {ref_name!r} is {want[0]} "
            f"{list(want[1])}; models to merge must share one architecture"
        )


def check_same_tensors(ref_name: str, ref: Mapping[str, tuple[int, ...]], name: str,
                       other: Mapping[str, tuple[int, ...]]) -> None:
    for key, shape in ref.items():
        if key not in other:
            raise ValueError(f"model {name!r} has no tensor {key!r}, which {ref_name!r} has")
        if tuple(other[key]) != tuple(shape):
            raise ValueError(
                f"tensor {key!r} has shape {tuple(other[key])} in model {name!r} but "
                f"{tuple(shape)} in {ref_name!r}; models to merge must have the same shapes"
            )
    extra = [key for key in other if key not in ref]
    if extra:
        raise ValueError(f"model {name!r} has tensor {extra[0]!r}, which {ref_name!r} lacks")


def check_same_vocab(ref_name: str, ref_tok: Any, name: str, tok: Any) -> None:
    """The two tokenizers map the same tokens to the same ids, or ValueError naming one."""
    a, b = ref_tok.get_vocab(), tok.get_vocab()
    if a == b:
        return
    if len(a) != len(b):
        detail = f"{len(b)} tokens vs {len(a)}"
    else:
        token = next(t for t in sorted(a, key=a.__getitem__) if b.get(t) != a[t])
        detail = f"token {token!r} has id {b.get(token)} vs {a[token]}"
    raise ValueError(
        f"the tokenizer of model {name!r} differs from {ref_name!r} ({detail}); models to "
        "merge must share one vocabulary"
    )


class SafetensorsReader:
    """One tensor at a time from a local safetensors folder, in the file's own dtype: a task
    vector is computed from the stored weights (not from a 16-bit load of them) without a
    second copy of the model in memory.

    >>> reader = SafetensorsReader.open("models/a")  # doctest: +SKIP
    >>> reader.shapes["model.norm.weight"], reader.get("model.norm.weight").dtype  # doctest: +SKIP
    ((576,), torch.float32)
    """

    def __init__(self, files: dict[str, Path], shapes: dict[str, tuple[int, ...]]) -> None:
        self.files = files  # tensor name -> the file that holds it
        self.shapes = shapes

    @classmethod
    def open(cls, source: str) -> SafetensorsReader | None:
        """The reader of a local safetensors folder; None for a hub id or other weights."""
        location, revision = parse_source(source)
        folder = Path(location).expanduser()
        if revision is not None or not folder.is_dir():
            return None
        index = folder / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {k: folder / v for k, v in weight_map.items()}
        else:
            files = {k: f for f in sorted(folder.glob("*.safetensors"))
                     for k in safetensors_header_shapes(f)}
        if not files:
            return None
        return cls(files, safetensors_shapes(folder))

    def get(self, key: str) -> Any:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as f:
            return f.get_tensor(key)

    def covers(self, keys: Any, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether every tensor ``keys`` names is stored here with the shape in ``shapes``."""
        return all(tuple(self.shapes.get(k, ())) == tuple(shapes[k]) for k in keys)
