"""ONNX export and the torch-free numpy + onnxruntime sampler (ort_sample.py)."""
