"""The built-in default task that runs anywhere: scikit-learn's bundled digits (`data`), the cache where built
models are kept (`cache`), pretraining of the base flow model and the reward classifier (`pretrain`), a few-step
student of the base model by reflow (`distill`, `builtin:digits-reflow`), and `ngrpo demo` end to end (`demo`).

Spans layers (docs/design.md): `data`, `cache` 0; `pretrain`, `distill` 1; `demo` 4.
"""
