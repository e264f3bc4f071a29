"""The embedded demo: its procedurally drawn multi-domain world (`world`) and the pretraining of
the demo's own small CLIP on that world's image-caption pairs (`pretrain`). The committed demo
CLIP (mmap_jax/assets/demo_clip) is what `pretrain` produced; the core loads it through
`mmap_jax.resources` and never imports this package's training code."""
