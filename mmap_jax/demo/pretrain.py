"""Contrastive pretraining of the demo's own small CLIP on procedurally drawn image-caption pairs.

Prompt tuning only means something on a *pretrained* frozen CLIP, and no real CLIP weights can be
downloaded here, so the embedded demo brings its own: a tiny CLIP (the "demo" variant) trained
with CLIP's symmetric InfoNCE loss and learnable temperature on `demo_world`'s pretraining stream.
That stream deliberately differs from the downstream demo domains (other rendering styles, held-out
object/style combinations), so zero-shot transfer is above chance but imperfect, as with real CLIP
on Office-Home. Everything is the project's machinery: the same encoders (`models.clip`), the
sharded jitted step (`train.step`), the Orbax checkpointer (resumable), the trainer's step-loop
cadence (`train.cadence`: log / eval / checkpoint steps, progress lines with rate and ETA,
TensorBoard scalars in <workdir>/tensorboard, SIGTERM agreed by all processes), and
`checkpoints.store` for the result.

  pretrain(config, workdir, out=...)      -> the output CLIP directory (+ pretrain_report.json)
  launch(config, workdir=, vocab=, out=)  -> the same, as `python -m launch.pretrain` runs it
  zero_shot_accuracy(cfg, params, ...)    -> accuracy per downstream demo domain
  ensure_demo_clip(path, vocab_path=...)  -> the committed mmap_jax/assets/demo_clip, or builds it
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from mmap_jax import parallel, paths, resources
from mmap_jax.checkpoints import store
from mmap_jax.checkpoints.errors import CheckpointError
from mmap_jax.demo import world as demo_world
from mmap_jax.demo import world_v2
from mmap_jax.data.preprocess import CLIP_MEAN, CLIP_STD, eval_pixels, random_resized_crop_box
from mmap_jax.models import clip
from mmap_jax.models.config import ClipConfig, get_variant
from mmap_jax.tokenizer import ClipTokenizer
from mmap_jax.train import cadence as cadence_lib, optim as optim_lib
from mmap_jax.train.checkpointing import Checkpointer
from mmap_jax.train.report import ScalarWriter
from mmap_jax.train.step import init_state, make_train_step

Params = dict[str, Any]

# CLIP clamps its learned temperature at 1/100.
MAX_LOGIT_SCALE = math.log(100.0)
ZERO_SHOT_TEMPLATE = "a photo of a {}."
REPORT_FILE = "pretrain_report.json"
DRAW_SIZE = 64  # demo_world draws at the demo tree's size; the model's input size may differ
DEFAULT_DEMO_CLIP = resources.demo_clip_dir()

_STREAM_TAG = 0x50C1   # seed-stream tags of this module's drawn pairs and their augmentation
_AUGMENT_TAG = 0x50C2
# Semantically neutral caption additions: they vary caption length (so positional embeddings
# beyond the shortest captions get trained, which prompt learning relies on) without changing
# what a caption says.
_CAPTION_PREFIXES = ("here is", "look at", "this image shows", "in the picture:", "we see")
_CAPTION_SUFFIXES = ("centered", "close-up", "high quality", "in the middle of the frame",
                     "low resolution", "small image", "seen in full")


WORLDS = {1: demo_world, 2: world_v2}   # data.world -> the module drawing pairs and eval images


def world_module(version: int):
  """The demo world `data.world` names (1: `world`, 10 classes; 2: `world_v2`, 24 classes)."""
  if version not in WORLDS:
    raise ValueError(f"data.world={version!r}; known worlds: {sorted(WORLDS)}")
  return WORLDS[version]


# ----------------------------------------------------------------------------- config

def default_config() -> mlc.ConfigDict:
  """The recipe that produced mmap_jax/assets/demo_clip (configs/demo_pretrain.py wraps it)."""
  c = mlc.ConfigDict()
  c.seed = 0
  c.vocab = mlc.FieldReference(None, field_type=str)  # CLIP BPE gz; always given by the caller
  c.clip = mlc.ConfigDict()
  c.clip.variant = "demo_v2"       # 64 image tokens, 6 layers per tower
  c.clip.layers = mlc.FieldReference(None, field_type=int)  # override both towers' depth

  c.data = mlc.ConfigDict()
  c.data.world = 2                # which demo world's pairs (and zero-shot eval images)
  c.data.batch_size = 256         # global; the in-batch negatives of the contrastive loss
  c.data.text_length = 24         # tokens per caption (longer ones are cut, EOT kept)
  c.data.reuse = 1                # >1: each drawn pair serves that many steps (hurts: data-hungry)
  c.data.crop_scale_min = 0.6     # RandomResizedCrop area range [min, 1]; 1 disables it
  c.data.caption_extra_prob = 0.3  # chance of a neutral prefix / suffix on a caption
  c.data.workers = 0              # 0: one drawing thread; N: N drawing processes
  c.data.prefetch = 4             # units drawn ahead

  c.optim = mlc.ConfigDict()
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 200
  c.optim.weight_decay = 0.1      # on matrices only (CLIP: no decay on gains, biases, scale)
  c.optim.b2 = 0.98
  c.optim.grad_clip = 1.0

  c.train = mlc.ConfigDict()
  # 155.5 GFLOP per step (XLA cost analysis); 2000 steps took 97 min on 2 CPU cores, within issue
  # 25's 2 h rebuild bound (the asset's pretrain_report.json, train_loop_seconds_all_pieces).
  c.train.steps = 2000
  c.train.log_every = 25
  c.train.eval_every = 500        # zero-shot evaluation (always at the end; 0: only then)
  c.train.ckpt_every = 250
  c.train.keep_checkpoints = 2

  c.eval = mlc.ConfigDict()
  c.eval.seed = 90210             # its own seed: never the demo tree's images
  c.eval.per_class = 30           # images per class and domain
  c.eval.batch_size = 256
  c.eval.template = ZERO_SHOT_TEMPLATE

  c.zero_unused_tokens = True     # store never-trained token rows as 0 (see _finalize_params)
  return c


def clip_config(config: mlc.ConfigDict) -> ClipConfig:
  """The architecture a config pretrains: a named variant, optionally with other depths."""
  cfg = get_variant(config.clip.variant)
  layers = config.clip.get("layers")
  if layers:
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, layers=int(layers)),
                              text=dataclasses.replace(cfg.text, layers=int(layers)))
  return cfg


# ----------------------------------------------------------------------------- loss

def contrastive_loss(image_features: jax.Array, text_features: jax.Array,
                     logit_scale: jax.Array) -> tuple[jax.Array, dict]:
  """CLIP's symmetric InfoNCE over a batch of matching pairs: row i of each is a positive pair.

  The learned temperature is clamped at 1/100 as in CLIP (no gradient beyond it).
  """
  img, txt = clip.normalize(image_features), clip.normalize(text_features)
  scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
  logits = scale * img @ txt.T
  labels = jnp.arange(logits.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  loss = 0.5 * (ce(logits, labels).mean() + ce(logits.T, labels).mean())
  aux = {"i2t_acc": jnp.mean(jnp.argmax(logits, 1) == labels),
         "t2i_acc": jnp.mean(jnp.argmax(logits, 0) == labels),
         "logit_scale": scale}
  return loss, aux


def images_to_input(images: jax.Array) -> jax.Array:
  """uint8 NHWC -> CLIP-normalised float32 (on device: 4x less to transfer than floats)."""
  mean = jnp.asarray(CLIP_MEAN, jnp.float32) * 255.0
  std = jnp.asarray(CLIP_STD, jnp.float32) * 255.0
  return (images.astype(jnp.float32) - mean) / std


def make_loss_fn(cfg: ClipConfig):
  """loss_fn(learned, frozen, batch) for `train.step`: the whole CLIP is learned, nothing frozen."""

  def loss_fn(params, frozen, batch):
    del frozen
    image_features = clip.encode_image(params, cfg, images_to_input(batch["images"]))
    text_features = clip.encode_text(params, cfg, clip.embed_tokens(params, batch["tokens"]),
                                     batch["eot"])
    return contrastive_loss(image_features, text_features, params["logit_scale"])

  return loss_fn


def make_optimizer(optim: mlc.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW as CLIP: clipped, warm-up + cosine, weight decay on >= 2-D params only."""
  schedule = optim_lib.learning_rate_schedule(optim, total_steps)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
  parts.append(optax.adamw(schedule, b2=float(optim.b2), weight_decay=float(optim.weight_decay),
                           mask=decay_mask))
  return optax.chain(*parts)


# `clip.init_params` as one jitted program (eagerly it is hundreds of separate compiles).
_init_params = jax.jit(clip.init_params, static_argnums=1)


@functools.lru_cache(maxsize=8)
def _compiled_step(cfg: ClipConfig, optim_items: tuple, total_steps: int):
  optimizer = make_optimizer(mlc.ConfigDict(dict(optim_items)), total_steps)
  return optimizer, make_train_step(make_loss_fn(cfg), optimizer)


def train_step_for(config: mlc.ConfigDict):
  """(architecture, optimizer, jitted `train.step` step) of a config; cached per recipe, so
  repeated runs in one process (tests, resumes) compile once."""
  cfg = clip_config(config)
  optimizer, step = _compiled_step(cfg, tuple(sorted(config.optim.to_dict().items())),
                                   int(config.train.steps))
  return cfg, optimizer, step


def initial_state(config: mlc.ConfigDict, cfg: ClipConfig,
                  optimizer: optax.GradientTransformation, mesh) -> dict:
  """Fresh CLIP parameters (seeded) and optimizer state, replicated over the mesh."""
  params = _init_params(jax.random.key(int(config.seed)), cfg)
  return parallel.replicate(init_state(params, optimizer), mesh)


# ----------------------------------------------------------------------------- data

def _vary_caption(caption: str, rng: np.random.Generator, prob: float) -> str:
  if rng.random() < prob:
    caption = f"{_CAPTION_PREFIXES[int(rng.integers(len(_CAPTION_PREFIXES)))]} {caption}"
  if rng.random() < prob:
    caption = f"{caption}, {_CAPTION_SUFFIXES[int(rng.integers(len(_CAPTION_SUFFIXES)))]}"
  return caption


def _train_pixels(image: np.ndarray, rng: np.random.Generator, size: int,
                  scale_min: float) -> np.ndarray:
  """RandomResizedCrop(size, (scale_min, 1)) of a drawn image; the eval transform if disabled."""
  if scale_min >= 1.0:
    return _eval_pixels(image, size)
  h, w = image.shape[:2]
  box = random_resized_crop_box(w, h, rng, (scale_min, 1.0), (3 / 4, 4 / 3))
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC, box=box))


def _eval_pixels(image: np.ndarray, size: int) -> np.ndarray:
  """CLIP's eval resize (what the demo's input pipeline does to its 64 px images)."""
  return image if image.shape[:2] == (size, size) else eval_pixels(Image.fromarray(image), size)


def draw_unit(seed: int, unit: int, n: int, draw_size: int = DRAW_SIZE,
              world: int = 1) -> tuple[np.ndarray, list[str]]:
  """The `n` pairs of rendering unit `unit`: uint8 [n, draw_size, draw_size, 3] and captions.

  A pure function of (seed, unit, world), one generator per pair. Pairs are the world's (its
  styles, captions and held-out combinations), drawn at the demo tree's size.
  """
  w = world_module(world)
  images = np.empty((n, draw_size, draw_size, 3), np.uint8)
  captions = []
  for j in range(n):
    spec_rng = np.random.default_rng([_STREAM_TAG, seed, unit, j])
    spec = w.pretraining_spec(spec_rng)
    images[j] = w.render(spec.obj, spec.color, spec.style, spec_rng, draw_size)
    captions.append(spec.caption)
  return images, captions


def batch_units(step: int, reuse: int) -> range:
  """Batch `step` is made of units step .. step+reuse-1, so every unit (drawn once) serves
  `reuse` consecutive steps, each time with a fresh crop and caption variation."""
  return range(step, step + reuse)


def assemble_batch(seed: int, step: int, units: Sequence[tuple[np.ndarray, list[str]]],
                   size: int, *, crop_scale_min: float = 1.0,
                   caption_extra_prob: float = 0.0) -> tuple[np.ndarray, list[str]]:
  """Batch `step` from its drawn units: a random resized crop to the model's `size` and neutral
  caption additions per example, from a generator of (seed, step, position)."""
  drawn = np.concatenate([u[0] for u in units])
  base = [c for u in units for c in u[1]]
  images = np.empty((len(drawn), size, size, 3), np.uint8)
  captions = []
  for i, (image, caption) in enumerate(zip(drawn, base)):
    rng = np.random.default_rng([_AUGMENT_TAG, seed, step, i])
    images[i] = _train_pixels(image, rng, size, crop_scale_min)
    captions.append(_vary_caption(caption, rng, caption_extra_prob))
  return images, captions


def render_batch(seed: int, step: int, batch_size: int, size: int, *, reuse: int = 1,
                 crop_scale_min: float = 1.0, caption_extra_prob: float = 0.0,
                 world: int = 1) -> tuple[np.ndarray, list[str]]:
  """Pretraining batch `step` for `seed` (what `PairStream` yields), computed in one go."""
  units = [draw_unit(seed, u, _unit_size(batch_size, reuse), DRAW_SIZE, world)
           for u in batch_units(step, reuse)]
  return assemble_batch(seed, step, units, size, crop_scale_min=crop_scale_min,
                        caption_extra_prob=caption_extra_prob)


def _unit_size(batch_size: int, reuse: int) -> int:
  if reuse < 1 or batch_size % reuse:
    raise ValueError(f"data.reuse={reuse} must be >= 1 and divide data.batch_size={batch_size}")
  return batch_size // reuse


class CaptionTokenizer:
  """Caption -> token row; the pretraining captions come from a small set, so this is a dict hit."""

  def __init__(self, tokenizer: ClipTokenizer, length: int):
    self._tokenizer, self._length = tokenizer, length
    self._rows: dict[str, np.ndarray] = {}

  def __call__(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for c in captions:
      row = self._rows.get(c)
      if row is None:
        row = self._rows[c] = self._tokenizer.tokenize(c, context_length=self._length)[0]
      rows.append(row)
    tokens = np.stack(rows)
    return tokens, clip.eot_positions(tokens, self._tokenizer.eot_token)


class PairStream:
  """Batches `start, start+1, ...` of the stream; units are drawn ahead in the background.

  Drawing is numpy/PIL work holding the GIL, and XLA's CPU step runs without it on about one
  core, so one background thread (`workers=0`) overlaps them. `workers > 0` draws in that many
  spawned processes instead, for machines with cores to spare (the main module must then be
  import-safe, as for any spawn-based loader). The cheap crops and tokenization happen here.
  Each batch depends on (seed, step) alone, so neither the workers nor the resume point change
  what a step sees.
  """

  def __init__(self, config: mlc.ConfigDict, tokenizer: ClipTokenizer, image_size: int,
               start: int):
    d = config.data
    self._seed, self._size = int(config.seed), image_size
    self._reuse = int(d.reuse)
    self._world = int(d.get("world", 1))
    self._unit_size = _unit_size(int(d.batch_size), self._reuse)
    self._crop, self._extra = float(d.crop_scale_min), float(d.caption_extra_prob)
    self._tokens = CaptionTokenizer(tokenizer, int(d.text_length))
    workers = int(d.workers)
    # spawn, not fork: forking a process that already runs XLA's threads is unsafe.
    self._pool = (concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")) if workers > 0 else
                  concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pretrain-draw"))
    self._prefetch = max(1, int(d.prefetch))
    self._step = start
    self._units: dict[int, Any] = {}   # unit -> Future, then its drawn result
    self.render_seconds = 0.0   # time spent drawing, summed over workers
    self.wait_seconds = 0.0     # time the training loop waited for drawn units

  def _request(self, unit: int) -> None:
    if unit not in self._units:
      self._units[unit] = self._pool.submit(_timed, draw_unit, self._seed, unit, self._unit_size,
                                            DRAW_SIZE, self._world)

  def _drawn(self, unit: int) -> tuple[np.ndarray, list[str]]:
    job = self._units[unit]
    if isinstance(job, concurrent.futures.Future):   # first use: count its drawing time once
      timed = job.result()
      self.render_seconds += timed.seconds
      job = self._units[unit] = timed.value
    return job

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    step = self._step
    needed = batch_units(step, self._reuse)
    for unit in range(needed.start, needed.stop + self._prefetch):
      self._request(unit)
    t = time.perf_counter()
    units = [self._drawn(u) for u in needed]
    self.wait_seconds += time.perf_counter() - t
    for unit in [u for u in self._units if u <= step]:
      del self._units[unit]   # later batches start at step + 1
    images, captions = assemble_batch(self._seed, step, units, self._size,
                                      crop_scale_min=self._crop, caption_extra_prob=self._extra)
    tokens, eot = self._tokens(captions)
    self._step += 1
    return {"images": images, "tokens": tokens, "eot": eot}

  def close(self) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)


class _Timed(NamedTuple):
  value: Any
  seconds: float


def _timed(fn, *args) -> _Timed:
  t = time.perf_counter()
  return _Timed(fn(*args), time.perf_counter() - t)


# ----------------------------------------------------------------------------- zero-shot

def zero_shot_eval_set(seed: int, per_class: int, size: int,
                       domains: Sequence[str] = demo_world.DOMAINS, *,
                       draw_size: int = DRAW_SIZE,
                       world: int = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """domain -> (uint8 images [N, size, size, 3], labels [N]): demo-tree images of `world` (drawn
  at `draw_size`, CLIP-resized to `size`) of a seed the demo itself does not use."""
  w = world_module(world)
  out = {}
  for domain in domains:
    images, labels = [], []
    for label, obj in enumerate(w.OBJECTS):
      for i in range(per_class):
        images.append(_eval_pixels(w.tree_image(seed, domain, obj, i, draw_size), size))
        labels.append(label)
    out[domain] = (np.stack(images), np.asarray(labels, np.int32))
  return out


@functools.partial(jax.jit, static_argnums=1)
def _image_embeddings(params: Params, cfg: ClipConfig, images: jax.Array) -> jax.Array:
  return clip.normalize(clip.encode_image(params, cfg, images_to_input(images)))


@functools.partial(jax.jit, static_argnums=1)
def _text_embeddings(params: Params, cfg: ClipConfig, tokens: jax.Array,
                     eot: jax.Array) -> jax.Array:
  return clip.normalize(clip.encode_text(params, cfg, clip.embed_tokens(params, tokens), eot))


def class_text_embeddings(cfg: ClipConfig, params: Params, tokenizer: ClipTokenizer,
                          classes: Sequence[str] = demo_world.OBJECTS,
                          template: str = ZERO_SHOT_TEMPLATE) -> jax.Array:
  tokens = clip.truncate_to_longest(
      tokenizer.tokenize([template.format(c) for c in classes]), tokenizer.eot_token)
  return _text_embeddings(params, cfg, tokens, clip.eot_positions(tokens, tokenizer.eot_token))


def zero_shot_accuracy(cfg: ClipConfig, params: Params, tokenizer: ClipTokenizer,
                       eval_set: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                       template: str = ZERO_SHOT_TEMPLATE, batch_size: int = 256,
                       classes: Sequence[str] = demo_world.OBJECTS) -> dict[str, float]:
  """Top-1 accuracy per domain of classifying by cosine to '<template>' of each object name."""
  text = class_text_embeddings(cfg, params, tokenizer, classes, template=template)
  result = {}
  for domain, (images, labels) in eval_set.items():
    preds = []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      n = len(chunk)
      if n < batch_size:   # one compiled shape: pad the last chunk
        chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
      sims = _image_embeddings(params, cfg, chunk) @ text.T
      preds.append(np.asarray(jnp.argmax(sims, -1))[:n])
    result[domain] = float(np.mean(np.concatenate(preds) == labels))
  return result


# ----------------------------------------------------------------------------- pretraining

def _finalize_params(params: Params, opt_state: Any, zero_unused_tokens: bool) -> Params:
  """Host float32 params as CLIP would ship them.

  The temperature is clamped as during training. Token rows no caption ever used received no
  gradient (their Adam second moment is exactly 0) and are still random noise; with
  `zero_unused_tokens` they are stored as 0, which says the same thing and keeps the committed
  safetensors file highly compressible (the 49408-row table is most of its size).
  """
  params = jax.tree.map(lambda x: np.array(x, np.float32), jax.device_get(params))
  params["logit_scale"] = np.minimum(params["logit_scale"], np.float32(MAX_LOGIT_SCALE))
  if zero_unused_tokens:
    nu = jax.device_get(optax.tree_utils.tree_get(opt_state, "nu"))
    used = np.any(np.asarray(nu["text"]["token_embedding"]["embedding"]) != 0, axis=1)
    params["text"]["token_embedding"]["embedding"][~used] = 0.0
  return params


def _write_output(out: pathlib.Path, cfg: ClipConfig, params: Params, tokenizer: ClipTokenizer,
                  report: dict) -> None:
  """store.save + the report into a staging directory, then one rename into place."""
  out.parent.mkdir(parents=True, exist_ok=True)
  stage = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.stage-"))
  try:
    staged = store.save(stage / "clip", cfg, params, tokenizer,
                        source={"kind": "mmap_jax.pretrain", "variant": report["variant"],
                                "seed": report["seed"], "steps": report["steps"]})
    (staged / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if out.exists():
      os.replace(out, stage / "old")
    os.replace(staged, out)
  finally:
    shutil.rmtree(stage, ignore_errors=True)


def pretrain(config: mlc.ConfigDict, workdir: str | os.PathLike, *,
             out: str | os.PathLike | None = None, progress: bool = False) -> str:
  """Pretrains (or resumes) a CLIP per `config` in `workdir`; writes it to `out` and returns it.

  `out` (default <workdir>/clip) gets the project's CLIP format (store.save) plus
  pretrain_report.json. Deterministic in `config.seed`; interrupted runs resume from the latest
  Orbax checkpoint in <workdir>/checkpoints with the same batches they would have seen. Steps
  follow the trainer's cadence (`train.cadence`): progress lines (also printed with
  `progress`), TensorBoard scalars in <workdir>/tensorboard, and on SIGTERM a checkpoint, then
  `cadence.Preempted` (launch.pretrain exits with status 143, or 130 after Ctrl-C; the same call
  resumes).
  """
  t_start = time.time()
  if not config.vocab:
    raise ValueError("config.vocab must name CLIP's BPE vocabulary "
                     "(bpe_simple_vocab_16e6.txt.gz); pass --vocab=PATH")
  for name, p in (("workdir", workdir), ("out", out)):
    if p is not None and paths.is_uri(p):   # pathlib would make 'gs://b/x' a local 'gs:/b/x'
      raise ValueError(f"{name}={os.fspath(p)!r}: pretraining writes the CLIP store format, "
                       "which is local; give local directories")
  workdir = pathlib.Path(workdir)
  out = pathlib.Path(out) if out is not None else workdir / "clip"
  cfg, optimizer, train_step = train_step_for(config)
  tokenizer = ClipTokenizer.from_bpe_file(config.vocab)
  steps = int(config.train.steps)
  if steps < 1:
    raise ValueError(f"train.steps={steps} must be >= 1")

  mesh = parallel.data_mesh()
  parallel.check_batch_divisible(int(config.data.batch_size), mesh, "data.batch_size")
  batch_sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))
  state = initial_state(config, cfg, optimizer, mesh)

  ckpt = Checkpointer(str(workdir / "checkpoints"), keep=int(config.train.keep_checkpoints))
  start, carried = 0, {}
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(state)
    state, start = restored.state, int(restored.data_state["next_step"])
    carried = restored.data_state   # the curves and loop time of the pieces before this one
    logging.info("pretrain: resumed from step %d of %d", start, steps)
  meta = {"config": config.to_dict(), "variant": config.clip.variant}

  version = int(config.data.get("world", 1))
  world = world_module(version)
  eval_set = zero_shot_eval_set(int(config.eval.seed), int(config.eval.per_class),
                                cfg.vision.image_size, world=version)
  evaluate = lambda params: zero_shot_accuracy(
      cfg, params, tokenizer, eval_set, template=config.eval.template,
      batch_size=int(config.eval.batch_size), classes=world.OBJECTS)
  chance = 1.0 / len(world.OBJECTS)
  schedule = optim_lib.learning_rate_schedule(config.optim, steps)
  # A resumed run's report covers every piece: the checkpoint carries the curves and loop time.
  history = [dict(h) for h in carried.get("history", [])]
  losses = [tuple(x) for x in carried.get("losses", [])]
  earlier_seconds = float(carried.get("loop_seconds", 0.0))
  recent = collections.deque(maxlen=50)   # device scalars: no host sync per step
  stream = PairStream(config, tokenizer, cfg.vision.image_size, start)
  writer = ScalarWriter(str(workdir / "tensorboard"))
  preemption = cadence_lib.Preemption(ckpt.reached_preemption)
  cadence = cadence_lib.Cadence(
      total=steps, start=start, log_every=int(config.train.log_every),
      eval_every=int(config.train.eval_every), ckpt_every=int(config.train.ckpt_every),
      images_per_step=int(config.data.batch_size), writer=writer, preemption=preemption,
      name="pretrain", echo=progress, checkpointer=ckpt,
      save=lambda step: ckpt.save(step, state, {
          "next_step": step, "history": history, "losses": losses,
          "loop_seconds": earlier_seconds + time.time() - t_loop}, meta),
      on_non_finite=lambda step, loss: logging.warning(
          "pretrain step %d: non-finite loss or gradient (%s), update skipped", step, loss))
  t_loop = time.time()
  try:
    for c in cadence.calls():
      done = c.last
      batch = jax.device_put(next(stream), batch_sharding)
      state, metrics = train_step(state, {}, batch)
      cadence.ran(c, metrics)
      recent.append(metrics["loss"])
      if c.log:
        m = jax.device_get(metrics)
        loss, lr = float(m["loss"]), float(schedule(done - 1))
        losses.append((done, loss))
        extra = {"i2t": float(m["i2t_acc"]), "t2i": float(m["t2i_acc"]),
                 "scale": float(m["logit_scale"])}
        cadence.log(done, loss, lr, {"train/loss": loss, "train/lr": lr,
                                     "train/grad_norm": float(m["grad_norm"])}
                    | {f"train/{k}": float(m[k]) for k in ("i2t_acc", "t2i_acc", "logit_scale")},
                    extra=extra)
      if c.eval and done != steps:   # the last step's evaluation is the report's, below
        acc = evaluate(state["learned"])
        history.append({"step": done, **acc})
        writer.scalars(done, _zero_shot_scalars("eval/zero_shot", acc))
        logging.info("pretrain step %d zero-shot: %s", done, _fmt_acc(acc))
      if cadence.after(c):   # checkpoint, hooks, preemption (then saved)
        raise cadence_lib.Preempted(done, ckpt.directory, preemption.exit_code)
  except BaseException:
    writer.close()
    raise
  finally:
    preemption.restore()
    stream.close()
    ckpt.close()
  loop_seconds = time.time() - t_loop
  trained = steps - start

  final = jax.device_get(metrics) if trained else None
  acc = evaluate(state["learned"])
  average = float(np.mean(list(acc.values())))
  writer.scalars(steps, _zero_shot_scalars("final/zero_shot", acc))
  writer.close()
  params = _finalize_params(state["learned"], state["opt_state"], bool(config.zero_unused_tokens))
  report = {
      "variant": config.clip.variant, "world": version, "seed": int(config.seed),
      "steps": steps, "resumed_from_step": start, "batch_size": int(config.data.batch_size),
      "param_count": clip.count_params(params),
      "time_seconds": round(time.time() - t_start, 1),
      "train_loop_seconds": round(loop_seconds, 1),
      "seconds_per_step": round(loop_seconds / max(trained, 1), 4),
      # all pieces of a resumed run: the time to rebuild the asset (plus compiles and evals)
      "train_loop_seconds_all_pieces": round(earlier_seconds + loop_seconds, 1),
      "draw_seconds_per_step": round(stream.render_seconds / max(trained, 1), 4),
      "input_wait_seconds_per_step": round(stream.wait_seconds / max(trained, 1), 4),
      "devices": mesh.devices.size,
      "final_loss": None if final is None else float(final["loss"]),
      "final_loss_mean_last_50": float(np.mean(jax.device_get(list(recent)))) if trained else None,
      "final_i2t_acc": None if final is None else float(final["i2t_acc"]),
      "logit_scale": float(np.exp(params["logit_scale"])),
      "loss_curve": losses,
      "zero_shot": {"template": config.eval.template, "images_per_domain":
                    int(config.eval.per_class) * len(world.OBJECTS),
                    "eval_seed": int(config.eval.seed), "accuracy": acc, "average": average,
                    "chance": chance, "history": history},
      "config": config.to_dict(),
  }
  logging.info("pretrain done in %.0f s: final loss %s, zero-shot %s (average %.3f, chance %.3f)",
               report["time_seconds"], report["final_loss"], _fmt_acc(acc), average, chance)
  if jax.process_index() == 0:  # one writer on a shared filesystem; the others wait for it
    _write_output(out, cfg, params, tokenizer, report)
  parallel.sync("mmap_jax:pretrain_output")
  return str(out)


def launch(config: mlc.ConfigDict, *, workdir: str | os.PathLike, vocab: str | os.PathLike,
           out: str | os.PathLike | None = None, progress: bool = False) -> str:
  """What `python -m launch.pretrain` does (the absl main only parses flags): `config` with the
  vocabulary path set, pretrained into `out`."""
  config = mlc.ConfigDict(config.to_dict())
  config.vocab = str(vocab)
  return pretrain(config, workdir, out=out, progress=progress)


def _fmt_acc(acc: Mapping[str, float]) -> str:
  return ", ".join(f"{k} {v:.3f}" for k, v in acc.items())


def _zero_shot_scalars(prefix: str, acc: Mapping[str, float]) -> dict[str, float]:
  return {f"{prefix}/{k}": v for k, v in acc.items()} | {
      f"{prefix}/average": float(np.mean(list(acc.values())))}


# ----------------------------------------------------------------------------- the demo's CLIP

def read_report(directory: str | os.PathLike) -> Optional[dict]:
  path = pathlib.Path(directory) / REPORT_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def ensure_demo_clip(path: str | os.PathLike | None = None, *,
                     vocab_path: str | os.PathLike | None = None) -> str:
  """The demo's pretrained CLIP: `path` (default: the committed mmap_jax/assets/demo_clip) if it loads,
  else pretrains it there with `default_config()` (about 2 hours on 2 CPU cores, with
  progress lines printed as it goes) and returns it. `vocab_path` (default: the packaged CLIP BPE file) is only read
  when building."""
  target = pathlib.Path(path) if path is not None else DEFAULT_DEMO_CLIP
  if store.is_store(target):
    store.load(target)   # verify: a broken checkpoint is an error, never silently rebuilt
    return str(target)
  if target.exists() and any(target.iterdir()):
    raise CheckpointError(f"{target} exists but holds no CLIP checkpoint; remove it to rebuild")
  if vocab_path is None:
    vocab_path = resources.clip_bpe_path()
  config = default_config()
  config.vocab = str(vocab_path)
  workdir = target.parent / f".{target.name}.pretrain"
  logging.info("building the demo CLIP at %s (workdir %s)", target, workdir)
  pretrain(config, workdir, out=target, progress=True)
  shutil.rmtree(workdir, ignore_errors=True)
  return str(target)
