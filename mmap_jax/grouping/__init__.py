"""Gradient-driven task grouping: which tasks should share one MmAP.

Warm-up: one MmAP is shared by all T tasks (`method=mmap_shared`). At every grouping step the
per-task gradients of the shared parameters come out of ONE `jax.vmap(jax.value_and_grad(...))`
over the task axis; their pairwise cosine similarities are accumulated into a T x T affinity, and
their mean over tasks (= the gradient of the mean task loss) is the training update, so a
grouping step costs about one training step, not T. The cosine may compare a sub-pytree of the
gradients (`affinity_filter`; the trainer's default is the MmAP source prompts) and may compare
an exponential moving average of each task's gradient instead of the step's own (`ema_decay`);
either way the affinity is the MEAN over recorded steps of that step's cosine matrix.

Partition: the tasks are split into disjoint groups maximising the objective

    J(G) = (1/T) * sum_i s_i,   s_i = mean_{j in G(i), j != i} A[i, j]   (s_i = 0 if G(i) = {i})

i.e. every task scores the mean affinity to its group-mates, and a task alone scores 0 ("no
transfer, no conflict": cosine 0 means orthogonal gradients). Equivalently J is the size-weighted
mean over groups of the group's mean pairwise affinity, singletons counting 0. The diagonal of A is
never read. Consequences: with num_groups = T the only partition is all singletons (J = 0); with
num_groups = 1 J is the mean off-diagonal affinity; left free, positively aligned tasks are merged
and conflicting ones (negative cosine) kept apart.

Search: EXACT over all set partitions (restricted-growth strings, vectorised numpy) while
T <= exact_max_tasks (default 10: 115,975 partitions), else average-linkage agglomerative
clustering. Ties (scores within 1e-12) go to fewer groups, then to the lexicographically smallest
label string (task 0's group first), so results are deterministic.

Number of groups: `num_groups=k` (exactly k groups), or `threshold=t` (the FEWEST groups such that
every group is coherent - its mean pairwise affinity is >= t, singletons trivially so - best J
among those; agglomerative: merge while the best average linkage is >= t, which gives the same
guarantee since a merge of coherent groups with cross-linkage >= t is coherent), or neither (the
partition with the best J over any number of groups; the trainer's `groups.num_groups=auto`).

Why J can choose k itself (auto) without drifting to k = 1 or k = T:
  - not k = T: a singleton scores 0, so any group whose members have positive mean affinity to
    each other beats splitting it; all singletons win only when every merge has a non-positive
    affinity (conflicting or unrelated tasks).
  - not k = 1: a task scores the MEAN (not the sum) of its affinities to its mates, so adding a
    task it agrees with less than with its current mates lowers its score; a uniform affinity
    a > 0 scores a for every partition without singletons, and the tie goes to fewer groups.
  - scale-free: multiplying A by c > 0 keeps the argmax (cosines and TAG's Z live on different
    scales), while adding a constant c to every off-diagonal entry does not: it is the
    evidence, and the singleton's 0 is the reference.
  Planted structure (blocks of high within- and low or negative cross-affinity) is recovered
  exactly, whatever the block sizes (tests/test_grouping.py).

Affinity (`affinity`): the cosine of per-task gradients (optionally per tower, each tower
normalised) or TAG's lookahead affinity (Fifty et al. 2021), see `affinity`'s docstring.

Outputs in the workdir: `affinity.npy`, `affinity.png`, `groups.json` (with the best alternative
partitions and their scores), `affinity_history.npy`; `load_groups` reads them. A config may
instead give the groups explicitly (`resolve_explicit_groups` validates them) or ask for an
ablation partition: `random_groups`, `all_in_one_groups`, `one_per_task_groups`.

Modules: `affinity` (gradients -> affinity), `partitions` (affinity -> groups), `files` (the
workdir's grouping files). Everything public is re-exported here (`from mmap_jax import grouping`).
"""
# pylint: disable=g-importing-member
from mmap_jax.grouping.affinity import (AFFINITIES, AffinityState, Split, affinity_signal,
                                        affinity_size, cosine_affinity, flatten_task_grads,
                                        grouping_step, lookahead_affinity, per_task_gradients,
                                        warmup_affinity)
from mmap_jax.grouping.files import (AFFINITY_FILE, FORMAT, GROUPS_FILE, HISTORY_FILE, PLOT_FILE,
                                     finalize_grouping, load_grouping, load_groups,
                                     plot_affinity, save_grouping)
from mmap_jax.grouping.partitions import (MAX_EXACT_TASKS, all_in_one_groups, check_affinity,
                                          enumerate_partitions, group_mean_affinity, partition,
                                          partition_score, one_per_task_groups, random_groups,
                                          ranked_partitions, resolve_explicit_groups,
                                          search_method, stable_from_step)
from mmap_jax.groups import Groups, canonical_groups, check_groups, groups_from_names
