"""The built-in tasks that run anywhere. Digits (the default): scikit-learn's bundled digits (`data`), the cache where
built models are kept (`cache`), pretraining of the base flow model and the reward classifier (`pretrain`), a few-step
student of the base model by reflow (`distill`, `builtin:digits-reflow`), and `ngrpo demo` end to end (`demo`).
Text rendering (`builtin:words`, scored by OCR): words drawn on the fly (`words`), the pretraining of its small SD3
transformer (`words_pretrain`; the base is committed in words_base/) and `ngrpo demo --task words` (`words_demo`).

Spans layers (docs/design.md): `data`, `cache`, `words` 0; `pretrain`, `distill`, `words_pretrain` 1; `demo`,
`words_demo` 4.
"""
