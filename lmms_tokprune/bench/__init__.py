"""Commands that build and run models to measure them: `lmms-tokprune bench` (the real engine path on a
full-width random LLaVA-1.5) and `bench --compress-only` (the methods alone on CLIP-L-shaped inputs).
The pure accounting they report against (FLOPs, timing helpers) lives in `lmms_tokprune.efficiency`."""
