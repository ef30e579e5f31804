"""Quality, speed and cost of models on a user's own text and tasks (`moeflash compare`): bits per byte,
task accuracy, measured tokens/s and memory, dollars per million tokens, and what a MoE's router does
with the text."""
