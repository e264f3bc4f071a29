"""Tests for mmap_jax.tokenizer against OpenAI CLIP's original BPE behaviour.

Ground truth is (1) Hugging Face's CLIPTokenizer on ordinary prompts, built
from the same real vocabulary, and (2) ids derived by hand from OpenAI's
`simple_tokenizer.py` algorithm for strings where Hugging Face differs.

Hand-derivation rules used in the comments below:
  * A single byte b as a whole pre-token becomes `chr'(b) + '</w>'`, whose id
    is 256 + (position of b in the bytes_to_unicode table). Printable ASCII
    starts the table at '!' (= position 0), so for ASCII c: id = 256 + ord(c) - 33.
  * Merged tokens have id 512 + (line of their merge in the file, 0-based
    after the header); those ids are read off the vocabulary and double-checked
    against well-known CLIP ids ("a dog" -> 49406 320 1929 49407 and
    "a cat" -> ... 2368 ... in OpenAI's README).
  * SOT = 512 + 48894 = 49406, EOT = 49407.
"""
import gzip
import json
import re
import pathlib

import numpy as np
import pytest

from mmap_jax import tokenizer as tk
from mmap_jax.models.clip import eot_positions
from mmap_jax.tokenizer import ClipTokenizer, TokenizerFileError, clean_text

TESTDATA = pathlib.Path(__file__).resolve().parent / "testdata"


def _class_names(file_name: str) -> list[str]:
  return [l.strip() for l in (TESTDATA / file_name).read_text().splitlines() if l.strip()]


def _prompts() -> list[str]:
  names = _class_names("office_home_classes.txt") + _class_names("domainnet_classes.txt")
  return [f"a photo of a {n.replace('_', ' ')}." for n in names]


@pytest.fixture(scope="module")
def tok(bpe_path) -> ClipTokenizer:
  return ClipTokenizer.from_bpe_file(bpe_path)


@pytest.fixture(scope="module")
def hf_dir(bpe_path, tmp_path_factory) -> pathlib.Path:
  """vocab.json + merges.txt laid out as Hugging Face's CLIP checkpoints are.

  Built with transformers' own byte table, not ours, so a bug in our table or
  vocabulary order cannot cancel out in the parity checks.
  """
  convert = pytest.importorskip("transformers.convert_slow_tokenizer")
  lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
  merges = [tuple(l.split()) for l in lines[1:49152 - 256 - 2 + 1]]
  assert len(merges) == 48894
  byte_chars = list(convert.bytes_to_unicode().values())
  vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  d = tmp_path_factory.mktemp("hf_clip")
  (d / "vocab.json").write_text(
      json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
  (d / "merges.txt").write_text(
      "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
  return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
  transformers = pytest.importorskip("transformers")
  return transformers.CLIPTokenizer.from_pretrained(str(hf_dir))


# ---------------------------------------------------------------- vocabulary


def test_vocabulary_shape(tok):
  assert tok.vocab_size == 49408
  assert (tok.sot_token, tok.eot_token) == (49406, 49407)
  assert tk.CLIP_EOT_TOKEN == tok.eot_token
  # Byte table: '!' is first; the 256 </w> forms follow the 256 bare bytes.
  assert tok.id_to_token(0) == "!" and tok.id_to_token(256) == "!</w>"
  # First merge line of OpenAI's file is "i n".
  assert tok.id_to_token(512) == "in"


def test_byte_table_matches_transformers():
  convert = pytest.importorskip("transformers.convert_slow_tokenizer")
  assert tk.bytes_to_unicode() == convert.bytes_to_unicode()


def test_class_lists_are_complete():
  oh, dn = _class_names("office_home_classes.txt"), _class_names("domainnet_classes.txt")
  assert len(oh) == len(set(oh)) == 65
  assert len(dn) == len(set(dn)) == 345
  assert {"Alarm_Clock", "Postit_Notes", "ToothBrush", "Webcam"} <= set(oh)
  assert {"aircraft_carrier", "The_Great_Wall_of_China", "t-shirt", "zigzag"} <= set(dn)


# ------------------------------------------------------- parity with HF CLIP


def test_class_prompts_match_hf(tok, hf_tok, hf_dir):
  prompts = _prompts()
  assert len(prompts) == 410
  ours = tok.tokenize(prompts)
  ours_hf_files = ClipTokenizer.from_hf_files(hf_dir / "vocab.json", hf_dir / "merges.txt")
  np.testing.assert_array_equal(ours_hf_files.tokenize(prompts), ours)
  assert ours.dtype == np.int32 and ours.shape == (410, 77)
  eot = eot_positions(ours)
  for row, (prompt, pos) in enumerate(zip(prompts, eot)):
    expected = hf_tok(prompt)["input_ids"]  # SOT ... EOT, no padding
    assert ours[row, :pos + 1].tolist() == expected, prompt
    assert not ours[row, pos + 1:].any(), prompt  # zero padding after EOT
    assert pos == len(expected) - 1
  # OpenAI pools at argmax(ids); explicit search must agree on real prompts.
  np.testing.assert_array_equal(eot, ours.argmax(-1))


def test_from_dir_prefers_either_form(tok, hf_dir, tmp_path):
  prompts = _prompts()[:20]
  from_hf = ClipTokenizer.from_dir(hf_dir)
  np.testing.assert_array_equal(from_hf.tokenize(prompts), tok.tokenize(prompts))
  saved = tok.save(tmp_path / "ckpt" / "tokenizer")
  assert saved.name == tk.BPE_FILE_NAME
  np.testing.assert_array_equal(
      ClipTokenizer.from_dir(saved.parent).tokenize(prompts), tok.tokenize(prompts))


# -------------------------------------------------- hand-derived hard strings

# (text, expected byte-level tokens, expected ids). Comments say why.
HARD_CASES = [
    # 'a' = 256 + 97 - 33 = 320 and '.' = 256 + 46 - 33 = 269 (single bytes);
    # dog</w> = 1929 as in OpenAI's README. '.' is a separate punctuation
    # pre-token, so it gets its own </w>.
    ("a photo of a dog.",
     ["a</w>", "photo</w>", "of</w>", "a</w>", "dog</w>", ".</w>"],
     [320, 1125, 539, 320, 1929, 269]),
    # Whitespace runs (tab, newline, several spaces) collapse to one space and
    # the ends are stripped; "newlines" is not one merge: 'new' + 'lines</w>'.
    ("  Multiple   spaces\tand\nnewlines ",
     ["multiple</w>", "spaces</w>", "and</w>", "new", "lines</w>"],
     [6470, 9006, 537, 1218, 3418]),
    # Accent: é is UTF-8 C3 A9 -> byte chars 'Ã' '©'; BPE merges the whole word.
    ("café", ["cafÃ©</w>"], [15304]),
    # ï is C3 AF -> 'Ã' '¯'. One [\p{L}]+ pre-token, but no merge joins
    # 'na'+'Ã¯' or 'Ã¯'+'ve</w>', so three pieces remain, only the last with </w>.
    ("naïve", ["na", "Ã¯", "ve</w>"], [1097, 35689, 563]),
    # Emoji: F0 9F 90 B6 -> 'ð' 'Ł' 'Ĳ' '¶' (non-printable bytes map to
    # chr(256 + n)); the dog emoji alone is a single merged token.
    ("🐶", ["ðŁĲ¶</w>"], [10631]),
    # Lowercased; emoji are neither \p{L} nor \p{N}, so "🐶🍕!" is ONE
    # punctuation-run pre-token and only its last piece ('!') carries </w>:
    # the dog is 'ðŁĲ¶' (14466) here, not 'ðŁĲ¶</w>' (10631) as above.
    # 'i' = 256 + 105 - 33 = 328; '!' = 256 + 33 - 33 = 256.
    ("I love 🐶🍕!",
     ["i</w>", "love</w>", "ðŁĲ¶", "ðŁįķ", "!</w>"],
     [328, 793, 14466, 31469, 256]),
    # One [^\s\p{L}\p{N}]+ run; BPE leaves '!!!' + '???</w>'.
    ("!!!???", ["!!!", "???</w>"], [11194, 3824]),
    ("...", ["...</w>"], [678]),
    # [\p{N}] matches ONE digit, so each digit is its own word:
    # 256 + ord(d) - 33 -> '2' = 273, '0' = 271, '4' = 275.
    ("2024", ["2</w>", "0</w>", "2</w>", "4</w>"], [273, 271, 273, 275]),
    # Contractions: "'s" / "'t" come before the letter class in the regex
    # alternation, so they split off as their own pre-tokens.
    ("it's", ["it</w>", "'s</w>"], [585, 568]),
    ("don't", ["don</w>", "'t</w>"], [847, 713]),
    # --- cases where Hugging Face's CLIPTokenizer differs (no ftfy/html) ---
    # Smart quotes: ftfy uncurls “ ” to '"' = 256 + 34 - 33 = 257.
    ("He said “hello”",
     ["he</w>", "said</w>", "\"</w>", "hello</w>", "\"</w>"],
     [797, 1946, 257, 3306, 257]),
    # ’ becomes ' so the contraction rule applies exactly as for "don't".
    ("don’t", ["don</w>", "'t</w>"], [847, 713]),
    # HTML entities: "&amp;amp;" -> '&' (ftfy unescapes text without '<',
    # html.unescape twice finishes it); '&' = 256 + 38 - 33 = 261.
    ("&amp;amp;", ["&</w>"], [261]),
    # With a '<' present ftfy leaves entities alone, so only OpenAI's two
    # html.unescape passes run: three levels of escaping lose exactly two,
    # leaving "&amp;" = '&' 'amp' ';' (each its own pre-token).
    # 'x' = 343, '<' = 256 + 60 - 33 = 283, 'y' = 344, ';' = 282, 'z' = 345.
    ("x < y &amp;amp;amp; z",
     ["x</w>", "<</w>", "y</w>", "&</w>", "amp</w>", ";</w>", "z</w>"],
     [343, 283, 344, 261, 6259, 282, 345]),
    # Ligature: ftfy turns U+FB01 'ﬁ' into "fi", giving the plain word.
    ("ﬁsh", ["fish</w>"], [2759]),
    # Fullwidth letters: ftfy narrows them; lowercase "cat" = 2368, the id of
    # "a cat" in OpenAI's README.
    ("ＣＡＴ", ["cat</w>"], [2368]),
    # Mojibake: UTF-8 'é' read as Latin-1 ("Ã©") is repaired by ftfy, so
    # it tokenizes exactly like "café".
    ("cafÃ©", ["cafÃ©</w>"], [15304]),
    # The literal special-token text maps to the special id (OpenAI's cache
    # is seeded with it, and the regex matches it before '<' punctuation).
    ("<|endoftext|>", ["<|endoftext|>"], [49407]),
]


@pytest.mark.parametrize("text,tokens,ids", HARD_CASES, ids=[repr(c[0]) for c in HARD_CASES])
def test_hand_derived_ids(tok, text, tokens, ids):
  got = tok.encode(text)
  assert [tok.id_to_token(i) for i in got] == tokens
  assert got == ids
  assert [tok.token_to_id(t) for t in tokens] == ids


# Verified against transformers 5.x (tokenizers backend: NFC + whitespace +
# lowercase only): each of these tokenizes differently there.
HF_DIFFERS = ["He said “hello”", "don’t", "&amp;amp;", "x < y &amp;amp;amp; z", "ﬁsh",
              "ＣＡＴ", "cafÃ©"]


@pytest.mark.parametrize("text", HF_DIFFERS)
def test_hf_differs_where_original_cleans(tok, hf_tok, text):
  hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
  assert hf_ids != tok.encode(text)


@pytest.mark.parametrize("text,cleaned", [
    ("  A\t\tB \n C  ", "a b c"),
    ("“Quote” ‘it’s’", "\"quote\" 'it's'"),
    ("&amp;amp;", "&"),
    ("<b>&amp;amp;amp;</b>", "<b>&amp;</b>"),  # '<' stops ftfy; 2 passes remain
    ("ﬁnal ｆｕｌｌ", "final full"),
    ("cafÃ©", "café"),
])
def test_clean_text(text, cleaned):
  assert clean_text(text) == cleaned


# ------------------------------------------------------ tokenize / truncation


def test_tokenize_layout(tok):
  out = tok.tokenize(["a dog", "a cat"])
  assert out.dtype == np.int32 and out.shape == (2, 77)
  # OpenAI README: clip.tokenize(["a dog", "a cat"]).
  assert out[0, :4].tolist() == [49406, 320, 1929, 49407]
  assert out[1, :4].tolist() == [49406, 320, 2368, 49407]
  assert not out[:, 4:].any()
  np.testing.assert_array_equal(tok.tokenize("a dog"), out[:1])
  assert tok.tokenize("a dog", context_length=8).shape == (1, 8)


def test_truncation_keeps_eot_last(tok):
  # 'a ' * 100 -> 100 words, each 'a</w>' = 320, plus SOT/EOT = 102 ids.
  out = tok.tokenize("a " * 100)
  assert out[0].tolist() == [49406] + [320] * 75 + [49407]
  assert eot_positions(out).tolist() == [76]
  # 75 words fit exactly (77 with SOT/EOT): nothing cut.
  fit = tok.tokenize("a " * 75, truncate=False)
  assert fit[0].tolist() == [49406] + [320] * 75 + [49407]
  # 76 words: the 76th word is overwritten by EOT.
  assert tok.tokenize("a " * 76)[0].tolist() == fit[0].tolist()


def test_no_truncate_raises_with_text_and_length(tok):
  long_text = "a photo of a very long prompt " * 20
  with pytest.raises(ValueError, match=r"'a photo of a very long prompt .*\.\.\.' is 142 tokens"):
    tok.tokenize(["a dog", long_text], truncate=False)


def test_eot_positions():
  ids = np.array([[49406, 320, 49407, 0, 0],
                  # Hugging Face pads with EOT itself: the first one counts.
                  [49406, 49407, 49407, 49407, 49407],
                  # An id above EOT (extended vocabulary) would fool argmax.
                  [49406, 50000, 320, 49407, 0]])
  assert eot_positions(ids).tolist() == [2, 1, 3]
  assert ids.argmax(-1).tolist()[2] == 1  # what OpenAI's argmax would pick
  assert eot_positions(ids[0]).tolist() == 2
  assert eot_positions(ids[[0, 2]], eot_token=320).tolist() == [1, 2]
  with pytest.raises(ValueError, match="no end-of-text token"):
    eot_positions(np.array([[49406, 320, 0], [49406, 49407, 0]]))


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize("text", [
    "a photo of a the eiffel tower",
    "naïve café owners love emoji 🐶",
    "multiple spaces and newlines",
] + [p[:-1].lower() for p in _prompts()[::37]])
def test_decode_round_trip(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_decode_matches_openai_spacing(tok):
  # OpenAI's decode turns every '</w>' into a space, so punctuation that was
  # its own pre-token comes back space-separated; we only strip the ends.
  assert tok.decode(tok.encode("a photo of a dog.")) == "a photo of a dog ."
  assert tok.decode([49406, 320, 1929, 49407]) == "<|startoftext|>a dog <|endoftext|>"
  with pytest.raises(ValueError, match="49408"):
    tok.decode([49408])


# ------------------------------------------------------------ save / loaders


def test_save_writes_openai_form(tok, bpe_path, tmp_path):
  saved = tok.save(tmp_path)
  original = gzip.open(bpe_path).read().decode("utf-8").split("\n")
  written = gzip.open(saved).read().decode("utf-8").split("\n")
  # Same header and the 48894 merges CLIP uses, i.e. a prefix of the original.
  assert written[:-1] == original[:48895] and written[-1] == ""
  first = saved.read_bytes()
  tok.save(tmp_path)
  assert saved.read_bytes() == first  # reproducible bytes (gzip mtime 0)
  assert [p.name for p in tmp_path.iterdir()] == [tk.BPE_FILE_NAME]  # no temp left


def test_save_refuses_non_canonical_ids(hf_dir, tmp_path):
  vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
  vocab["a</w>"], vocab["b</w>"] = vocab["b</w>"], vocab["a</w>"]
  (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  swapped = ClipTokenizer.from_hf_files(tmp_path / "vocab.json", hf_dir / "merges.txt")
  assert swapped.encode("a") == [321]  # the file's ids are used as given
  with pytest.raises(ValueError, match="canonical"):
    swapped.save(tmp_path / "out")


def test_missing_file(tmp_path):
  missing = tmp_path / "nope.txt.gz"
  with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
    ClipTokenizer.from_bpe_file(missing)
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(FileNotFoundError) as e:
    ClipTokenizer.from_hf_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
  assert str(tmp_path / "merges.txt") in str(e.value)
  assert "vocab.json" not in str(e.value)  # only what is actually missing


def test_from_dir_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found.*absent"):
    ClipTokenizer.from_dir(tmp_path / "absent")
  (tmp_path / "vocab.json").write_text("{}")  # half of the HF pair only
  with pytest.raises(FileNotFoundError) as e:
    ClipTokenizer.from_dir(tmp_path)
  msg = str(e.value)
  assert str(tmp_path) in msg
  for name in ("bpe_simple_vocab_16e6.txt.gz", "vocab.json", "merges.txt"):
    assert name in msg


@pytest.mark.parametrize("content", [
    b"this is not gzip data at all",
    gzip.compress(b"header\nt h\n" * 1000)[:-40],  # truncated stream
    gzip.compress(b"\xff\xfe\xfd not utf-8"),
    gzip.compress(b"header\ni n\nthree part line\n"),  # not a merge
    gzip.compress(b"header only\n"),  # no merges
], ids=["not-gzip", "truncated", "not-utf8", "bad-line", "empty"])
def test_corrupt_bpe_file(tmp_path, content):
  path = tmp_path / tk.BPE_FILE_NAME
  path.write_bytes(content)
  with pytest.raises(TokenizerFileError, match=re.escape(str(path))):
    ClipTokenizer.from_bpe_file(path)
  with pytest.raises(TokenizerFileError, match=re.escape(str(path))):
    ClipTokenizer.from_dir(tmp_path)


def test_corrupt_hf_files(hf_dir, tmp_path):
  bad_json = tmp_path / "vocab.json"
  bad_json.write_text('{"a": 1,', encoding="utf-8")
  with pytest.raises(TokenizerFileError, match="vocab.json"):
    ClipTokenizer.from_hf_files(bad_json, hf_dir / "merges.txt")
  bad_merges = tmp_path / "merges.txt"
  bad_merges.write_text("#version: 0.2\nzz qq\n", encoding="utf-8")
  with pytest.raises(TokenizerFileError, match="merges.txt.*missing"):
    ClipTokenizer.from_hf_files(hf_dir / "vocab.json", bad_merges)
  # A vocabulary without the special tokens cannot tokenize for CLIP.
  vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
  del vocab["<|endoftext|>"]
  bad_json.write_text(json.dumps(vocab), encoding="utf-8")
  with pytest.raises(TokenizerFileError, match="endoftext"):
    ClipTokenizer.from_hf_files(bad_json, hf_dir / "merges.txt")


def test_small_custom_vocabulary(tmp_path):
  """A short merge file (trailing newline, '#' merge) loads without OpenAI's '' merge."""
  path = tmp_path / "tiny.txt.gz"
  path.write_bytes(gzip.compress("#version: 0.2\nc a\nca t</w>\n# #</w>\n".encode()))
  t = ClipTokenizer.from_bpe_file(path)
  assert t.vocab_size == 512 + 3 + 2
  assert (t.sot_token, t.eot_token) == (515, 516)
  assert t.encode("cat ##") == [512 + 1, 512 + 2]  # 'cat</w>', '##</w>'
  assert eot_positions(t.tokenize("cat"), eot_token=t.eot_token).tolist() == [2]
