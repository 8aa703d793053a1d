"""Build-time tools beside the package (not installed with it; nothing under lmms_tokprune imports them).

- `recipes.shapes_vqa`: the deterministic synthetic benchmark generator behind tasks/shapes_vqa.
- `recipes.demo_checkpoint`: the training recipe of the shipped demo checkpoint (`lmms-tokprune train-demo`
  from a checkout).
"""
