"""Concept erasure for text-to-image diffusion models: pure objectives, editors and metrics.

Modules: ``esd`` (the score-distillation objective of the ESD family and its x_t sources),
``closed_form`` (the ridge editor of cross-attention projections: UCE, RECE's and TRCE's edit
steps), ``params`` (which parameters a method trains or edits), ``preservation`` (retain,
anchor and unconditional-drift terms), and one module per method built from them.
"""
