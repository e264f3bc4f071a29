"""Grouping that measures something: TAG lookahead affinity, per-tower cosine, num_groups=auto
(choose k by the objective), and their config fields."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmap_jax import grouping as G
from mmap_jax.train import run_spec
from tests import test_grouping as tg

_STEP = jax.jit(G.grouping_step, static_argnums=(0, 3),
                static_argnames=("affinity_filter", "ema_decay", "affinity", "split"))


def _quadratic(params, target):
  """Task loss (w - target)^2: tasks with targets on opposite sides of w pull it apart."""
  return (params["w"][0] - target) ** 2


def test_tag_on_a_toy_where_one_tasks_step_hurts_the_other():
  """w = 0; task 0 wants w = 1, task 1 wants w = -1, task 2 wants w = 2. A gradient step of
  lr on task i moves w to lr * 2 * target_i, so Z[i, j] = 1 - (2 lr t_i - t_j)^2 / t_j^2 exactly:
  task 0's step raises task 1's loss (Z[0, 1] = -0.44 at lr 0.1) and lowers task 2's."""
  params = {"w": jnp.zeros((1,))}
  targets = jnp.asarray([1.0, -1.0, 2.0])
  lr = 0.1
  opt = optax.sgd(0.0)
  _, _, state, metrics = _STEP(_quadratic, params, opt.init(params), opt,
                               G.AffinityState.zeros(3), targets, affinity="tag",
                               lookahead_lr=lr)
  t = np.asarray(targets, np.float64)
  want = 1 - (2 * lr * t[:, None] - t[None, :]) ** 2 / t[None, :] ** 2
  np.testing.assert_allclose(state.mean(), want, rtol=1e-5, atol=1e-6)
  z = np.asarray(state.mean())
  assert z[0, 1] == pytest.approx(-0.44, abs=1e-5) and z[1, 0] == pytest.approx(-0.44, abs=1e-5)
  assert z[0, 2] == pytest.approx(1 - 1.8 ** 2 / 4, abs=1e-5) and z[2, 0] == pytest.approx(
      1 - 0.6 ** 2, abs=1e-5)                                # directed: 0.19 vs 0.64
  np.testing.assert_allclose(metrics["affinity"], want, rtol=1e-5, atol=1e-6)
  # The partition reads the symmetric part: 0 and 2 help each other, 1 conflicts with both.
  groups = G.partition((z + z.T) / 2)                        # num_groups=auto
  assert groups == ((0, 2), (1,))


def test_tag_needs_a_lookahead_lr():
  params = {"w": jnp.zeros((1,))}
  opt = optax.sgd(0.1)
  with pytest.raises(ValueError, match="needs lookahead_lr"):
    G.grouping_step(_quadratic, params, opt.init(params), opt, G.AffinityState.zeros(2),
                    jnp.asarray([1.0, -1.0]), affinity="tag")
  with pytest.raises(ValueError, match="affinity='magic'"):
    G.grouping_step(_quadratic, params, opt.init(params), opt, G.AffinityState.zeros(2),
                    jnp.asarray([1.0, -1.0]), affinity="magic")


def _two_tower_loss(split, a_text, a_visual):
  """Linear in a shared vector p that two 'towers' read through their own copies."""
  return jnp.dot(a_text, split["text"]) + jnp.dot(a_visual, split["visual"])


def _plain_two_tower_loss(params, a_text, a_visual):
  return _two_tower_loss(_SPLIT.split(params), a_text, a_visual)


_SPLIT = G.Split(lambda p: {"text": p["p"], "visual": p["p"]},
                 lambda g: {"p": g["text"] + g["visual"]})


@pytest.mark.parametrize("towers,want", [("text", 1.0), ("visual", -1.0), ("both", 0.0),
                                         ("summed", -99 / 101)])
def test_per_tower_cosine_is_not_dominated_by_the_larger_tower(towers, want):
  """Two tasks agree in the text tower (u, u) and disagree in the visual tower (10v, -10v),
  u and v orthogonal unit vectors. The summed gradient's cosine is (1 - 100) / (1 + 100): the
  visual tower's larger gradients decide it; per tower it is +1 / -1, and `both` (each tower
  normalised, then concatenated) weighs them equally: 0."""
  u, v = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
  a_text = jnp.asarray(np.stack([u, u]))
  a_visual = jnp.asarray(np.stack([10 * v, -10 * v]))
  params = {"p": jnp.zeros((4,))}
  opt = optax.sgd(0.1)
  pick = {"text": lambda g: {"t": g["text"]}, "visual": lambda g: {"v": g["visual"]}}
  filt = {"text": pick["text"], "visual": pick["visual"],
          "both": (pick["text"], pick["visual"]), "summed": None}[towers]
  loss = _two_tower_loss if towers != "summed" else _plain_two_tower_loss
  new, _, state, _ = _STEP(loss, params, opt.init(params), opt,
                           G.AffinityState.zeros(2), a_text, a_visual, affinity_filter=filt,
                           split=None if towers == "summed" else _SPLIT)
  assert float(state.mean()[0, 1]) == pytest.approx(want, abs=1e-6)
  # The update is the same whatever the affinity reads: the merged (plain) mean gradient.
  np.testing.assert_allclose(new["p"], -0.1 * np.asarray(u), atol=1e-7)


def test_affinity_signal_normalises_each_tower():
  g = {"a": jnp.asarray([[3.0, 4.0], [0.0, 0.0]]), "b": jnp.asarray([[0.0, 2.0], [1.0, 0.0]])}
  sig = G.affinity_signal(g, (lambda x: x["a"], lambda x: x["b"]))
  np.testing.assert_allclose(sig, [[0.6, 0.8, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
  assert G.affinity_size({"a": jnp.zeros(2), "b": jnp.zeros(3)},
                         (lambda x: x["a"], lambda x: x["b"])) == 5


@pytest.mark.parametrize("affinity,blocks,want", [
    # two planted pairs, cross affinity about 0
    ([[1, .8, .05, -.02], [.8, 1, 0, .03], [.05, 0, 1, .7], [-.02, .03, .7, 1]], None,
     ((0, 1), (2, 3))),
    # a planted 3 + 1: the odd task conflicts with the others
    ([[1, .5, .5, -.1], [.5, 1, .5, -.1], [.5, .5, 1, -.1], [-.1, -.1, -.1, 1]], None,
     ((0, 1, 2), (3,))),
    # everything uniformly positive: one group (ties go to fewer groups), not k = T
    ([[1, .3, .3, .3], [.3, 1, .3, .3], [.3, .3, 1, .3], [.3, .3, .3, 1]], None,
     ((0, 1, 2, 3),)),
    # everything conflicting: singletons, not k = 1
    ([[1, -.2, -.1, -.3], [-.2, 1, -.2, -.1], [-.1, -.2, 1, -.2], [-.3, -.1, -.2, 1]], None,
     ((0,), (1,), (2,), (3,))),
    # all positive but two tighter blocks of 3: J splits them (mean, not sum, of mates)
    (None, (3, 3), ((0, 1, 2), (3, 4, 5))),
])
def test_auto_number_of_groups_recovers_planted_structure(affinity, blocks, want):
  if affinity is None:
    labels = np.repeat(np.arange(len(blocks)), blocks)
    affinity = np.where(labels[:, None] == labels[None, :], 0.6, 0.2)
  a = np.asarray(affinity, np.float64)
  assert G.partition(a) == want
  assert G.partition(3.7 * a) == want                  # scale-free (cosine vs TAG scales)


def test_tag_warmup_recovers_planted_pairs_with_auto_k():
  """Linear tasks with two shared labelling rules (test_grouping's planted toy), TAG at the
  warm-up's lr: the pairs come out, and auto k finds 2 groups."""
  rules = [0, 1, 0, 1]
  classes, noise_dims = 3, 3
  d = 2 * classes + noise_dims
  params = {"w": 0.01 * jax.random.normal(jax.random.PRNGKey(0), (d, classes)),
            "b": jnp.zeros((classes,))}
  _, state, _ = G.warmup_affinity(tg._linear_task_loss, params, optax.sgd(0.5),
                                  tg._planted_batches(rules, 6, classes=classes,
                                                      noise_dims=noise_dims),
                                  affinity="tag", lookahead_lr=0.5)
  z = np.asarray(state.mean())
  sym = (z + z.T) / 2
  assert sym[0, 2] > sym[0, 1] and sym[1, 3] > sym[1, 2]
  assert G.partition(sym) == ((0, 2), (1, 3))


def test_tower_split_loss_equals_the_plain_loss_on_the_tiny_clip(bpe_path):
  """The trainer's TOWER_SPLIT form of mmap_shared (text prompts from one source copy, visual
  from the other): the same per-task losses and, merged, the same gradients as the plain
  per-task loss; each copy's gradient is one tower's part (both non-zero, summing to it)."""
  from mmap_jax import heads
  from mmap_jax.models.config import VARIANTS
  from mmap_jax.prompts import PromptSpec, init_learned
  from mmap_jax.tokenizer import ClipTokenizer
  from mmap_jax.train import grouping_run

  cfg = VARIANTS["tiny"]
  spec = PromptSpec(method="mmap_shared", length=2, depth=2, source_dim=16).validate(cfg)
  clip_params = tg._random_clip(cfg)
  learned = jax.tree.map(lambda x: x * 25.0, init_learned(jax.random.PRNGKey(1), cfg, spec, 2))
  tokens = heads.build_class_tokens(ClipTokenizer.from_bpe_file(bpe_path),
                                    [["dog", "cat"], ["car", "tree", "house"]],
                                    spec.text_prompt_tokens)
  images = np.random.default_rng(2).standard_normal((2, 3, 32, 32, 3)).astype(np.float32)
  labels = np.array([[0, 1, 1], [2, 0, 1]], np.int32)
  plain = heads.per_task_loss_fn(clip_params, cfg, spec)
  split = grouping_run.tower_split_loss_fn(clip_params, cfg, spec)

  @jax.jit
  def both(learned, tokens, images, labels):
    a = G.per_task_gradients(plain, learned, tokens, images, labels)
    b = G.per_task_gradients(split, grouping_run.TOWER_SPLIT.split(learned), tokens, images,
                             labels)
    return a, b, jax.vmap(grouping_run.TOWER_SPLIT.merge)(b[1])
  (la, ga), (lb, gb), merged = both(learned, tokens, images, labels)
  np.testing.assert_allclose(lb, la, rtol=1e-6)
  for x, y in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(ga)):
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7)
  text, visual = gb["shared"]["source_text"], gb["shared"]["source_visual"]
  assert float(jnp.linalg.norm(text)) > 0 and float(jnp.linalg.norm(visual)) > 0
  filters = grouping_run.tower_filters("both", "source")
  assert len(filters) == 2 and set(filters[0](gb)) == {"source"}
  assert grouping_run.tower_filters("summed", "source") is None
  all_text = grouping_run.tower_filters("text", "all")(gb)
  assert set(all_text) == {"source", "scale"} and all_text["scale"].shape[0] == 2


def _config(**groups):
  return tg._base_config(**groups)


@pytest.mark.parametrize("groups,needle", [
    ({"affinity": "magic"}, r"groups\.affinity='magic'; allowed: \('cosine', 'tag'\)"),
    ({"towers": "left"}, r"groups\.towers='left'; allowed"),
    ({"num_groups": "many"}, r"groups\.num_groups='many' must be an int >= 0 .* or 'auto'"),
    ({"num_groups": -1}, r"groups\.num_groups=-1 must be an int >= 0"),
    ({"affinity": "tag", "grad_ema": 0.5}, r"groups\.affinity='tag' needs groups\.grad_ema=0"),
    ({"mode": "random", "num_groups": "auto"}, r"groups\.num_groups=auto must be >= 1 with "
                                               r"groups\.mode='random'"),
])
def test_new_grouping_fields_are_validated_naming_the_field(groups, needle):
  from mmap_jax.train import setup
  with pytest.raises(setup.ConfigError, match=needle):
    setup.validate(_config(**groups))


def test_new_grouping_fields_validate_and_enter_the_settings():
  from mmap_jax.train import grouping_run, setup
  for kw in ({"affinity": "tag", "num_groups": "auto"}, {"towers": "text"},
             {"towers": "summed", "num_groups": 3}):
    setup.validate(_config(**kw))
  s = run_spec.resolve(_config(affinity="tag", num_groups="auto")).groups.settings()
  assert s["affinity"] == "tag" and s["num_groups"] == "auto" and s["threshold"] is None
  assert "towers" not in s and s["affinity_params"] is None
  s = run_spec.resolve(_config(towers="visual")).groups.settings()
  assert (s["affinity"], s["towers"], s["num_groups"]) == ("cosine", "visual", 2)
  # A groups.json from before these fields was a summed cosine: reused only by that setting.
  old = {"settings": {k: v for k, v in run_spec.resolve(_config(towers="summed")).groups.settings().items()
                      if k not in ("affinity", "towers")}}
  grouping_run._check_reuse(old, run_spec.resolve(_config(towers="summed")).groups.settings(), "g.json")
  with pytest.raises(setup.ConfigError, match=r"towers: file 'summed' vs config 'both'"):
    grouping_run._check_reuse(old, run_spec.resolve(_config()).groups.settings(), "g.json")


def test_num_groups_auto_from_the_command_line_and_the_sweep():
  """The field takes an int or 'auto' on the command line (ml_collections) and in a sweep."""
  from mmap_jax.apps import sweep
  c = _config()
  assert sweep._typed("groups.num_groups", "auto", c, "--sweep ") == "auto"
  assert sweep._typed("groups.num_groups", "3", c, "--sweep ") == 3


@pytest.mark.slow   # builds the tiny demo data and compiles a warm-up per case (~90 s each)
@pytest.mark.parametrize("groups,steps_per_call", [
    ({"affinity": "tag", "num_groups": "auto"}, 1),
    ({"affinity": "cosine", "towers": "both", "num_groups": "auto"}, 2),
])
def test_trainer_warmup_with_tag_or_towers_and_auto_k(tmp_path, bpe_path, groups, steps_per_call):
  """The trainer's warm-up (loop.group_tasks) on the tiny CLIP and demo data: TAG records the
  directed Z and partitions its symmetric part; per-tower cosine runs in K-step calls; auto k
  writes the partition with the best objective over every k (its first alternative)."""
  import json
  from mmap_jax.train import loop
  from tests import train_fixtures as fx
  clip_dir = fx.make_tiny_clip(tmp_path / "clip", bpe_path)
  c = fx.tiny_config(clip_dir, str(tmp_path / "tfds"))
  c.groups.warmup_steps = 3
  c.train.steps_per_call = steps_per_call
  for k, v in groups.items():
    c.groups[k] = v
  names = loop.group_tasks(c, str(tmp_path / "run"))
  record = json.loads((tmp_path / "run" / "groups.json").read_text())
  assert record["groups"] == names and record["settings"]["num_groups"] == "auto"
  assert record["settings"]["affinity"] == groups["affinity"]
  a = np.asarray(record["affinity"])
  np.testing.assert_allclose(a, a.T)
  assert record["requested_num_groups"] is None and record["threshold"] is None
  assert record["objective"] == pytest.approx(record["alternatives"][0]["objective"])
  assert record["alternatives"][0]["groups"] == names
  if groups["affinity"] == "tag":
    z = np.asarray(record["directed_affinity"])
    np.testing.assert_allclose((z + z.T) / 2, a, atol=1e-6)
    assert not np.allclose(z, z.T)     # directed: a step on i helps j not as j's helps i
  else:
    assert record["settings"]["towers"] == "both"
