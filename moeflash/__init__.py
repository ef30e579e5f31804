"""moeflash: run DeepSeek-V4-class sparse mixture-of-experts models on the hardware you have.

A token reads only the experts it routes to, so moeflash makes every cost it pays (bytes read, FLOPs,
memory held, dollars) follow the activated parameters rather than the total. The model code is an exact,
readable implementation of the DeepSeek-V4 architecture in plain PyTorch; it loads official (FP8 / FP4)
and Hugging Face checkpoints and is checked against the transformers reference implementation.
"""

__version__ = "0.1.0"
