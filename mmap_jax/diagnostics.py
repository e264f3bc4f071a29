"""How much a frozen CLIP already knows about a dataset: zero-shot and linear-probe accuracy.

    python -m launch.diagnose --config=configs/demo.py --out=/tmp/diag.json

Per domain (= task): zero-shot accuracy of the test split with the config's template
(`prompt.zeroshot_template`, "a photo of a {}." by default), and a linear probe, a multinomial
logistic regression on the frozen image features trained on the domain's full train pool
(`data.shots` is ignored: the probe measures the backbone, not the few-shot split) and scored on
its test split. Users run it before any adaptation method, on the demo or on Office-Home with a
real CLIP, to see how much headroom adaptation has.

The probe (JAX + optax, no sklearn): features standardised by the train pool's mean and std,
softmax regression with an L2 penalty (lambda / 2) * ||W||^2 on the weights (not the bias),
minimised full-batch by optax's L-BFGS (zoom line search) for `PROBE_ITERS` iterations. The
L2 strength is chosen on the validation pool (`data.val_fraction` / `data.val_per_class`, never
the test split) from `L2_GRID`, highest val accuracy, ties to the stronger penalty; a domain
without validation images takes `DEFAULT_L2`. The chosen value per domain is in the output.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from mmap_jax import heads, parallel, paths
from mmap_jax.data import pipeline, sources
from mmap_jax.models import clip as clip_lib
from mmap_jax.train import evaluate as evaluation, run_spec, setup

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DEFAULT_L2 = 1e-3
PROBE_ITERS = 200


# --------------------------------------------------------------- features ---


def _image_feature_fn(cfg):
  @jax.jit
  def fn(params, images):
    return clip_lib.normalize(clip_lib.encode_image(params, cfg, images))
  return fn


def image_features(clip: setup.Clip, params: Any, task: sources.TaskData, split: str, *,
                   batch_size: int, mesh, feature_fn) -> tuple[np.ndarray, np.ndarray]:
  """(unit image features [N, E], labels [N]) of one task's 'train', 'val' or 'test' split.

  The train pool goes through the evaluation pipeline (no augmentation, every example once) as
  a view whose test source is the train split.
  """
  if split == "train":
    task, split = dataclasses.replace(task, test=task.train), "test"
  feats, labels = [], []
  for batch in pipeline.eval_batches(task, batch_size=batch_size,
                                     image_size=clip.cfg.vision.image_size, sharding=mesh,
                                     split=split):
    mask = evaluation.to_host(batch["mask"]).astype(bool)
    feats.append(evaluation.to_host(feature_fn(params, batch["image"]))[mask])
    labels.append(evaluation.to_host(batch["label"])[mask])
  if not feats:
    return np.zeros((0, clip.cfg.embed_dim), np.float32), np.zeros((0,), np.int32)
  return np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int32)


def class_text_features(clip: setup.Clip, params: Any, class_names: Sequence[str],
                        template: str) -> np.ndarray:
  """Unit text features [C, E] of `template` filled with each class name."""
  tokens = heads.build_class_tokens(clip.tokenizer, [list(class_names)], 0,
                                    zeroshot_template=template,
                                    context_length=clip.cfg.text.context_length)
  feats = heads.text_features(params, clip.cfg, None, tokens)
  return np.asarray(feats[0, :len(class_names)])


def zero_shot_accuracy(image_feats: np.ndarray, labels: np.ndarray,
                       text_feats: np.ndarray) -> float:
  if len(labels) == 0:
    return float("nan")
  return float(np.mean(np.argmax(image_feats @ text_feats.T, axis=-1) == labels))


# ------------------------------------------------------------------ probe ---


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _fit(x, y, weight, l2, *, num_classes: int):
  """Full-batch L-BFGS on the weighted mean softmax cross-entropy + (l2 / 2) ||W||^2."""
  onehot = jax.nn.one_hot(y, num_classes)

  def loss(p):
    logits = x @ p["w"] + p["b"]
    ce = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)
    return jnp.sum(weight * ce) / jnp.sum(weight) + 0.5 * l2 * jnp.sum(p["w"] ** 2)

  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(p, updates), state), value

  (params, _), values = jax.lax.scan(step, (params, opt.init(params)), None, length=PROBE_ITERS)
  return params, values[-1]


def _standardise(train: np.ndarray):
  mean = train.mean(0, keepdims=True)
  std = train.std(0, keepdims=True) + 1e-6
  return lambda x: (x - mean) / std


def linear_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], num_classes: int, *,
                 grid: Sequence[float] = L2_GRID) -> dict[str, Any]:
  """{'accuracy': test accuracy, 'l2': the chosen penalty, 'val_accuracy': {l2: acc}}.

  Fits one probe per grid value on the train pool, keeps the one with the best validation
  accuracy (ties to the larger l2) and scores it on test.
  """
  x_train, y_train = train
  if len(y_train) == 0:
    raise ValueError("the linear probe needs training images")
  scale = _standardise(x_train)
  predict = lambda p, x: np.argmax(np.asarray(scale(x) @ np.asarray(p["w"]) + np.asarray(p["b"])),
                                   axis=-1)
  # Rows padded (weight 0) to a power of two: domains of similar size share one compiled fit.
  n = len(y_train)
  rows = max(64, 1 << (n - 1).bit_length())
  x = np.zeros((rows, x_train.shape[1]), np.float32)
  x[:n] = scale(x_train)
  y = np.zeros((rows,), np.int32)
  y[:n] = y_train
  weight = (np.arange(rows) < n).astype(np.float32)
  fits = {}
  candidates = grid if len(val[1]) else (DEFAULT_L2,)
  for l2 in candidates:
    params, _ = _fit(jnp.asarray(x), jnp.asarray(y), jnp.asarray(weight), jnp.float32(l2),
                     num_classes=num_classes)
    fits[l2] = params
  val_acc = ({l2: float(np.mean(predict(p, val[0]) == val[1])) for l2, p in fits.items()}
             if len(val[1]) else {})
  chosen = (max(sorted(fits, reverse=True), key=lambda l2: val_acc[l2]) if val_acc
            else DEFAULT_L2)
  accuracy = (float(np.mean(predict(fits[chosen], test[0]) == test[1])) if len(test[1])
              else float("nan"))
  return {"accuracy": accuracy, "l2": float(chosen),
          "val_accuracy": {f"{l2:g}": a for l2, a in val_acc.items()}}


# ---------------------------------------------------------------- diagnose ---


def diagnose(config: mlc.ConfigDict) -> dict[str, Any]:
  """Zero-shot and linear-probe accuracy per domain of the config's dataset and CLIP."""
  config = mlc.ConfigDict(config.to_dict())   # An unlocked copy; the caller's stays as it was.
  config.data.shots = 0                       # The probe trains on the full train pool.
  if config.method not in ("zeroshot",):
    config.method = "zeroshot"                # Only data / CLIP / input fields matter here.
  mesh = parallel.data_mesh()
  rs = run_spec.resolve(config, mesh.devices.size)
  clip = setup.load_clip(rs.clip_path)
  tasks = setup.build_tasks(rs.data)
  params = parallel.replicate(clip.params, mesh)
  feature_fn = _image_feature_fn(clip.cfg)
  template = rs.prompt.zeroshot_template
  out: dict[str, Any] = {"zero_shot": {}, "linear_probe": {}, "num_classes": None,
                         "test_images": {}, "train_images": {}, "val_images": {},
                         "probe_l2": {}, "probe_val_accuracy": {}}
  for t in tasks:
    name = t.info.name
    feats = {s: image_features(clip, params, t, s, batch_size=rs.input.eval_batch_size,
                               mesh=mesh, feature_fn=feature_fn)
             for s in ("train", "val", "test")}
    text = class_text_features(clip, clip.params, t.info.class_names, template)
    out["zero_shot"][name] = zero_shot_accuracy(*feats["test"], text)
    probe = linear_probe(feats["train"], feats["val"], feats["test"], t.info.num_classes)
    out["linear_probe"][name] = probe["accuracy"]
    out["probe_l2"][name] = probe["l2"]
    out["probe_val_accuracy"][name] = probe["val_accuracy"]
    for split in ("train", "val", "test"):
      out[f"{split}_images"][name] = int(len(feats[split][1]))
  counts = {t.info.name: t.info.num_classes for t in tasks}
  out["num_classes"] = (next(iter(counts.values())) if len(set(counts.values())) == 1
                        else counts)
  for key in ("zero_shot", "linear_probe"):
    out[f"{key}_average"] = float(np.mean(list(out[key].values())))
  out.update({"template": template, "clip": clip.path, "dataset": rs.data.name,
              "probe": {"model": "softmax regression on standardised unit image features",
                        "optimizer": f"optax.lbfgs, full batch, {PROBE_ITERS} iterations",
                        "l2_grid": list(L2_GRID), "l2_selected_on": "validation accuracy"},
              "splits": sources.splits_record(tasks)})
  return out


def format_table(result: dict[str, Any]) -> str:
  """A small text table: one row per domain and the average."""
  names = list(result["zero_shot"])
  lines = [f"{'domain':<16} {'zero-shot':>9} {'probe':>7} {'train':>7} {'test':>7}"]
  for n in names:
    lines.append(f"{n:<16} {100 * result['zero_shot'][n]:>8.1f}% "
                 f"{100 * result['linear_probe'][n]:>6.1f}% "
                 f"{result['train_images'][n]:>7d} {result['test_images'][n]:>7d}")
  lines.append(f"{'average':<16} {100 * result['zero_shot_average']:>8.1f}% "
               f"{100 * result['linear_probe_average']:>6.1f}%")
  return "\n".join(lines)


def write(result: dict[str, Any], out: str) -> None:
  """The JSON (process 0 only; atomically, local or gs://)."""
  if jax.process_index() == 0:
    paths.write_text_atomic(out, json.dumps(result, indent=2))
