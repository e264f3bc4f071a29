r"""The MmAP-MT training step written the straightforward PyTorch way (the benchmark's reference).

What the published PyTorch prompt-learning code (MaPLe's trainers, which MmAP builds on) does:
transformers' CLIP modules, eager, float32, frozen CLIP weights (requires_grad=False), every class
prompt run over all 77 context positions, deep prompts that REPLACE tokens between layers, and
one text + one image forward per task, then one backward and an SGD step:

  per task t (group g(t)):
    text prompts   [J, 2L, d_t] = concat(kron(S_g, W_t^g), kron(S_t, W_t^t))   (token axis)
    visual prompts [J, 2L, d_v] = concat(kron(S_g, W_v^g), kron(S_t, W_v^t))
    text:  token embeddings with positions 1..2L replaced by text[0], + positions, then each
           layer i >= 1 (< J) first replaces hidden states 1..2L by text[i]; causal mask;
           final LN at the EOT position; text projection
    image: patch conv + class token + positions, visual[0] appended, pre-LN, each layer
           i >= 1 (< J) replaces the last 2L tokens by visual[i]; post-LN of the class token;
           visual projection
    logits = exp(logit_scale) * cos(image, text) [B, C]; cross-entropy over the real classes
  loss = sum over tasks of each task's mean CE (heads.multitask_loss); backward; SGD(momentum 0.9, weight decay 5e-4)

The math is the same as mmap_jax's (`heads.multitask_loss` with `mmap_mt`), which
tests/test_benchmark.py checks (loss and gradients on the same weights, tiny CLIP).

Standalone use (the benchmark's --vs_torch runs this in a subprocess):
  python benchmarks/torch_reference.py --arch '<ClipConfig JSON>' --tokens tokens.npz \
      --groups '[[0,2],[1,3]]' --length 8 --depth 11 --source_length 8 --source_dim 256 \
      --batch_size 8 --runs 3 --warmup 1 --out torch.json
tokens.npz: ids int [T, C, 77] (zeros after EOT), eot int [T, C], class_mask bool [T, C].
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

NEG = -1e30   # logit of a padded (non-existent) class, as mmap_jax.heads.NEG


# ----------------------------------------------------------------------------- model

def hf_config(arch: Mapping[str, Any], attn_implementation: str = "sdpa") -> CLIPConfig:
  """A transformers CLIPConfig for an mmap_jax ClipConfig dict (`ClipConfig.to_dict()`)."""
  v, t = arch["vision"], arch["text"]
  cfg = CLIPConfig(
      text_config=dict(vocab_size=t["vocab_size"], hidden_size=t["width"],
                       intermediate_size=4 * t["width"], num_hidden_layers=t["layers"],
                       num_attention_heads=t["heads"], max_position_embeddings=t["context_length"],
                       hidden_act=arch.get("activation", "quick_gelu"), layer_norm_eps=1e-5,
                       projection_dim=arch["embed_dim"]),
      vision_config=dict(hidden_size=v["width"], intermediate_size=4 * v["width"],
                         num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
                         image_size=v["image_size"], patch_size=v["patch_size"],
                         hidden_act=arch.get("activation", "quick_gelu"), layer_norm_eps=1e-5,
                         projection_dim=arch["embed_dim"]),
      projection_dim=arch["embed_dim"])
  cfg._attn_implementation = attn_implementation  # pylint: disable=protected-access
  for sub in (cfg.text_config, cfg.vision_config):
    sub._attn_implementation = attn_implementation  # pylint: disable=protected-access
  return cfg


def _kron_layers(source: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  """MmAP's per-layer Kronecker product: [J, a, b] x [p, q] -> [J, a*p, b*q]."""
  return torch.stack([torch.kron(s, scale) for s in source])


class MmapMT(nn.Module):
  """Frozen transformers CLIPModel + MmAP group-shared and task-specific prompt units."""

  def __init__(self, config: CLIPConfig, num_tasks: int, groups: Sequence[Sequence[int]], *,
               length: int, depth: int, source_length: int, source_dim: int,
               init_std: float = 0.02):
    super().__init__()
    self.clip = CLIPModel(config)
    self.clip.requires_grad_(False)
    self.clip.eval()                       # no dropout (CLIP has none at p=0 anyway)
    self.depth, self.length = depth, length
    self.task_group = [0] * num_tasks
    for g, members in enumerate(groups):
      for t in members:
        self.task_group[t] = g
    d_t, d_v = config.text_config.hidden_size, config.vision_config.hidden_size
    rows = length // source_length

    def unit(n):
      return nn.ParameterDict({
          "source": nn.Parameter(init_std * torch.randn(n, depth, source_length, source_dim)),
          "scale_text": nn.Parameter(torch.ones(n, rows, d_t // source_dim)),
          "scale_visual": nn.Parameter(torch.ones(n, rows, d_v // source_dim))})
    self.group = unit(len(groups))
    self.task = unit(num_tasks)

  # ---------------------------------------------------------------- prompts
  def task_prompts(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(text [J, 2L, d_t], visual [J, 2L, d_v]) of task t: group unit ++ task unit."""
    g = self.task_group[t]
    text = torch.cat([_kron_layers(self.group["source"][g], self.group["scale_text"][g]),
                      _kron_layers(self.task["source"][t], self.task["scale_text"][t])], dim=1)
    visual = torch.cat([_kron_layers(self.group["source"][g], self.group["scale_visual"][g]),
                        _kron_layers(self.task["source"][t], self.task["scale_visual"][t])], dim=1)
    return text, visual

  # ---------------------------------------------------------------- encoders
  def encode_text(self, ids: torch.Tensor, eot: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """ids [C, 77], eot [C], prompts [J, n, d_t] -> text embeddings [C, E]."""
    tm = self.clip.text_model
    c, s = ids.shape
    n = prompts.shape[1]
    x = tm.embeddings.token_embedding(ids)
    x = torch.cat([x[:, :1], prompts[0].expand(c, -1, -1), x[:, 1 + n:]], dim=1)
    x = x + tm.embeddings.position_embedding.weight[:s]
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    for i, layer in enumerate(tm.encoder.layers):
      if 1 <= i < prompts.shape[0]:
        x = torch.cat([x[:, :1], prompts[i].expand(c, -1, -1), x[:, 1 + n:]], dim=1)
      x = layer(x, mask)
    x = tm.final_layer_norm(x)
    pooled = x[torch.arange(c), eot]
    return self.clip.text_projection(pooled)

  def encode_image(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] -> image embeddings [B, E]; prompts [J, n, d_v]."""
    vm = self.clip.vision_model
    b = images.shape[0]
    n = prompts.shape[1]
    x = vm.embeddings(images)
    x = torch.cat([x, prompts[0].expand(b, -1, -1)], dim=1)
    x = vm.pre_layrnorm(x)
    for i, layer in enumerate(vm.encoder.layers):
      if 1 <= i < prompts.shape[0]:
        x = torch.cat([x[:, :-n], prompts[i].expand(b, -1, -1)], dim=1)
      x = layer(x, None)
    pooled = vm.post_layernorm(x[:, 0])
    return self.clip.visual_projection(pooled)

  # ---------------------------------------------------------------- loss
  def forward(self, ids: torch.Tensor, eot: torch.Tensor, class_mask: torch.Tensor,
              images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, C, 77], eot [T, C], class_mask [T, C], images [T, B, 3, H, W], labels [T, B]
    -> (summed task loss, per-task losses [T])."""
    scale = self.clip.logit_scale.exp()
    losses = []
    for t in range(ids.shape[0]):
      text_p, visual_p = self.task_prompts(t)
      txt = F.normalize(self.encode_text(ids[t], eot[t], text_p), dim=-1)
      img = F.normalize(self.encode_image(images[t], visual_p), dim=-1)
      logits = scale * img @ txt.t()
      logits = torch.where(class_mask[t][None, :], logits, torch.full_like(logits, NEG))
      losses.append(F.cross_entropy(logits, labels[t]))
    per_task = torch.stack(losses)
    return per_task.sum(), per_task


def make_optimizer(model: MmapMT, lr: float = 0.0035) -> torch.optim.Optimizer:
  return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                         momentum=0.9, weight_decay=5e-4)


def train_step(model: MmapMT, optimizer: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor]
               ) -> torch.Tensor:
  optimizer.zero_grad(set_to_none=True)
  loss, _ = model(batch["ids"], batch["eot"], batch["class_mask"], batch["images"], batch["labels"])
  loss.backward()
  optimizer.step()
  return loss.detach()


# ----------------------------------------------------------------------------- weights from mmap_jax

def hf_state_dict(params: Mapping[str, Any], arch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
  """mmap_jax CLIP params (nested, OpenAI names, Flax kernels [in, out]) -> CLIPModel state dict.

  The inverse of mmap_jax.checkpoints.naming.hf_rules.
  """
  def a(x):
    return torch.from_numpy(np.array(x, dtype=np.float32))

  out: dict[str, torch.Tensor] = {}
  vis, txt = params["visual"], params["text"]
  out["vision_model.embeddings.patch_embedding.weight"] = a(
      np.asarray(vis["conv1"]["kernel"]).transpose(3, 2, 0, 1))
  out["vision_model.embeddings.class_embedding"] = a(vis["class_embedding"])
  out["vision_model.embeddings.position_embedding.weight"] = a(vis["positional_embedding"])
  for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    out[f"vision_model.{theirs}.weight"] = a(vis[ours]["scale"])
    out[f"vision_model.{theirs}.bias"] = a(vis[ours]["bias"])
  out["visual_projection.weight"] = a(np.asarray(vis["proj"]).T)
  out["text_model.embeddings.token_embedding.weight"] = a(txt["token_embedding"]["embedding"])
  out["text_model.embeddings.position_embedding.weight"] = a(txt["positional_embedding"])
  out["text_model.final_layer_norm.weight"] = a(txt["ln_final"]["scale"])
  out["text_model.final_layer_norm.bias"] = a(txt["ln_final"]["bias"])
  out["text_projection.weight"] = a(np.asarray(txt["text_projection"]).T)
  out["logit_scale"] = a(params["logit_scale"])
  for tower, prefix in ((vis, "vision_model"), (txt, "text_model")):
    for i, blk in tower["transformer"]["resblocks"].items():
      base = f"{prefix}.encoder.layers.{i}"
      w = np.asarray(blk["attn"]["in_proj"]["kernel"])          # [W, 3W] = [q | k | v]
      bias = np.asarray(blk["attn"]["in_proj"]["bias"])
      width = w.shape[0]
      for j, n in enumerate("qkv"):
        out[f"{base}.self_attn.{n}_proj.weight"] = a(w[:, j * width:(j + 1) * width].T)
        out[f"{base}.self_attn.{n}_proj.bias"] = a(bias[j * width:(j + 1) * width])
      for ours, theirs in (("attn/out_proj", "self_attn.out_proj"), ("mlp/c_fc", "mlp.fc1"),
                           ("mlp/c_proj", "mlp.fc2")):
        p = blk
        for k in ours.split("/"):
          p = p[k]
        out[f"{base}.{theirs}.weight"] = a(np.asarray(p["kernel"]).T)
        out[f"{base}.{theirs}.bias"] = a(p["bias"])
      for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
        out[f"{base}.{theirs}.weight"] = a(blk[ours]["scale"])
        out[f"{base}.{theirs}.bias"] = a(blk[ours]["bias"])
  return out


def load_weights(model: MmapMT, clip_params: Mapping[str, Any], arch: Mapping[str, Any],
                 learned: Optional[Mapping[str, Any]] = None) -> None:
  """Copy mmap_jax CLIP params (and an mmap_mt learned pytree) into the torch model."""
  missing, unexpected = model.clip.load_state_dict(hf_state_dict(clip_params, arch), strict=False)
  missing = [k for k in missing if not k.endswith("position_ids")]
  if missing or unexpected:
    raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
  if learned is not None:
    with torch.no_grad():
      for unit in ("group", "task"):
        for name in ("source", "scale_text", "scale_visual"):
          getattr(model, unit)[name].copy_(torch.from_numpy(np.array(learned[unit][name],
                                                                     dtype=np.float32)))


# ----------------------------------------------------------------------------- timing

def _vm_hwm() -> Optional[int]:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _reset_hwm() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def benchmark(arch: Mapping[str, Any], tokens: Mapping[str, np.ndarray],
              groups: Sequence[Sequence[int]], *, length: int, depth: int, source_length: int,
              source_dim: int, batch_size: int, runs: int = 3, warmup: int = 1,
              threads: int = 0, attn: str = "sdpa", seed: int = 0) -> dict[str, Any]:
  """Median/min/max seconds and peak RSS of `train_step` on random weights and images."""
  if threads > 0:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  ids = torch.from_numpy(np.asarray(tokens["ids"], np.int64))
  num_tasks = ids.shape[0]
  model = MmapMT(hf_config(arch, attn), num_tasks, groups, length=length, depth=depth,
                 source_length=source_length, source_dim=source_dim)
  optimizer = make_optimizer(model)
  size = arch["vision"]["image_size"]
  num_classes = np.asarray(tokens["class_mask"]).sum(-1)
  rng = np.random.default_rng(seed)
  batch = {"ids": ids, "eot": torch.from_numpy(np.asarray(tokens["eot"], np.int64)),
           "class_mask": torch.from_numpy(np.asarray(tokens["class_mask"], bool)),
           "images": torch.from_numpy(rng.standard_normal(
               (num_tasks, batch_size, 3, size, size), np.float32)),
           "labels": torch.from_numpy(np.stack(
               [rng.integers(0, n, batch_size) for n in num_classes]).astype(np.int64))}
  for _ in range(warmup):
    train_step(model, optimizer, batch)
  reset = _reset_hwm()
  times, loss = [], None
  for _ in range(runs):
    t0 = time.perf_counter()
    loss = train_step(model, optimizer, batch)
    times.append(time.perf_counter() - t0)
  return {"step_s_median": statistics.median(times), "step_s_min": min(times),
          "step_s_max": max(times), "all_s": [round(t, 4) for t in times], "runs": runs,
          "warmup": warmup, "peak_memory_bytes": _vm_hwm(),
          "peak_memory_scope": "host RSS, timed steps" if reset else "host RSS, process lifetime",
          "loss": float(loss) if loss is not None else None,
          "torch": torch.__version__, "threads": torch.get_num_threads(),
          "attn_implementation": attn, "python": platform.python_version()}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", required=True, help="ClipConfig.to_dict() as JSON")
  p.add_argument("--tokens", required=True, help=".npz with ids, eot, class_mask")
  p.add_argument("--groups", required=True, help="JSON list of task-index lists")
  p.add_argument("--length", type=int, required=True)
  p.add_argument("--depth", type=int, required=True)
  p.add_argument("--source_length", type=int, required=True)
  p.add_argument("--source_dim", type=int, required=True)
  p.add_argument("--batch_size", type=int, required=True)
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  a = p.parse_args(argv)
  with np.load(a.tokens) as z:
    tokens = {k: z[k] for k in z.files}
  result = benchmark(json.loads(a.arch), tokens, json.loads(a.groups), length=a.length,
                     depth=a.depth, source_length=a.source_length, source_dim=a.source_dim,
                     batch_size=a.batch_size, runs=a.runs, warmup=a.warmup, threads=a.threads,
                     attn=a.attn, seed=a.seed)
  text = json.dumps(result, indent=2)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text + "\n")
  print(text)
  return result


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
