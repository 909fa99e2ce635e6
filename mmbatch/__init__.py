"""mmbatch: batch multimodal feature extraction and fusion training on Ray."""
__version__ = "0.1.0"
