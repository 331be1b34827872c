"""Training data: tile sources (slides, image folders, synthesized slides), multi-crop
augmentation, iBOT masks, and a deterministic, resumable, rank/worker-sharded sample order."""
