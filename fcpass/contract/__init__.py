"""The contract every layer shares: errors, the cache plan and its I/O names, input roles, ONNX I/O, and the
artefact formats (the segments manifest, the engines index, the token options). It imports only onnx and
numpy, so the compiler and the runtimes can both rest on it without importing each other."""
