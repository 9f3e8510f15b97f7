"""Stage 2 inputs: dense checkpoints read as metadata, and the family tables."""
