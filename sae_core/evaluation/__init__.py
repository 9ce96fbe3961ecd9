"""Evaluation of trained SAEs on held-out data: reconstruction metrics and latent statistics
(`reconstruction`), downstream loss by splicing the reconstruction into the model (`downstream`),
progressive recovery at other sparsities (`recovery`), comparison of SAEs of different widths (`family`),
and the per-run composition of all of them (`run`). Modules are imported directly: the trainer needs only
`reconstruction`, which must not pull in transformers."""
