"""Builders: layouts, splits, label mapping, bad input (small generated trees)."""

import importlib
import json
import os
import shutil
import sys

import numpy as np
import pytest

from mmap_jax.data import images
from mmap_jax.data import sources
from mmap_jax.data.builders import common
from tests import data_trees

SPECIAL = ("gray.jpg", "rgba.png", "cmyk.jpg", "gray16.png", "rgb16.png", "rotated.jpg")


def _name(record) -> str:
  name = record["file_name"]
  return name.decode() if isinstance(name, bytes) else str(name)


def _records(source):
  return [source[i] for i in range(len(source))]


def _check_labels(task):
  """label -> class name agrees with the file's class folder and its colour."""
  for split in (task.train, task.val, task.test):
    for record in _records(split):
      domain, cls, fname = _name(record).split("/")
      assert domain == task.info.name
      assert task.info.raw_class_names[record["label"]] == cls
      pixels = np.asarray(images.decode_rgb(record["image"]))
      assert pixels.ndim == 3 and pixels.shape[-1] == 3
      if fname not in SPECIAL and fname != "gray.jpg":
        assert data_trees.color_label(pixels) == data_trees.CLASSES.index(cls)


@pytest.fixture(scope="module")
def office_home(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("office_home")
  root = data_trees.make_domain_tree(tmp / "OfficeHome", data_trees.OFFICE_HOME_DOMAINS,
                                     per_class=5)
  data_trees.write_special_images(root / "Art" / "Alarm_Clock", 0)
  data_dir = tmp / "tfds"
  return root, data_dir, sources.build_tasks("office_home", root=str(root), data_dir=str(data_dir))


def test_office_home_tasks(office_home):
  root, data_dir, tasks = office_home
  assert [t.info.name for t in tasks] == ["Art", "Clipart", "Product", "Real World"]
  assert [t.task_id for t in tasks] == [0, 1, 2, 3]
  assert [t.info.builder for t in tasks] == [
      "office_home/art", "office_home/clipart", "office_home/product", "office_home/real_world"]
  for t in tasks:
    assert t.info.raw_class_names == ("Alarm_Clock", "Desk Lamp", "flip_flops")
    assert t.info.class_names == ("Alarm Clock", "Desk Lamp", "flip flops")
    assert t.info.num_skipped == 0
    assert os.path.isfile(os.path.join(data_dir, "office_home", t.info.builder.split("/")[1],
                                       "1.0.0", "dataset_info.json"))
  # 5 files per class -> 4 train (1 of them val) / 1 test; Art's first class has 6 more
  # (11 -> 9 train (1 val) / 2 test).
  sizes = [(t.info.num_train, t.info.num_val, t.info.num_test) for t in tasks]
  assert sizes == [(14, 3, 4), (9, 3, 3), (9, 3, 3), (9, 3, 3)]
  assert all(t.info.val_split == "val0.1-seed0" for t in tasks)


def test_office_home_labels_and_images(office_home):
  _, _, tasks = office_home
  for t in tasks:
    _check_labels(t)
  names = {_name(r) for r in
           _records(tasks[0].train) + _records(tasks[0].val) + _records(tasks[0].test)}
  assert {f"Art/Alarm_Clock/{f}" for f in SPECIAL} <= names


def test_seeded_split_is_stratified_disjoint_and_complete(office_home):
  root, _, tasks = office_home
  for t in tasks:
    train = {_name(r) for r in _records(t.train)}
    val = {_name(r) for r in _records(t.val)}
    test = {_name(r) for r in _records(t.test)}
    assert not train & test and not val & train and not val & test
    on_disk = {f"{t.info.name}/{c}/{f}" for c in t.info.raw_class_names
               for f in os.listdir(root / t.info.name / c)}
    assert train | val | test == on_disk
    for c in t.info.raw_class_names:
      assert sum(n.split("/")[1] == c for n in test) >= 1


def test_reopen_without_root_and_determinism(office_home, tmp_path):
  root, data_dir, tasks = office_home
  again = sources.build_tasks("office_home", root=None, data_dir=str(data_dir))
  assert [t.info for t in again] == [t.info for t in tasks]
  other = sources.build_tasks("office_home", root=str(root), data_dir=str(tmp_path),
                              domains=["real_world"])
  assert [t.info.name for t in other] == ["Real World"]
  for split in ("train", "test"):
    names = [_name(r) for r in _records(getattr(other[0], split))]
    assert names == [_name(r) for r in _records(getattr(tasks[3], split))]


def test_other_seed_and_fraction(office_home, tmp_path):
  root, _, tasks = office_home
  a = sources.build_tasks("office_home", root=str(root), data_dir=str(tmp_path),
                          domains=["Clipart"], split_seed=7, train_fraction=0.6)[0]
  assert a.info.builder == "office_home/clipart-seed7-train0.6"
  # 3 of 5 per class to train, of which 1 is carved for val.
  assert (a.info.num_train, a.info.num_val, a.info.num_test) == (6, 3, 6)
  b = sources.build_tasks("office_home", root=str(root), data_dir=str(tmp_path),
                          domains=["Clipart"], split_seed=8)[0]
  test_7 = {_name(r) for r in _records(tasks[1].test)}
  assert {_name(r) for r in _records(b.test)} != test_7


def test_user_split_files(office_home, tmp_path):
  root, _, _ = office_home
  lists = tmp_path / "lists"
  lists.mkdir()
  train = ["Real World/Desk Lamp/000.jpg", "Real World/Alarm_Clock/001.png 7"]
  test = ["Real World/flip_flops/002.jpg 2", "", "# comment"]
  (lists / "Real World_train.txt").write_text("\n".join(train) + "\n")
  (lists / "Real World_test.txt").write_text("\n".join(test) + "\n")
  (task,) = sources.build_tasks("office_home", root=str(root), data_dir=str(tmp_path / "d"),
                                domains=["Real World"], split_files=str(lists))
  assert task.info.builder.startswith("office_home/real_world-files")
  assert [_name(r) for r in _records(task.train)] == [train[0], train[1].rsplit(" ", 1)[0]]
  assert [r["label"] for r in _records(task.train)] == [1, 0]  # From the folder, not the list.
  assert [_name(r) for r in _records(task.test)] == ["Real World/flip_flops/002.jpg"]
  (lists / "Real World_test.txt").write_text("Real World/No Such Class/x.jpg\n")
  with pytest.raises(common.SplitFileError, match=r"Real World_test.txt:1"):
    sources.build_tasks("office_home", root=str(root), data_dir=str(tmp_path / "e"),
                        domains=["Real World"], split_files=str(lists))


# ------------------------------------------------------------- bad input ---


def test_missing_root_lists_expected(tmp_path):
  with pytest.raises(common.DataLayoutError) as e:
    sources.build_tasks("office_home", root=str(tmp_path / "nope"), data_dir=str(tmp_path / "d"))
  assert "nope" in str(e.value) and "'Real World'" in str(e.value)


def test_missing_domain_lists_expected_and_found(tmp_path):
  root = data_trees.make_domain_tree(tmp_path / "oh", ["Art", "Clipart", "RealWorld"], per_class=1)
  with pytest.raises(common.DataLayoutError) as e:
    sources.build_tasks("office_home", root=str(root), data_dir=str(tmp_path / "d"))
  msg = str(e.value)
  assert "missing domain folder(s) ['Product', 'Real World']" in msg
  assert "expected ['Art', 'Clipart', 'Product', 'Real World']" in msg
  assert "found ['Art', 'Clipart', 'RealWorld']" in msg


def test_corrupt_image_fails_naming_the_file_then_skip_mode(tmp_path):
  root = data_trees.make_domain_tree(tmp_path / "tree", ["a", "b"], per_class=4)
  (root / "b" / "Desk Lamp" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  data_dir = str(tmp_path / "d")
  with pytest.raises(images.UnreadableImageError, match=r"b/Desk Lamp/broken.jpg.*skip_corrupt"):
    sources.build_tasks("image_folder", root=str(root), data_dir=data_dir)
  tasks = sources.build_tasks("image_folder", root=str(root), data_dir=data_dir, skip_corrupt=True)
  assert [t.info.num_skipped for t in tasks] == [0, 1]
  assert tasks[1].info.num_train + tasks[1].info.num_val + tasks[1].info.num_test == 12
  with open(os.path.join(tasks[1].info.data_dir, "metadata.json")) as f:
    metadata = json.load(f)
  assert metadata["num_skipped"] == 1 and metadata["skipped_files"] == ["b/Desk Lamp/broken.jpg"]
  # A later strict call must not silently use the data that skipped files...
  with pytest.raises(ValueError, match="broken.jpg"):
    sources.build_tasks("image_folder", root=str(root), data_dir=data_dir)
  # ...until the file is fixed and the domain rebuilt.
  data_trees.flat_image(1, 9).save(root / "b" / "Desk Lamp" / "broken.jpg", "JPEG")
  tasks = sources.build_tasks("image_folder", root=str(root), data_dir=data_dir,
                              domains=["b"], force_rebuild=True)
  assert tasks[0].info.num_skipped == 0
  assert tasks[0].info.num_train + tasks[0].info.num_val + tasks[0].info.num_test == 13


def test_differing_class_lists(tmp_path):
  root = data_trees.make_domain_tree(tmp_path / "tree", ["a", "b"], per_class=2)
  shutil.rmtree(root / "b" / "Desk Lamp")
  (root / "b" / "Lamp").mkdir()
  data_trees.flat_image(1, 0).save(root / "b" / "Lamp" / "x.png")
  data_trees.flat_image(1, 1).save(root / "b" / "Lamp" / "y.png")
  with pytest.raises(common.ClassListMismatchError) as e:
    sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp_path / "d"))
  assert "'b'" in str(e.value) and "['Desk Lamp']" in str(e.value) and "['Lamp']" in str(e.value)
  assert not (tmp_path / "d" / "image_folder").exists()  # Checked before building anything.
  a, b = sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp_path / "d"),
                             allow_per_task_classes=True)
  assert a.info.raw_class_names == ("Alarm_Clock", "Desk Lamp", "flip_flops")
  assert b.info.raw_class_names == ("Alarm_Clock", "Lamp", "flip_flops")


def test_single_image_classes_leave_the_test_split_empty(tmp_path):
  root = data_trees.make_domain_tree(tmp_path / "tree", ["only"], per_class=1)
  (task,) = sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp_path / "d"))
  assert (task.info.num_train, task.info.num_test) == (3, 0) and len(task.test) == 0


# ------------------------------------------------------------- list-based ---


def _list_tree(tmp_path, domains, list_dir_name):
  classes = ("aircraft_carrier", "alarm_clock", "The_Eiffel_Tower")
  root = data_trees.make_domain_tree(tmp_path / "dn", domains, classes=classes, per_class=4)
  list_dir = root / list_dir_name if list_dir_name else root
  # Labels are the official numbering (not 0..K-1 in our folder order).
  data_trees.write_lists(root, list_dir, domains, classes, labels=[0, 1, 2])
  return root, list_dir, classes


def test_mini_domainnet(tmp_path):
  domains = ("clipart", "painting", "real", "sketch")
  root, list_dir, classes = _list_tree(tmp_path, domains, "splits_mini")
  tasks = sources.build_tasks("mini_domainnet", root=str(root), data_dir=str(tmp_path / "d"))
  assert [t.info.builder for t in tasks] == [f"mini_domainnet/{d}" for d in domains]
  for t in tasks:
    assert t.info.raw_class_names == classes
    assert t.info.class_names == ("aircraft carrier", "alarm clock", "The Eiffel Tower")
    assert (t.info.num_train, t.info.num_val, t.info.num_test) == (6, 3, 3)
    for split, name in ((t.train, "train"), (t.test, "test")):
      lines = (list_dir / f"{t.info.name}_{name}.txt").read_text().split("\n")
      listed = sorted(line.rsplit(" ", 1)[0] for line in lines if line)
      got = _records(split) + (_records(t.val) if name == "train" else [])
      assert sorted(_name(r) for r in got) == listed
      for r in _records(split):
        assert t.info.raw_class_names[r["label"]] == _name(r).split("/")[1]
  # A label naming two classes is reported with file and line.
  bad = (list_dir / "sketch_train.txt").read_text().replace(
      "alarm_clock/000.jpg 1", "alarm_clock/000.jpg 0")
  (list_dir / "sketch_train.txt").write_text(bad)
  with pytest.raises(common.SplitFileError, match=r"sketch_train.txt:\d+: label 0"):
    sources.build_tasks("mini_domainnet", root=str(root), data_dir=str(tmp_path / "e"),
                        domains=["sketch"])


def test_domainnet_six_domains_lists_at_root(tmp_path):
  domains = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
  root, _, classes = _list_tree(tmp_path, domains, None)
  tasks = sources.build_tasks("domainnet", root=str(root), data_dir=str(tmp_path / "d"))
  assert [t.info.name for t in tasks] == list(domains)
  assert tasks[0].info.builder == "mmap_domainnet/clipart"
  assert all(t.info.raw_class_names == classes for t in tasks)
  _check = tasks[4]
  for r in _records(_check.train):
    assert classes[r["label"]] == _name(r).split("/")[1]
  with pytest.raises(common.DataLayoutError, match="infograph"):
    shutil.rmtree(root / "infograph")
    sources.build_tasks("domainnet", root=str(root), data_dir=str(tmp_path / "e"))


def test_domainnet_class_list_mismatch_across_domains(tmp_path):
  domains = ("clipart", "real")
  root, list_dir, _ = _list_tree(tmp_path, domains, None)
  text = (list_dir / "real_train.txt").read_text() + (list_dir / "real_test.txt").read_text()
  kept = [l for l in text.split("\n") if l and "aircraft_carrier" not in l]
  (list_dir / "real_train.txt").write_text("\n".join(kept[:-2]) + "\n")
  (list_dir / "real_test.txt").write_text("\n".join(kept[-2:]) + "\n")
  with pytest.raises(common.ClassListMismatchError,
                     match=r"'real'.*missing \['aircraft_carrier'\]"):
    sources.build_tasks("domainnet", root=str(root), data_dir=str(tmp_path / "d"),
                        domains=["clipart", "real"])


# ------------------------------------------------------- image_folder/demo ---


def test_image_folder_domain_selection_and_unknown_domain(tmp_path):
  root = data_trees.make_domain_tree(tmp_path / "mine", ["cartoon", "x-ray scans"], per_class=3)
  (task,) = sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp_path / "d"),
                                domains=["x-ray scans"])
  assert task.info.name == "x-ray scans"
  assert task.info.builder.startswith("image_folder/x_ray_scans-r")
  _check_labels(task)
  with pytest.raises(common.DataLayoutError, match=r"'photos'.*\['cartoon', 'x-ray scans'\]"):
    sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp_path / "d"),
                        domains=["photos"])


def test_demo_domains_generated_and_deterministic(tmp_path):
  from mmap_jax.demo import world as demo_world
  kwargs = dict(demo_seed=3, demo_images_per_class=5, demo_image_size=32)
  a = sources.build_tasks("demo_domains", data_dir=str(tmp_path / "a"), **kwargs)
  b = sources.build_tasks("demo_domains", data_dir=str(tmp_path / "b"), **kwargs)
  assert [t.info.name for t in a] == list(demo_world.DOMAINS)
  assert a[0].info.builder == f"demo_domains/{demo_world.DOMAINS[0]}-seed3-n5-px32"
  for ta, tb in zip(a, b):
    assert ta.info.raw_class_names == tuple(sorted(demo_world.folder_name(o)
                                                   for o in demo_world.OBJECTS))
    n = len(demo_world.OBJECTS)
    assert (ta.info.num_train, ta.info.num_val, ta.info.num_test) == (3 * n, n, n)
    for split in ("train", "val", "test"):
      assert _records(getattr(ta, split)) == _records(getattr(tb, split))
    for r in _records(ta.test):
      assert np.asarray(images.decode_rgb(r["image"])).shape == (32, 32, 3)
      assert ta.info.raw_class_names[r["label"]] == _name(r).split("/")[1]


def test_modules_reimport_without_registration_clash():
  import tensorflow_datasets as tfds
  import mmap_jax.data.builders as builders
  for _ in range(2):
    for name in ("common", "office_home", "mini_domainnet", "domainnet", "image_folder"):
      importlib.reload(sys.modules[f"mmap_jax.data.builders.{name}"])
    importlib.reload(builders)
    importlib.reload(importlib.import_module("mmap_jax.demo.dataset"))  # registers again
  assert "demo_domains" in builders.DATASETS
  with pytest.raises(ValueError, match="already registered by mmap_jax.data.builders.office_home"):
    builders.register(common.FolderDataset("office_home", type("Other", (), {})))
  registered = tfds.core.registered.list_imported_builders()
  for module in builders.DATASETS.values():
    assert module.Builder.name not in registered
  # TFDS's own (different) domainnet builder is untouched.
  assert tfds.core.registered.imported_builder_cls("domainnet").__module__.startswith(
      "tensorflow_datasets.")


def test_prompt_names_of_the_real_class_lists():
  here = os.path.dirname(__file__)
  with open(os.path.join(here, "testdata", "office_home_classes.txt")) as f:
    office = [l.strip() for l in f if l.strip()]
  with open(os.path.join(here, "testdata", "domainnet_classes.txt")) as f:
    domainnet = [l.strip() for l in f if l.strip()]
  assert common.prompt_name("alarm_clock") == "alarm clock"
  assert common.prompt_name("Alarm_Clock") == "Alarm Clock"
  for raw in office + domainnet:
    words = common.prompt_name(raw)
    assert "_" not in words and words == words.strip() and "  " not in words
  assert len({common.prompt_name(c) for c in domainnet}) == len(domainnet) == 345
  assert len({common.slug(d) for d in data_trees.OFFICE_HOME_DOMAINS}) == 4
