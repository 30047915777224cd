"""The model layer: presets, GGUF conversion, vocabulary growth and Hugging Face export."""
