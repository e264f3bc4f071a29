"""The embedded demo: its procedurally drawn multi-domain world (`world`) and the pretraining of
the demo's own small CLIP on that world's image-caption pairs (`pretrain`). The committed demo
CLIP (mmap_jax/assets/demo_clip) is what `pretrain` produced; the core loads it through
`mmap_jax.resources` and never imports this package: importing it registers the demo's dataset
builder (`dataset`, name 'demo_domains') with `mmap_jax.data.builders`."""

from mmap_jax.demo import dataset  # noqa: F401  (registers 'demo_domains')
