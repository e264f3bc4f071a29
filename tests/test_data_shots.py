"""The few-shot protocol: data.shots / data.split_seed on the real-dataset builders.

Train splits are k images per class drawn by the split seed from what the validation carve
leaves; val (>= val_per_class per class) and test never depend on k; the lists are written beside
the data and their sha256 goes into results.json.
"""
from __future__ import annotations

import collections
import hashlib
import os

import pytest

from mmap_jax.data import sources
from mmap_jax.data.builders import common
from mmap_jax.train import setup
from mmap_jax.train import run_spec
from tests import data_trees
from tests.test_validation import _files


def _name(record) -> str:
  name = record["file_name"]
  return name.decode() if isinstance(name, bytes) else str(name)


def _names(source) -> list[str]:
  return [_name(source[i]) for i in range(len(source))]


def _per_class(names) -> collections.Counter:
  return collections.Counter(n.split("/")[1] for n in names)


# ----------------------------------------------------------------- draws ---


def test_sample_shots_is_balanced_nested_seeded_and_keeps_short_classes():
  counts = (3, 20, 40)
  relpaths, labels = _files(counts)
  classes = ["c0", "c1", "c2"]
  pool = list(range(len(labels)))
  draw = lambda k, seed=0, domain="d": common.sample_shots(
      relpaths, labels, classes, pool, domain=domain, seed=seed, shots=k)
  four, short4 = draw(4)
  sixteen, short16 = draw(16)
  assert collections.Counter(labels[i] for i in four) == {0: 3, 1: 4, 2: 4}
  assert collections.Counter(labels[i] for i in sixteen) == {0: 3, 1: 16, 2: 16}
  assert short4 == {"c0": 3} and short16 == {"c0": 3}
  assert set(four) <= set(sixteen)                       # nested in k
  assert draw(16) == (sixteen, short16)                  # deterministic
  assert draw(16, seed=1)[0] != sixteen                  # the split seed draws another
  assert draw(16, domain="e")[0] != sixteen              # each domain its own stream
  assert draw(0) == (pool, {})                           # 0 = all
  # Only the pool is drawn from: indices outside it never come back.
  part = pool[::2]
  drawn, _ = common.sample_shots(relpaths, labels, classes, part, domain="d", seed=0, shots=4)
  assert set(drawn) <= set(part)
  with pytest.raises(ValueError, match="shots"):
    draw(-1)


def test_carve_floor_per_class_is_capped_at_half_a_class():
  relpaths, labels = _files((4, 10, 80))
  classes = ["c0", "c1", "c2"]
  _, val = common.carve_val(relpaths, labels, classes, domain="d", seed=0, val_fraction=0.1,
                            min_per_class=8)
  # max(round(0.1 n), min(8, n // 2)): 2 of 4, 5 of 10, 8 of 80.
  assert collections.Counter(labels[i] for i in val) == {0: 2, 1: 5, 2: 8}
  # Without the floor the carve is the fraction's, as before.
  _, plain = common.carve_val(relpaths, labels, classes, domain="d", seed=0, val_fraction=0.1)
  assert collections.Counter(labels[i] for i in plain) == {0: 1, 1: 1, 2: 8}
  # The floor only adds images: the fraction's val set is a prefix of the same permutation.
  assert set(plain) <= set(val)


# ---------------------------------------------------------- real builder ---


@pytest.fixture(scope="module")
def office_home(tmp_path_factory):
  """An Office-Home-shaped tree: 2 of its domains x 3 classes x 40 images."""
  tmp = tmp_path_factory.mktemp("shots")
  root = data_trees.make_domain_tree(tmp / "OfficeHome", data_trees.OFFICE_HOME_DOMAINS[:2],
                                     per_class=40)
  data_dir = str(tmp / "tfds")
  build = lambda **kw: sources.build_tasks(
      "office_home", root=str(root), data_dir=data_dir, domains=["Art", "Clipart"],
      val_per_class=8, **kw)
  return tmp, root, build


def test_shots_on_office_home_are_class_balanced_and_disjoint(office_home):
  _, _, build = office_home
  full = build()
  few = build(shots=4)
  for t, f in zip(few, full):
    train, val, test = _names(t.train), _names(t.val), _names(t.test)
    assert _per_class(train) == {c: 4 for c in data_trees.CLASSES}
    assert _per_class(val) == {c: 8 for c in data_trees.CLASSES}   # 32 train -> 8 val
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    # Val and test do not depend on k; the k-shot train split is part of the full pool.
    assert val == _names(f.val) and test == _names(f.test)
    assert set(train) <= set(_names(f.train)) and len(_names(f.train)) == 3 * 24
    assert t.info.shots == 4 and t.info.num_train == 12
    assert t.info.val_split == "val0.1-min8-seed0-shots4"
    for r in (t.train[i] for i in range(len(t.train))):
      assert t.info.raw_class_names[r["label"]] == _name(r).split("/")[1]


def test_split_files_checksums_and_determinism(office_home):
  tmp, root, build = office_home
  tasks = build(shots=16)
  for t in tasks:
    folder = t.info.split_lists
    assert folder == os.path.join(os.path.dirname(t.info.data_dir), "splits",
                                  "val0.1-min8-seed0-shots16")
    lists = {}
    for split in ("train", "val", "test"):
      path = os.path.join(folder, f"{t.info.name}_{split}.txt")
      with open(path, "rb") as f:
        content = f.read()
      assert hashlib.sha256(content).hexdigest() == t.info.split_checksums[split]
      rows = [r for r, _, _ in common.read_split_file(path)]
      assert rows == _names(getattr(t, split))
      lists[split] = set(rows)
    assert not lists["train"] & lists["val"] and not lists["train"] & lists["test"]
    assert not lists["val"] & lists["test"]
  # Another data dir (a fresh build) gives byte-identical lists; another split seed does not.
  again = sources.build_tasks("office_home", root=str(root), data_dir=str(tmp / "other"),
                              domains=["Art", "Clipart"], val_per_class=8, shots=16)
  assert [t.info.split_checksums for t in again] == [t.info.split_checksums for t in tasks]
  reseeded = build(shots=16, split_seed=1)
  for a, b in zip(reseeded, tasks):
    assert a.info.split_checksums["train"] != b.info.split_checksums["train"]
    assert "seed1" in a.info.val_split
  record = sources.splits_record(tasks)
  assert record["tasks"]["Art"]["sha256"] == tasks[0].info.split_checksums
  assert record["tasks"]["Art"]["shots"] == 16 and record["tasks"]["Art"]["num_train"] == 48
  assert record["sha256"] == sources.splits_record(again)["sha256"]
  assert record["sha256"] != sources.splits_record(reseeded)["sha256"]


def test_shots_apply_to_user_split_files(office_home):
  tmp, root, build = office_home
  t = build()[0]
  folder = t.info.split_lists   # The full lists, passed back as split_files (val from its list).
  (few,) = sources.build_tasks("office_home", root=str(root), data_dir=str(tmp / "files"),
                               domains=["Art"], split_files=folder, shots=4)
  assert few.info.val_split == "files-seed0-shots4"
  assert _per_class(_names(few.train)) == {c: 4 for c in data_trees.CLASSES}
  assert _names(few.val) == _names(t.val) and _names(few.test) == _names(t.test)


def test_shots_on_a_list_dataset(tmp_path):
  """MiniDomainNet's official lists: the k-shot draw comes from the listed train split."""
  classes = ("aircraft_carrier", "alarm_clock", "The_Eiffel_Tower")
  root = data_trees.make_domain_tree(tmp_path / "dn", ["clipart"], classes=classes, per_class=16)
  data_trees.write_lists(root, root / "splits_mini", ["clipart"], classes, labels=[0, 1, 2])
  build = lambda **kw: sources.build_tasks("mini_domainnet", root=str(root),
                                           data_dir=str(tmp_path / "d"), domains=["clipart"],
                                           val_per_class=2, **kw)
  (full,) = build()
  (few,) = build(shots=3)
  listed = (root / "splits_mini" / "clipart_train.txt").read_text().split()[::2]
  assert _per_class(_names(few.train)) == {c: 3 for c in classes}   # 12 listed -> 2 val, 10
  assert set(_names(few.train)) <= set(listed) - set(_names(few.val))
  assert _names(few.val) == _names(full.val) and _names(few.test) == _names(full.test)
  assert few.info.split_checksums["test"] == full.info.split_checksums["test"]
  assert few.info.split_checksums["train"] != full.info.split_checksums["train"]


def test_config_shots_argument_and_validation(office_home):
  tmp, root, _ = office_home
  from configs import demo, office_home as oh
  assert oh.get_config("").data.shots == 0 and oh.get_config("shots=all").data.shots == 0
  assert demo.get_config("shots=4").data.shots == 4
  assert demo.get_config("").data.shots == 16    # the demo's few-shot default (issue 25)
  assert demo.get_config("shots=all").data.shots == 0
  assert demo.get_config("runlocal").data.shots == 4       # the smoke run's 20-image tree
  assert demo.get_config("runlocal,shots=all").data.shots == 0
  with pytest.raises(ValueError, match=r"data.shots: shots='many'"):
    oh.get_config("shots=many")
  c = demo.get_config("runlocal")
  c.data.shots = -4
  c.data.split_seed = -1
  with pytest.raises(setup.ConfigError) as e:
    setup.validate(c)
  assert "data.shots=-4" in str(e.value) and "data.split_seed=-1" in str(e.value)
  c = oh.get_config(f"clip=demo,root={root},data_dir={tmp / 'tfds'},domains=Art,shots=4")
  setup.validate(c)
  (t,) = setup.build_tasks(run_spec.resolve(c).data)
  assert _per_class(_names(t.train)) == {cl: 4 for cl in data_trees.CLASSES}
  assert t.info.num_val == 24


@pytest.mark.slow
def test_demo_world2_few_shot_splits(tmp_path):
  """The new demo world through the demo builder: 24 classes, k-shot train, val and test
  disjoint and class-balanced, prepared under its own config names."""
  from mmap_jax.demo import world_v2
  tasks = sources.build_tasks("demo_domains", data_dir=str(tmp_path), domains=["photo", "sketch"],
                              demo_world=2, demo_images_per_class=20, demo_image_size=16,
                              train_fraction=0.5, val_per_class=8, shots=4)
  for t in tasks:
    assert t.info.builder == f"demo_domains/{t.info.name}-w2-seed0-n20-px16-seed0-train0.5"
    assert sorted(t.info.class_names) == sorted(world_v2.OBJECTS)   # labels: sorted folders
    train, val, test = _names(t.train), _names(t.val), _names(t.test)
    assert _per_class(train) == {c: 4 for c in world_v2.OBJECTS}
    assert _per_class(val) == {c: 5 for c in world_v2.OBJECTS}    # 10 train -> min(8, 10 // 2)
    assert _per_class(test) == {c: 10 for c in world_v2.OBJECTS}
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    for split in ("train", "val", "test"):
      path = os.path.join(t.info.split_lists, f"{t.info.name}_{split}.txt")
      with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == t.info.split_checksums[split]
  with pytest.raises(ValueError, match="demo_world=3"):
    sources.build_tasks("demo_domains", data_dir=str(tmp_path), demo_world=3,
                        demo_images_per_class=2, demo_image_size=32)
