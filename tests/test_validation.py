"""Validation split (carve, lists beside the data, user val lists) and validation-based selection."""
from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest

from mmap_jax.data import sources
from mmap_jax.data.builders import common
from mmap_jax.train import checkpointing, selection, setup
from mmap_jax.train import run_spec
from tests import data_trees


def _name(record) -> str:
  name = record["file_name"]
  return name.decode() if isinstance(name, bytes) else str(name)


def _names(source) -> list[str]:
  return [_name(source[i]) for i in range(len(source))]


def _read_list(path) -> list[tuple[str, int]]:
  return [(r, lab) for r, lab, _ in common.read_split_file(str(path))]


# ------------------------------------------------------------------ carve ---


def _files(counts):
  relpaths, labels = [], []
  for label, n in enumerate(counts):
    relpaths += [f"d/c{label}/{i:03d}.jpg" for i in range(n)]
    labels += [label] * n
  return relpaths, labels


def test_carve_is_stratified_deterministic_and_keyed_by_names():
  counts = (1, 2, 5, 10, 31)
  relpaths, labels = _files(counts)
  classes = [f"c{i}" for i in range(len(counts))]
  train, val = common.carve_val(relpaths, labels, classes, domain="d", seed=0, val_fraction=0.1)
  assert sorted(train + val) == list(range(len(labels))) and not set(train) & set(val)
  per_class = collections.Counter(labels[i] for i in val)
  # round(0.1 n), at least 1 and at most n - 1 when n >= 2; a single image stays in train.
  assert [per_class[c] for c in range(len(counts))] == [0, 1, 1, 1, 3]
  assert common.carve_val(relpaths, labels, classes, domain="d", seed=0,
                          val_fraction=0.1) == (train, val)
  # Input order does not matter (the carve orders each class by relpath).
  order = np.random.default_rng(1).permutation(len(labels))
  _, val_shuffled = common.carve_val([relpaths[i] for i in order], [labels[i] for i in order],
                                     classes, domain="d", seed=0, val_fraction=0.1)
  assert sorted(relpaths[order[i]] for i in val_shuffled) == sorted(relpaths[i] for i in val)
  # Another seed or domain draws another split; adding a class moves no other class's images.
  _, other = common.carve_val(relpaths, labels, classes, domain="d", seed=1, val_fraction=0.1)
  assert other != val
  more_paths, more_labels = _files(counts + (7,))
  _, val_more = common.carve_val(more_paths, more_labels, classes + ["c5"], domain="d", seed=0,
                                 val_fraction=0.1)
  assert [more_paths[i] for i in val_more if more_labels[i] < 5] == [relpaths[i] for i in val]
  assert common.carve_val(relpaths, labels, classes, domain="d", seed=0,
                          val_fraction=0.0) == (list(range(len(labels))), [])
  with pytest.raises(ValueError, match="val_fraction"):
    common.carve_val(relpaths, labels, classes, domain="d", seed=0, val_fraction=1.0)


# ----------------------------------------------------------------- tasks ---


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("val")
  root = data_trees.make_domain_tree(tmp / "tree", ["Real World", "b"], per_class=10)
  tasks = sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp / "tfds"))
  return tmp, root, tasks


def test_splits_are_disjoint_complete_and_stratified(tree):
  _, root, tasks = tree
  for t in tasks:
    train, val, test = _names(t.train), _names(t.val), _names(t.test)
    assert len(set(train + val + test)) == len(train) + len(val) + len(test)
    on_disk = {f"{t.info.name}/{c}/{f}" for c in t.info.raw_class_names
               for f in os.listdir(root / t.info.name / c)}
    assert set(train + val + test) == on_disk
    # 10 per class: 8 train before the carve -> 1 val (round(0.8) = 1), 7 train; 2 test.
    assert collections.Counter(n.split("/")[1] for n in val) == {c: 1 for c in data_trees.CLASSES}
    assert (t.info.num_train, t.info.num_val, t.info.num_test) == (21, 3, 6)
    assert t.info.val_split == "val0.1-seed0"
    for r in (t.val[i] for i in range(len(t.val))):
      assert t.info.raw_class_names[r["label"]] == _name(r).split("/")[1]


def test_val_is_the_same_for_every_method_and_training_seed(tree):
  tmp, root, _ = tree
  from configs import image_folder
  # The configs ask for >= 8 val images per class (capped at half a class: 4 of these 8).
  tasks = sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp / "tfds"),
                              val_per_class=8)
  assert [len(t.val) for t in tasks] == [12, 12]
  for arg, seed in (("method=coop_mt", 0), ("method=mmap_st", 5)):
    c = image_folder.get_config(f"{arg},root={root},data_dir={tmp / 'tfds'}")
    c.seed, c.clip.path = seed, "demo"   # only the data fields matter; a run needs a CLIP
    again = setup.build_tasks(run_spec.resolve(c).data)
    assert [_names(t.val) for t in again] == [_names(t.val) for t in tasks]
    assert [_names(t.train) for t in again] == [_names(t.train) for t in tasks]


def test_lists_written_beside_the_data_and_round_trip(tree):
  tmp, root, tasks = tree
  t = tasks[0]
  folder = t.info.split_lists
  assert folder == os.path.join(os.path.dirname(t.info.data_dir), "splits", "val0.1-seed0")
  for split in ("train", "val", "test"):
    rows = _read_list(os.path.join(folder, f"Real World_{split}.txt"))
    source = getattr(t, split)
    assert rows == [(_name(source[i]), int(source[i]["label"])) for i in range(len(source))]
  # The folder, passed back as split_files, reproduces every split (val from its list).
  (again,) = sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp / "rt"),
                                 domains=["Real World"], split_files=folder)
  assert again.info.val_split == "files" and "-files" in again.info.builder
  for split in ("train", "val", "test"):
    assert _names(getattr(again, split)) == _names(getattr(t, split))
  # A second open reads the carve from index.json and agrees.
  reopened = sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp / "tfds"))
  assert [_names(x.val) for x in reopened] == [_names(x.val) for x in tasks]


def test_val_fraction_zero_and_subset_pickles(tree):
  tmp, root, tasks = tree
  none = sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp / "tfds"),
                             val_fraction=0.0)
  for t, carved in zip(none, tasks):
    assert len(t.val) == 0 and t.info.val_split == "none"
    assert sorted(_names(t.train)) == sorted(_names(carved.train) + _names(carved.val))
    assert not os.path.exists(os.path.join(t.info.split_lists, f"{t.info.name}_val.txt"))
  val = pickle.loads(pickle.dumps(tasks[1].val))
  assert _names(val) == _names(tasks[1].val)
  assert [_name(r) for r in val.__getitems__([2, 0])] == [_names(val)[2], _names(val)[0]]


def test_user_val_list_is_honoured_and_overlaps_are_rejected(tree):
  tmp, root, _ = tree
  lists = tmp / "user_lists"
  lists.mkdir()
  files = [f"b/{c}/{f}" for c in data_trees.CLASSES for f in sorted(os.listdir(root / "b" / c))]
  train, val, test = files[:20], files[20:25], files[25:]
  for split, rows in (("train", train), ("val", val), ("test", test)):
    (lists / f"b_{split}.txt").write_text("\n".join(rows) + "\n")
  (t,) = sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp / "u"),
                             domains=["b"], split_files=str(lists))
  assert (_names(t.train), _names(t.val), _names(t.test)) == (train, val, test)
  assert t.info.val_split == "files"
  for other, name in ((train, "train"), (test, "test")):
    (lists / "b_val.txt").write_text("\n".join(val[:2] + [other[3]]) + "\n")
    with pytest.raises(common.SplitFileError, match=rf"b_val\.txt:3: .*already listed in "
                       rf".*b_{name}\.txt:4"):
      sources.build_tasks("image_folder", root=str(root), data_dir=str(tmp / "u2"),
                          domains=["b"], split_files=str(lists))


def test_list_dataset_val_list_overlap_names_file_and_line(tmp_path):
  domains = ("clipart", "painting", "real", "sketch")
  classes = ("aircraft_carrier", "alarm_clock", "The_Eiffel_Tower")
  root = data_trees.make_domain_tree(tmp_path / "dn", domains, classes=classes, per_class=4)
  list_dir = root / "splits_mini"
  data_trees.write_lists(root, list_dir, domains, classes)
  (list_dir / "real_val.txt").write_text(
      (list_dir / "real_test.txt").read_text().splitlines()[1] + "\n")
  with pytest.raises(common.SplitFileError, match=r"real_val\.txt:1: .*real_test\.txt:2"):
    sources.build_tasks("mini_domainnet", root=str(root), data_dir=str(tmp_path / "d"),
                        domains=["real"], split_files=str(list_dir))
  train_lines = (list_dir / "real_train.txt").read_text().splitlines()
  (list_dir / "real_train.txt").write_text("\n".join(train_lines[1:]) + "\n")
  (list_dir / "real_val.txt").write_text(train_lines[0] + "\n")
  (t,) = sources.build_tasks("mini_domainnet", root=str(root), data_dir=str(tmp_path / "d"),
                             domains=["real"], split_files=str(list_dir))
  assert _names(t.val) == [train_lines[0].rsplit(" ", 1)[0]] and t.info.val_split == "files"
  # The dataset's own list folder (no split_files): val is carved from train, not listed.
  (own,) = sources.build_tasks("mini_domainnet", root=str(root), data_dir=str(tmp_path / "o"),
                               domains=["real"])
  assert own.info.val_split == "val0.1-seed0"


# -------------------------------------------------------------- selection ---


HISTORY = [(100, {"a": 0.5, "b": 0.3}), (200, {"a": 0.6, "b": 0.4}),
           (300, {"a": 0.4, "b": 0.6}), (400, {"a": 0.55, "b": 0.3})]


def test_best_val_picks_the_highest_average_ties_to_the_earlier_step():
  s = selection.Selection("best_val")
  became = [s.record(step, val) for step, val in HISTORY]
  # Averages 0.40, 0.50, 0.50 (a tie: the earlier step 200 stays), 0.425.
  assert became == [True, True, False, False] and s.step == 200
  record = s.to_json()
  assert record["val_average"] == pytest.approx(0.5) and record["rule"] == "best_val"
  assert [h["step"] for h in record["history"]] == [100, 200, 300, 400]
  assert "step 200" in record["reason"]
  again = selection.Selection.from_json(record, "best_val")
  assert again.to_json() == record
  with pytest.raises(ValueError, match="train.select"):
    selection.Selection.from_json(record, "last")
  last = selection.Selection("last")
  for step, val in HISTORY:
    last.record(step, val)
  assert last.step == 400 and last.to_json()["val_average"] == pytest.approx(0.425)
  with pytest.raises(ValueError, match="after step"):
    last.record(400, {"a": 1.0})


def test_selected_state_survives_checkpoint_rotation(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"), keep=2, async_save=False)
  best = {"w": np.full(3, 2.0, np.float32)}
  for step in (2, 4, 6, 8):
    state = {"learned": {"w": np.full(3, float(step), np.float32)}, "step": np.asarray(step)}
    ckpt.save(step, state, {"step": step}, {"selection": {"step": 2}}, selected=best)
  assert ckpt.all_steps() == [6, 8]  # the selected step's own checkpoint was rotated away...
  restored = ckpt.restore(state)
  np.testing.assert_array_equal(restored.selected["w"], best["w"])  # ...its state was not.
  assert restored.meta["selection"] == {"step": 2}
  ckpt.close()


def test_config_rejects_bad_validation_fields(tmp_path):
  from configs import demo
  c = demo.get_config("runlocal")
  c.data.val_fraction = 0.0
  with pytest.raises(setup.ConfigError, match=r"train.select='best_val'.*data.val_fraction=0"):
    setup.validate(c)
  c.train.select = "last"
  setup.validate(c)  # val_fraction=0 is fine when nothing selects with it.
  c.data.val_fraction = 1.0
  c.train.select = "best"
  with pytest.raises(setup.ConfigError) as e:
    setup.validate(c)
  assert "data.val_fraction=1.0" in str(e.value) and "train.select='best'" in str(e.value)


# ------------------------------------------------------- one clear error ---


def test_validation_names_every_bad_field_once():
  from configs import demo
  c = demo.get_config("runlocal")
  c.method, c.seed, c.input.batch_size = "mmap_mtt", -1, 0
  with pytest.raises(setup.ConfigError) as e:
    setup.validate(c)
  msg = str(e.value)
  for field in ("method='mmap_mtt'", "seed=-1", "input.batch_size=0"):
    assert field in msg, msg
  assert msg.count("lora_mt") == 1, msg   # the allowed methods, listed once


def test_a_missing_clip_and_a_bad_data_root_are_reported_together(tmp_path):
  from configs import office_home
  c = office_home.get_config(f"clip={tmp_path / 'no_clip'}")
  c.data.root, c.data.data_dir = str(tmp_path / "no_root"), str(tmp_path / "tfds")
  setup.validate(c)   # the values are well-formed; the files are what is missing
  with pytest.raises(setup.ConfigError) as e:
    setup.load_inputs(run_spec.resolve(c))
  msg = str(e.value)
  assert "clip.path:" in msg and "no_clip" in msg, msg
  assert "data:" in msg and "no_root" in msg, msg


def test_a_workdir_that_is_a_file_or_unwritable_is_named(tmp_path):
  setup.check_workdir(tmp_path / "new" / "run")          # creatable: fine
  setup.check_workdir("gs://bucket/run")                  # object stores: their first write says
  file = tmp_path / "a_file"
  file.write_text("x")
  with pytest.raises(setup.ConfigError, match=f"workdir {file} is a file"):
    setup.check_workdir(file)
  with pytest.raises(setup.ConfigError, match=f"{file} is a file"):
    setup.check_workdir(file / "run")
  if os.geteuid() != 0:   # root writes anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(setup.ConfigError, match="not writable"):
      setup.check_workdir(locked / "run")


def test_launchers_print_user_errors_as_one_block_and_exit_2(monkeypatch, capsys):
  """launch.entry.report_user_errors: the project's errors and missing files are one block on
  stderr (exit 2, no traceback); bugs, and everything under MMAP_JAX_DEBUG=1, keep theirs."""
  from launch import entry

  def failing(e):
    def main(argv):
      raise e
    return entry.report_user_errors(main)

  monkeypatch.delenv(entry.DEBUG_ENV, raising=False)
  problem = setup.ConfigError("invalid config:\n  method='x'; allowed: a, b")
  for error, text in ((problem, str(problem)),
                      (FileNotFoundError("no checkpoint in /w/checkpoints"),
                       "no checkpoint in /w/checkpoints"),
                      (FileExistsError(17, "File exists", "/w"), "File exists: /w")):
    with pytest.raises(SystemExit) as exit_:
      failing(error)(["x"])
    assert exit_.value.code == entry.USER_ERROR_EXIT_CODE == 2
    err = capsys.readouterr().err
    assert err == f"error: {text}\n" and "Traceback" not in err

  def bad_state(argv):   # a ValueError the project raises about the user's input
    from mmap_jax.train import trained
    trained.load_trained("/nowhere", state="bogus")
  with pytest.raises(SystemExit):
    entry.report_user_errors(bad_state)(["x"])
  assert capsys.readouterr().err.startswith("error: state='bogus'; allowed:")
  with pytest.raises(ValueError):   # not raised by the project: a bug, with its traceback
    failing(ValueError("deep inside a library"))(["x"])
  with pytest.raises(KeyError):
    failing(KeyError("bug"))(["x"])
  monkeypatch.setenv(entry.DEBUG_ENV, "1")
  with pytest.raises(setup.ConfigError):
    failing(problem)(["x"])


def test_library_chatter_stays_off_the_launchers_console():
  """orbax / grain INFO and TFDS below ERROR are dropped from absl's handler; the project's own
  lines and the libraries' real problems stay; --verbosity=1 shows everything."""
  import logging
  from absl import logging as absl_logging
  from launch import entry
  entry.quiet_library_logs()
  entry.quiet_library_logs()   # idempotent
  filters = [f for f in absl_logging.get_absl_handler().filters
             if isinstance(f, entry._LibraryChatterFilter)]
  assert len(filters) == 1
  shown = lambda where, level: filters[0].filter(logging.LogRecord(
      "absl", level, f"/venv/site-packages/{where}.py", 1, "msg", None, None))
  assert not shown("orbax/checkpoint/checkpoint_manager", logging.INFO)
  assert shown("orbax/checkpoint/checkpoint_manager", logging.WARNING)
  assert not shown("tensorflow_datasets/core/dataset_builder", logging.WARNING)
  assert shown("tensorflow_datasets/core/dataset_builder", logging.ERROR)
  assert not shown("grain/_src/python/data_loader", logging.INFO)
  assert shown("mmap_jax/train/loop", logging.INFO)
  before = absl_logging.get_verbosity()
  try:
    absl_logging.set_verbosity(1)
    assert shown("orbax/checkpoint/checkpoint_manager", logging.INFO)
  finally:
    absl_logging.set_verbosity(before)
