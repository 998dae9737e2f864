"""Model backends: a checkpoint and its tokenizer loaded (PyTorch), or exported and run by ONNX
Runtime or OpenVINO. They import only the shared ground: no stage, engine or quality tool."""
