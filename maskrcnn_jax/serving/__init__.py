"""Serving a trained model: `host` is the one mapping between canvas and original pixels and the mask paste rules
(NumPy only, shared by evaluation, the Predictor and the exported model); `predictor.Predictor`; `export` writes a
`jax.export` directory and `exported_model.ExportedModel` runs one; `visualize` draws overlays."""
