"""Gradient-driven task grouping: vmapped gradients, affinity, exact partition search, outputs."""
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmap_jax import grouping as G
from mmap_jax.train import run_spec

# Module-level jitted functions and one optimizer object: tests with equal shapes share compiles.
_PER_TASK = jax.jit(G.per_task_gradients, static_argnums=0)
_STEP = jax.jit(G.grouping_step, static_argnums=(0, 3))
_SGD = optax.sgd(0.1)


# ----------------------------------------------------------------------------- small models

def _mlp_task_loss(shared, head, x, y):
  """A shared 2-layer MLP trunk + a per-task linear head (passed as a per-task argument)."""
  h = jnp.tanh(x @ shared["w1"] + shared["b1"])
  h = jnp.tanh(h @ shared["w2"]) + h
  logits = h @ head
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _mlp_setup(t=5, n=16, d=7, h=11, c=4, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 6)
  shared = {"w1": jax.random.normal(k[0], (d, h)) / np.sqrt(d),
            "b1": 0.1 * jax.random.normal(k[1], (h,)),
            "w2": jax.random.normal(k[2], (h, h)) / np.sqrt(h)}
  heads = jax.random.normal(k[3], (t, h, c)) / np.sqrt(h)
  x = jax.random.normal(k[4], (t, n, d))
  y = jax.random.randint(k[5], (t, n), 0, c)
  return shared, heads, x, y


def _linear_task_loss(params, x, y):
  """One linear softmax classifier shared by all tasks."""
  logits = x @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _planted_batches(rules, steps, n=256, classes=3, noise_dims=3, seed=0):
  """Task t labels x by argmax over its rule's own block of input dims: tasks with the same rule
  share their labelling function, tasks with different rules have orthogonal ones."""
  num_rules = max(rules) + 1
  d = num_rules * classes + noise_dims
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    x = rng.standard_normal((len(rules), n, d)).astype(np.float32)
    y = np.stack([np.argmax(x[t, :, r * classes:(r + 1) * classes], axis=1)
                  for t, r in enumerate(rules)]).astype(np.int32)
    yield jnp.asarray(x), jnp.asarray(y)


def _warm_up(rules, steps=6, seed=0):
  classes, noise_dims = 3, 3
  d = (max(rules) + 1) * classes + noise_dims
  k = jax.random.PRNGKey(seed)
  params = {"w": 0.01 * jax.random.normal(k, (d, classes)), "b": jnp.zeros((classes,))}
  _, state, history = G.warmup_affinity(
      _linear_task_loss, params, optax.sgd(0.5),
      _planted_batches(rules, steps, classes=classes, noise_dims=noise_dims, seed=seed))
  assert int(state.count) == steps
  assert history[-1]["loss"] < history[0]["loss"]
  return np.asarray(state.mean())


# ----------------------------------------------------------------------------- gradients

@pytest.mark.slow
def test_vmapped_gradients_equal_python_loop():
  shared, heads, x, y = _mlp_setup()
  losses, grads = _PER_TASK(_mlp_task_loss, shared, heads, x, y)
  assert losses.shape == (5,)
  single = jax.jit(jax.value_and_grad(_mlp_task_loss))
  for t in range(5):
    loss_t, grad_t = single(shared, heads[t], x[t], y[t])
    np.testing.assert_allclose(losses[t], loss_t, rtol=1e-6)
    for name in shared:
      ref, got = np.asarray(grad_t[name]), np.asarray(grads[name][t])
      assert got.shape == shared[name].shape
      rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
      assert rel <= 1e-6, (name, t, rel)


def test_flatten_and_cosine_affinity_match_numpy():
  shared, heads, x, y = _mlp_setup()
  _, grads = _PER_TASK(_mlp_task_loss, shared, heads, x, y)
  flat = jax.jit(G.flatten_task_grads)(grads)
  leaves = jax.tree_util.tree_leaves(grads)
  assert flat.shape == (5, sum(l[0].size for l in leaves))
  np.testing.assert_array_equal(flat[2], np.concatenate([np.ravel(l[2]) for l in leaves]))
  aff = np.asarray(G.cosine_affinity(flat))
  f = np.asarray(flat, np.float64)
  ref = (f @ f.T) / np.outer(np.linalg.norm(f, axis=1), np.linalg.norm(f, axis=1))
  np.testing.assert_allclose(aff, ref, atol=1e-6)
  np.testing.assert_array_equal(aff, aff.T)


def test_cosine_affinity_zero_gradient_is_defined():
  flat = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0], [-3.0, 0.0, 0.0]])
  aff = np.asarray(jax.jit(G.cosine_affinity)(flat))
  assert np.all(np.isfinite(aff))
  np.testing.assert_array_equal(np.diag(aff), 1.0)
  np.testing.assert_array_equal(aff[1, [0, 2, 3]], 0.0)
  np.testing.assert_allclose(aff[0, 2], 1 / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(aff[0, 3], -1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="grads"):
    G.flatten_task_grads({"a": jnp.zeros((3, 2)), "b": jnp.zeros((4, 2))})


def test_affinity_state_update_mean_jit_and_pytree():
  s = G.AffinityState.zeros(3)
  np.testing.assert_array_equal(s.mean(), np.zeros((3, 3)))  # count 0: defined, zeros
  a1, a2, a3 = (np.full((3, 3), v, np.float32) for v in (0.2, 0.6, 100.0))
  update = jax.jit(lambda st, a, r: st.update(a, r))
  s = update(s, a1, True)
  s = update(s, a3, False)  # skipped ("every n steps")
  s = update(s, a2, jnp.array(True))
  assert int(s.count) == 2
  np.testing.assert_allclose(jax.jit(lambda st: st.mean())(s), np.full((3, 3), 0.4), rtol=1e-6)
  leaves, treedef = jax.tree_util.tree_flatten(s)
  assert len(leaves) == 2
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert isinstance(back, G.AffinityState)
  with pytest.raises(ValueError, match="num_tasks"):
    G.AffinityState.zeros(0)


@pytest.mark.slow
def test_grouping_step_update_is_mean_of_task_gradients_and_records_affinity():
  shared, heads, x, y = _mlp_setup(t=4)
  opt, step = _SGD, _STEP
  state = G.AffinityState.zeros(4)
  new, _, state, m = step(_mlp_task_loss, shared, opt.init(shared), opt, state, heads, x, y)
  single = jax.jit(jax.grad(_mlp_task_loss))
  loop = [single(shared, heads[t], x[t], y[t]) for t in range(4)]
  for name in shared:
    mean_g = np.mean([np.asarray(g[name]) for g in loop], axis=0)
    np.testing.assert_allclose(new[name], shared[name] - 0.1 * mean_g, rtol=1e-5, atol=1e-7)
  flat = np.stack([np.concatenate([np.ravel(g[k]) for k in sorted(g)]) for g in loop])
  flat = flat.astype(np.float64)
  n = np.linalg.norm(flat, axis=1)
  np.testing.assert_allclose(state.mean(), flat @ flat.T / np.outer(n, n), atol=2e-6)
  assert int(state.count) == 1 and m["task_loss"].shape == (4,)
  np.testing.assert_allclose(m["task_grad_norm"], n, rtol=1e-5)
  _, _, state2, _ = step(_mlp_task_loss, new, opt.init(new), opt, state, heads, x, y,
                         record=False)
  assert int(state2.count) == 1
  np.testing.assert_array_equal(state2.total, state.total)


def test_grouping_step_on_a_data_mesh_matches_single_device():
  """The trainer shards the batch axis over ("data",); the step must give the same numbers."""
  shared, heads, x, y = _mlp_setup(t=4)  # the shapes of the test above: its compile is reused
  mesh = Mesh(np.array(jax.devices()), ("data",))
  assert len(jax.devices()) == 8
  xs = jax.device_put(x, NamedSharding(mesh, P(None, "data")))
  ys = jax.device_put(y, NamedSharding(mesh, P(None, "data")))
  opt, step = _SGD, _STEP
  ref = step(_mlp_task_loss, shared, opt.init(shared), opt, G.AffinityState.zeros(4), heads, x, y)
  got = step(_mlp_task_loss, shared, opt.init(shared), opt, G.AffinityState.zeros(4), heads, xs,
             ys)
  assert got[2].total.shape == (4, 4)
  for r, g in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- planted groups

def test_warmup_recovers_two_planted_pairs():
  aff = _warm_up([0, 1, 0, 1])
  assert aff[0, 2] > 0.8 and aff[1, 3] > 0.8, aff
  assert G.partition(aff, num_groups=2) == ((0, 2), (1, 3))
  assert G.partition(aff) == ((0, 2), (1, 3))  # free
  assert G.partition(aff, threshold=0.5) == ((0, 2), (1, 3))
  assert G.partition(aff, threshold=0.99) == ((0,), (1,), (2,), (3,))  # nothing that coherent


def test_warmup_recovers_three_planted_groups_of_six_tasks():
  aff = _warm_up([0, 1, 2, 0, 2, 1], seed=1)
  expected = ((0, 3), (1, 5), (2, 4))
  assert G.partition(aff, num_groups=3) == expected
  assert G.partition(aff, threshold=0.5) == expected
  assert G.partition(aff, num_groups=3, exact_max_tasks=0) == expected  # agglomerative agrees
  assert G.partition(aff, threshold=0.5, exact_max_tasks=0) == expected


# ----------------------------------------------------------------------------- exact search

def _set_partitions(items):
  """Independent generator: insert the first item into every block of every partition of the
  rest, or into a block of its own."""
  if not items:
    yield []
    return
  first, rest = items[0], items[1:]
  for p in _set_partitions(rest):
    yield [[first]] + p
    for i in range(len(p)):
      yield p[:i] + [[first] + p[i]] + p[i + 1:]


def _pair_mean(a, g):
  pairs = [a[i, j] for i, j in __import__("itertools").combinations(sorted(g), 2)]
  return sum(pairs) / len(pairs) if pairs else None


def _brute_score(a, p):
  """J as the size-weighted mean of group pair-means (singletons 0): a different formula."""
  return sum(len(g) * (_pair_mean(a, g) or 0.0) for g in p) / a.shape[0]


def _brute_best(a, k=None, threshold=None):
  cands = list(_set_partitions(list(range(a.shape[0]))))
  if k is not None:
    cands = [p for p in cands if len(p) == k]
  if threshold is not None:
    cands = [p for p in cands
             if all(_pair_mean(a, g) is None or _pair_mean(a, g) >= threshold for g in p)]
    fewest = min(len(p) for p in cands)
    cands = [p for p in cands if len(p) == fewest]
  scored = sorted(((_brute_score(a, p), p) for p in cands), key=lambda sp: -sp[0])
  gap = scored[0][0] - scored[1][0] if len(scored) > 1 else math.inf
  return scored[0][0], G.canonical_groups(scored[0][1]), gap


def _random_affinity(rng, t):
  m = rng.uniform(-1, 1, (t, t))
  a = (m + m.T) / 2
  np.fill_diagonal(a, 1.0)
  return a


@pytest.mark.parametrize("t", range(2, 8))
def test_exact_partition_matches_brute_force(t):
  rng = np.random.default_rng(t)
  for _ in range(3):
    a = _random_affinity(rng, t)
    modes = [{}] + [{"num_groups": k} for k in range(1, t + 1)] + [
        {"threshold": float(th)} for th in (-0.2, 0.1, 0.4)]
    for mode in modes:
      best, p, gap = _brute_best(a, mode.get("num_groups"), mode.get("threshold"))
      got = G.partition(a, **mode)
      assert G.partition_score(a, got) == pytest.approx(best, abs=1e-12), mode
      if gap > 1e-9:
        assert got == p, mode


def _bell(n):
  row = [1]
  for _ in range(n - 1):
    nxt = [row[-1]]
    for v in row:
      nxt.append(nxt[-1] + v)
    row = nxt
  return row[-1]


def _stirling2(n, k):
  s = [[0] * (n + 1) for _ in range(n + 1)]
  s[0][0] = 1
  for i in range(1, n + 1):
    for j in range(1, i + 1):
      s[i][j] = j * s[i - 1][j] + s[i - 1][j - 1]
  return s[n][k]


def test_partition_counts_are_bell_and_stirling_numbers():
  assert _bell(10) == 115975
  for t in range(1, 11):
    labels = G.enumerate_partitions(t)
    assert labels.shape == (_bell(t), t)
    assert len(np.unique(labels, axis=0)) == len(labels)
    # restricted growth: starts at 0 and never jumps more than one above the running max
    assert np.all(labels[:, 0] == 0)
    assert np.all(labels[:, 1:] <= np.maximum.accumulate(labels, axis=1)[:, :-1] + 1)
    for k in range(1, t + 1):
      lk = G.enumerate_partitions(t, k)
      assert len(lk) == _stirling2(t, k)
      assert np.all(lk.max(1) == k - 1)


def test_ten_tasks_exact_is_fast():
  a = _random_affinity(np.random.default_rng(0), 10)
  G.enumerate_partitions.cache_clear()
  start = time.perf_counter()
  free = G.partition(a)
  fixed = G.partition(a, num_groups=3)
  thr = G.partition(a, threshold=0.3)
  elapsed = time.perf_counter() - start
  assert elapsed < 3.0, elapsed
  assert len(fixed) == 3
  for p in (free, fixed, thr):
    assert sorted(i for g in p for i in g) == list(range(10))
  # free search is the best over every k
  assert G.partition_score(a, free) >= max(
      G.partition_score(a, G.partition(a, num_groups=k)) for k in range(1, 11)) - 1e-12


def test_twelve_tasks_fall_back_to_agglomerative():
  rng = np.random.default_rng(3)
  blocks = [0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 3]
  a = np.where(np.equal.outer(blocks, blocks), 0.8, -0.1) + 0.05 * _random_affinity(rng, 12)
  a = (a + a.T) / 2
  assert G.search_method(12) == "agglomerative"
  start = time.perf_counter()
  p = G.partition(a, num_groups=4)
  assert time.perf_counter() - start < 2.0
  expected = tuple(tuple(i for i in range(12) if blocks[i] == b) for b in range(4))
  assert p == expected
  assert G.partition(a) == expected
  assert G.partition(a, threshold=0.5) == expected
  r = G.partition(_random_affinity(rng, 12), num_groups=5)
  assert len(r) == 5 and sorted(i for g in r for i in g) == list(range(12))
  assert r == G.canonical_groups(r)


def _naive_average_linkage(a, k=None, threshold=None):
  clusters = [[i] for i in range(len(a))]
  while len(clusters) > (k or 1):
    pairs = [(np.mean([a[i, j] for i in clusters[p] for j in clusters[q]]), p, q)
             for p in range(len(clusters)) for q in range(p + 1, len(clusters))]
    best, p, q = max(pairs, key=lambda x: x[0])
    if threshold is not None and best < threshold:
      break
    clusters[p] = clusters[p] + clusters[q]
    del clusters[q]
  return G.canonical_groups(clusters)


def test_agglomerative_matches_naive_average_linkage():
  rng = np.random.default_rng(7)
  for t in (11, 13, 16):
    a = _random_affinity(rng, t)
    for k in (1, 2, 5, t):
      assert G.partition(a, num_groups=k) == _naive_average_linkage(a, k), (t, k)
    for th in (-0.1, 0.2, 0.5):
      assert G.partition(a, threshold=th) == _naive_average_linkage(a, threshold=th), (t, th)
      for g in G.partition(a, threshold=th):  # the documented guarantee: every group coherent
        assert len(g) == 1 or a[np.ix_(g, g)][np.triu_indices(len(g), 1)].mean() >= th
  start = time.perf_counter()
  big = G.partition(_random_affinity(rng, 80), num_groups=6)
  assert time.perf_counter() - start < 2.0 and len(big) == 6


def test_degenerate_cases_and_ties_are_deterministic():
  a = _random_affinity(np.random.default_rng(1), 5)
  assert G.partition(a, num_groups=5) == ((0,), (1,), (2,), (3,), (4,))
  assert G.partition(a, num_groups=1) == ((0, 1, 2, 3, 4),)
  assert G.partition_score(a, ((0,), (1,), (2,), (3,), (4,))) == 0.0
  assert G.partition(np.ones((1, 1))) == ((0,),)
  flat = np.full((4, 4), 0.5)
  assert G.partition(flat) == ((0, 1, 2, 3),)  # ties go to fewer groups
  # three tied pairings: the first label string (0,0,1,1) wins
  assert G.partition(flat, num_groups=2) == ((0, 1), (2, 3))
  # agglomerative ties: the pair of clusters with the smallest first members merges
  assert G.partition(flat, num_groups=2, exact_max_tasks=0) == ((0, 1, 2), (3,))
  assert G.partition(np.zeros((4, 4))) == ((0, 1, 2, 3),)
  assert G.partition(-np.ones((3, 3))) == ((0,), (1,), (2,))  # conflicting tasks stay apart


def test_partition_validation_errors_name_the_field():
  a = _random_affinity(np.random.default_rng(2), 4)
  for bad in (0, 5, 2.0, True):
    with pytest.raises(ValueError, match="num_groups"):
      G.partition(a, num_groups=bad)
  with pytest.raises(ValueError, match="not both"):
    G.partition(a, num_groups=2, threshold=0.1)
  with pytest.raises(ValueError, match="threshold"):
    G.partition(a, threshold=float("nan"))
  with pytest.raises(ValueError, match="exact_max_tasks"):
    G.partition(a, exact_max_tasks=13)
  with pytest.raises(ValueError, match="affinity.*symmetric"):
    G.partition(a + np.triu(np.ones((4, 4)), 1))
  with pytest.raises(ValueError, match="affinity.*square"):
    G.partition(np.zeros((3, 4)))
  with pytest.raises(ValueError, match="affinity.*NaN"):
    G.partition(np.full((2, 2), np.nan))
  with pytest.raises(ValueError, match="groups.*both"):
    G.partition_score(a, ((0, 1), (1, 2, 3)))


# ----------------------------------------------------------------------------- files

NAMES = ["clipart", "painting", "real", "sketch"]


def test_save_and_load_grouping(tmp_path):
  a = _random_affinity(np.random.default_rng(4), 4)
  groups = G.finalize_grouping(tmp_path, NAMES, a, num_groups=2, steps=np.int64(7))
  assert groups == G.partition(a, num_groups=2)
  png = (tmp_path / "affinity.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
  np.testing.assert_allclose(np.load(tmp_path / "affinity.npy"), a, atol=1e-6)
  rec = json.loads((tmp_path / "groups.json").read_text())
  assert rec["task_names"] == NAMES
  assert rec["group_indices"] == [list(g) for g in groups]
  assert rec["groups"] == [[NAMES[i] for i in g] for g in groups]
  assert rec["steps"] == 7 and rec["search"] == "exact" and rec["method"] == "gradient_affinity"
  assert rec["objective"] == pytest.approx(G.partition_score(a, groups))
  np.testing.assert_allclose(rec["affinity"], a)
  assert G.load_groups(tmp_path) == groups
  assert G.load_groups(tmp_path, task_names=NAMES) == groups
  with pytest.raises(ValueError, match="do not match"):
    G.load_groups(tmp_path, task_names=NAMES[::-1])


def test_finalize_from_affinity_state(tmp_path):
  state = G.AffinityState.zeros(4)
  with pytest.raises(ValueError, match="count 0"):
    G.finalize_grouping(tmp_path, NAMES, state, num_groups=2)
  a = jnp.asarray(_random_affinity(np.random.default_rng(5), 4), jnp.float32)
  state = state.update(a).update(a)
  assert G.finalize_grouping(tmp_path, NAMES, state, threshold=0.0) == G.partition(
      np.asarray(a), threshold=0.0)


def test_load_groups_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="groups.json"):
    G.load_groups(tmp_path)
  (tmp_path / "groups.json").write_text("{not json")
  with pytest.raises(ValueError, match="groups.json.*malformed"):
    G.load_groups(tmp_path)
  (tmp_path / "groups.json").write_text(json.dumps({"format": "other/2", "task_names": NAMES}))
  with pytest.raises(ValueError, match="'format'"):
    G.load_groups(tmp_path)
  (tmp_path / "groups.json").write_text(json.dumps({"task_names": NAMES}))
  with pytest.raises(ValueError, match="'groups'"):
    G.load_groups(tmp_path)
  (tmp_path / "groups.json").write_text(json.dumps(
      {"task_names": NAMES, "groups": [["clipart", "real"], ["painting", "sketch"]],
       "group_indices": [[0, 1], [2, 3]]}))
  with pytest.raises(ValueError, match="disagree"):
    G.load_groups(tmp_path)
  (tmp_path / "groups.json").write_text(json.dumps(
      {"task_names": NAMES, "groups": [["clipart", "real"], ["painting"]],
       "group_indices": [[0, 2], [1]]}))
  with pytest.raises(ValueError, match="no group"):
    G.load_groups(tmp_path)


def test_explicit_groups(tmp_path):
  got = G.resolve_explicit_groups([["sketch", "painting"], ["real", "clipart"]], NAMES)
  assert got == ((0, 2), (1, 3))
  with pytest.raises(ValueError, match=r"grouping.groups: task 'real' is in both"):
    G.resolve_explicit_groups([["real", "clipart"], ["real", "painting", "sketch"]], NAMES)
  with pytest.raises(ValueError, match=r"grouping.groups: tasks \['sketch'\] are in no group"):
    G.resolve_explicit_groups([["real", "clipart"], ["painting"]], NAMES)
  with pytest.raises(ValueError, match=r"grouping.groups\[1\]: unknown task 'photo'"):
    G.resolve_explicit_groups([["real", "clipart"], ["photo", "painting", "sketch"]], NAMES)
  with pytest.raises(ValueError, match=r"grouping.groups\[0\]: empty"):
    G.resolve_explicit_groups([[], NAMES], NAMES)
  with pytest.raises(ValueError, match="grouping.groups"):
    G.resolve_explicit_groups("clipart", NAMES)
  # explicit groups are saved without an affinity (no warm-up ran)
  G.save_grouping(tmp_path, NAMES, None, got, {"method": "explicit"})
  assert G.load_groups(tmp_path) == got
  assert not (tmp_path / "affinity.png").exists()
  assert json.loads((tmp_path / "groups.json").read_text())["objective"] is None
  with pytest.raises(ValueError, match="extra.*reserved"):
    G.save_grouping(tmp_path, NAMES, None, got, {"groups": []})


# ----------------------------------------------------------------------------- MmAP (tiny CLIP)

def _random_clip(cfg, seed=0):
  """A random CLIP of the given shapes, drawn with numpy: eager `clip.init_params` compiles one
  XLA program per op (many seconds on CPU), and the test only needs non-trivial weights."""
  from mmap_jax.models import clip
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(s.shape, np.float32)
    if name.endswith("['bias']"):
      return np.zeros(s.shape, np.float32)
    if name.endswith("['logit_scale']"):
      return np.float32(np.log(1 / 0.07))
    std = 0.02 if s.ndim == 1 or "embedding" in name else s.shape[-2] ** -0.5
    return (std * rng.standard_normal(s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, clip.param_shapes(cfg))


@pytest.mark.slow
def test_mmap_shared_per_task_gradients_on_tiny_clip(bpe_path, xla_default_codegen):
  """The real per-task loss (heads.per_task_loss_fn, method mmap_shared) through the tiny CLIP:
  vmapped gradients equal a loop of single-task gradients, and a jitted grouping step on it
  records their cosines, over all leaves (groups.affinity_params=all) or over the source prompts
  only (=source, the trainer's filter), each against numpy."""
  from mmap_jax import heads
  from mmap_jax.train import grouping_run
  from mmap_jax.models.config import VARIANTS
  from mmap_jax.prompts import PromptSpec, init_learned
  from mmap_jax.tokenizer import ClipTokenizer

  cfg = VARIANTS["tiny"]
  spec = PromptSpec(method="mmap_shared", length=2, depth=2, source_dim=16).validate(cfg)
  clip_params = _random_clip(cfg)
  learned = init_learned(jax.random.PRNGKey(1), cfg, spec, num_tasks=3)
  # A trained-looking MmAP: larger sources and non-unit scales, so the scaling matrices'
  # gradients weigh in the all-leaves cosine (at init, S ~ 0.02 makes them negligible).
  rng = np.random.default_rng(5)
  learned = jax.tree.map(
      lambda x: x * 25.0 + 0.3 * rng.standard_normal(x.shape).astype(np.float32), learned)
  classes = [["dog", "cat", "bicycle"], ["car", "tree"], ["house", "alarm_clock", "dog"]]
  tokens = heads.build_class_tokens(ClipTokenizer.from_bpe_file(bpe_path), classes,
                                    spec.text_prompt_tokens)
  images = np.random.default_rng(2).standard_normal((3, 4, 32, 32, 3)).astype(np.float32)
  labels = np.array([[0, 1, 2, 0], [1, 0, 1, 1], [2, 2, 0, 1]], np.int32)
  fn = heads.per_task_loss_fn(clip_params, cfg, spec)
  opt = optax.adam(1e-3)

  @jax.jit
  def vmapped_and_step(learned, tokens, images, labels):  # one compile for both
    out = G.per_task_gradients(fn, learned, tokens, images, labels)
    step = G.grouping_step(fn, learned, opt.init(learned), opt, G.AffinityState.zeros(3),
                           tokens, images, labels,
                           affinity_filter=grouping_run.affinity_filter("all"))
    # the trainer's groups.affinity_params=source filter, on the same per-task gradients
    source = G.cosine_affinity(G.flatten_task_grads(
        grouping_run.affinity_filter("source")(out[1])))
    return out, step, source

  (losses, grads), (new, _, state, metrics), source_aff = vmapped_and_step(
      learned, tokens, images, labels)
  single = jax.jit(jax.value_and_grad(fn))
  flat_loop, source_loop = [], []
  for t in range(3):
    tokens_t = heads.ClassTokens(*(np.asarray(x)[t] for x in tokens))
    loss_t, grad_t = single(learned, tokens_t, images[t], labels[t])
    np.testing.assert_allclose(losses[t], loss_t, rtol=1e-6)
    for (path, ref), got in zip(jax.tree_util.tree_leaves_with_path(grad_t),
                                jax.tree_util.tree_leaves(grads)):
      rel = np.linalg.norm(np.asarray(got[t]) - ref) / max(np.linalg.norm(ref), 1e-30)
      assert rel <= 1e-6, (jax.tree_util.keystr(path), t, rel)
    flat_loop.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(grad_t)]))
    source_loop.append(np.ravel(grad_t["shared"]["source"]))
  assert min(np.linalg.norm(f) for f in flat_loop) > 0

  f = np.stack(flat_loop).astype(np.float64)
  n = np.linalg.norm(f, axis=1)
  np.testing.assert_allclose(state.mean(), f @ f.T / np.outer(n, n), atol=1e-5)
  np.testing.assert_allclose(metrics["task_loss"], losses, rtol=1e-6)
  assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(learned)
  ref_src = _numpy_cos(np.stack(source_loop))
  np.testing.assert_allclose(source_aff, ref_src, atol=2e-6)
  np.testing.assert_allclose(state.mean(), f @ f.T / np.outer(n, n), atol=2e-6)
  # the choice matters: the two affinities differ by far more than the tolerance above
  assert np.max(np.abs(ref_src - f @ f.T / np.outer(n, n))) > 1e-4


# ----------------------------------------------------------------------------- affinity options

_STEP_OPTS = jax.jit(G.grouping_step, static_argnums=(0, 3),
                     static_argnames=("affinity_filter", "ema_decay"))


def _w1_only(grads):
  return {"w1": grads["w1"]}


def _numpy_cos(f):
  f = np.asarray(f, np.float64)
  u = f / np.linalg.norm(f, axis=1, keepdims=True)
  return u @ u.T


def test_gradient_ema_affinity_matches_numpy():
  """EMA m_s = b*m_{s-1} + (1-b)*g_s per task (m_0 = 0, every step); a recorded step adds
  cos(m_s); the affinity is the mean over recorded steps. Checked against numpy on an MLP, with
  a leaf filter, record every 2nd step, and against the plain (EMA off) mean of cosines."""
  t, steps, decay, every = 4, 5, 0.6, 2
  shared, heads, _, _ = _mlp_setup(t=t)
  rng = np.random.default_rng(3)
  batches = [(rng.standard_normal((t, 16, 7)).astype(np.float32),
              rng.integers(0, 4, (t, 16)).astype(np.int32)) for _ in range(steps)]
  size = G.affinity_size(shared, _w1_only)
  assert size == 7 * 11 and G.affinity_size(shared) == 7 * 11 + 11 + 11 * 11
  single = jax.jit(jax.grad(_mlp_task_loss))
  params, opt_state, state = shared, _SGD.init(shared), G.AffinityState.zeros(t, size)
  m, total, plain, count = np.zeros((t, size)), np.zeros((t, t)), np.zeros((t, t)), 0
  for s, (x, y) in enumerate(batches):
    g = np.stack([np.ravel(single(params, heads[i], x[i], y[i])["w1"]) for i in range(t)])
    m = decay * m + (1 - decay) * g.astype(np.float64)
    if s % every == 0:
      total, plain, count = total + _numpy_cos(m), plain + _numpy_cos(g), count + 1
    params, opt_state, state, metrics = _STEP_OPTS(
        _mlp_task_loss, params, opt_state, _SGD, state, heads, x, y, record=(s % every == 0),
        affinity_filter=_w1_only, ema_decay=decay)
    np.testing.assert_allclose(metrics["affinity"], _numpy_cos(m), atol=2e-6)
  assert count == 3 and int(state.count) == 3
  np.testing.assert_allclose(state.ema, m, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(state.mean(), total / count, atol=2e-6)
  assert np.max(np.abs(total - plain)) / count > 1e-2  # the EMA changes the affinity
  # decay 0 is the plain per-step cosine, and the state then has no EMA leaf
  st0 = G.AffinityState.zeros(t)
  assert st0.ema is None and len(jax.tree_util.tree_leaves(st0)) == 2
  x, y = batches[0]
  _, _, st0, _ = _STEP_OPTS(_mlp_task_loss, shared, _SGD.init(shared), _SGD, st0, heads, x, y,
                            affinity_filter=_w1_only)
  g0 = np.stack([np.ravel(single(shared, heads[i], x[i], y[i])["w1"]) for i in range(t)])
  np.testing.assert_allclose(st0.mean(), _numpy_cos(g0), atol=2e-6)
  # the filter changes only what is compared, never the update (the mean over ALL leaves)
  new_f, _, _, _ = _STEP_OPTS(_mlp_task_loss, shared, _SGD.init(shared), _SGD,
                              G.AffinityState.zeros(t), heads, x, y, affinity_filter=_w1_only)
  new_a, _, _, _ = _STEP_OPTS(_mlp_task_loss, shared, _SGD.init(shared), _SGD,
                              G.AffinityState.zeros(t), heads, x, y)
  for a, b in zip(jax.tree_util.tree_leaves(new_f), jax.tree_util.tree_leaves(new_a)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(new_a["b1"], shared["b1"])  # b1 (not in the filter) was updated
  with pytest.raises(ValueError, match="needs an ema"):
    _STEP_OPTS(_mlp_task_loss, shared, _SGD.init(shared), _SGD, G.AffinityState.zeros(t),
               heads, x, y, ema_decay=0.5)
  with pytest.raises(ValueError, match="ema_decay"):
    _STEP_OPTS(_mlp_task_loss, shared, _SGD.init(shared), _SGD, state, heads, x, y,
               affinity_filter=_w1_only, ema_decay=1.0)


def test_warmup_with_ema_recovers_planted_pairs():
  classes, noise_dims, rules = 3, 3, [0, 1, 0, 1]
  d = 2 * classes + noise_dims
  params = {"w": 0.01 * jax.random.normal(jax.random.PRNGKey(0), (d, classes)),
            "b": jnp.zeros((classes,))}
  _, state, _ = G.warmup_affinity(_linear_task_loss, params, optax.sgd(0.5),
                                  _planted_batches(rules, 6), ema_decay=0.7)
  assert state.ema.shape == (4, d * classes + classes)
  assert G.partition(np.asarray(state.mean()), num_groups=2) == ((0, 2), (1, 3))


# ----------------------------------------------------------------------------- ablation modes

def test_random_groups_are_seeded_balanced_and_uniform():
  import collections
  for t, k in [(4, 2), (5, 2), (7, 3), (6, 6), (6, 1), (1, 1)]:
    for seed in range(12):
      g = G.random_groups(t, k, seed)
      assert len(g) == k and sorted(i for grp in g for i in grp) == list(range(t))
      sizes = [len(grp) for grp in g]
      assert max(sizes) - min(sizes) <= 1
      assert g == G.random_groups(t, k, seed) == G.canonical_groups(g)
  assert len({G.random_groups(7, 3, s) for s in range(12)}) > 1  # the seed matters
  # uniform over the 3 balanced pairings of 4 tasks (expected 200 each, sd ~11.5)
  draws = collections.Counter(G.random_groups(4, 2, s) for s in range(600))
  assert set(draws) == {((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))}
  assert min(draws.values()) > 150, draws
  # pinned: SHA-256 orders, so a seed's partition is the same on every numpy/JAX version
  assert G.random_groups(6, 3, 0) == ((0, 2), (1, 5), (3, 4))
  assert G.random_groups(5, 2, 2) == ((0, 4), (1, 2, 3))
  for bad in (0, 5):
    with pytest.raises(ValueError, match="num_groups"):
      G.random_groups(4, bad, 0)
  with pytest.raises(ValueError, match="seed"):
    G.random_groups(4, 2, True)
  assert G.all_in_one_groups(3) == ((0, 1, 2),)
  assert G.one_per_task_groups(3) == ((0,), (1,), (2,))


def _base_config(**groups):
  from configs import common
  c = common.base_config()
  c.clip.path = "demo"
  for k, v in groups.items():
    with c.groups.ignore_type():
      c.groups[k] = v
  return c


def test_ablation_groups_from_the_config():
  from mmap_jax.train import grouping_run, setup
  names = ["a", "b", "c", "d", "e"]
  c = _base_config(mode="random", num_groups=2)
  c.seed = 3
  assert grouping_run.ablation_groups(run_spec.resolve(c), 5, names) == G.random_groups(5, 2, 3)
  c.groups.seed = 11  # groups.seed fixes the partition whatever the run seed
  assert grouping_run.ablation_groups(run_spec.resolve(c), 5, names) == G.random_groups(5, 2, 11)
  assert run_spec.resolve(c).groups.settings() == {"mode": "random", "num_groups": 2, "seed": 11}
  c.groups.num_groups = 6
  with pytest.raises(setup.ConfigError, match=r"groups\.num_groups=6 must be in 1\.\.5"):
    grouping_run.ablation_groups(run_spec.resolve(c), 5, names)
  assert grouping_run.ablation_groups(run_spec.resolve(_base_config(mode="all_in_one")), 5, names) == \
      ((0, 1, 2, 3, 4),)
  assert grouping_run.ablation_groups(run_spec.resolve(_base_config(mode="one_per_task")), 5, names) == \
      tuple((i,) for i in range(5))
  assert grouping_run.ablation_groups(run_spec.resolve(_base_config(mode="explicit", explicit="a+c;b+d+e")), 5,
                                      names) == ((0, 2), (1, 3, 4))


@pytest.mark.parametrize("groups,needle", [
    ({"mode": "auto"}, r"groups\.mode='auto' was renamed: use groups\.mode='gradient'"),
    ({"mode": "magic"}, r"groups\.mode='magic'; allowed: \('gradient'"),
    ({"affinity_params": "both"}, r"groups\.affinity_params='both'"),
    ({"grad_ema": 1.0}, r"groups\.grad_ema=1\.0"),
    ({"grad_ema": -0.5}, r"groups\.grad_ema=-0\.5"),
    ({"mode": "random", "num_groups": 0}, r"groups\.num_groups=0 must be >= 1"),
    ({"mode": "one_per_task", "init_from_warmup": True}, r"groups\.init_from_warmup=True needs"),
    ({"mode": "explicit"}, r"groups\.explicit is required"),
])
def test_bad_grouping_fields_are_rejected_naming_the_field(groups, needle):
  from mmap_jax.train import setup
  with pytest.raises(setup.ConfigError, match=needle):
    setup.validate(_base_config(**groups))


def test_every_mode_validates():
  from mmap_jax.train import setup
  for mode in setup.GROUP_MODES:
    setup.validate(_base_config(mode=mode, explicit="photo;clipart+sketch+painting"))
  setup.validate(_base_config(grad_ema=0.9, affinity_params="all", init_from_warmup=True))


# ----------------------------------------------------------------------------- diagnostics

def test_ranked_partitions_match_brute_force():
  rng = np.random.default_rng(8)
  a = _random_affinity(rng, 5)
  for k in (None, 2, 3):
    ranked = G.ranked_partitions(a, num_groups=k, top=6)
    assert len(ranked) == 6
    assert ranked[0]["groups"] == G.partition(a, num_groups=k)
    brute = sorted((_brute_score(a, p) for p in _set_partitions(list(range(5)))
                    if k is None or len(p) == k), reverse=True)
    np.testing.assert_allclose([r["objective"] for r in ranked], brute[:6], atol=1e-12)
    for r in ranked:
      assert r["objective"] == pytest.approx(G.partition_score(a, r["groups"]))
      assert r["num_groups"] == len(r["groups"]) and (k is None or r["num_groups"] == k)
      pairs = [_pair_mean(a, g) for g in r["groups"] if len(g) > 1]
      assert r["min_group_affinity"] == (pytest.approx(min(pairs)) if pairs else None)
  assert len({r["groups"] for r in G.ranked_partitions(a, top=52)}) == 52  # Bell(5): all
  assert G.ranked_partitions(_random_affinity(rng, 11), num_groups=2) == []  # agglomerative


def test_finalize_writes_alternatives_and_history(tmp_path):
  a = _random_affinity(np.random.default_rng(9), 4)
  history = np.stack([a, a * 0.5, a])
  groups = G.finalize_grouping(tmp_path, NAMES, a, num_groups=2, history=history,
                               alternatives=3, extra={"mode": "gradient"})
  rec = json.loads((tmp_path / "groups.json").read_text())
  assert rec["mode"] == "gradient" and rec["history_file"] == "affinity_history.npy"
  assert rec["stable_from_step"] == G.stable_from_step(history, num_groups=2)
  np.testing.assert_allclose(np.load(tmp_path / "affinity_history.npy"), history, atol=1e-7)
  alts = rec["alternatives"]
  assert len(alts) == 3 and alts[0]["groups"] == rec["groups"]
  assert alts[0]["objective"] == pytest.approx(rec["objective"])
  assert [x["objective"] for x in alts] == sorted((x["objective"] for x in alts), reverse=True)
  assert G.load_groups(tmp_path) == groups
  with pytest.raises(ValueError, match="history"):
    G.finalize_grouping(tmp_path, NAMES, a, num_groups=2, history=history[:, :3])


def test_stable_from_step():
  def pairing(p, q, v=0.8):  # tasks p, q aligned at v, the other pair too, rest 0
    a = np.eye(4)
    others = [i for i in range(4) if i not in (p, q)]
    for i, j in ((p, q), tuple(others)):
      a[i, j] = a[j, i] = v
    return a
  early, late = pairing(0, 1), pairing(0, 2)
  # running means over 2 early + n late steps: {0,1} leads while n < 2, n = 2 ties (ties go to
  # the first label string, {0,1}), {0,2} wins from step 5 on
  history = np.stack([early, early, late, late, late, late, late])
  assert G.partition(history.mean(0), num_groups=2) == ((0, 2), (1, 3))
  assert G.stable_from_step(history, num_groups=2) == 5
  assert G.stable_from_step(np.stack([late] * 3 + [early]), num_groups=2) == 1
  # every=2 records steps 0, 2, 4, 6 = early, late, late, late: a tie at step 3, {0,2} from 5
  assert G.stable_from_step(history, every=2, num_groups=2) == 5
  # threshold 0.5: no pair reaches 0.5 at steps 4-5 (0.4, 0.48: singletons), {0,2} from step 6
  assert G.stable_from_step(history, threshold=0.5) == 6
  with pytest.raises(ValueError, match="history"):
    G.stable_from_step(history[0])


# ----------------------------------------------------------------------------- init from warm-up

@pytest.mark.slow
def test_init_groups_from_shared_copies_into_every_group_only():
  from mmap_jax.models.config import VARIANTS
  from mmap_jax.prompts import PromptSpec, init_learned, multitask
  cfg = VARIANTS["tiny"]
  mt = PromptSpec(method="mmap_mt", length=2, depth=2, source_dim=16).validate(cfg)
  sh = PromptSpec(method="mmap_shared", length=2, depth=2, source_dim=16).validate(cfg)
  groups = ((0, 2), (1,), (3,))
  learned = init_learned(jax.random.PRNGKey(1), cfg, mt, 4, groups)
  warm = jax.tree.map(lambda x: x + 0.5, init_learned(jax.random.PRNGKey(2), cfg, sh, 4)["shared"])
  out = multitask.init_groups_from_shared(learned, warm)
  assert jax.tree.structure(out) == jax.tree.structure(learned)
  for name, leaf in out["group"].items():
    assert leaf.shape == learned["group"][name].shape and leaf.shape[0] == 3
    for g in range(3):
      np.testing.assert_array_equal(leaf[g], warm[name])
  for name, leaf in out["task"].items():
    np.testing.assert_array_equal(leaf, learned["task"][name])
    assert not np.allclose(leaf[0], warm[name])
  prompts = multitask.task_prompts(out, cfg, mt, groups)
  from mmap_jax.prompts import mmap
  warm_tokens = mmap.expand(warm, cfg, sh)
  for t in range(4):  # every task's group half is the warm-up MmAP's prompt
    np.testing.assert_allclose(prompts.text[t, :, :2], warm_tokens.text, rtol=1e-6)
    np.testing.assert_allclose(prompts.visual[t, :, :2], warm_tokens.visual, rtol=1e-6)
  other = PromptSpec(method="mmap_shared", length=4, depth=2, source_dim=16).validate(cfg)
  with pytest.raises(ValueError, match="prompt config changed"):
    multitask.init_groups_from_shared(
        learned, init_learned(jax.random.PRNGKey(2), cfg, other, 4)["shared"])
  with pytest.raises(ValueError, match="mmap_mt"):
    multitask.init_groups_from_shared({"shared": warm}, warm)
