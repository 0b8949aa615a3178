"""Text generation from a causal-LM export with its key/value cache (numpy + onnxruntime, no torch).

```python
from rlhf_runtime.generate import Generator, generate
out = generate("export/", "def main(", max_new_tokens=64, greedy=True)   # Generation
out.text, out.tokens, out.steps
```

The export's manifest has a ``causal_lm`` entry (written by toolkit.export.kv_cache): per stage a
``stage_NN.kv.onnx`` file taking the stage's inputs plus ``past_key_i`` / ``past_value_i``
(batch, heads, past, head_dim) and returning its outputs plus ``present_key_i`` /
``present_value_i``. The prompt runs once with an empty cache; each new token then runs alone
against the cache.

Context: a prompt longer than the context is refused (InputError). Generation past the context
slides the window: when the window is full, the last ``context // 2`` tokens become a new prompt
(positions restart at 0, the cache is recomputed from them) and generation goes on. A reference
without a cache must apply the same rule (``window_start``) to give the same tokens.

Byte-level models (vocabulary 256) take text, encoded as UTF-8; other vocabularies take token ids.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_runtime.errors import InputError
from rlhf_runtime.manifest import FileEntry, read_manifest, read_verified
from rlhf_runtime.session import SessionConfig, create_session, resolve_providers

BYTE_VOCAB = 256


@dataclass
class Generation:
    """A generated continuation: ``tokens`` (new ids only), ``text`` (bytes decoded as UTF-8 with
    replacement, for byte models; else ""), ``slides`` (times the window slid), ``seconds``."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    slides: int = 0
    seconds: float = 0.0
    steps: int = 0
    timings: dict[str, Any] = field(default_factory=dict)


def _entry(doc: dict[str, Any], where: str) -> dict[str, Any]:
    entry = doc.get("causal_lm")
    if not isinstance(entry, dict):
        raise InputError(
            f"{where}: not a causal language model export (manifest.json has no 'causal_lm' entry); "
            "export a causal LM spec such as graphs/charlm.yaml"
        )
    for key, kind in (
        ("input", str),
        ("logits", str),
        ("vocab", int),
        ("context", int),
        ("heads", int),
        ("head_dim", int),
        ("stages", list),
    ):
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            raise InputError(
                f"{where}: invalid manifest, causal_lm.{key}: expected {kind.__name__}, got {entry.get(key)!r}"
            )
    if entry["context"] < 2 or entry["vocab"] < 1 or not entry["stages"]:
        raise InputError(
            f"{where}: invalid manifest, causal_lm: expected context >= 2, vocab >= 1 and stages"
        )
    for i, st in enumerate(entry["stages"]):
        w = f"{where}: invalid manifest, causal_lm.stages[{i}]"
        if not isinstance(st, dict) or not isinstance(st.get("file"), dict):
            raise InputError(f"{w}: expected an object with a 'file' entry")
        for key in ("inputs", "outputs", "past", "present"):
            names = st.get(key)
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise InputError(f"{w}.{key}: expected a list of tensor names, got {names!r}")
        if not st["past"] or len(st["past"]) != len(st["present"]):
            raise InputError(
                f"{w}: expected as many present as past tensors (at least one), got {st['past']!r}"
            )
    return entry


class Generator:
    """The key/value-cache stages of a causal-LM export, loaded once.

    Args:
        export_dir: an export directory whose manifest has a ``causal_lm`` entry.
        threads: onnxruntime intra-op threads per session (None: onnxruntime's default).
        providers: "cpu" (default), "auto", "cuda" or a list of onnxruntime providers.

    Raises:
        InputError: not a causal-LM export, a bad manifest, a file whose hash does not match.
    """

    def __init__(
        self,
        export_dir: str | os.PathLike[str],
        threads: int | None = None,
        providers: str | Sequence[str] = "cpu",
    ) -> None:
        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)
        self.manifest = manifest
        self.entry = _entry(manifest.raw, str(self.export_dir))
        self.context: int = self.entry["context"]
        self.vocab: int = self.entry["vocab"]
        self.heads: int = self.entry["heads"]
        self.head_dim: int = self.entry["head_dim"]
        self.byte_level = self.vocab == BYTE_VOCAB
        provs = resolve_providers(providers)
        config = SessionConfig(intra_op_threads=threads) if threads else SessionConfig()
        self.sessions = []
        for i, st in enumerate(self.entry["stages"]):
            f = st["file"]
            if (
                not isinstance(f.get("file"), str)
                or not isinstance(f.get("sha256"), str)
                or not isinstance(f.get("bytes"), int)
            ):
                raise InputError(
                    f"{self.export_dir}: invalid manifest, causal_lm.stages[{i}].file: expected file, sha256, bytes"
                )
            data = read_verified(self.export_dir, FileEntry(f["file"], f["sha256"].lower(), f["bytes"]))
            self.sessions.append(create_session(data, provs, config, strict=False))

    # ---- encoding ---------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Prompt text (byte models) or ids -> ids, checked: not empty, in the vocabulary, fits the context."""
        if isinstance(prompt, str):
            if not self.byte_level:
                raise InputError(
                    f"prompt: this export's vocabulary has {self.vocab} ids, not the {BYTE_VOCAB} bytes: "
                    "expected token ids, got text"
                )
            ids = list(prompt.encode("utf-8"))
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise InputError(f"prompt: expected token ids in [0, {self.vocab}), got {bad[0]}")
        if not ids:
            raise InputError("prompt: expected at least one token, got an empty prompt")
        if len(ids) > self.context:
            raise InputError(
                f"prompt: {len(ids)} tokens is longer than the model's context of {self.context} tokens"
            )
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text (byte models: UTF-8 with replacement characters for broken sequences)."""
        return bytes(ids).decode("utf-8", errors="replace") if self.byte_level else ""

    # ---- stepping ---------------------------------------------------------------------------
    def empty_cache(self) -> list[list[np.ndarray]]:
        """A cache with no past tokens, batch 1."""
        shape = (1, self.heads, 0, self.head_dim)
        return [[np.zeros(shape, dtype=np.float32) for _ in st["past"]] for st in self.entry["stages"]]

    def step(
        self, ids: Sequence[int], cache: list[list[np.ndarray]]
    ) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """Run ``ids`` (new tokens) after ``cache``: (logits of the last token (vocab,), new cache)."""
        env: dict[str, np.ndarray] = {self.entry["input"]: np.asarray([list(ids)], dtype=np.int64)}
        new_cache = []
        for sess, st, past in zip(self.sessions, self.entry["stages"], cache):
            feeds = {n: env[n] for n in st["inputs"]}
            feeds.update(zip(st["past"], past))
            got = sess.run(st["outputs"] + st["present"], feeds)
            env.update(zip(st["outputs"], got[: len(st["outputs"])]))
            new_cache.append(got[len(st["outputs"]) :])
        logits = env[self.entry["logits"]]  # (1, T, V)
        return np.asarray(logits[0, -1], dtype=np.float64), new_cache

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = 0,
        greedy: bool = False,
    ) -> Generation:
        """Continue ``prompt`` by ``max_new_tokens`` tokens (see the module doc for the window rule).

        Args:
            prompt: text (byte models) or token ids.
            max_new_tokens: tokens to generate, >= 1.
            temperature: softmax temperature for sampling, > 0 (ignored when greedy).
            top_k: sample among the k most likely tokens only (>= 1; None: all).
            seed: sampling seed (same seed, same tokens).
            greedy: always take the most likely token (argmax; ties: the lowest id).

        Raises:
            InputError: an empty or too long prompt, ids out of range, max_new_tokens < 1,
                temperature <= 0 when sampling, top_k < 1.
        """
        check_options(max_new_tokens, temperature, top_k, greedy)
        ids = self.encode(prompt)
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        tokens = list(ids)
        start = 0  # first token of the window
        logits, cache = self.step(tokens, self.empty_cache())
        new: list[int] = []
        slides = 0
        steps = 1
        for n in range(max_new_tokens):
            nxt = pick(logits, temperature, top_k, greedy, rng)
            tokens.append(nxt)
            new.append(nxt)
            if n == max_new_tokens - 1:
                break
            if len(tokens) - start > self.context:  # the window is full: slide it, recompute the cache
                start = len(tokens) - self.context // 2
                slides += 1
                logits, cache = self.step(tokens[start:], self.empty_cache())
            else:
                logits, cache = self.step([nxt], cache)
            steps += 1
        seconds = time.perf_counter() - t0
        return Generation(ids, new, self.decode(new), slides, seconds, steps)


def check_options(max_new_tokens: int, temperature: float, top_k: int | None, greedy: bool) -> None:
    """Raise InputError for generation options that mean nothing."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    if not greedy and not (
        isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0
    ):
        raise InputError(f"temperature: expected a number > 0 when sampling (or greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k: expected an int >= 1, got {top_k!r}")


def pick(
    logits: np.ndarray, temperature: float, top_k: int | None, greedy: bool, rng: np.random.Generator
) -> int:
    """The next token from one position's logits: argmax, or a sample of softmax(logits / T) among
    the top k."""
    if greedy:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if top_k is not None and top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


def generate(
    export: str | os.PathLike[str] | Generator,
    prompt: str | Sequence[int],
    max_new_tokens: int = 64,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = 0,
    greedy: bool = False,
    threads: int | None = None,
) -> Generation:
    """Load ``export`` (a directory or a Generator) and continue ``prompt``; see Generator.generate."""
    check_options(max_new_tokens, temperature, top_k, greedy)
    gen = export if isinstance(export, Generator) else Generator(export, threads=threads)
    return gen.generate(
        prompt, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, greedy=greedy
    )


__all__ = ["Generation", "Generator", "check_options", "generate", "pick"]
