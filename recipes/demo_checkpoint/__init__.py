"""Training recipe of the shipped demo checkpoint (`lmms-tokprune train-demo`): LLaVA-1.5 in miniature."""
