"""Input pipeline: batches, determinism, resume, eval coverage, multi-host."""

import json
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmap_jax.data import pipeline
from mmap_jax.data import preprocess
from mmap_jax.data import sources
from tests import data_trees

SIZE = 16


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pipeline")
  root = tmp / "tree"
  data_trees.make_domain_tree(root, ["a"], per_class=5)   # 9 train / 3 val / 3 test
  data_trees.make_domain_tree(root, ["b"], per_class=7)   # 15 train / 3 val / 3 test
  data_trees.make_domain_tree(root, ["c"], per_class=9)   # 18 train / 3 val / 6 test
  return sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp / "tfds"))


def _pixel_labels(image: np.ndarray) -> np.ndarray:
  """Class of each (flat-coloured) image from its pixels."""
  pixels = (image * np.asarray(preprocess.CLIP_STD) + np.asarray(preprocess.CLIP_MEAN)) * 255
  flat = pixels.reshape((-1,) + pixels.shape[-3:])
  return np.asarray([data_trees.color_label(p) for p in flat]).reshape(image.shape[:-3])


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_sizes(tasks):
  assert [(t.info.num_train, t.info.num_val, t.info.num_test) for t in tasks] == [
      (9, 3, 3), (15, 3, 3), (18, 3, 6)]


def test_train_batch_shapes_labels_and_images(tasks):
  it = pipeline.train_iterator(tasks, batch_size=4, image_size=SIZE, seed=0, with_index=True)
  for batch in _take(it, 3):
    assert batch["image"].shape == (3, 4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (3, 4) and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["task"], [0, 1, 2])
    np.testing.assert_array_equal(_pixel_labels(batch["image"]), batch["label"])
    for t, task in enumerate(tasks):
      for idx, label in zip(batch["index"][t], batch["label"][t]):
        assert task.train[int(idx)]["label"] == label


def test_each_epoch_is_a_fresh_permutation(tasks):
  it = pipeline.train_iterator(tasks, batch_size=4, image_size=SIZE, seed=0, with_index=True,
                               augment=preprocess.AugmentConfig(random_resized_crop=False))
  stream = np.concatenate([b["index"] for b in _take(it, 11)], axis=1)  # 44 per task
  for t, task in enumerate(tasks):
    n = len(task.train)
    epochs = [stream[t, e * n:(e + 1) * n] for e in range(44 // n)]
    for e in epochs:
      assert sorted(e.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])


def test_determinism_and_seed(tasks):
  kw = dict(batch_size=4, image_size=SIZE)
  a = _take(pipeline.train_iterator(tasks, seed=3, **kw), 3)
  b = _take(pipeline.train_iterator(tasks, seed=3, **kw), 3)
  c = _take(pipeline.train_iterator(tasks, seed=4, **kw), 3)
  _assert_same(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_augmentation_is_applied_and_configurable(tasks):
  kw = dict(batch_size=4, image_size=SIZE, seed=0, with_index=True)
  plain = next(pipeline.train_iterator(
      tasks, augment=preprocess.AugmentConfig(random_resized_crop=False, hflip=False), **kw))
  aug = next(pipeline.train_iterator(tasks, **kw))
  np.testing.assert_array_equal(plain["index"], aug["index"])  # Same records...
  assert not np.array_equal(plain["image"], aug["image"])      # ...differently cropped.
  # Without augmentation a training image is exactly its eval preprocessing.
  from mmap_jax.data import images
  record = tasks[0].train[int(plain["index"][0, 0])]
  ref = preprocess.eval_image(images.decode_rgb(record["image"]), SIZE)
  np.testing.assert_array_equal(plain["image"][0, 0], ref)


def test_resume_is_exact(tasks):
  kw = dict(batch_size=4, image_size=SIZE, seed=11, with_index=True)
  it = pipeline.train_iterator(tasks, **kw)
  _take(it, 4)
  state = json.dumps(it.get_state())  # JSON-serialisable.
  expected = _take(it, 3)
  fresh = pipeline.train_iterator(tasks, **kw)
  fresh.set_state(json.loads(state))
  assert fresh.step == 4
  _assert_same(_take(fresh, 3), expected)
  other = pipeline.train_iterator(tasks, **{**kw, "batch_size": 2})
  with pytest.raises(ValueError, match="differently configured"):
    other.set_state(state)


def test_worker_processes_give_the_same_batches(tasks):
  kw = dict(batch_size=4, image_size=SIZE, seed=5, with_index=True)
  ref = _take(pipeline.train_iterator(tasks, **kw), 3)
  with pipeline.train_iterator(tasks, worker_count=2, num_threads=2, **kw) as it:
    got = _take(it, 2)
    state = it.get_state()
  resumed = pipeline.train_iterator(tasks, worker_count=0, **kw)  # Another worker count.
  resumed.set_state(state)
  _assert_same(got + _take(resumed, 1), ref)


@pytest.mark.parametrize("process_count", [2, 4])
def test_multihost_train_shards_are_disjoint_and_cover_the_global_batch(tasks, process_count):
  kw = dict(batch_size=8, image_size=SIZE, seed=2, with_index=True)
  ref = _take(pipeline.train_iterator(tasks, process_index=0, process_count=1, **kw), 3)
  per_process = [
      _take(pipeline.train_iterator(tasks, process_index=p, process_count=process_count, **kw), 3)
      for p in range(process_count)]
  for step in range(3):
    parts = [per_process[p][step] for p in range(process_count)]
    for part in parts:
      assert part["image"].shape == (3, 8 // process_count, SIZE, SIZE, 3)
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts], axis=1), ref[step][key])
  # Within an epoch the processes never read the same record: task c has 21
  # train examples, so steps 0 and 1 (positions 0..15) lie in its first epoch.
  reads = [np.concatenate([per_process[p][s]["index"][2] for s in (0, 1)])
           for p in range(process_count)]
  assert len(set(np.concatenate(reads).tolist())) == 16
  assert all(len(r) == 16 // process_count for r in reads)


def _eval_all(tasks, **kw):
  return list(pipeline.eval_batches(tasks, batch_size=4, image_size=SIZE, with_index=True, **kw))


def test_eval_covers_every_example_exactly_once(tasks):
  batches = _eval_all(tasks)
  assert [b["task"] for b in batches] == [0, 1, 2, 2]  # 3, 3 and 6 examples; B = 4.
  for t, task in enumerate(tasks):
    mine = [b for b in batches if b["task"] == t]
    idx = np.concatenate([b["index"][b["mask"]] for b in mine])
    assert sorted(idx.tolist()) == list(range(len(task.test)))
    assert sum(int(b["mask"].sum()) for b in mine) == len(task.test)
    for b in mine:
      assert b["image"].shape == (4, SIZE, SIZE, 3) and b["label"].shape == (4,)
      np.testing.assert_array_equal(b["image"][~b["mask"]], 0)
      np.testing.assert_array_equal(_pixel_labels(b["image"][b["mask"]]), b["label"][b["mask"]])
      for i, label in zip(b["index"][b["mask"]], b["label"][b["mask"]]):
        assert task.test[int(i)]["label"] == label


def test_eval_of_one_task_keeps_its_task_id(tasks):
  batches = list(pipeline.eval_batches(tasks[2], batch_size=4, image_size=SIZE))
  assert [b["task"] for b in batches] == [2, 2]
  assert [int(b["mask"].sum()) for b in batches] == [4, 2]


@pytest.mark.parametrize("process_count", [2, 4])
def test_multihost_eval_shards_cover_the_dataset(tasks, process_count):
  ref = _eval_all(tasks, process_index=0, process_count=1)
  parts = [_eval_all(tasks, process_index=p, process_count=process_count)
           for p in range(process_count)]
  assert all(len(p) == len(ref) for p in parts)  # Same number of steps everywhere.
  for j, whole in enumerate(ref):
    for key in ("image", "label", "mask", "index"):
      np.testing.assert_array_equal(np.concatenate([p[j][key] for p in parts]), whole[key])
  for t, task in enumerate(tasks):
    seen = [set(np.concatenate([b["index"][b["mask"]] for b in p if b["task"] == t]).tolist())
            for p in parts]
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == len(task.test)


def _mesh():
  devices = np.asarray(jax.devices())
  assert devices.size == 8, "tests/conftest.py should give 8 fake CPU devices"
  return Mesh(devices, ("data",))


@pytest.mark.parametrize("as_named", [False, True])
def test_global_arrays_are_sharded_over_data(tasks, as_named):
  mesh = _mesh()
  sharding = NamedSharding(mesh, P(None, "data")) if as_named else mesh
  kw = dict(batch_size=8, image_size=SIZE, seed=1)
  host = next(pipeline.train_iterator(tasks, **kw))
  batch = next(pipeline.train_iterator(tasks, sharding=sharding, **kw))
  assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (3, 8, SIZE, SIZE, 3)
  assert batch["image"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 5)
  assert batch["label"].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 2)
  assert batch["task"].sharding.is_fully_replicated
  assert len(batch["image"].addressable_shards) == 8
  assert batch["image"].addressable_shards[0].data.shape == (3, 1, SIZE, SIZE, 3)
  for key in ("image", "label", "task"):
    np.testing.assert_array_equal(np.asarray(batch[key]), host[key])

  eval_sharding = NamedSharding(mesh, P("data")) if as_named else mesh
  ev = next(pipeline.eval_batches(tasks, batch_size=8, image_size=SIZE, sharding=eval_sharding))
  assert ev["image"].shape == (8, SIZE, SIZE, 3)
  assert ev["image"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 4)
  assert ev["mask"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 1)
  assert ev["task"] == 0


def test_sharding_argument_errors(tasks):
  mesh = _mesh()
  with pytest.raises(ValueError, match="jax.process_count"):
    pipeline.train_iterator(tasks, batch_size=8, image_size=SIZE, seed=0, sharding=mesh,
                            process_index=0, process_count=2)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_iterator(tasks, batch_size=12, image_size=SIZE, seed=0, sharding=mesh)
  with pytest.raises(ValueError, match="multiple of process_count"):
    pipeline.train_iterator(tasks, batch_size=5, image_size=SIZE, seed=0, process_index=0,
                            process_count=2)


def test_no_tensorflow_imported(tasks):
  next(pipeline.train_iterator(tasks, batch_size=2, image_size=SIZE, seed=0))
  next(pipeline.eval_batches(tasks, batch_size=2, image_size=SIZE))
  loaded = [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]
  assert not loaded, loaded
