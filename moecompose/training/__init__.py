"""Training and evaluation of built artifacts: the recipe (``recipe``), the data
pipeline (``data``), the training loop (``loop``) and evaluation (``evaluate``)."""
