"""Checkpoint loading, the project's store, and the convert / predict command lines."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")

from mmap_jax.checkpoints import convert as convert_cli  # noqa: E402
from mmap_jax import predict as predict_cli  # noqa: E402
from mmap_jax import checkpoints  # noqa: E402
from mmap_jax.checkpoints import (CheckpointError, from_huggingface, from_openai,  # noqa: E402
                                  naming, store)
from mmap_jax.models import clip  # noqa: E402
from mmap_jax.prompts.base import PromptTokens  # noqa: E402
from mmap_jax.tokenizer import ClipTokenizer  # noqa: E402
from tests.test_clip_parity import (TINY, encode_image, encode_text, hf_to_openai,  # noqa: E402
                                    make_hf_model, save_torchscript, write_hf_tokenizer_files)

REPO = pathlib.Path(__file__).resolve().parents[1]


def flat(params) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in naming.flatten(params).items()}


def assert_same_params(a, b) -> None:
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bpe_path):
  """A tiny perturbed CLIPModel as an HF directory (with vocab.json + merges.txt) and its
  OpenAI-layout torch state dict."""
  root = tmp_path_factory.mktemp("ckpt")
  model = make_hf_model(TINY, seed=3)
  model.save_pretrained(root / "hf")
  write_hf_tokenizer_files(bpe_path, root / "hf")
  sd = hf_to_openai(model.state_dict(), 2, 2)
  torch.save(sd, root / "openai.pt")
  return {"root": root, "hf": root / "hf", "openai": root / "openai.pt", "sd": sd,
          "params": from_huggingface.load(root / "hf").params}


def copy_hf(tiny, dst: pathlib.Path, edit=None, config_edit=None) -> pathlib.Path:
  """The tiny HF directory with its tensors / config.json edited."""
  shutil.copytree(tiny["hf"], dst)
  if edit is not None:
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
  if config_edit is not None:
    config = json.loads((dst / "config.json").read_text())
    config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
  return dst


# ----------------------------------------------------------------------------- dtypes

def test_fp16_huggingface_is_cast_to_float32(tiny, tmp_path):
  half = copy_hf(tiny, tmp_path / "fp16", edit=lambda t: t.update(
      {k: v.astype(np.float16) for k, v in t.items()}))
  loaded = from_huggingface.load(half)
  assert loaded.source["dtypes"] == ["F16"]
  leaves = flat(loaded.params)
  assert {v.dtype for v in leaves.values()} == {np.dtype(np.float32)}
  rounded = flat(tiny["params"])
  for k in leaves:
    np.testing.assert_array_equal(leaves[k], rounded[k].astype(np.float16).astype(np.float32), k)


def test_fp16_torchscript_and_bf16_state_dict_are_cast(tiny, tmp_path):
  save_torchscript(tiny["sd"], tmp_path / "fp16.pt", dtype=torch.float16, image_size=32)
  torch.save({k: v.to(torch.bfloat16) for k, v in tiny["sd"].items()}, tmp_path / "bf16.pt")
  reference = flat(tiny["params"])
  for name, fmt, dtype in (("fp16.pt", "openai-torchscript", torch.float16),
                           ("bf16.pt", "state-dict-torch", torch.bfloat16)):
    loaded = from_openai.load(tmp_path / name)
    assert loaded.source["format"] == fmt
    assert loaded.source["dtypes"] == [str(dtype).replace("torch.", "")]
    for k, v in flat(loaded.params).items():
      assert v.dtype == np.float32, k
      expected = torch.from_numpy(reference[k]).to(dtype).float().numpy()
      np.testing.assert_array_equal(v, expected, err_msg=f"{name}: {k}")


# ----------------------------------------------------------------------------- loader errors

def test_missing_key_is_named(tiny, tmp_path):
  key = "vision_model.encoder.layers.1.mlp.fc2.bias"
  d = copy_hf(tiny, tmp_path / "missing", edit=lambda t: t.pop(key))
  with pytest.raises(CheckpointError) as e:
    from_huggingface.load(d)
  msg = str(e.value)
  assert "missing keys (1)" in msg and f"'{key}' (expected shape (128,))" in msg, msg
  assert str(d / "model.safetensors") in msg


def test_unexpected_key_is_named(tiny, tmp_path):
  key = "text_model.encoder.layers.0.self_attn.rotary.weight"
  d = copy_hf(tiny, tmp_path / "extra",
              edit=lambda t: t.update({key: np.ones((3, 5), np.float32)}))
  with pytest.raises(CheckpointError) as e:
    from_huggingface.load(d)
  assert f"unexpected keys (1):\n    '{key}' with shape (3, 5)" in str(e.value), str(e.value)


def test_known_buffers_are_skipped(tiny, tmp_path):
  d = copy_hf(tiny, tmp_path / "buffers", edit=lambda t: t.update({
      "text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None],
      "vision_model.embeddings.position_ids": np.arange(17, dtype=np.int64)[None]}))
  assert_same_params(from_huggingface.load(d).params, tiny["params"])


def test_wrong_shape_is_named(tiny, tmp_path):
  key = "text_model.encoder.layers.1.mlp.fc1.weight"
  d = copy_hf(tiny, tmp_path / "shape",
              edit=lambda t: t.update({key: np.zeros((512, 100), np.float32)}))
  with pytest.raises(CheckpointError) as e:
    from_huggingface.load(d)
  assert f"'{key}': expected (512, 128), found (512, 100)" in str(e.value), str(e.value)


def test_truncated_files_are_named(tiny, tmp_path):
  d = copy_hf(tiny, tmp_path / "truncated")
  weights = d / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
    from_huggingface.load(d)
  assert str(weights) in str(e.value)
  pt = tmp_path / "truncated.pt"
  pt.write_bytes(tiny["openai"].read_bytes()[:100_000])
  with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
    from_openai.load(pt)
  assert str(pt) in str(e.value)


def test_config_that_contradicts_the_weights(tiny, tmp_path):
  d = copy_hf(tiny, tmp_path / "cfg", config_edit=lambda c: c["vision_config"].update(
      hidden_size=256))
  with pytest.raises(CheckpointError, match=r"vision_config.hidden_size=256 but the weights say "
                     r"128 \(vision_model.embeddings.patch_embedding.weight"):
    from_huggingface.load(d)


def test_hf_activation_and_unsupported_models(tiny, tmp_path):
  def act(name):
    return lambda c: [c[t].update(hidden_act=name) for t in ("vision_config", "text_config")]
  gelu = from_huggingface.load(copy_hf(tiny, tmp_path / "gelu", config_edit=act("gelu")))
  assert gelu.cfg.activation == "gelu"
  with pytest.raises(CheckpointError, match="unsupported vision_config.hidden_act='gelu_new'"):
    from_huggingface.load(copy_hf(tiny, tmp_path / "gelu_new", config_edit=act("gelu_new")))
  with pytest.raises(CheckpointError, match="unsupported model_type 'modernbert'"):
    from_huggingface.load(copy_hf(tiny, tmp_path / "mb",
                                  config_edit=lambda c: c.update(model_type="modernbert")))


def test_resnet_and_hf_layout_state_dicts_are_refused(tiny, tmp_path):
  resnet = dict(tiny["sd"])
  del resnet["visual.conv1.weight"]
  resnet["visual.layer1.0.conv1.weight"] = torch.zeros(4, 4, 1, 1)
  resnet["visual.attnpool.positional_embedding"] = torch.zeros(5, 4)
  torch.save(resnet, tmp_path / "rn50.pt")
  with pytest.raises(CheckpointError, match="unsupported: ResNet image tower") as e:
    from_openai.load(tmp_path / "rn50.pt")
  assert str(tmp_path / "rn50.pt") in str(e.value)
  torch.save({"vision_model.embeddings.class_embedding": torch.zeros(4)}, tmp_path / "hf.pt")
  with pytest.raises(CheckpointError, match="Hugging Face CLIP state dict"):
    from_openai.load(tmp_path / "hf.pt")


def test_openai_missing_block_is_named(tiny, tmp_path):
  sd = {k: v for k, v in tiny["sd"].items() if not k.startswith("transformer.resblocks.0.")}
  torch.save(sd, tmp_path / "gap.pt")
  with pytest.raises(CheckpointError, match=r"missing keys \(12\)") as e:
    from_openai.load(tmp_path / "gap.pt")
  assert "'transformer.resblocks.0.attn.in_proj_weight' (expected shape (384, 128))" in str(e.value)


class _NotATensor:
  """Pickled by reference: only an unrestricted unpickler would import and build it."""


def test_pickles_beyond_tensors_are_refused(tiny, tmp_path):
  torch.save({"state_dict": tiny["sd"], "extra": _NotATensor()}, tmp_path / "pickle.pt")
  with pytest.raises(CheckpointError, match=r"weights_only=True") as e:
    from_openai.load(tmp_path / "pickle.pt")
  assert str(tmp_path / "pickle.pt") in str(e.value)


def test_torch_is_needed_only_for_torch_files(tiny, tmp_path, monkeypatch):
  loaded = from_huggingface.load(tiny["hf"])
  converted = store.save(tmp_path / "store", loaded.cfg, loaded.params,
                         ClipTokenizer.from_dir(tiny["hf"]))
  monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` now raises ImportError
  with pytest.raises(CheckpointError, match=r"needs torch, which is not installed; install it"):
    from_openai.load(tiny["openai"])
  assert_same_params(from_huggingface.load(tiny["hf"]).params, tiny["params"])
  assert_same_params(store.load(converted)[1], tiny["params"])


def test_sharded_huggingface_checkpoint(tiny, tmp_path):
  model = make_hf_model(TINY, seed=3)
  model.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
  index = tmp_path / "sharded" / "model.safetensors.index.json"
  assert index.is_file() and not (tmp_path / "sharded" / "model.safetensors").exists()
  assert_same_params(from_huggingface.load(tmp_path / "sharded").params, tiny["params"])
  meta = json.loads(index.read_text())
  shards = sorted(set(meta["weight_map"].values()))
  assert len(shards) > 1
  key = next(k for k, v in meta["weight_map"].items() if v == shards[0])
  meta["weight_map"][key] = shards[1]
  index.write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match=f"weight_map puts '{key}' in {shards[1]}"):
    from_huggingface.load(tmp_path / "sharded")


def test_load_pretrained_dispatches_on_the_path(tiny, tmp_path):
  assert checkpoints.load_pretrained(tiny["hf"]).source["format"] == "huggingface"
  assert checkpoints.load_pretrained(tiny["openai"]).source["format"] == "state-dict-torch"
  with pytest.raises(CheckpointError, match="checkpoint not found"):
    checkpoints.load_pretrained(tmp_path / "nothing.pt")
  with pytest.raises(CheckpointError, match="no config.json"):
    checkpoints.load_pretrained(tmp_path)


# ----------------------------------------------------------------------------- store

def test_store_round_trip(tiny, tmp_path, bpe_path):
  loaded = from_huggingface.load(tiny["hf"])
  tok = ClipTokenizer.from_bpe_file(bpe_path)
  out = store.save(tmp_path / "clip", loaded.cfg, loaded.params, tok, source=loaded.source)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]     # no temporary leftovers
  cfg, params, tok2 = store.load(out)
  assert cfg == loaded.cfg
  assert_same_params(params, loaded.params)
  texts = ["a photo of a dog.", "Ünïcode &amp; “quotes”"]
  np.testing.assert_array_equal(tok2.tokenize(texts), tok.tokenize(texts))
  meta = json.loads((out / "clip.json").read_text())
  assert meta["format_version"] == 1 and meta["source"]["format"] == "huggingface"
  assert meta["param_count"] == clip.count_params(params)
  with pytest.raises(CheckpointError, match="already exists"):
    store.save(out, cfg, params, tok)
  store.save(out, cfg, params, tok, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]


def test_store_errors_name_the_file(tiny, tmp_path, bpe_path):
  loaded = from_huggingface.load(tiny["hf"])
  tok = ClipTokenizer.from_bpe_file(bpe_path)
  with pytest.raises(CheckpointError, match=r"'visual/proj': expected \(128, 64\), found \(3,\)"):
    bad = dict(loaded.params, visual=dict(loaded.params["visual"], proj=np.zeros(3, np.float32)))
    store.save(tmp_path / "bad", loaded.cfg, bad, tok)
  assert not (tmp_path / "bad").exists()
  out = store.save(tmp_path / "clip", loaded.cfg, loaded.params, tok)

  def broken(name, edit):
    d = tmp_path / name
    shutil.copytree(out, d)
    edit(d)
    return d
  d = broken("no_weights", lambda d: (d / "model.safetensors").unlink())
  with pytest.raises(CheckpointError, match=f"not found: {d / 'model.safetensors'}"):
    store.load(d)
  d = broken("version", lambda d: (d / "clip.json").write_text(
      (d / "clip.json").read_text().replace('"format_version": 1', '"format_version": 99')))
  with pytest.raises(CheckpointError, match=f"{d / 'clip.json'}: format_version 99"):
    store.load(d)

  def reshape(d):
    t = load_file(str(d / "model.safetensors"))
    t["text/ln_final/scale"] = np.ones(5, np.float32)
    save_file(t, str(d / "model.safetensors"))
  d = broken("shape", reshape)
  with pytest.raises(CheckpointError, match=r"'text/ln_final/scale': expected \(128,\), found"):
    store.load(d)
  d = broken("no_tokenizer", lambda d: (d / "bpe_simple_vocab_16e6.txt.gz").unlink())
  with pytest.raises(CheckpointError, match=f"{d}: cannot load the tokenizer"):
    store.load(d)
  with pytest.raises(CheckpointError, match="not a converted CLIP checkpoint"):
    store.load(tiny["hf"])


# ----------------------------------------------------------------------------- command lines

def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def test_convert_function(tiny, tmp_path, bpe_path):
  lines = []
  result = convert_cli.convert(tiny["hf"], tmp_path / "from_hf", log=lines.append)
  text = "\n".join(lines)
  assert "architecture: ViT image 32px patch 8 width 128 layers 2 heads 2; text width 128" in text
  assert f"parameters: {result.param_count:,}" in text
  assert result.param_count == clip.count_params(tiny["params"])
  with pytest.raises(CheckpointError, match="carries no vocabulary; pass --tokenizer="):
    convert_cli.convert(tiny["openai"], tmp_path / "no_tok", log=lines.append)
  assert not (tmp_path / "no_tok").exists()
  convert_cli.convert(tiny["openai"], tmp_path / "from_pt", tokenizer=str(bpe_path),
                      log=lines.append)
  cfg_hf, params_hf, tok_hf = store.load(tmp_path / "from_hf")
  cfg_pt, params_pt, tok_pt = store.load(tmp_path / "from_pt")
  assert cfg_hf == cfg_pt
  assert_same_params(params_hf, params_pt)
  np.testing.assert_array_equal(tok_hf.tokenize("a photo of a cat."),
                                tok_pt.tokenize("a photo of a cat."))
  with pytest.raises(CheckpointError, match="already exists"):
    convert_cli.convert(tiny["hf"], tmp_path / "from_hf", log=lines.append)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
  """`python -m launch.convert` as a user runs it."""
  out = tmp_path_factory.mktemp("cli") / "tiny_clip"
  proc = subprocess.run([sys.executable, "-m", "launch.convert", f"--src={tiny['hf']}",
                         f"--out={out}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "architecture: ViT image 32px" in proc.stdout and "parameters:" in proc.stdout
  return out


def _write_images(directory: pathlib.Path, sizes=((48, 40), (30, 64))) -> list[pathlib.Path]:
  from PIL import Image
  rng = np.random.RandomState(0)
  paths = []
  for i, (h, w) in enumerate(sizes):
    p = directory / f"img{i}.png"
    Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
    paths.append(p)
  return paths


@pytest.mark.slow
def test_predict_command_line(converted, tmp_path):
  images = _write_images(tmp_path)
  proc = subprocess.run([sys.executable, "-m", "launch.predict", f"--clip={converted}",
                         "--classes=cat,dog,hot_air_balloon", "--json", *map(str, images)],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout)
  assert [r["image"] for r in results] == [str(p) for p in images]
  for r in results:
    probs = r["probabilities"]
    assert list(probs) == ["cat", "dog", "hot_air_balloon"]
    assert abs(sum(probs.values()) - 1) < 1e-5 and all(0 <= p <= 1 for p in probs.values())
    assert r["top"] == max(probs, key=probs.get)


@pytest.mark.slow   # `converted` runs launch.convert
def test_predict_matches_direct_computation(converted, tmp_path):
  """Batch padding and prompt plumbing do not change the numbers."""
  images = _write_images(tmp_path, sizes=((48, 40), (30, 64), (32, 32)))
  classes = ["cat", "dog", "bird"]
  padded = predict_cli.predict_files(converted, classes, images, batch_size=2)   # 2 + (1 + pad)
  cfg, params, tok = store.load(converted)
  pixels = np.stack([predict_cli.load_image(p, cfg.vision.image_size) for p in images])
  ids = tok.tokenize([f"a photo of a {c}." for c in classes])
  img = encode_image(params, cfg, pixels)
  txt = encode_text(params, cfg, clip.embed_tokens(params, ids), clip.eot_positions(ids))
  logits = np.asarray(clip.similarity_logits(params, img, txt), np.float64)
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  got = np.array([[r["probabilities"][c] for c in classes] for r in padded])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # Learned prompts (as the trainer will pass them) go through the same classifier.
  rng = np.random.RandomState(1)
  prompts = PromptTokens(text=0.02 * rng.randn(2, 4, cfg.text.width).astype(np.float32),
                         visual=0.02 * rng.randn(2, 3, cfg.vision.width).astype(np.float32))
  classifier = predict_cli.build_classifier(params, cfg, tok, classes, prompts)
  probs = predict_cli.classify(classifier, pixels)
  assert probs.shape == (3, 3) and np.allclose(probs.sum(-1), 1, atol=1e-5)
  assert not np.allclose(probs, expected, atol=1e-4)
