"""Applications built on the core library: the benchmark and its accelerator sweep, the
multi-run sweep (seeds x settings -> tables), and the launchers' process setup (host_runtime).
The core (models, prompts, heads, data, train) never imports from here."""
