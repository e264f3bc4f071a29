"""CLIP's byte-level BPE tokenizer, matching OpenAI's `simple_tokenizer.py`.

The frozen CLIP text encoder only gives the features it was trained to give if
prompts are tokenized exactly as during CLIP's training, so this follows
OpenAI's original code step by step (ftfy + double HTML unescape cleanup, the
same pre-tokenization regex, `</w>` word ends; CLIP pools at the first EOT:
`models.clip.eot_positions`)
rather than Hugging Face's `CLIPTokenizer`, which skips ftfy and HTML
unescaping and so differs on smart quotes, entities, ligatures, fullwidth
letters and mojibake.

The vocabulary always comes from the caller (a checkpoint directory or an
explicit path); this module never looks for one on its own.
"""

from __future__ import annotations

import gzip
import html
import json
import os
import pathlib
import tempfile
import zlib
from typing import Iterable, Mapping, Sequence, Union

import ftfy
import numpy as np
import regex

PathLike = Union[str, os.PathLike]

SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
# Id of `<|endoftext|>` in CLIP's 49408-token vocabulary (the largest id).
CLIP_EOT_TOKEN = 49407
# CLIP keeps the first 49152 - 256 - 2 merges of OpenAI's merge list.
CLIP_NUM_MERGES = 49152 - 256 - 2
CONTEXT_LENGTH = 77

# File names looked for in a checkpoint directory.
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
HF_VOCAB_NAME = "vocab.json"
HF_MERGES_NAME = "merges.txt"
# First line of OpenAI's merge file (skipped on load, written by `save`).
BPE_HEADER = '"bpe_simple_vocab_16e6.txt#version: 0.2'

_WORD_END = "</w>"
_PRETOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


class TokenizerFileError(ValueError):
  """A vocabulary file exists but cannot be read as one (the message names it)."""


def bytes_to_unicode() -> dict[int, str]:
  """OpenAI/GPT-2 byte -> printable unicode table.

  BPE runs on strings, so every byte needs a visible, non-whitespace character;
  printable Latin-1 bytes map to themselves and the rest to code points 256+.
  """
  bs = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("¡"), ord("¬") + 1))
      + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def clean_text(text: str) -> str:
  """OpenAI's basic_clean + whitespace_clean + lower, in that order."""
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  text = _WHITESPACE.sub(" ", text).strip()
  return text.lower()


def _get_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
  return {(a, b) for a, b in zip(word[:-1], word[1:])}


def canonical_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
  """CLIP's id order: bytes, bytes + `</w>`, merges, then the 2 specials."""
  vocab = list(bytes_to_unicode().values())
  vocab = vocab + [v + _WORD_END for v in vocab]
  vocab.extend("".join(m) for m in merges)
  vocab.extend([SOT_TEXT, EOT_TEXT])
  return vocab


def _parse_merges(lines: Iterable[tuple[int, str]], path: PathLike) -> list[tuple[str, str]]:
  """(line number, text) pairs -> merge pairs; anything else means a corrupt file."""
  merges = []
  for lineno, line in lines:
    parts = line.split()
    if len(parts) != 2:
      raise TokenizerFileError(
          f"{path}: line {lineno} is not a BPE merge (two tokens): {line[:60]!r}")
    merges.append((parts[0], parts[1]))
  if not merges:
    raise TokenizerFileError(f"{path}: no BPE merges found")
  return merges


class ClipTokenizer:
  """CLIP's BPE tokenizer; build it with `from_bpe_file`, `from_hf_files` or `from_dir`."""

  def __init__(self, encoder: Mapping[str, int], merges: Sequence[tuple[str, str]],
               source: str = "<memory>"):
    """`encoder` maps token strings to ids; `merges` are ranked BPE pairs."""
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {v: k for k, v in self._byte_encoder.items()}
    # Every byte and byte + `</w>` must have an id, or some text cannot be encoded.
    needed = [SOT_TEXT, EOT_TEXT] + [
        t for c in self._byte_encoder.values() for t in (c, c + _WORD_END)]
    missing = [t for t in needed if t not in encoder]
    if missing:
      raise TokenizerFileError(
          f"{source}: vocabulary lacks {len(missing)} required token(s), e.g. {missing[:3]!r}")
    self._encoder = dict(encoder)
    self._decoder = {v: k for k, v in self._encoder.items()}
    self._merges = [tuple(m) for m in merges]
    # Later duplicates win, as in OpenAI's dict(zip(merges, range(...))).
    self._bpe_ranks = dict(zip(self._merges, range(len(self._merges))))
    self._source = source
    # Per-instance memo of word -> space-joined BPE pieces (OpenAI keeps one too).
    self._cache: dict[str, str] = {SOT_TEXT: SOT_TEXT, EOT_TEXT: EOT_TEXT}

  # ---------------------------------------------------------------- loaders
  @classmethod
  def from_bpe_file(cls, path: PathLike, num_merges: int = CLIP_NUM_MERGES) -> "ClipTokenizer":
    """Loads OpenAI's gzipped merge list (header line, then one merge per line)."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"CLIP BPE vocabulary file not found: {path}")
    try:
      with gzip.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
      raise TokenizerFileError(f"cannot read CLIP BPE vocabulary {path}: {e}") from e
    lines = text.split("\n")
    # Line 0 is a header; OpenAI keeps lines[1 : num_merges + 1]. Empty lines
    # (the trailing newline) are skipped so short files do not grow a '' merge.
    body = [(i + 1, l) for i, l in enumerate(lines[1:num_merges + 1]) if l]
    merges = _parse_merges(body, path)
    encoder = {t: i for i, t in enumerate(canonical_vocab(merges))}
    return cls(encoder, merges, source=str(path))

  @classmethod
  def from_hf_files(cls, vocab_json: PathLike, merges_txt: PathLike) -> "ClipTokenizer":
    """Loads a Hugging Face `vocab.json` + `merges.txt` pair, keeping its ids."""
    vocab_json, merges_txt = pathlib.Path(vocab_json), pathlib.Path(merges_txt)
    missing = [str(p) for p in (vocab_json, merges_txt) if not p.is_file()]
    if missing:
      raise FileNotFoundError(f"CLIP tokenizer file(s) not found: {', '.join(missing)}")
    try:
      encoder = json.loads(vocab_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise TokenizerFileError(f"cannot read CLIP vocabulary {vocab_json}: {e}") from e
    if not isinstance(encoder, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in encoder.items()):
      raise TokenizerFileError(f"{vocab_json}: expected a JSON object of token -> int id")
    try:
      lines = merges_txt.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
      raise TokenizerFileError(f"cannot read CLIP merges {merges_txt}: {e}") from e
    # Only a leading '#version' line is a header: real merges can start with '#'.
    start = 1 if lines and lines[0].startswith("#version") else 0
    body = [(i + 1, l) for i, l in enumerate(lines) if i >= start and l.strip()]
    merges = _parse_merges(body, merges_txt)
    unknown = [t for a, b in merges for t in (a, b, a + b) if t not in encoder]
    if unknown:
      raise TokenizerFileError(
          f"{merges_txt}: merges produce tokens missing from {vocab_json}, e.g. {unknown[:3]!r}")
    return cls(encoder, merges, source=f"{vocab_json} + {merges_txt}")

  @classmethod
  def from_dir(cls, directory: PathLike) -> "ClipTokenizer":
    """Loads whichever form a checkpoint directory carries (OpenAI gz first)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
      raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    bpe = directory / BPE_FILE_NAME
    if bpe.is_file():
      return cls.from_bpe_file(bpe)
    vocab, merges = directory / HF_VOCAB_NAME, directory / HF_MERGES_NAME
    if vocab.is_file() and merges.is_file():
      return cls.from_hf_files(vocab, merges)
    raise FileNotFoundError(
        f"no CLIP tokenizer in {directory}: looked for {BPE_FILE_NAME} or "
        f"{HF_VOCAB_NAME} + {HF_MERGES_NAME}")

  def save(self, directory: PathLike) -> pathlib.Path:
    """Writes the vocabulary as OpenAI's gz merge list so a checkpoint carries it.

    The gz form only stores merges, so ids must follow CLIP's canonical layout
    (true for OpenAI's and Hugging Face's CLIP files); anything else is refused
    rather than silently renumbered. The file is byte-reproducible (mtime 0)
    and written atomically.
    """
    if canonical_vocab(self._merges) != [self._decoder.get(i) for i in range(self.vocab_size)]:
      raise ValueError(
          f"vocabulary from {self._source} is not in CLIP's canonical id order; "
          "it cannot be saved as an OpenAI merge list")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / BPE_FILE_NAME
    body = "\n".join([BPE_HEADER] + [f"{a} {b}" for a, b in self._merges]) + "\n"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{BPE_FILE_NAME}.")
    try:
      with os.fdopen(fd, "wb") as raw, gzip.GzipFile(
          filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(body.encode("utf-8"))
      os.replace(tmp, target)
    except BaseException:
      pathlib.Path(tmp).unlink(missing_ok=True)
      raise
    return target

  # ------------------------------------------------------------- properties
  @property
  def sot_token(self) -> int:
    return self._encoder[SOT_TEXT]

  @property
  def eot_token(self) -> int:
    return self._encoder[EOT_TEXT]

  @property
  def vocab_size(self) -> int:
    """Rows the token embedding needs (largest id + 1; 49408 for CLIP)."""
    return max(self._decoder) + 1

  def token_to_id(self, token: str) -> int:
    """Id of a vocabulary string (byte-level form, e.g. 'cafÃ©</w>')."""
    return self._encoder[token]

  def id_to_token(self, token_id: int) -> str:
    """Vocabulary string of an id, to inspect what BPE produced."""
    return self._decoder[int(token_id)]

  # --------------------------------------------------------------- encoding
  def _bpe(self, token: str) -> str:
    """OpenAI's greedy lowest-rank-first merge loop, memoized per word."""
    cached = self._cache.get(token)
    if cached is not None:
      return cached
    word = tuple(token[:-1]) + (token[-1] + _WORD_END,)
    pairs = _get_pairs(word)
    if not pairs:
      return token + _WORD_END
    inf = float("inf")
    while True:
      bigram = min(pairs, key=lambda p: self._bpe_ranks.get(p, inf))
      if bigram not in self._bpe_ranks:
        break
      first, second = bigram
      new_word: list[str] = []
      i = 0
      while i < len(word):
        try:
          j = word.index(first, i)
        except ValueError:
          new_word.extend(word[i:])
          break
        new_word.extend(word[i:j])
        i = j
        if i < len(word) - 1 and word[i + 1] == second:
          new_word.append(first + second)
          i += 2
        else:
          new_word.append(word[i])
          i += 1
      word = tuple(new_word)
      if len(word) == 1:
        break
      pairs = _get_pairs(word)
    out = " ".join(word)
    self._cache[token] = out
    return out

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without start/end tokens."""
    ids: list[int] = []
    for token in _PRETOKENIZE.findall(clean_text(text)):
      token = "".join(self._byte_encoder[b] for b in token.encode("utf-8"))
      ids.extend(self._encoder[piece] for piece in self._bpe(token).split(" "))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` as OpenAI decodes it (`</w>` -> space), stripped at the ends.

    Special tokens decode to their literal text; bytes that are not valid
    UTF-8 become U+FFFD.
    """
    pieces = []
    for i in ids:
      i = int(i)
      if i not in self._decoder:
        raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
      pieces.append(self._decoder[i])
    text = "".join(pieces)
    data = bytearray(self._byte_decoder[c] for c in text)
    return data.decode("utf-8", errors="replace").replace(_WORD_END, " ").strip()

  def tokenize(self, texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH,
               truncate: bool = True) -> np.ndarray:
    """[N, context_length] int32 ids: SOT, text, EOT, zero padding.

    As `clip.tokenize(truncate=True)`, an over-long text is cut and its last
    kept position overwritten with EOT so pooling still finds one; with
    `truncate=False` it is an error instead.
    """
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 2:
      raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
    result = np.zeros((len(texts), context_length), dtype=np.int32)
    for row, text in enumerate(texts):
      ids = [self.sot_token] + self.encode(text) + [self.eot_token]
      if len(ids) > context_length:
        if not truncate:
          short = text if len(text) <= 60 else text[:57] + "..."
          raise ValueError(
              f"text {short!r} is {len(ids)} tokens long (with start/end tokens), "
              f"more than context_length={context_length}")
        ids = ids[:context_length]
        ids[-1] = self.eot_token
      result[row, :len(ids)] = ids
    return result

  def __repr__(self) -> str:
    return f"ClipTokenizer(vocab_size={self.vocab_size}, source={self._source!r})"
